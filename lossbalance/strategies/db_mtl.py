"""DB-MTL: dual-balancing multi-task learning (Lin et al., 2023)."""

import tensorflow as tf

from lossbalance import solvers
from lossbalance.strategies.arguments import check_number
from lossbalance.strategies.parameter_state import ParameterStateAggregator
from lossbalance.strategies.registry import register


@register("db_mtl", aliases=("dbmtl",))
class DBMTL(ParameterStateAggregator):
    """Balance loss scales with a log transform and gradient scales by the largest norm.

    Formula: loss-scale balancing trains on log(L_k + eps) (`transform_losses`), so each
    task's gradient is g_k = grad L_k / (L_k + eps). Gradient-magnitude balancing keeps a
    moving average of each task's gradient and rescales all of them to the largest norm:
        m_k <- g_k + beta_t (m_k - g_k),   beta_t = beta / t^beta_sigma  (m_k starts at 0),
        update = sum_k (max_j |m_j| / |m_k|) m_k.

    Losses must be non-negative (a negative one would be clamped to 0, and its task get no
    gradient): `fit` stops with an error naming the task when a task's logged mean loss is
    negative (`Strategy.check_losses`).

    Defaults, the authors' code (LibMTL): beta=0.9, beta_sigma=0.5, eps=1e-8. With beta=0
    no moving average is kept (m_k = g_k) and the method needs no per-parameter state.
    The logged `<task>_loss` stays the raw loss; the objective logged as `loss` is the sum
    of weighted log losses. The moving averages M (K x P) are sized by the shared parameter
    count, so they are created by `build_parameter_state(P)`: by `BalancedModel` before
    its first step, or on first use from the Jacobian's width, and rebuilt from the
    config (`num_parameters`) when a saved model loads.

    Args:
        beta: moving-average rate, in [0, 1).
        beta_sigma: its decay exponent (>= 0).
        eps: added to the loss inside the log (> 0).

    Reference: B. Lin, W. Jiang, F. Ye, Y. Zhang, P. Chen, Y.-C. Chen, S. Liu, J. T. Kwok,
    "Dual-Balancing for Multi-Task Learning", arXiv:2308.12029, 2023.
    """

    loss_floor = 0.0
    scale_invariant = True  # log losses, and every moving average scaled to the largest

    def __init__(self, beta=0.9, beta_sigma=0.5, eps=1e-8, **kwargs):
        super().__init__(**kwargs)
        self.beta = check_number("beta", beta, minimum=0.0)
        if self.beta >= 1.0:
            raise ValueError(f"`beta` must be < 1; got {beta!r}.")
        self.beta_sigma = check_number("beta_sigma", beta_sigma, minimum=0.0)
        self.eps = check_number("eps", eps, minimum=0.0, strict=True)

    @property
    def needs_parameter_state(self):
        return self.beta > 0

    def build_state(self, num_tasks):
        self.step = self.add_state("step")

    def create_parameter_state(self, num_tasks, num_parameters):
        self.moving_gradients = self.add_state("moving_gradients", (num_tasks, num_parameters))

    def transform_losses(self, losses):
        return tf.math.log(tf.maximum(losses, 0.0) + self.eps)

    def aggregate(self, jacobian, losses):
        self.check_parameter_state(jacobian)
        j = tf.convert_to_tensor(jacobian)
        dtype = j.dtype
        j = solvers.finite_or_zero(j)
        step = self.read(self.step) + 1.0
        self.write(self.step, step)
        if self.needs_parameter_state:
            beta = self.beta / tf.cast(step, dtype) ** self.beta_sigma
            m = tf.cast(self.read(self.moving_gradients), dtype)
            m = j + beta * (m - j)
            self.write(self.moving_gradients, m)
        else:
            m = j
        # The weights span the tasks' scale ratio: norms and J^T w in float64, so that
        # the sum of unit-scaled rows is exact (as BalancedModel's combination is).
        m64 = tf.cast(m, tf.float64)
        norms = tf.norm(m64, axis=1)
        weights = tf.math.divide_no_nan(tf.reduce_max(norms), norms)
        direction = tf.linalg.matvec(m64, weights, transpose_a=True)
        return tf.cast(direction, dtype), tf.cast(weights, dtype)

    def get_config(self):
        return {**super().get_config(), "beta": self.beta, "beta_sigma": self.beta_sigma,
                "eps": self.eps}
