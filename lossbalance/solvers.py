"""Small in-graph numerical routines on K x K problems.

Every gradient-level strategy reduces to a problem on the K x K Gramian G = J J^T of the task
gradients (K tasks, rarely more than 40). Published implementations send these problems to
scipy, cvxpy or quadprog on the host at every step; here they are TensorFlow ops with bounded
loops (`tf.while_loop` with an iteration cap, or fixed unrolled counts), so they run inside a
compiled training step, under `jit_compile=True` and on any device.

Conventions shared by the routines:
* Inputs may be float32 or float64; the work is done in float64 and the result is cast back
  to the input's dtype (the problems are tiny, and Gramians of badly scaled gradients span
  many orders of magnitude).
* A Gramian is first normalised (`normalize_gramian`) where the answer allows it, so the
  tolerances below are relative.
* Degenerate inputs (a zero Gramian, zero rows, rank deficiency) give finite answers.

Routines:
    normalize_gramian          G / (trace / K), with the scale
    project_simplex            Euclidean projection onto the probability simplex (sort-based)
    min_norm_simplex           argmin_{w in simplex} w^T G w  (pairwise Frank-Wolfe + polish)
    box_qp                     argmin_{w >= u} w^T G w, batched over u (accelerated projected
                               gradient + primal-dual active-set polish)
    power_barrier_solve        w > 0 with G w = w^(-1/alpha) (damped Newton)
    simplex_norm_penalty_min   argmin_{w in simplex} b^T w + c sqrt(w^T G w) (CAGrad)
    psd_pinv                   pseudo-inverse of a symmetric PSD matrix by eigendecomposition
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

_F64 = tf.float64
#: Relative size below which a Gramian (its trace) is treated as zero.
TINY = 1e-300


def _as64(x):
    x = tf.convert_to_tensor(x)
    return tf.cast(x, _F64), x.dtype


def _eps(dtype) -> float:
    return float(np.finfo(tf.as_dtype(dtype).as_numpy_dtype).eps)


def normalize_gramian(gramian):
    """(G / s, s) with s = trace(G) / K, the mean squared gradient norm (float64).

    A zero (or non-finite) Gramian gives (zeros, 0). Entries that are not finite are
    treated as zero so that a single overflowed task cannot poison the others.
    """
    g, _ = _as64(gramian)
    g = tf.where(tf.math.is_finite(g), g, tf.zeros_like(g))
    g = 0.5 * (g + tf.transpose(g))
    k = tf.cast(tf.shape(g)[0], _F64)
    scale = tf.linalg.trace(g) / k
    ok = scale > TINY
    safe = tf.where(ok, scale, tf.ones_like(scale))
    normalized = tf.where(ok, g / safe, tf.zeros_like(g))
    return normalized, tf.where(ok, scale, tf.zeros_like(scale))


def project_simplex(v):
    """Euclidean projection of each row of `v` (..., K) onto {w >= 0, sum w = 1}.

    The sort-based algorithm (Held et al. 1974; Duchi et al. 2008): with u sorted in
    decreasing order, rho = max{j : u_j - (sum_{i<=j} u_i - 1) / j > 0} and
    w = max(v - theta, 0), theta = (sum_{i<=rho} u_i - 1) / rho.
    """
    v = tf.convert_to_tensor(v)
    k = tf.shape(v)[-1]
    u = tf.sort(v, axis=-1, direction="DESCENDING")
    css = tf.cumsum(u, axis=-1) - 1.0
    index = tf.cast(tf.range(1, k + 1), v.dtype)
    condition = u - css / index > 0
    rho = tf.reduce_sum(tf.cast(condition, tf.int32), axis=-1, keepdims=True)
    rho = tf.maximum(rho, 1)
    theta = tf.gather(css, rho - 1, batch_dims=len(v.shape) - 1) / tf.cast(rho, v.dtype)
    return tf.maximum(v - theta, 0.0)


def psd_pinv(matrix, rcond=None):
    """Pseudo-inverse of a symmetric PSD matrix, by eigendecomposition (float64 inside).

    Eigenvalues at most `rcond * max eigenvalue` are treated as zero; the default `rcond`
    is K times the machine epsilon of the input dtype (numpy's and Aligned-MTL's rule), so
    float32 Gramians do not amplify their rounding noise.
    """
    m, dtype = _as64(matrix)
    if rcond is None:
        rcond = _eps(dtype) * int(m.shape[0] or 1)
    m = 0.5 * (m + tf.transpose(m))
    values, vectors = tf.linalg.eigh(m)
    tol = rcond * tf.reduce_max(tf.abs(values))
    keep = values > tol
    inverse = tf.where(keep, 1.0 / tf.where(keep, values, tf.ones_like(values)),
                       tf.zeros_like(values))
    result = tf.matmul(vectors * inverse[None, :], vectors, transpose_b=True)
    return tf.cast(result, dtype)


# -- min-norm point of the convex hull (MGDA) ----------------------------------------------


def min_norm_simplex(gramian, max_iterations=1000, tolerance=1e-12, polish=True):
    """Weights w in the simplex minimising |J^T w|^2 = w^T G w: the min-norm point of the
    convex hull of the task gradients (MGDA, Sener & Koltun 2018).

    Solver: Frank-Wolfe in its pairwise form. At every step the vertex s with the smallest
    gradient (G w)_s gains weight from the support vertex a with the largest, along
    d = e_s - e_a, with the closed-form two-point line search
        gamma = clip(((G w)_a - (G w)_s) / (G_ss + G_aa - 2 G_sa), 0, w_a),
    which is Sener & Koltun's exact step between two points; the pairwise form converges
    linearly on the simplex where plain Frank-Wolfe is sublinear. The loop stops when the
    duality gap w^T G w - min_s (G w)_s falls under `tolerance` (relative to the normalised
    Gramian) or after `max_iterations`. A final polish solves the optimality conditions
    exactly on the support found, and keeps the result if it is feasible and no worse.

    Returns (K,) weights in the input dtype (uniform for a zero Gramian).
    """
    g, dtype = _as64(gramian)
    g, _ = normalize_gramian(g)
    k = tf.shape(g)[0]
    kf = tf.cast(k, _F64)
    w0 = tf.ones([k], _F64) / kf
    # Start from the best vertex if it beats the centre (as Sener & Koltun start from the
    # best pair); this keeps a dominant task exact.
    diag = tf.linalg.diag_part(g)
    best = tf.argmin(diag, output_type=tf.int32)
    centre_value = tf.tensordot(w0, tf.linalg.matvec(g, w0), 1)
    w0 = tf.where(tf.reduce_min(diag) < centre_value, tf.one_hot(best, k, dtype=_F64), w0)

    def gap_of(w, gw):
        return tf.tensordot(w, gw, 1) - tf.reduce_min(gw)

    def cond(i, w, gw):
        return (i < max_iterations) & (gap_of(w, gw) > tolerance)

    def body(i, w, gw):
        s = tf.argmin(gw, output_type=tf.int32)
        masked = tf.where(w > 0, gw, tf.fill([k], tf.constant(-np.inf, _F64)))
        a = tf.argmax(masked, output_type=tf.int32)
        # tf.gather, not g[s, a]: XLA would need dynamic slice indices as compile-time
        # constants and recompile the step for every new Gramian.
        step = tf.one_hot(s, k, dtype=_F64) - tf.one_hot(a, k, dtype=_F64)
        g_step = tf.linalg.matvec(g, step)  # G[:, s] - G[:, a]
        curvature = tf.tensordot(step, g_step, 1)
        slope = -tf.tensordot(step, gw, 1)
        w_a = tf.gather(w, a)
        gamma = tf.where(curvature > 0, slope / tf.where(curvature > 0, curvature, 1.0),
                         w_a)
        gamma = tf.clip_by_value(gamma, 0.0, w_a)
        w = tf.maximum(w + gamma * step, 0.0)
        gw = gw + gamma * g_step
        return i + 1, w, gw

    _, w, _ = tf.while_loop(cond, body, (tf.constant(0), w0, tf.linalg.matvec(g, w0)),
                            maximum_iterations=max_iterations)
    if polish:
        w = _polish_simplex(g, w)
    w = w / tf.maximum(tf.reduce_sum(w), TINY)
    return tf.cast(w, dtype)


def _polish_simplex(g, w):
    """Solve [G_SS 1; 1^T 0][w_S; -lambda] = [0; 1] on the support S of w; keep if better."""
    k = tf.shape(g)[0]
    support = w > 1e-12
    free = tf.cast(support, _F64)
    eye = tf.eye(k, dtype=_F64)
    m = g * free[:, None] * free[None, :] + eye * (1.0 - free)[None, :] + 1e-14 * eye
    top = tf.concat([m, -free[:, None]], axis=1)
    bottom = tf.concat([free[None, :], tf.zeros([1, 1], _F64)], axis=1)
    system = tf.concat([top, bottom], axis=0)
    rhs = tf.concat([tf.zeros([k], _F64), tf.ones([1], _F64)], axis=0)
    solution = tf.linalg.solve(system, rhs[:, None])[:k, 0]
    candidate = solution * free
    finite = tf.reduce_all(tf.math.is_finite(candidate))
    candidate = tf.where(finite, candidate, w)
    feasible = finite & tf.reduce_all(candidate >= -1e-12)
    candidate = tf.maximum(candidate, 0.0)
    candidate = candidate / tf.maximum(tf.reduce_sum(candidate), TINY)

    def value(x):
        return tf.tensordot(x, tf.linalg.matvec(g, x), 1)

    better = feasible & (value(candidate) <= value(w) * (1 + 1e-9) + 1e-300)
    return tf.where(better, candidate, w)


# -- box-constrained quadratic programs (UPGrad, DualProj) ----------------------------------


def box_qp(gramian, lower, max_iterations=500, active_set_iterations=8, ridge=0.0):
    """argmin_{w >= u} (1/2) w^T (G + ridge I) w, for every row u of `lower` (M, K).

    This is the dual of the projection of J^T u onto the dual cone {x : J x >= 0} of the
    task gradients (UPGrad, DualProj): the projection is J^T w*. `G` must be positive
    semi-definite; the problem is solved for the Gramian as given (normalise it, and add
    the ridge, before calling when the method allows).

    Solver: a primal-dual active-set method (Hintermueller, Ito & Kunisch 2002) on all rows
    at once, started from every bound active; it solves the KKT system exactly once it
    finds the active set, usually in a few batched K x K solves (the last ones only for
    the rows whose active set still changes, when that is at most M // 8 of them; see
    `_box_active_set`). Should a row fail the KKT check after `active_set_iterations`,
    all rows are solved again by accelerated projected gradient (FISTA with adaptive
    restart, step 1/lambda_max, stopped when no row moves more than 1e-15 or after
    `max_iterations`) followed by the active-set method started from the active set
    found; each row keeps the active-set answer when it is feasible and no worse than the
    gradient one.

    Returns (M, K) weights in the input dtype.
    """
    g, dtype = _as64(gramian)
    u = tf.cast(lower, _F64)
    k = tf.shape(g)[0]
    g = 0.5 * (g + tf.transpose(g)) + ridge * tf.eye(k, dtype=_F64)
    scale = tf.reduce_max(tf.abs(u), axis=-1, keepdims=True) + 1.0
    g_scale = tf.reduce_max(tf.abs(tf.linalg.diag_part(g)))
    zero = ~(g_scale > TINY)

    def objective(w):
        return 0.5 * tf.reduce_sum(w * tf.matmul(w, g), axis=-1)

    # The first step from "every bound active" (w = u) needs no solve: its multipliers
    # are G u.
    first = _box_active_set(g, u, tf.matmul(u, g) > 0, active_set_iterations)
    # KKT: w >= u, and G w >= 0 with (G w)_i = 0 where w_i > u_i.
    gw = tf.matmul(first, g)
    tolerance = 1e-9 * (g_scale + TINY) * tf.reduce_max(tf.abs(first), axis=-1, keepdims=True)
    free = first > u + 1e-12 * scale
    kkt = (tf.reduce_all(tf.math.is_finite(first))
           & tf.reduce_all(first >= u - 1e-12 * scale)
           & tf.reduce_all(gw >= -tolerance)
           & tf.reduce_all(tf.where(free, tf.abs(gw) <= tolerance, True)))

    def fallback():
        w = _box_projected_gradient(g, u, max_iterations)
        active = (w - u) <= 1e-9 * scale
        candidate = _box_active_set(g, u, active, active_set_iterations)
        finite = tf.reduce_all(tf.math.is_finite(candidate), axis=-1)
        candidate = tf.where(finite[:, None], candidate, w)
        feasible = finite & tf.reduce_all(candidate >= u - 1e-12 * scale, axis=-1)
        candidate = tf.maximum(candidate, u)
        better = feasible & (objective(candidate)
                             <= objective(w) + 1e-14 * tf.abs(objective(w)))
        return tf.where(better[:, None], candidate, w)

    w = tf.cond(kkt, lambda: tf.maximum(first, u), fallback)
    w = tf.where(zero, u, w)
    return tf.cast(w, dtype)


def _box_active_set(g, u, active, iterations):
    """Primal-dual active-set steps for min_{w >= u} w^T G w / 2, from `active` (M, K).

    A row is settled once a solve on its active set reproduces that set (its x is then
    the answer); the steps stop when every row is, or after `iterations` steps of each
    kind. Steps solve every row while more than M // 8 rows are unsettled (the first one
    or two, typically), then only the unsettled rows, padded to M // 8 (a static shape, as
    XLA needs): the last step usually settles one or two rows, and re-solving all M there
    would be a third of all the solving."""
    k = tf.shape(g)[0]
    # Row r's system takes row i of G (+ 1e-15 I) where i is free ((G x)_i = 0) and row i
    # of the identity where i is active (x_i = u_i): rows of one (2K, K) table.
    table = tf.concat([g + 1e-15 * tf.eye(k, dtype=_F64), tf.eye(k, dtype=_F64)], 0)
    positions = tf.range(k)

    def solve(active, u):
        """x on each row's active set, and the active set it implies."""
        systems = tf.gather(table, positions + k * tf.cast(active, positions.dtype))
        rhs = tf.where(active, u, tf.zeros_like(u))
        x = tf.linalg.solve(systems, rhs[:, :, None])[:, :, 0]
        multipliers = tf.matmul(x, g)  # = lambda on the active set, 0 on the free set
        return x, (multipliers + (u - x)) > 0

    def all_rows(i, active, x, unsettled):
        x, new_active = solve(active, u)
        return i + 1, new_active, x, tf.reduce_any(new_active != active, axis=-1)

    def some_rows(i, active, x, unsettled):
        _, rows = tf.math.top_k(tf.cast(unsettled, tf.int32), batch)  # unsettled first
        index = rows[:, None]
        old = tf.gather(active, rows)
        x_rows, new = solve(old, tf.gather(u, rows))
        return (i + 1, tf.tensor_scatter_nd_update(active, index, new),
                tf.tensor_scatter_nd_update(x, index, x_rows),
                tf.tensor_scatter_nd_update(unsettled, index,
                                            tf.reduce_any(new != old, axis=-1)))

    batch = u.shape[0] // 8 if u.shape[0] is not None else 0
    state = (tf.constant(0), active, u, tf.ones(tf.shape(u)[:1], tf.bool))
    state = tf.while_loop(
        lambda i, active, x, unsettled: (
            (i < iterations) & (tf.reduce_sum(tf.cast(unsettled, tf.int32)) > batch)),
        all_rows, state, maximum_iterations=max(iterations, 1))
    if batch:
        state = tf.while_loop(
            lambda i, active, x, unsettled: tf.reduce_any(unsettled), some_rows,
            (tf.constant(0), *state[1:]), maximum_iterations=max(iterations, 1))
    return state[2]


