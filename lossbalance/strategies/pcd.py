"""PCD: Priority-Constrained Descent (Varam & AlHajri, 2026): follow one primary task, with
every other task held to a guaranteed share of its own progress."""

import difflib

import tensorflow as tf

from lossbalance import solvers
from lossbalance.strategies.arguments import check_choice, check_number
from lossbalance.strategies.base import GramianWeighting
from lossbalance.strategies.registry import register

NORMALIZATIONS = ("ema", "none")


def _weights(gramian, scales, num_tasks, primary, tau, max_correction):
    """PCD's (K,) float64 weights from the Gramian and the tasks' scales s (pure).

    With G = D C D (D the gradient norms, C the cosines) and n_k = |g_k| / s_k the norms
    of the normalised gradients, G^ = S^-1 G S^-1 = N C N. The dual
    min_{mu >= 0} (1/2) mu^T G^_ss mu + mu^T (G^_sp - tau diag G^_ss), written in
    x_j = mu_j n_j (the length of secondary j's correction mu_j g~_j), is
        min_{x >= 0} (1/2) x^T C_ss x + x^T (C_sp n_p - tau n_s),
    the same problem on the cosines, whatever the tasks' scales; here with the bound
    x_j <= M (n_p + n_j). Then d = g~_p + sum_j x_j g_j / |g_j|: w_p = 1 / s_p and
    w_j = x_j / |g_j|.
    """
    cosines, norms = solvers.cosine_gramian(gramian)
    k = num_tasks
    others = [i for i in range(k) if i != primary]
    unit = solvers.divide_by_norms(norms, scales)  # n_k = |g~_k|; 0 for a zero task
    c_ss = tf.gather(tf.gather(cosines, others), others, axis=1)
    c_sp = tf.gather(cosines[:, primary], others)
    n_p, n_s = unit[primary], tf.gather(unit, others)
    # A ridge at the project's rank threshold (K eps32)^2 on the cosines: directions of
    # the secondaries that float32 gradients cannot resolve are not inverted.
    x = solvers.nonnegative_qp(c_ss, c_sp * n_p - tau * n_s,
                               upper=max_correction * (n_p + n_s),
                               ridge=(k * solvers.GRADIENT_EPS) ** 2)
    secondary = solvers.divide_by_norms(x, tf.gather(norms, others))
    own = solvers.divide_by_norms(tf.ones([1], tf.float64), scales[primary:primary + 1])
    return tf.concat([secondary[:primary], own, secondary[primary:]], 0)


# One compiled solver for every instance: XLA compiles it once per K, primary and
# hyper-parameters, not once per strategy.
_compiled_weights = tf.function(_weights, jit_compile=True, autograph=False)


