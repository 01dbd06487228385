"""lossbalance: balance the tasks of a multi-task Keras model.

    model = lossbalance.BalancedModel(inputs=..., outputs={"cls": ..., "reg": ...})
    model.compile(optimizer="adam", loss={"cls": "sparse_categorical_crossentropy",
                  "reg": "mse"}, strategy="pcgrad")
"""

from lossbalance import compat

compat.check_versions()  # before anything else fails mid-training on an old Keras

from lossbalance import solvers, strategies  # noqa: E402
from lossbalance.aggregation import aggregate, aggregate_with_weights, task_weights  # noqa: E402
from lossbalance.model import BalancedModel, FunctionalBalancedModel  # noqa: E402
from lossbalance.representation import Representation  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BalancedModel",
    "FunctionalBalancedModel",
    "Representation",
    "aggregate",
    "aggregate_with_weights",
    "solvers",
    "strategies",
    "task_weights",
    "__version__",
]
