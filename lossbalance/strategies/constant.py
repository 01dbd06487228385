"""Constant weights on the task gradients: TorchJD's `Constant` aggregator."""

from collections.abc import Mapping

import tensorflow as tf

from lossbalance.strategies.arguments import check_number, resolve_per_task
from lossbalance.strategies.base import GramianWeighting
from lossbalance.strategies.registry import register


def _check_weight(name, value):
    return check_number(name, value)


@register("constant")
class Constant(GramianWeighting):
    """A fixed linear combination of the task gradients: update = J^T w, w given.

    Formula: w is the user's weight vector, the same at every step; the update is
    sum_k w_k g_k. It is the gradient-level form of `fixed` (which minimises sum_k w_k L_k
    with one backward pass, the same update at plain Keras' cost), and `sum` and `mean`
    are its special cases w = 1 and w = 1/K. Use it where the per-task gradients are
    needed anyway: the low-level API (`lossbalance.aggregate`), a comparison against
    TorchJD's `Constant`, or as the base of a wrapper.

    Args:
        weights: one finite weight per task, as a list in task order or a dict by task
            name (tasks missing from the dict get 1, as in `fixed`). Default: all 1 (the
            plain sum). The length and names are checked against the model's tasks at
            `compile`.

    Where implementations differ: TorchJD's `Constant` takes a weight tensor with no
    default and accepts any real weights; so does this one (a negative weight ascends that
    task's loss: `fixed` refuses it), with all 1 as the default so that the strategy has a
    name-only form. Not non-conflicting, and not invariant to the tasks' scales.

    Reference: TorchJD's `torchjd.aggregation.Constant` (Quinton & Rey, "Jacobian Descent
    for Multi-Objective Optimization", 2024); linear scalarisation.
    """

    def __init__(self, weights=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(weights, Mapping):
            self.weights_spec = {task: _check_weight(f"weights[{task!r}]", value)
                                 for task, value in weights.items()}
        elif weights is not None:
            if isinstance(weights, str) or not hasattr(weights, "__len__"):
                raise TypeError(
                    "`weights` must be a list of numbers in task order or a dict by task "
                    f"name; got {weights!r}.")
            self.weights_spec = [_check_weight(f"weights[{i}]", value)
                                 for i, value in enumerate(weights)]
        else:
            self.weights_spec = None

    def bind(self, task_names):
        if self._task_names is None:  # lengths and names checked before binding
            self.__dict__["_constant_weights"] = tuple(resolve_per_task(
                "weights", self.weights_spec, list(task_names), default=1.0,
                validate=_check_weight))
        super().bind(task_names)

    def gramian_weights(self, gramian, losses):
        return tf.constant(self._constant_weights, dtype=gramian.dtype)

    def get_config(self):
        spec = self.weights_spec
        if spec is not None:  # Keras wraps containers held by layers; store plain ones
            spec = dict(spec) if isinstance(spec, Mapping) else list(spec)
        return {**super().get_config(), "weights": spec}
