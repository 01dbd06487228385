"""ExcessMTL: robust multi-task learning with excess risks (He et al., 2024)."""

import tensorflow as tf

from lossbalance import solvers
from lossbalance.strategies.arguments import check_number
from lossbalance.strategies.parameter_state import ParameterStateAggregator
from lossbalance.strategies.registry import register


@register("excess_mtl", aliases=("excessmtl",))
class ExcessMTL(ParameterStateAggregator):
    """Weight tasks up by their estimated excess risk (distance to their own optimum).

    Formula, at every step with task gradients g_k and AdaGrad-style accumulators
    a_k <- a_k + g_k^2 (element-wise, K x P):
        e_k = g_k^T diag(a_k + 1e-7)^(-1/2) g_k         (excess-risk estimate),
        from the second step on: w_k <- w_k exp(eta e_k / e_k^(1)),  w <- K w / sum w,
        update = J^T w,
    where e_k^(1) is the first step's estimate (normalising tasks of different scales).
    Tasks far from their optimum (large e_k) gain weight; noisy tasks whose loss cannot go
    lower do not, unlike loss-based robust weighting.

    Defaults: `robust_step_size=1e-2` (eta). Follows the authors' code as ported to LibMTL:
    the first step only records e^(1) and keeps w = 1; weights are renormalised to sum to K
    (a *sum* convention). The accumulators (K x P) are sized by the shared parameter count,
    so they are created by `build_parameter_state(P)`: by `BalancedModel` before its first
    step, or on first use from the Jacobian's width, and rebuilt from the config
    (`num_parameters`) when a saved model loads.

    Args:
        robust_step_size: eta, >= 0.

    Reference: Y. He, S. Zhou, G. Zhang, H. Yun, Y. Xu, B. Zeng, T. Chilimbi, H. Zhao,
    "Robust Multi-Task Learning with Excess Risks", ICML 2024.
    """

    def __init__(self, robust_step_size=1e-2, **kwargs):
        super().__init__(**kwargs)
        self.robust_step_size = check_number("robust_step_size", robust_step_size,
                                             minimum=0.0)

    def build_state(self, num_tasks):
        self.task_weights = self.add_state("task_weights", (num_tasks,), "ones")
        self.initial_risks = self.add_state("initial_risks", (num_tasks,))
        self.has_initial = self.add_state("has_initial")

    def create_parameter_state(self, num_tasks, num_parameters):
        self.squared_sums = self.add_state("squared_sums", (num_tasks, num_parameters))

    def aggregate(self, jacobian, losses):
        self.check_parameter_state(jacobian)
        j = tf.convert_to_tensor(jacobian)
        dtype = j.dtype
        j = solvers.finite_or_zero(j)
        sums = tf.cast(self.read(self.squared_sums), dtype) + j * j
        self.write(self.squared_sums, sums)
        risks = tf.reduce_sum(j * j / tf.sqrt(sums + 1e-7), axis=1)
        first = self.read(self.has_initial) <= 0
        initial = tf.where(first, tf.cast(risks, self.initial_risks.dtype),
                           self.read(self.initial_risks))
        self.write(self.initial_risks, initial)
        self.write(self.has_initial, 1.0)
        weights = tf.cast(self.read(self.task_weights), dtype)
        relative = tf.math.divide_no_nan(risks, tf.cast(initial, dtype))
        exponent = tf.minimum(self.robust_step_size * relative, 50.0)
        updated = weights * tf.exp(exponent)
        updated = self.num_tasks * updated / tf.reduce_sum(updated)
        weights = tf.where(first, weights, updated)
        weights = tf.where(tf.reduce_all(tf.math.is_finite(weights)), weights,
                           tf.ones_like(weights))
        self.write(self.task_weights, weights)
        return tf.linalg.matvec(j, weights, transpose_a=True), weights

    def get_config(self):
        return {**super().get_config(), "robust_step_size": self.robust_step_size}
