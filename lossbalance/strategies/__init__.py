"""Balancing strategies, chosen by name: `get`, `available`, `register`.

Families (see `base`): `LossWeighting` (weights from the losses, one backward pass),
`GramianWeighting` (weights from the K x K Gramian of task gradients) and
`JacobianAggregator` (a direction from the full Jacobian).
"""

from lossbalance.strategies.base import (
    GramianWeighting,
    JacobianAggregator,
    LossWeighting,
    Strategy,
)
from lossbalance.strategies.registry import aliases, available, get, register

# Importing the modules registers their strategies.
from lossbalance.strategies.dwa import DynamicWeightAverage  # noqa: E402
from lossbalance.strategies.famo import FAMO  # noqa: E402
from lossbalance.strategies.fixed import FixedWeights  # noqa: E402
from lossbalance.strategies.geometric import GeometricLossStrategy, ScaleInvariant  # noqa: E402
from lossbalance.strategies.gradnorm import GradNorm  # noqa: E402
from lossbalance.strategies.imtl_l import IMTLL  # noqa: E402
from lossbalance.strategies.pcgrad import PCGrad  # noqa: E402
from lossbalance.strategies.rlw import RandomLossWeighting  # noqa: E402
from lossbalance.strategies.scalarisations import COSMOS, PBI  # noqa: E402
from lossbalance.strategies.stch import SmoothTchebycheff  # noqa: E402
from lossbalance.strategies.uncertainty import UncertaintyWeighting  # noqa: E402
from lossbalance.strategies.uw_so import SoftOptimalUncertaintyWeighting  # noqa: E402
from lossbalance.strategies.aligned_mtl import AlignedMTL  # noqa: E402
from lossbalance.strategies.cagrad import CAGrad  # noqa: E402
from lossbalance.strategies.conflict_free import ConFIG  # noqa: E402
from lossbalance.strategies.constant import Constant  # noqa: E402
from lossbalance.strategies.crmogm import CRMOGM  # noqa: E402
from lossbalance.strategies.db_mtl import DBMTL  # noqa: E402
from lossbalance.strategies.double_sampling import MoDo, SDMGrad  # noqa: E402
from lossbalance.strategies.dual_cone import DualProj, UPGrad  # noqa: E402
from lossbalance.strategies.excess_mtl import ExcessMTL  # noqa: E402
from lossbalance.strategies.fairgrad import FairGrad  # noqa: E402
from lossbalance.strategies.graddrop import GradDrop  # noqa: E402
from lossbalance.strategies.gradvac import GradVac  # noqa: E402
from lossbalance.strategies.imtl import IMTL, IMTLG  # noqa: E402
from lossbalance.strategies.mgda import MGDA  # noqa: E402
from lossbalance.strategies.moco import MoCo  # noqa: E402
from lossbalance.strategies.nash_mtl import NashMTL  # noqa: E402
from lossbalance.strategies.output_balancer import OutputBalancer  # noqa: E402
from lossbalance.strategies.parameter_state import ParameterStateAggregator  # noqa: E402
from lossbalance.strategies.pcd import PriorityConstrainedDescent  # noqa: E402
from lossbalance.strategies.reference import Mean, RandomWeights, Sum  # noqa: E402
from lossbalance.strategies.robust import Krum, TrimmedMean  # noqa: E402

__all__ = [
    "AlignedMTL",
    "CAGrad",
    "COSMOS",
    "CRMOGM",
    "ConFIG",
    "Constant",
    "DBMTL",
    "DualProj",
    "ExcessMTL",
    "FairGrad",
    "GradDrop",
    "GradVac",
    "IMTL",
    "IMTLG",
    "Krum",
    "MGDA",
    "Mean",
    "MoCo",
    "MoDo",
    "NashMTL",
    "OutputBalancer",
    "PBI",
    "ParameterStateAggregator",
    "PriorityConstrainedDescent",
    "RandomWeights",
    "Sum",
    "TrimmedMean",
    "UPGrad",
    "DynamicWeightAverage",
    "FAMO",
    "FixedWeights",
    "GeometricLossStrategy",
    "GradNorm",
    "GramianWeighting",
    "IMTLL",
    "JacobianAggregator",
    "LossWeighting",
    "PCGrad",
    "RandomLossWeighting",
    "SDMGrad",
    "ScaleInvariant",
    "SmoothTchebycheff",
    "SoftOptimalUncertaintyWeighting",
    "Strategy",
    "UncertaintyWeighting",
    "aliases",
    "available",
    "get",
    "register",
]
