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
from lossbalance.strategies.fixed import FixedWeights  # noqa: E402
from lossbalance.strategies.gradnorm import GradNorm  # noqa: E402
from lossbalance.strategies.pcgrad import PCGrad  # noqa: E402
from lossbalance.strategies.uncertainty import UncertaintyWeighting  # noqa: E402

__all__ = [
    "FixedWeights",
    "GradNorm",
    "GramianWeighting",
    "JacobianAggregator",
    "LossWeighting",
    "PCGrad",
    "Strategy",
    "UncertaintyWeighting",
    "aliases",
    "available",
    "get",
    "register",
]
