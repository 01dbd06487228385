"""Scale-free scalarisations: the geometric mean of the losses (GLS) and the sum of their logs.

Both are invariant to rescaling any one task's loss (L_k -> c L_k): the sum of logs changes by
a constant, the geometric mean by a constant factor, so neither cares whether a task's loss is
measured in metres or millimetres. Their gradients are proportional:
    d/dtheta sum_k log L_k           = sum_k g_k / L_k
    d/dtheta (prod_k L_k)^(1/K)      = (L / K) sum_k g_k / L_k,    L = geometric mean,
where g_k is the gradient of L_k. Each is minimised with one backward pass of sum_k w_k L_k,
with w_k = dS/dL_k held constant (stop_gradient), which gives exactly these gradients.
"""

import tensorflow as tf

from lossbalance.strategies._loss_utils import global_losses, surrogate_offset
from lossbalance.strategies.arguments import check_number
from lossbalance.strategies.base import LossWeighting
from lossbalance.strategies.registry import register


class _LogScalarisation(LossWeighting):
    """A scalarisation S of the (clamped) losses, minimised through w_k = dS/dL_k.

    Subclasses implement `scalarise(positive_losses) -> (weights, value of S)`.
    """

    loss_floor = 0.0
    scale_invariant = True  # L_k -> c L_k changes S by a constant or a constant factor

    def __init__(self, epsilon=1e-20, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = check_number("epsilon", epsilon, minimum=0.0, strict=True)

    def scalarise(self, positive):
        raise NotImplementedError

    def weighting(self, losses):
        """w_k = dS/dL_k, and the offset that makes the logged objective S itself."""
        total = tf.cast(global_losses(losses), tf.float32)
        weights, value = self.scalarise(tf.maximum(total, self.epsilon))
        return (tf.stop_gradient(tf.cast(weights, losses.dtype)),
                tf.cast(surrogate_offset(value, weights, total), losses.dtype))

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@register("gls", aliases=("geometric_mean",))
class GeometricLossStrategy(_LogScalarisation):
    """Minimise the geometric mean of the task losses (GLS).

    Formula: L = (prod_k L_k)^(1/K), computed as exp(mean_k log L_k) (no overflow of the
    product). Its gradient is (L / K) sum_k g_k / L_k, so the strategy uses the weights
        w_k = stop_gradient(L / (K L_k)),
    and one backward pass of sum_k w_k L_k (whose value is exactly L). The weight of a task
    is inversely proportional to its loss. The logged `loss` is the geometric mean.

    Defaults: none to tune. Losses are clamped below at `epsilon=1e-20` before the logarithm
    (a loss of exactly 0 would otherwise give 0/0); losses must be non-negative (`fit`
    stops with an error when a task's logged mean loss is negative). The method
    is the sum of log losses (`"scale_invariant"`) with its gradient multiplied by L / K.

    Implementations differ only numerically: LibMTL takes the K-th root of the product of
    the losses, which underflows or overflows for many tasks; this one averages logs. The
    gradients are the same.

    Args:
        epsilon: lower clamp of the losses, > 0.

    Reference: S. Chennupati, G. Sistu, S. Yogamani, S. A. Rawashdeh, "MultiNet++:
    Multi-Stream Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning",
    CVPR Workshops 2019.
    """

    def scalarise(self, positive):
        value = tf.exp(tf.reduce_mean(tf.math.log(positive)))
        return value / (float(self.num_tasks) * positive), value


@register("scale_invariant", aliases=("si",))
class ScaleInvariant(_LogScalarisation):
    """Minimise the sum of the log task losses (scale-invariant linear scalarisation).

    Formula: S = sum_k log L_k, gradient sum_k g_k / L_k. The strategy uses the weights
        w_k = stop_gradient(1 / L_k)
    with one backward pass of sum_k w_k L_k, plus a constant so that the logged `loss` is S
    itself (it may be negative). The logged `<task>_weight` is 1 / L_k, the factor the
    task's gradient receives.

    Defaults: none to tune; losses are clamped below at `epsilon=1e-20` before the log, and
    must be non-negative (`fit` checks, as for GLS). Same direction as GLS (`"gls"`), which
    multiplies the gradient by the geometric mean over K: SI's step shrinks less as the
    losses fall.

    Implementations differ only numerically: some add a small constant inside the log
    (log(L + 1e-20)), which for positive float32 losses is the same as the clamp here.

    Args:
        epsilon: lower clamp of the losses, > 0.

    Reference: the "SI" baseline of A. Navon, A. Shamsian, I. Achituve, H. Maron,
    K. Kawaguchi, G. Chechik, E. Fetaya, "Multi-Task Learning as a Bargaining Game",
    ICML 2022; also used as a baseline by FAMO (Liu et al., NeurIPS 2023).
    """

    def scalarise(self, positive):
        return 1.0 / positive, tf.reduce_sum(tf.math.log(positive))