def _box_projected_gradient(g, u, max_iterations):
    """FISTA with adaptive restart for min_{w >= u} w^T G w / 2, every row of u at once."""
    lipschitz = tf.reduce_max(tf.linalg.eigvalsh(g))
    step = 1.0 / tf.where(lipschitz > TINY, lipschitz, tf.ones_like(lipschitz))

    def cond(i, w, y, t, moved):
        return (i < max_iterations) & (moved > 1e-15)

    def body(i, w, y, t, moved):
        w_new = tf.maximum(u, y - step * tf.matmul(y, g))
        t_new = 0.5 * (1.0 + tf.sqrt(1.0 + 4.0 * t * t))
        # Adaptive restart (O'Donoghue & Candes): drop momentum where it points uphill.
        restart = tf.reduce_sum((y - w_new) * (w_new - w), axis=-1) > 0
        momentum = tf.where(restart, tf.zeros_like(t), (t - 1.0) / t_new)
        y_new = w_new + momentum[:, None] * (w_new - w)
        t_new = tf.where(restart, tf.ones_like(t_new), t_new)
        moved = tf.reduce_max(tf.abs(w_new - w))
        return i + 1, w_new, y_new, t_new, moved

    ones = tf.ones([tf.shape(u)[0]], _F64)
    _, w, _, _, _ = tf.while_loop(
        cond, body, (tf.constant(0), u, u, ones, tf.constant(1.0, _F64)),
        maximum_iterations=max_iterations)
    return w


