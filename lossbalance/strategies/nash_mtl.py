"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., 2022)."""

import tensorflow as tf

from lossbalance import solvers
from lossbalance.strategies.arguments import check_number
from lossbalance.strategies.base import GramianWeighting
from lossbalance.strategies.registry import register


@register("nash_mtl", aliases=("nashmtl", "nash"))
class NashMTL(GramianWeighting):
    """The Nash bargaining solution: weights a > 0 with G a = 1 / a.

    Formula: the update J^T a maximises sum_k log(g_k . d) over the ball |d| <= eps; its
    weights solve (G a)_k = 1 / a_k for every task, i.e. each task's share g_k . J^T a
    equals 1 / a_k. This is the stationarity condition of the strictly convex
    (1/2) a^T G a - sum_k log a_k, solved here exactly in-graph by damped Newton
    (`lossbalance.solvers.power_barrier_solve` with alpha = 1) on the cosines: with
    G = D C D (D the gradient norms), a = D^-1 b where C b = 1/b. So every task's share of
    the update is exact whatever the tasks' scales, and the update's direction J^T a =
    sum_k b_k g_k / |g_k| does not depend on them (`scale_invariant`): a task whose
    gradient is 1e4 times smaller gets a 1e4 times larger weight. A task with a zero
    gradient gets weight 0 (the equation has no solution for it).

    Conventions, following the authors' code: the Gramian is divided by its Frobenius norm
    n before solving and the weights used as found, so a = sqrt(n) a*, a* the exact
    solution for G; then the shared update is clipped to norm `max_norm` (default 1.0; 0
    turns clipping off), as the authors clip the shared parameters' gradient. Weights are
    recomputed every `update_weights_every` steps (default 1) and reused in between; the
    cache and the step counter are variables, saved with the model.

    Where implementations differ: the authors solve the condition approximately with a
    sequence of convex programs (cvxpy/ECOS, `optim_niter=20` iterations), which often ends
    visibly away from G a = 1/a; this solver reaches a residual near machine precision. The
    authors' step rescaling to a fixed update norm then makes the two agree in direction
    whenever theirs converges.

    Args:
        update_weights_every: recompute the weights every this many steps (>= 1).
        max_norm: clip the shared update to this norm; 0 disables clipping.

    Reference: A. Navon, A. Shamsian, I. Achituve, H. Maron, K. Kawaguchi, G. Chechik,
    E. Fetaya, "Multi-Task Learning as a Bargaining Game", ICML 2022.
    """

    non_conflicting = True  # (G a)_k = 1 / a_k > 0
    xla_max_tasks = None  # Newton's loop of small steps: XLA wins at every K
    scale_invariant = True

    def __init__(self, update_weights_every=1, max_norm=1.0, **kwargs):
        super().__init__(**kwargs)
        self.update_weights_every = check_number(
            "update_weights_every", update_weights_every, minimum=1, integer=True)
        self.max_norm = check_number("max_norm", max_norm, minimum=0.0)

    def build_state(self, num_tasks):
        self.step = self.add_state("step", dtype="int64")
        self.cached_weights = self.add_state("cached_weights", (num_tasks,), "ones")

    def _solve(self, gramian):
        # G a = 1/a with G = D C D is C b = 1/b for b = D a: solved on the cosines, so
        # the answer is as exact whatever the tasks' scales.
        cosines, norms = solvers.cosine_gramian(gramian)
        b = tf.cast(solvers.power_barrier_solve(cosines, alpha=1.0), tf.float64)
        g = tf.cast(gramian, tf.float64)
        frobenius = tf.norm(solvers.finite_or_zero(g))
        return solvers.divide_by_norms(b, norms) * tf.sqrt(frobenius)

    def gramian_weights(self, gramian, losses):
        solve = self._solve
        if self.compiles_solver():  # the pure solve; the cache is written outside it
            solve = self.__dict__.setdefault("_compiled_solve", tf.function(
                self._solve, jit_compile=True, autograph=False))
        step = self.read(self.step)
        refresh = tf.equal(step % self.update_weights_every, 0)
        weights = tf.cond(refresh, lambda: solve(gramian),
                          lambda: tf.cast(self.read(self.cached_weights), tf.float64))
        self.write(self.cached_weights, weights)
        self.write(self.step, step + 1)
        if self.max_norm > 0:
            g = tf.cast(gramian, tf.float64)
            norm = tf.sqrt(tf.maximum(tf.tensordot(weights, tf.linalg.matvec(g, weights), 1),
                                      0.0))
            factor = tf.where(norm > self.max_norm,
                              self.max_norm / tf.where(norm > 0, norm, 1.0), 1.0)
            weights = weights * tf.where(tf.math.is_finite(factor), factor, 0.0)
        return tf.cast(weights, gramian.dtype)

    def get_config(self):
        return {**super().get_config(), "update_weights_every": self.update_weights_every,
                "max_norm": self.max_norm}