@register("pcd", aliases=("priority_constrained_descent",))
class PriorityConstrainedDescent(GramianWeighting):
    """Priority-Constrained Descent: the update closest to the primary task's (normalised)
    gradient that makes every secondary task progress at a guaranteed rate.

    Formula, with scale-normalised task gradients g~_k = g_k / s_k, where s_k^2 is an
    exponential moving average of |g_k|^2 (so |g~_k| ~ 1 in steady state), and the primary
    task p:
        d* = argmin_d |d - g~_p|^2   s.t.   g~_j . d >= tau |g~_j|^2   for every j != p.
    Its KKT solution is d* = g~_p + sum_j mu_j g~_j with mu_j >= 0 (zero where the
    constraint is inactive), mu solving the dual, a non-negativity-constrained QP on the
    normalised Gramian G^ = S^-1 G S^-1:
        min_{mu >= 0} (1/2) mu^T G^_ss mu + mu^T (G^_sp - tau diag(G^_ss)).
    For two tasks, d* = g~_1 if g~_2 . g~_1 >= tau |g~_2|^2, else
    g~_1 + (tau - g~_2 . g~_1 / |g~_2|^2) g~_2. As a Gramian weighting the update is
    J^T w with w_p = 1 / s_p and w_j = mu_j / s_j. With tau = 0 the update is the primary's
    gradient projected onto the directions that conflict with no secondary; with tau = 1
    each secondary's loss must fall at least as fast, to first order, as under a step along
    its own normalised gradient. The primary itself gets no guarantee: its gradient may
    conflict with the update when the secondaries pull against it.

    Task scales: the normalisation makes the update independent of each objective's
    scale (multiplying a task's loss by c > 0 multiplies g_k and s_k by c), so
    `scale_invariant` is True with `normalization="ema"`; "none" uses the raw gradients
    (s_k = 1), whose update depends on the scales.

    Update scale: the update is in normalised units: |g~_p| ~ 1, so whatever the losses'
    scales, plain SGD moves the parameters by about the learning rate times a unit-norm
    direction (plus the corrections), not by the size of any task's raw gradient. Choose
    the learning rate for that (Adam, which rescales the step itself, hardly notices).

    Defaults and where the published description is silent: tau = 0.5, inside the range
    [0, 1] the project page gives. The page gives no EMA rate: beta = 0.9 here, with
    Adam-style bias correction, m_k <- beta m_k + (1 - beta) |g_k|^2 and
    s_k^2 = m_k / (1 - beta^t) at step t, so the first step normalises by the current
    norms exactly (beta = 0: every step does). A task whose gradient has been zero so far
    has s_k = 0: as the primary its weight is 0; as a secondary it has no constraint.

    Infeasible constraints, which the page does not treat: for tau > 0 the constraints can
    all hold if and only if no convex combination of the secondaries' gradients is zero;
    otherwise (two secondaries with opposite gradients, say: no direction improves both)
    the dual is unbounded. Feasibility does not depend on tau's size (a feasible d can be
    lengthened), so lowering tau to the largest feasible value would mean tau = 0. Here
    instead each secondary's correction is bounded:
        |mu_j g~_j| <= max_correction (|g~_p| + |g~_j|).
    That is the dual of the same problem with each constraint, divided by |g~_j|, made an
    exact penalty of that weight per unit of violation: identical to PCD wherever its
    corrections are below the bound (one secondary never needs more than
    |g~_p| + tau |g~_j|, so the bound acts only where several secondaries are nearly
    opposed), finite and continuous everywhere, and the update's norm stays below
    |g~_p| + max_correction sum_j (|g~_p| + |g~_j|).

    Solver: the dual, rescaled to the cosines (x_j = mu_j |g~_j| is the length of
    secondary j's correction; the problem then does not depend on the tasks' scales), is
    solved exactly in-graph by a primal-dual active-set method with a projected-gradient
    fallback (`lossbalance.solvers.nonnegative_qp`), in float64. A ridge of
    (K eps32)^2 on the secondaries' cosines, the project's rank threshold
    (`solvers.GRADIENT_EPS`), keeps directions that float32 gradients cannot resolve from
    being inverted.

    State: the moving averages m_k (float64) and the step count, saved with the model
    and written through `Strategy.write` (a skipped step changes neither); none with
    `normalization="none"`.

    Args:
        primary: the primary task: its name (as `compile` names the tasks; `aggregate`
            names them "task_0", "task_1", ...) or its position in the model's task
            order. Required; an unknown name fails at `compile`, listing the tasks.
        tau: the share of its own progress each secondary is guaranteed, in [0, 1]
            (default 0.5).
        beta: rate of the moving average of the squared gradient norms, in [0, 1)
            (default 0.9; not given by the paper).
        normalization: "ema" (default) or "none" (raw gradients, s_k = 1).
        max_correction: the bound on each secondary's correction, in units of
            |g~_p| + |g~_j| (> 0, default 10; see above).

    Reference: D. Varam, M. I. AlHajri, "Not All Objectives Are Born Equal:
    Priority-Constrained Descent for Hierarchical Multi-Objective Optimization",
    arXiv:2606.29521, 2026 (project page daravaram.github.io/PCD).
    """

    min_tasks = 2
    required_arguments = ("primary",)

    def __init__(self, primary=None, tau=0.5, beta=0.9, normalization="ema",
                 max_correction=10.0, **kwargs):
        super().__init__(**kwargs)
        if primary is None:
            raise TypeError(
                "PCD (Priority-Constrained Descent) needs `primary`: the task whose "
                "gradient the update follows; every other task is held to a constraint. "
                "Name it, e.g. lossbalance.strategies.get('pcd', primary='cls'), "
                "compile(strategy={'name': 'pcd', 'primary': 'cls'}), or "
                "'pcd:primary=cls' for the comparison runner.")
        if isinstance(primary, bool) or not isinstance(primary, (str, int)):
            raise TypeError(f"`primary` must be a task name (str) or a task's position "
                            f"(int); got {primary!r}.")
        self.primary = primary
        self.tau = check_number("tau", tau, minimum=0.0, maximum=1.0)
        self.beta = check_number("beta", beta, minimum=0.0)
        if self.beta >= 1.0:
            raise ValueError(f"`beta` must be < 1 (the moving average must move); got "
                             f"{beta!r}.")
        self.normalization = check_choice("normalization", normalization, NORMALIZATIONS)
        self.max_correction = check_number("max_correction", max_correction, minimum=0.0,
                                           strict=True)
        self._primary_index = None

    @property
    def scale_invariant(self):
        return self.normalization == "ema"

    def bind(self, task_names):
        if self._task_names is None:
            self._primary_index = self._resolve_primary(list(task_names))
        super().bind(task_names)

    def _resolve_primary(self, task_names):
        """The primary's position in `task_names`, or a ValueError naming the tasks."""
        if len(task_names) < self.min_tasks:
            raise ValueError(
                f"Strategy 'pcd' needs at least {self.min_tasks} tasks (a primary and "
                f"a secondary), but the model has {len(task_names)}: {task_names}. With "
                "one task, train it with a plain Keras loss (or the 'fixed' strategy).")
        primary = self.primary
        if isinstance(primary, int):
            if 0 <= primary < len(task_names):
                return primary
            raise ValueError(
                f"`primary`={primary} is not a task position: the model's tasks are "
                f"{task_names} (positions 0 to {len(task_names) - 1}); give a position in "
                "range or the task's name.")
        if primary in task_names:
            return task_names.index(primary)
        close = difflib.get_close_matches(primary, task_names, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"`primary`={primary!r} is not one of the model's tasks {task_names}.{hint} "
            "Name the task whose gradient PCD should follow.")

    def build_state(self, num_tasks):
        if self.normalization != "ema":
            return
        self.average = self.add_state("average", (num_tasks,), dtype="float64")
        self.step = self.add_state("step", dtype="int64")

    def scales(self, gramian):
        """The tasks' scales s (float64, (K,)): with "ema", the bias-corrected moving
        average of |g_k|^2, updated with this step's norms, square-rooted; ones with
        "none"."""
        g = solvers.finite_or_zero(tf.cast(gramian, tf.float64))
        if self.normalization == "none":
            return tf.ones([self.num_tasks], tf.float64)
        squared = tf.maximum(tf.linalg.diag_part(g), 0.0)
        step = self.read(self.step) + 1
        average = self.beta * self.read(self.average) + (1.0 - self.beta) * squared
        self.write(self.average, average)
        self.write(self.step, step)
        correction = 1.0 - tf.pow(tf.constant(self.beta, tf.float64),
                                  tf.cast(step, tf.float64))
        return tf.sqrt(average / correction)

    def gramian_weights(self, gramian, losses):
        g = tf.cast(gramian, tf.float64)
        scales = self.scales(g)
        solve = _compiled_weights if self.compiles_solver() else _weights
        weights = solve(g, scales, self.num_tasks, self._primary_index, self.tau,
                        self.max_correction)
        return tf.cast(weights, gramian.dtype)

    def get_config(self):
        return {**super().get_config(), "primary": self.primary, "tau": self.tau,
                "beta": self.beta, "normalization": self.normalization,
                "max_correction": self.max_correction}
