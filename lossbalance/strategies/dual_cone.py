"""UPGrad and DualProj: projections onto the dual cone of the task gradients
(Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024)."""

import tensorflow as tf

from lossbalance import solvers
from lossbalance.strategies.arguments import check_choice, check_number
from lossbalance.strategies.base import GramianWeighting
from lossbalance.strategies.registry import register

PREFERENCES = ("mean", "sum")
REGULARIZATIONS = ("cosine", "trace")


class _DualConeProjection(GramianWeighting):
    def __init__(self, preference="mean", reg_eps=0.0, regularization="cosine",
                 norm_eps=0.0, max_iterations=500, **kwargs):
        super().__init__(**kwargs)
        self.preference = check_choice("preference", preference, PREFERENCES)
        self.reg_eps = check_number("reg_eps", reg_eps, minimum=0.0)
        self.regularization = check_choice("regularization", regularization,
                                           REGULARIZATIONS)
        self.norm_eps = check_number("norm_eps", norm_eps, minimum=0.0)
        self.max_iterations = check_number("max_iterations", max_iterations, minimum=1,
                                           integer=True)

    @property
    def non_conflicting(self):
        # a ridge > 0 leaves conflicts of order reg_eps (on the cosines) or of order
        # reg_eps * lambda_max / lambda_min (on the trace-normalised Gramian)
        return self.reg_eps == 0.0

    def _preference(self):
        k = self.num_tasks
        return tf.fill([k], tf.constant(1.0 / k if self.preference == "mean" else 1.0,
                                        tf.float64))

    def _projections(self, gramian, lower):
        """Rows w = argmin_{v >= u} v^T G v for the rows u of `lower` (M, K), float64."""
        if self.regularization == "trace":  # TorchJD's conditioning
            g = tf.cast(gramian, tf.float64)
            g = solvers.finite_or_zero(g)
            g = 0.5 * (g + tf.transpose(g))
            trace = tf.linalg.trace(g)
            ok = trace >= self.norm_eps
            g = tf.where(ok, g / tf.where(ok, trace, 1.0), tf.zeros_like(g))
            g = g + self.reg_eps * tf.eye(self.num_tasks, dtype=tf.float64)
            return solvers.box_qp(g, lower, max_iterations=self.max_iterations)
        w = solvers.dual_cone_weights(gramian, lower, ridge=self.reg_eps,
                                      max_iterations=self.max_iterations)
        return tf.where(tf.linalg.trace(tf.cast(gramian, tf.float64)) >= self.norm_eps, w,
                        lower)

    def get_config(self):
        return {**super().get_config(), "preference": self.preference,
                "reg_eps": self.reg_eps, "regularization": self.regularization,
                "norm_eps": self.norm_eps, "max_iterations": self.max_iterations}


@register("upgrad")
class UPGrad(_DualConeProjection):
    """Unconflicting projection of gradients: project each task's gradient onto the dual
    cone of all gradients, then average.

    Formula: the dual cone is C = {x : J x >= 0} (directions that conflict with no task).
    The projection of J^T u onto C is J^T w with w = argmin_{v >= u} v^T G v (its dual), so
        UPGrad = (1/K) sum_i pi_C(g_i) = J^T (1/K) sum_i w^(i),  w^(i) = argmin_{v >= e_i} v^T G v.
    The update conflicts with no task, and is linear under positive scaling of each task's
    gradient (scaling g_i by a > 0 scales its own projection by a).

    Defaults: the mean of the projections (`preference="mean"`, as TorchJD; "sum"
    multiplies by K) and the exact projections, with no ridge (`reg_eps=0`), so the update
    conflicts with no task at any scale. The problems are solved on the cosines C
    (G = D C D, D the gradient norms; x = D w solves min_{x >= D u} x^T C x), which are as
    well conditioned whatever the tasks' scales. A ridge `reg_eps` > 0 is added to C
    (`regularization="cosine"`), i.e. reg_eps |g_k|^2 to each task's own diagonal entry:
    relative to each task's norm, it leaves conflicts of order reg_eps at most.

    Where implementations differ: TorchJD divides G by its trace (treating a trace under
    `norm_eps=1e-4` as zero) and adds `reg_eps=1e-4` times the identity there; that is
    `regularization="trace", reg_eps=1e-4, norm_eps=1e-4`. With gradients on different
    scales that ridge swamps the small task (its diagonal entry in G / trace(G) is 1e-8 at
    a scale ratio of 1e4): the update then conflicts with it (cosines down to -0.14
    measured), and the threshold zeroes any Gramian of small gradients.
    The weights are sums of w^(i) >= e_i / K, so every weight is at least 1/K.

    Solver: the K box-constrained QPs are solved together in-graph by an exact primal-dual
    active-set method, with accelerated projected gradient as a fallback should its answer
    fail the optimality check (`lossbalance.solvers.box_qp`); TorchJD calls quadprog on
    the host.

    Args:
        preference: "mean" (default) or "sum".
        reg_eps: the ridge (default 0: the exact projection).
        regularization: "cosine" (default) or "trace" (TorchJD's): where the ridge goes.
        norm_eps: a Gramian whose trace is under it is treated as zero (default 0).
        max_iterations: cap on projected-gradient steps (default 500).

    Reference: P. Quinton, V. Rey, "Jacobian Descent for Multi-Objective Optimization",
    arXiv:2406.16232, 2024.
    """

    def gramian_weights(self, gramian, losses):
        w = self._projections(gramian, tf.linalg.diag(self._preference()))
        return tf.cast(tf.reduce_sum(w, axis=0), gramian.dtype)


@register("dualproj", aliases=("dual_proj",))
class DualProj(_DualConeProjection):
    """Project the average gradient onto the dual cone of the task gradients.

    Formula: with C = {x : J x >= 0}, DualProj = pi_C(J^T p) = J^T w,
    w = argmin_{v >= p} v^T G v, for the preference p (1/K: the mean gradient). The update
    conflicts with no task and equals the mean gradient when that one conflicts with none.

    Defaults and conventions as `UPGrad`: p = 1/K (`preference="mean"`), the exact
    projection (`reg_eps=0`) solved on the cosines in-graph by
    `lossbalance.solvers.box_qp`; TorchJD's conditioning is
    `regularization="trace", reg_eps=1e-4, norm_eps=1e-4` (see `UPGrad`).

    Args:
        preference: "mean" (default) or "sum".
        reg_eps, regularization, norm_eps: the ridge, where it goes, and the zero
            threshold (see `UPGrad`).
        max_iterations: cap on projected-gradient steps (default 500).

    Reference: P. Quinton, V. Rey, "Jacobian Descent for Multi-Objective Optimization",
    arXiv:2406.16232, 2024.
    """

    def gramian_weights(self, gramian, losses):
        w = self._projections(gramian, self._preference()[None, :])
        return tf.cast(w[0], gramian.dtype)
