"""Fixed task weights: what stock Keras does with `loss_weights`."""

from collections.abc import Mapping

import tensorflow as tf

from lossbalance.strategies.arguments import check_number, resolve_per_task
from lossbalance.strategies.base import LossWeighting
from lossbalance.strategies.registry import register


def _check_weight(name, value):
    return check_number(name, value, minimum=0.0)


@register("fixed", aliases=("linear", "static", "ls"))
class FixedWeights(LossWeighting):
    """Linear scalarisation with fixed weights.

    Formula: minimise sum_k w_k L_k, one gradient of the weighted sum. This is exactly what
    `keras.Model.compile(loss=..., loss_weights=w)` does: the gradient of the weighted sum is
    the weighted sum of the per-task gradients, so every head's gradient reaches the shared
    trunk added up with the fixed weights w. The test suite checks that a `BalancedModel`
    with this strategy and a `keras.Model` with `loss_weights` reach the same weights.

    Args:
        weights: one non-negative weight per task, as a list in task order or a dict by
            task name (tasks missing from the dict get 1). Default: all 1 (the plain sum).

    Multiplies with `compile(loss_weights=...)` if both are given.

    Reference: the "equal weighting" / linear scalarisation baseline; Kurin et al., "In
    Defense of the Unitary Scalarization for Deep Multi-Task Learning", NeurIPS 2022, show
    that a tuned fixed weighting is a strong baseline.
    """

    allows_zero_loss_weights = True

    def __init__(self, weights=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(weights, Mapping):
            for task, value in weights.items():
                _check_weight(f"weights[{task!r}]", value)
            self.weights_spec = dict(weights)
        elif weights is not None:
            if isinstance(weights, str) or not hasattr(weights, "__len__"):
                raise TypeError(
                    "`weights` must be a list of numbers in task order or a dict by task "
                    f"name; got {weights!r}."
                )
            self.weights_spec = [
                _check_weight(f"weights[{i}]", value) for i, value in enumerate(weights)
            ]
        else:
            self.weights_spec = None

    def build_state(self, num_tasks):
        self._fixed_weights = tf.constant(
            resolve_per_task("weights", self.weights_spec, self.task_names, default=1.0,
                             validate=_check_weight),
            dtype=tf.float32,
        )

    def loss_weights(self, losses):
        return tf.cast(self._fixed_weights, losses.dtype)

    def get_config(self):
        spec = self.weights_spec
        if spec is not None:  # Keras wraps containers held by layers; store plain ones
            spec = dict(spec) if isinstance(spec, Mapping) else list(spec)
        return {**super().get_config(), "weights": spec}
