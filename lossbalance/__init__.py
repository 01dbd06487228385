"""lossbalance: balance the tasks of a multi-task Keras model.

    model = lossbalance.BalancedModel(inputs=..., outputs={"cls": ..., "reg": ...})
    model.compile(optimizer="adam", loss={"cls": "sparse_categorical_crossentropy",
                  "reg": "mse"}, strategy="pcgrad")
"""

from lossbalance import solvers, strategies
from lossbalance.aggregation import aggregate, aggregate_with_weights, task_weights
from lossbalance.model import BalancedModel, FunctionalBalancedModel
from lossbalance.representation import Representation

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
