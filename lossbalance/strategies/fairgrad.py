"""FairGrad: fair resource allocation among tasks (Ban & Ji, 2024)."""

import tensorflow as tf

from lossbalance import solvers
from lossbalance.strategies.arguments import check_number
from lossbalance.strategies.base import GramianWeighting
from lossbalance.strategies.registry import register


@register("fairgrad")
class FairGrad(GramianWeighting):
    """Alpha-fair allocation of progress between tasks: weights w > 0 with G w = w^(-1/alpha).

    Formula: the update d = J^T w maximises sum_k u_alpha(g_k . d) with the alpha-fair
    utility u_alpha(x) = x^(1-alpha) / (1 - alpha) (log for alpha = 1) on a ball; the
    optimality condition is (G w)_k = w_k^(-1/alpha). alpha = 1 is proportional fairness
    (Nash-MTL's condition, without its normalisation and clipping); alpha -> infinity
    approaches max-min fairness. The condition is the stationarity condition of the
    strictly convex (1/2) w^T G w - sum_k h(w_k), h' = w^(-1/alpha), solved in-graph by
    damped Newton to machine precision (`lossbalance.solvers.power_barrier_solve`), on the
    cosines C (G = D C D, D the gradient norms): x = D w solves
    (C x)_k = d_k^(1/alpha - 1) x_k^(-1/alpha), whose Newton systems do not degrade with
    the tasks' scale ratio. For alpha = 1 the update's direction does not depend on the
    tasks' scales (`scale_invariant`); for other alpha it does, by the method's
    definition. A task with a zero gradient gets weight 0.

    Defaults: `alpha=1.0` (LibMTL's default; the paper tunes alpha per benchmark, e.g. 2
    on NYUv2). The authors call scipy's `least_squares` from 1/K on the host; this solver
    is exact where that one stops at its tolerance. No rescaling of the update is applied,
    as in the authors' code.

    Args:
        alpha: fairness parameter, > 0.

    Reference: H. Ban, K. Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024.
    """

    non_conflicting = True  # (G w)_k = w_k^(-1/alpha) > 0
    xla_max_tasks = None  # Newton's loop of small steps: XLA wins at every K

    def __init__(self, alpha=1.0, **kwargs):
        super().__init__(**kwargs)
        self.alpha = check_number("alpha", alpha, minimum=0.0, strict=True)

    @property
    def scale_invariant(self):
        return self.alpha == 1.0

    def gramian_weights(self, gramian, losses):
        # G w = w^(-1/alpha) with G = D C D is C x = d^(1/alpha - 1) x^(-1/alpha) for
        # x = D w (each equation divided by d_k): solved on the cosines.
        cosines, norms = solvers.cosine_gramian(gramian)
        nonzero = norms > 0
        coefficients = tf.where(
            nonzero, tf.pow(tf.where(nonzero, norms, 1.0), 1.0 / self.alpha - 1.0), 1.0)
        x = solvers.power_barrier_solve(cosines, alpha=self.alpha, coefficients=coefficients)
        return tf.cast(solvers.divide_by_norms(tf.cast(x, tf.float64), norms), gramian.dtype)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha}
