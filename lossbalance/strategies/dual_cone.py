"""UPGrad and DualProj: projections onto the dual cone of the task gradients
(Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024)."""

import tensorflow as tf

from lossbalance import solvers
from lossbalance.strategies.base import GramianWeighting, check_choice, check_number
from lossbalance.strategies.registry import register

PREFERENCES = ("mean", "sum")


def _prepared_gramian(gramian, norm_eps, reg_eps):
    """TorchJD's conditioning: G / trace(G) (zero if the trace is under norm_eps), + reg_eps I."""
    g = tf.cast(gramian, tf.float64)
    g = tf.where(tf.math.is_finite(g), g, tf.zeros_like(g))
    g = 0.5 * (g + tf.transpose(g))
    trace = tf.linalg.trace(g)
    ok = trace >= norm_eps
    g = tf.where(ok, g / tf.where(ok, trace, 1.0), tf.zeros_like(g))
    return g + reg_eps * tf.eye(tf.shape(g)[0], dtype=tf.float64)


class _DualConeProjection(GramianWeighting):
    def __init__(self, preference="mean", norm_eps=1e-4, reg_eps=1e-4, max_iterations=500,
                 **kwargs):
        super().__init__(**kwargs)
        self.preference = check_choice("preference", preference, PREFERENCES)
        self.norm_eps = check_number("norm_eps", norm_eps, minimum=0.0)
        self.reg_eps = check_number("reg_eps", reg_eps, minimum=0.0)
        self.max_iterations = check_number("max_iterations", max_iterations, minimum=1,
                                           integer=True)

    def _preference(self):
        k = self.num_tasks
        return tf.fill([k], tf.constant(1.0 / k if self.preference == "mean" else 1.0,
                                        tf.float64))

    def get_config(self):
        return {**super().get_config(), "preference": self.preference,
                "norm_eps": self.norm_eps, "reg_eps": self.reg_eps,
                "max_iterations": self.max_iterations}


@register("upgrad")
class UPGrad(_DualConeProjection):
    """Unconflicting projection of gradients: project each task's gradient onto the dual
    cone of all gradients, then average.

    Formula: the dual cone is C = {x : J x >= 0} (directions that conflict with no task).
    The projection of J^T u onto C is J^T w with w = argmin_{v >= u} v^T G v (its dual), so
        UPGrad = (1/K) sum_i pi_C(g_i) = J^T (1/K) sum_i w^(i),  w^(i) = argmin_{v >= e_i} v^T G v.
    The update conflicts with no task, and is linear under positive scaling of each task's
    gradient (scaling g_i by a > 0 scales its own projection by a).

    Defaults and conventions, those of the authors' library TorchJD: the mean of the
    projections (`preference="mean"`; "sum" multiplies by K); the Gramian is divided by
    its trace (when the trace is at least `norm_eps=1e-4`, else treated as zero) and
    regularised by `reg_eps=1e-4` times the identity, which keeps the problem strictly
    convex but makes the update non-conflicting only up to a term of order
    reg_eps * lambda_max / lambda_min of the Gramian (measured cosines down to -0.14 on
    ill-conditioned 3 x 6 Jacobians); `reg_eps=0` gives the exact projection (the tests
    check non-conflict there) and is the better choice when gradient scales differ a lot.
    The weights are sums of w^(i) >= e_i / K, so every weight is at least 1/K.

    Solver: the K box-constrained QPs are solved together in-graph by an exact primal-dual
    active-set method, with accelerated projected gradient as a fallback should its answer
    fail the optimality check (`lossbalance.solvers.box_qp`); TorchJD calls quadprog on
    the host.

    Args:
        preference: "mean" (default) or "sum".
        norm_eps, reg_eps: the trace threshold and ridge above.
        max_iterations: cap on projected-gradient steps (default 500).

    Reference: P. Quinton, V. Rey, "Jacobian Descent for Multi-Objective Optimization",
    arXiv:2406.16232, 2024.
    """

    def gramian_weights(self, gramian, losses):
        g = _prepared_gramian(gramian, self.norm_eps, self.reg_eps)
        lower = tf.linalg.diag(self._preference())
        w = solvers.box_qp(g, lower, max_iterations=self.max_iterations)
        return tf.cast(tf.reduce_sum(w, axis=0), gramian.dtype)


@register("dualproj", aliases=("dual_proj",))
class DualProj(_DualConeProjection):
    """Project the average gradient onto the dual cone of the task gradients.

    Formula: with C = {x : J x >= 0}, DualProj = pi_C(J^T p) = J^T w,
    w = argmin_{v >= p} v^T G v, for the preference p (1/K: the mean gradient). The update
    conflicts with no task and equals the mean gradient when that one conflicts with none.

    Defaults and conventions as `UPGrad` (TorchJD's): p = 1/K (`preference="mean"`), the
    Gramian divided by its trace and regularised with `reg_eps=1e-4` (non-conflicting up
    to that ridge; exact with `reg_eps=0`); solved in-graph by `lossbalance.solvers.box_qp`.

    Args:
        preference: "mean" (default) or "sum".
        norm_eps, reg_eps: the trace threshold and ridge.
        max_iterations: cap on projected-gradient steps (default 500).

    Reference: P. Quinton, V. Rey, "Jacobian Descent for Multi-Objective Optimization",
    arXiv:2406.16232, 2024.
    """

    def gramian_weights(self, gramian, losses):
        g = _prepared_gramian(gramian, self.norm_eps, self.reg_eps)
        lower = self._preference()[None, :]
        w = solvers.box_qp(g, lower, max_iterations=self.max_iterations)
        return tf.cast(w[0], gramian.dtype)