# -- w > 0 with G w = w^(-1/alpha) (Nash-MTL, FairGrad) -------------------------------------


def _barrier(w, alpha):
    """h(w) with h'(w) = w^(-1/alpha): log w for alpha = 1, w^(1-1/alpha)/(1-1/alpha) else."""
    if alpha == 1.0:
        return tf.math.log(w)
    q = 1.0 - 1.0 / alpha
    return tf.pow(w, q) / q


def power_barrier_solve(gramian, alpha=1.0, max_iterations=100, ridge=1e-12,
                        tolerance=1e-13):
    """The w > 0 with G w = w^(-1/alpha), element-wise (Nash-MTL: alpha = 1; FairGrad).

    The equation is the stationarity condition of the strictly convex function
        f(w) = (1/2) w^T G w - sum_i h(w_i),   h'(w) = w^(-1/alpha)
    (h = log for alpha = 1), whose Hessian G + diag(w^(-1/alpha - 1) / alpha) is positive
    definite, so damped Newton solves it to machine precision. The Gramian is normalised to
    mean diagonal 1 (scale s), the equation solved there, and the answer rescaled exactly:
    w = s^(-alpha / (1 + alpha)) v. Each Newton step is damped by a vectorised
    backtracking search over 40 halvings (all evaluated at once, the largest step that
    satisfies Armijo's condition wins; the full step is taken whenever it halves the
    residual) and kept inside w > 0. A relative `ridge` keeps the
    problem bounded when the gradients are linearly dependent with a non-negative null
    vector (e.g. a task with a zero gradient), where the exact equation has no solution.

    Returns (K,) positive weights (zeros for a zero Gramian) in the input dtype.
    """
    g, dtype = _as64(gramian)
    g, scale = normalize_gramian(g)
    k = tf.shape(g)[0]
    a = g + ridge * tf.eye(k, dtype=_F64)
    power = -1.0 / alpha
    steps = tf.constant([0.5 ** j for j in range(40)], _F64)

    def f(w):  # (..., K) -> (...)
        quad = 0.5 * tf.reduce_sum(w * tf.linalg.matvec(a, w), axis=-1)
        return quad - tf.reduce_sum(_barrier(w, alpha), axis=-1)

    def gradient(w):
        return tf.linalg.matvec(a, w) - tf.pow(w, power)

    def cond(i, w, done):
        return (i < max_iterations) & ~done

    def body(i, w, done):
        grad = gradient(w)
        hessian = a + tf.linalg.diag(-power * tf.pow(w, power - 1.0))
        direction = -tf.linalg.solve(hessian, grad[:, None])[:, 0]
        # Largest step keeping w > 0 (fraction to the boundary 0.99).
        ratios = tf.where(direction < 0, -w / tf.where(direction < 0, direction, -1.0),
                          tf.fill([k], tf.constant(np.inf, _F64)))
        t_max = tf.minimum(tf.constant(1.0, _F64), 0.99 * tf.reduce_min(ratios))
        candidates = w[None, :] + (t_max * steps)[:, None] * direction[None, :]
        values = f(tf.maximum(candidates, 1e-300))
        f0 = f(w)
        slope = tf.tensordot(grad, direction, 1)
        armijo = values <= f0 + 1e-4 * t_max * steps * slope
        ok = tf.reduce_any(armijo)
        first = tf.argmax(tf.cast(armijo, tf.int32), output_type=tf.int32)
        # The full Newton step is kept whenever it halves the residual (near the solution f
        # changes by less than its rounding error and Armijo's test is unreliable);
        # otherwise the largest step that passes Armijo's test on f.
        full = candidates[0]
        residual_now = tf.reduce_max(tf.abs(grad) * w)
        residual_full = tf.reduce_max(tf.abs(gradient(tf.maximum(full, 1e-300))) * full)
        shrinks = tf.reduce_all(full > 0) & (residual_full < 0.5 * residual_now)
        w_new = tf.where(shrinks, full, tf.where(ok, tf.gather(candidates, first), w))
        ok = ok | shrinks
        residual = tf.reduce_max(tf.abs(gradient(w_new)) * w_new)
        done = (~ok) | (residual < tolerance) | ~tf.reduce_all(tf.math.is_finite(w_new))
        w_new = tf.where(tf.reduce_all(tf.math.is_finite(w_new)), w_new, w)
        return i + 1, w_new, done

    diag = tf.maximum(tf.linalg.diag_part(a), ridge)
    w0 = tf.pow(diag, -alpha / (1.0 + alpha))
    _, v, _ = tf.while_loop(cond, body, (tf.constant(0), w0, tf.constant(False)),
                            maximum_iterations=max_iterations)
    ok = scale > 0
    factor = tf.pow(tf.where(ok, scale, tf.ones_like(scale)), -alpha / (1.0 + alpha))
    w = tf.where(ok, v * factor, tf.zeros_like(v))
    return tf.cast(w, dtype)


