"""CAGrad: conflict-averse gradient descent (Liu et al., 2021)."""

import tensorflow as tf

from lossbalance import solvers
from lossbalance.strategies.arguments import check_number
from lossbalance.strategies.base import GramianWeighting
from lossbalance.strategies.registry import register


@register("cagrad")
class CAGrad(GramianWeighting):
    """Maximise the worst task's improvement within a ball around the average gradient.

    Formula, with g0 = (1/K) sum_k g_k and phi = c^2 |g0|^2:
        max_d min_k g_k . d   subject to |d - g0| <= sqrt(phi).
    Its dual is w* = argmin_{w in simplex} g_w . g0 + sqrt(phi) |g_w| with g_w = J^T w, and
        d = g0 + (sqrt(phi) / |g_w*|) g_w*,   update d / (1 + c^2) when `rescale`.
    In Gramian terms g_w . g0 = w^T G 1/K and |g_w|^2 = w^T G w, so the weights are
    1/K + (c |g0| / |g_w*|) w*, over (1 + c^2). c = 0 is the mean gradient; for c >= 1 the
    update does not conflict with any task (it approaches MGDA's min-norm direction).

    Defaults: `c=0.4` (the paper's value for its multi-task experiments) and `rescale=True`,
    the authors' code default (`rescale=1`: divide by 1 + c^2), which keeps the step
    comparable to the mean gradient's; the paper's algorithm has no rescale
    (`rescale=False`). The authors' code also offers 1/(1 + c) (`rescale=2`), not
    provided. CAGrad is built on the *mean* gradient (the authors' code and LibMTL), not the
    sum. When 0 is in the convex hull (|g_w*| = 0) the second term is dropped and the
    update is g0.

    Solver (`lossbalance.solvers.max_min_in_ball`): the dual on the simplex is solved
    in-graph by pairwise Frank-Wolfe with an exact line search, which finds the tasks
    that bind; the update then comes from the primal's optimality conditions on them,
    d = J^T (1/K + y) with g_k . d equal on the binding tasks and |J^T y| = c |g0|,
    solved exactly on the cosines of the gradients. The dual's formula divides by |g_w*|,
    which vanishes near Pareto stationarity (the authors add 1e-4 to it; float rounding
    then gives updates that conflict with a task, for c >= 1 too); the primal form keeps
    min_k g_k . d >= 0 for c >= 1 there, and at any scale ratio between tasks. The
    authors call scipy's SLSQP on the host.

    Args:
        c: radius of the ball, relative to |g0|; >= 0.
        rescale: divide the update by 1 + c^2 (default True).
        max_iterations: cap on solver steps (default 500).

    Reference: B. Liu, X. Liu, X. Jin, P. Stone, Q. Liu, "Conflict-Averse Gradient Descent
    for Multi-task Learning", NeurIPS 2021.
    """

    xla_max_tasks = None  # a loop of small steps: XLA wins at every K (see GramianWeighting)

    def __init__(self, c=0.4, rescale=True, max_iterations=500, **kwargs):
        super().__init__(**kwargs)
        self.c = check_number("c", c, minimum=0.0)
        if not isinstance(rescale, bool):
            raise TypeError(f"`rescale` must be True or False; got {rescale!r}.")
        self.rescale = rescale
        self.max_iterations = check_number("max_iterations", max_iterations, minimum=1,
                                           integer=True)

    @property
    def non_conflicting(self):
        return self.c >= 1.0  # d = 0 is then feasible, so min_k g_k . d >= 0 at the optimum

    def gramian_weights(self, gramian, losses):
        g = tf.cast(gramian, tf.float64)
        k = tf.shape(g)[0]
        mean = tf.ones([k], tf.float64) / tf.cast(k, tf.float64)
        g0_norm = tf.sqrt(tf.maximum(tf.tensordot(mean, tf.linalg.matvec(g, mean), 1), 0.0))
        weights = tf.cast(solvers.max_min_in_ball(g, mean, self.c * g0_norm,
                                                  max_iterations=self.max_iterations),
                          tf.float64)
        if self.rescale:
            weights = weights / (1.0 + self.c ** 2)
        return tf.cast(weights, gramian.dtype)

    def get_config(self):
        return {**super().get_config(), "c": self.c, "rescale": self.rescale,
                "max_iterations": self.max_iterations}