# -- CAGrad's inner problem -----------------------------------------------------------------


def simplex_norm_penalty_min(gramian, linear, penalty, max_iterations=500,
                             tolerance=1e-12):
    """argmin over the simplex of F(w) = b^T w + c sqrt(w^T G w) (CAGrad's dual problem).

    `linear` is b (K,), `penalty` is c >= 0. F is convex; the solver is pairwise
    Frank-Wolfe (as in `min_norm_simplex`) with an exact line search along d = e_s - e_a:
    F(w + t d) = F0 + beta t + c sqrt(q(t)), q(t) = q0 + 2 q1 t + q2 t^2, whose stationary
    point is t = (x - q1) / q2 with x = r sqrt((q0 q2 - q1^2) / (q2 - r^2)), r = -beta / c
    (clipped to [0, w_a]; when r^2 >= q2 the slope has the sign of beta everywhere). Stops
    when the Frank-Wolfe gap falls under `tolerance` or after `max_iterations`. Solved on
    the Gramian and b as given (float64 inside); scale them beforehand.

    Returns (K,) weights in the input dtype.
    """
    g, dtype = _as64(gramian)
    b = tf.cast(linear, _F64)
    c = tf.cast(penalty, _F64)
    k = tf.shape(g)[0]
    tiny = 1e-300

    def value(w, gw):
        return tf.tensordot(b, w, 1) + c * tf.sqrt(tf.maximum(tf.tensordot(w, gw, 1), 0.0))

    def grad_of(w, gw):
        norm = tf.sqrt(tf.maximum(tf.tensordot(w, gw, 1), 0.0))
        return b + c * gw / tf.maximum(norm, 1e-150)

    def cond(i, w, gw, gap):
        return (i < max_iterations) & (gap > tolerance)

    def body(i, w, gw, gap):
        grad = grad_of(w, gw)
        s = tf.argmin(grad, output_type=tf.int32)
        masked = tf.where(w > 0, grad, tf.fill([k], tf.constant(-np.inf, _F64)))
        a_idx = tf.argmax(masked, output_type=tf.int32)
        d = tf.one_hot(s, k, dtype=_F64) - tf.one_hot(a_idx, k, dtype=_F64)
        gd = tf.linalg.matvec(g, d)  # G[:, s] - G[:, a], without dynamic slicing (XLA)
        t_max = tf.gather(w, a_idx)
        beta = tf.tensordot(b, d, 1)
        q0 = tf.maximum(tf.tensordot(w, gw, 1), 0.0)
        q1 = tf.tensordot(d, gw, 1)
        q2 = tf.maximum(tf.tensordot(d, gd, 1), 0.0)
        r = -beta / tf.maximum(c, tiny)
        inside = q2 - r * r > 0
        discriminant = tf.maximum(q0 * q2 - q1 * q1, 0.0)
        x = r * tf.sqrt(discriminant / tf.where(inside, q2 - r * r, 1.0))
        root = (x - q1) / tf.where(q2 > 0, q2, 1.0)
        endpoint = tf.where(beta < 0, t_max, tf.zeros_like(t_max))
        t = tf.where(inside & (c > 0), root, endpoint)
        t = tf.clip_by_value(t, 0.0, t_max)
        w_new = tf.maximum(w + t * d, 0.0)
        gw_new = gw + t * gd
        keep = value(w_new, gw_new) <= value(w, gw)
        w_new = tf.where(keep, w_new, w)
        gw_new = tf.where(keep, gw_new, gw)
        new_grad = grad_of(w_new, gw_new)
        gap = tf.tensordot(w_new, new_grad, 1) - tf.reduce_min(new_grad)
        gap = tf.where(keep, gap, tf.zeros_like(gap))
        return i + 1, w_new, gw_new, gap

    w0 = tf.ones([k], _F64) / tf.cast(k, _F64)
    _, w, _, _ = tf.while_loop(
        cond, body, (tf.constant(0), w0, tf.linalg.matvec(g, w0), tf.constant(np.inf, _F64)),
        maximum_iterations=max_iterations)
    return tf.cast(w / tf.maximum(tf.reduce_sum(w), TINY), dtype)
