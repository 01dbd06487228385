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
* Tasks on different scales: G = D C D, with D = diag(|g_k|) and C the cosines of the task
  gradients (`cosine_gramian`). The condition number of G is that of C times the square of
  the gradients' scale ratio (1e4 apart: 1e8 more), while C, known to the gradients' own
  relative precision, does not depend on their scales. So nothing here decomposes, inverts,
  regularises or truncates G itself: rank decisions and ridges are made on C, systems are
  solved on C with the scales carried in vectors, and tolerances are relative to each
  task's own scale. The one eigendecomposition of G a method needs (Aligned-MTL) is the
  SVD of a graded factor of G (`graded_eigh`), accurate to each eigenvalue's own size.
* Degenerate inputs (a zero Gramian, zero rows, rank deficiency) give finite answers.

Routines:
    normalize_gramian          G / (trace / K), with the scale
    cosine_gramian             G = D C D: the cosines C and the norms d
    cosine_pinv                pseudo-inverse of C, dependent directions cut on C
    graded_eigh                eigenpairs of G on the range of C, each to its own precision
    project_simplex            Euclidean projection onto the probability simplex (sort-based)
    min_norm_simplex           argmin_{w in simplex} w^T G w  (Wolfe's active-set method)
    box_qp                     argmin_{w >= u} w^T G w, batched over u (accelerated projected
                               gradient + primal-dual active-set polish)
    dual_cone_weights          box_qp on the cosines: projections onto the dual cone
    power_barrier_solve        w > 0 with G w = c w^(-1/alpha) (damped Newton)
    simplex_norm_penalty_min   argmin_{w in simplex} b^T w + c sqrt(w^T G w) (CAGrad's dual)
    max_min_in_ball            CAGrad: max_d min_k g_k . d near J^T m (dual, then exact KKT)
    psd_pinv                   pseudo-inverse of a symmetric PSD matrix by eigendecomposition
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

_F64 = tf.float64
#: Relative size below which a Gramian (its trace) is treated as zero.
TINY = 1e-300
#: The relative precision of the task gradients: float32's, at which training steps compute
#: them (float64 Jacobians given to the low-level API are held to the same rule, so that
#: both give one answer). The unit gradients U (C = U U^T) are known to about this, so a
#: singular value of U under K * GRADIENT_EPS times the largest (an eigenvalue of C under
#: (K * GRADIENT_EPS)^2 times the largest) is a direction the gradients cannot resolve:
#: numpy's `pinv` rule, applied to the scale-free U instead of J. Anything larger is kept:
#: two gradients within 1e-3 rad of opposite are still two directions (a cut at
#: K * GRADIENT_EPS on C's eigenvalues would merge them, and stall IMTL-G near the Pareto
#: set). The float64 Gramian and combination keep such directions exact.
GRADIENT_EPS = float(np.finfo(np.float32).eps)


def _as64(x):
    x = tf.convert_to_tensor(x)
    return tf.cast(x, _F64), x.dtype


def _eps(dtype) -> float:
    return float(np.finfo(tf.as_dtype(dtype).as_numpy_dtype).eps)


def finite_or_zero(x):
    """`x` with its non-finite entries replaced by 0 (one overflowed task must not poison
    the others' weights)."""
    x = tf.convert_to_tensor(x)
    return tf.where(tf.math.is_finite(x), x, tf.zeros_like(x))


def random_orders(seed_generator, num_tasks):
    """(K, K - 1) int tensor: row i is a uniformly random order of the tasks other than i
    (PCGrad's and GradVac's visiting orders), drawn from a Keras `SeedGenerator`."""
    scores = keras.random.uniform((num_tasks, num_tasks), seed=seed_generator)
    scores = scores + 2.0 * tf.eye(num_tasks)  # a task comes after all others: drop it
    return tf.argsort(scores, axis=1)[:, : num_tasks - 1]


def normalize_gramian(gramian):
    """(G / s, s) with s = trace(G) / K, the mean squared gradient norm (float64).

    A zero (or non-finite) Gramian gives (zeros, 0). Entries that are not finite are
    treated as zero so that a single overflowed task cannot poison the others.
    """
    g, _ = _as64(gramian)
    g = finite_or_zero(g)
    g = 0.5 * (g + tf.transpose(g))
    k = tf.cast(tf.shape(g)[0], _F64)
    scale = tf.linalg.trace(g) / k
    ok = scale > TINY
    safe = tf.where(ok, scale, tf.ones_like(scale))
    normalized = tf.where(ok, g / safe, tf.zeros_like(g))
    return normalized, tf.where(ok, scale, tf.zeros_like(scale))


def cosine_gramian(gramian):
    """(C, d) with G = D C D: d_k = |g_k| = sqrt(G_kk) and C_kl = G_kl / (d_k d_l), float64.

    C holds the cosines of the task gradients, whatever their scales. A task with a zero
    gradient (d_k = 0) gets the row and column of the identity in C, so C stays as well
    conditioned as the other tasks make it; callers give such a task the weight the method
    gives a zero gradient. Entries that are not finite are treated as zero.
    """
    g, _ = _as64(gramian)
    g = finite_or_zero(g)
    g = 0.5 * (g + tf.transpose(g))
    d = tf.sqrt(tf.maximum(tf.linalg.diag_part(g), 0.0))
    nonzero = d > 0
    inverse = tf.where(nonzero, 1.0 / tf.where(nonzero, d, 1.0), 0.0)
    c = g * inverse[:, None] * inverse[None, :]
    c = tf.clip_by_value(c, -1.0, 1.0)  # rounding can push a cosine past 1
    both = nonzero[:, None] & nonzero[None, :]
    eye = tf.eye(tf.shape(g)[0], dtype=_F64)
    return tf.where(both, c, eye), d


def divide_by_norms(v, d):
    """v / d element-wise, 0 where d = 0 (a task with a zero gradient)."""
    nonzero = d > 0
    return tf.where(nonzero, v / tf.where(nonzero, d, 1.0), tf.zeros_like(v))


def _cosine_eigh(c):
    """Eigenpairs of the cosine matrix C and which of them are kept (see GRADIENT_EPS)."""
    values, vectors = tf.linalg.eigh(c)
    k = tf.cast(tf.shape(c)[0], _F64)
    keep = values > (k * GRADIENT_EPS) ** 2 * tf.reduce_max(values)
    return values, vectors, keep


def cosine_pinv(cosines):
    """Pseudo-inverse of a cosine matrix C (float64): eigenvalues under
    (K * GRADIENT_EPS)^2 times the largest are dropped, so only directions that the
    gradients' precision resolves are inverted."""
    values, vectors, keep = _cosine_eigh(cosines)
    inverse = tf.where(keep, 1.0 / tf.where(keep, values, 1.0), 0.0)
    return tf.matmul(vectors * inverse[None, :], vectors, transpose_b=True)


def graded_eigh(cosines, norms):
    """Eigenpairs of G = D C D on the range of C that the gradients resolve (float64).

    Returns (values, vectors, keep): `values` (K,) ascending and `vectors` (K, K); where
    `keep` is False the pair is padding (value 0), left out of the rank that C's cut
    (`cosine_pinv`) finds. With C's kept eigenpairs C_r = V_r L_r V_r^T, G's are those of
    N N^T for the graded factor N = D V_r L_r^(1/2): the left singular pairs of N. For a
    matrix whose rows are scaled apart this SVD (Jacobi-based in TensorFlow's kernel for
    small K) keeps each singular value to its own relative precision, where an
    eigendecomposition of G itself loses eigenvalues under eps * lambda_max (all of the
    small task's at a scale ratio of 1e8).
    """
    values, vectors, keep = _cosine_eigh(cosines)
    roots = tf.where(keep, tf.sqrt(tf.maximum(values, 0.0)), 0.0)
    graded = norms[:, None] * vectors * roots[None, :]  # N, with zero columns for the cut
    singular, left, _ = tf.linalg.svd(graded)  # descending
    # N's rank: the kept directions, less one for each zero task (an identity row of C).
    rank = (tf.reduce_sum(tf.cast(keep, tf.int32))
            - tf.reduce_sum(tf.cast(norms <= 0, tf.int32)))
    k = tf.shape(cosines)[0]
    kept = tf.range(k) >= k - rank  # the largest `rank`, in ascending order
    values = tf.reverse(singular, [0]) ** 2
    return tf.where(kept, values, 0.0), tf.reverse(left, [1]), kept


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


def min_norm_simplex(gramian, max_iterations=1000, tolerance=1e-12):
    """Weights w in the simplex minimising |J^T w|^2 = w^T G w: the min-norm point of the
    convex hull of the task gradients (MGDA, Sener & Koltun 2018).

    Solver: Wolfe's nearest-point algorithm (Wolfe 1976), an active-set method that ends
    in finitely many steps with the exact answer. It keeps a support S, starting from the
    smallest gradient. A step solves for the min-norm point y of the affine hull of S; if
    y lies inside the simplex it becomes w, and the task whose gradient has the smallest
    product with J^T w joins S unless w is optimal, (G w)_k >= w^T G w for every k;
    otherwise w moves toward y until a weight reaches 0, and that task leaves S.

    Every system is solved on the cosines (G = D C D, `cosine_gramian`): the affine
    minimiser solves [C_SS, -e; e^T, 0] [z; mu] = [0; 1] with e = D^-1 1 scaled to a
    largest entry of 1, and w = D^-1 z, so the answer is as exact for gradients whose norms
    differ by 1e6 as for equal ones. The optimality test is relative to each task's scale:
    (G w)_k >= w^T G w - `tolerance` |g_k| sum_l |g_l| w_l. A task with a zero gradient is
    the answer by itself. Stops after `max_iterations` steps at the latest (Wolfe's
    method needs a few per task).

    Returns (K,) weights in the input dtype (uniform for a zero Gramian).
    """
    g, dtype = _as64(gramian)
    c, d = cosine_gramian(g)
    g = d[:, None] * c * d[None, :]  # symmetrised and finite
    k = tf.shape(g)[0]
    eye = tf.eye(k, dtype=_F64)
    inverse = divide_by_norms(tf.ones([k], _F64), d)
    border = inverse / tf.maximum(tf.reduce_max(inverse), TINY)  # e, largest entry 1

    def affine_minimizer(support):
        """The min-norm point of the affine hull of the gradients in `support`."""
        free = tf.cast(support, _F64)
        system = c * free[:, None] * free[None, :] + eye * (1.0 - free)[None, :]
        e = border * free
        top = tf.concat([system, -e[:, None]], axis=1)
        bottom = tf.concat([e[None, :], tf.zeros([1, 1], _F64)], axis=1)
        rhs = tf.concat([tf.zeros([k], _F64), tf.ones([1], _F64)], axis=0)
        z = tf.linalg.solve(tf.concat([top, bottom], axis=0), rhs[:, None])[:k, 0]
        y = divide_by_norms(z * free, d)
        return y / tf.reduce_sum(y)

    def optimal(w):
        gw = tf.linalg.matvec(g, w)
        spread = tf.reduce_sum(d * w)
        slack = tolerance * spread * (d + spread)
        return tf.reduce_all(gw >= tf.tensordot(w, gw, 1) - slack), gw

    def cond(i, support, w, done):
        return (i < max_iterations) & ~done

    def body(i, support, w, done):
        y = affine_minimizer(support)
        finite = tf.reduce_all(tf.math.is_finite(y))
        inside = finite & tf.reduce_all(tf.where(support, y > 0, True))
        # Inside: y becomes w, then optimality, or the most violating task joins S.
        is_optimal, gw = optimal(y)
        outside = tf.where(support, tf.constant(np.inf, _F64), gw)
        entering = tf.one_hot(tf.argmin(outside, output_type=tf.int32), k, on_value=True,
                              off_value=False)
        # Outside: move toward y until the first weight reaches zero; drop it.
        shrinking = support & (y <= 0)
        ratios = tf.where(shrinking, w / tf.where(shrinking, w - y, 1.0),
                          tf.constant(np.inf, _F64))
        theta = tf.clip_by_value(tf.reduce_min(ratios), 0.0, 1.0)
        leaving = tf.one_hot(tf.argmin(ratios, output_type=tf.int32), k, on_value=True,
                             off_value=False)
        moved = tf.where(leaving, tf.zeros_like(w), tf.maximum(w + theta * (y - w), 0.0))
        new_w = tf.where(inside, y, tf.where(finite, moved, w))
        new_support = tf.where(inside, support | entering,
                               tf.where(finite, support & ~leaving & (moved > 0), support))
        stop = (inside & is_optimal) | ~finite | ~tf.reduce_any(new_support)
        new_w = new_w / tf.reduce_sum(new_w)
        return i + 1, new_support, new_w, stop

    start = tf.argmin(d, output_type=tf.int32)
    support = tf.one_hot(start, k, on_value=True, off_value=False)
    w0 = tf.one_hot(start, k, dtype=_F64)
    zero = tf.gather(d, start) <= 0  # a zero gradient: the min-norm point is 0, there
    _, _, w, _ = tf.while_loop(cond, body, (tf.constant(0), support, w0, zero),
                               maximum_iterations=max_iterations)
    uniform = tf.fill([k], 1.0 / tf.cast(k, _F64))
    return tf.cast(tf.where(tf.reduce_all(d <= 0), uniform, w), dtype)


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


def dual_cone_weights(gramian, lower, ridge=0.0, max_iterations=500):
    """Rows w = argmin_{v >= u} v^T G v for the rows u of `lower` (M, K), float64: J^T w is
    the projection of J^T u onto the dual cone {x : J x >= 0} of the task gradients.

    Solved on the cosines: with x = D v (D the gradient norms) the problem is
    min_{x >= D u} x^T (C + ridge I) x, as well conditioned whatever the tasks' scales
    (the bounds divided by the largest norm, the answer scaled back). `ridge` is thus
    relative to each task's own squared norm. A task with a zero gradient keeps v_k = u_k;
    a zero Gramian gives w = u.
    """
    c, d = cosine_gramian(gramian)
    k = tf.shape(c)[0]
    u = tf.cast(lower, _F64)
    largest = tf.reduce_max(d)
    unit = tf.where(largest > 0, largest, 1.0)
    x = box_qp(c + ridge * tf.eye(k, dtype=_F64), u * (d / unit)[None, :],
               max_iterations=max_iterations)
    return tf.where(d[None, :] > 0, x * unit / tf.where(d > 0, d, 1.0)[None, :], u)


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


def power_barrier_solve(gramian, alpha=1.0, coefficients=None, max_iterations=100,
                        ridge=1e-15, tolerance=1e-13):
    """The w > 0 with (G w)_k = c_k w_k^(-1/alpha) (Nash-MTL: alpha = 1, c = 1; FairGrad).

    The equation is the stationarity condition of the strictly convex function
        f(w) = (1/2) w^T G w - sum_k c_k h(w_k),   h'(w) = w^(-1/alpha)
    (h = log for alpha = 1), whose Hessian G + diag(c w^(-1/alpha - 1) / alpha) is positive
    definite, so damped Newton solves it to machine precision. `coefficients` c (K,) are
    positive (default 1). The Gramian is normalised to mean diagonal 1 (scale s), the
    equation solved there, and the answer rescaled exactly: w = s^(-alpha / (1 + alpha)) v.
    Give it the cosine matrix where the method allows (Nash-MTL, FairGrad; see
    `cosine_gramian`): on a Gramian of gradients whose scales differ by r, Newton's systems
    are r^2 times worse conditioned. Each Newton step is damped by a vectorised
    backtracking search over 40 halvings (all evaluated at once, the largest step that
    satisfies Armijo's condition wins; the full step is taken whenever it halves the
    residual) and kept inside w > 0. The loop stops when every equation holds to
    `tolerance`, relative: |(G w)_k / (c_k w_k^(-1/alpha)) - 1|. A relative `ridge` keeps
    the problem bounded when the gradients are linearly dependent with a non-negative null
    vector (e.g. two opposite gradients), where the exact equation has no solution.

    Returns (K,) positive weights (zeros for a zero Gramian) in the input dtype.
    """
    g, dtype = _as64(gramian)
    g, scale = normalize_gramian(g)
    k = tf.shape(g)[0]
    c = tf.ones([k], _F64) if coefficients is None else tf.cast(coefficients, _F64)
    a = g + ridge * tf.eye(k, dtype=_F64)
    power = -1.0 / alpha
    steps = tf.constant([0.5 ** j for j in range(40)], _F64)

    def f(w):  # (..., K) -> (...)
        quad = 0.5 * tf.reduce_sum(w * tf.linalg.matvec(a, w), axis=-1)
        return quad - tf.reduce_sum(c * _barrier(w, alpha), axis=-1)

    def gradient(w):
        return tf.linalg.matvec(a, w) - c * tf.pow(w, power)

    def residual_of(w, grad):  # the equations' relative error
        return tf.reduce_max(tf.abs(grad) * tf.pow(w, -power) / c)

    def cond(i, w, done):
        return (i < max_iterations) & ~done

    def body(i, w, done):
        grad = gradient(w)
        hessian = a + tf.linalg.diag(-power * c * tf.pow(w, power - 1.0))
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
        full = tf.maximum(candidates[0], 1e-300)
        residual_now = residual_of(w, grad)
        residual_full = residual_of(full, gradient(full))
        shrinks = tf.reduce_all(candidates[0] > 0) & (residual_full < 0.5 * residual_now)
        w_new = tf.where(shrinks, full, tf.where(ok, tf.gather(candidates, first), w))
        ok = ok | shrinks
        finite = tf.reduce_all(tf.math.is_finite(w_new))
        w_new = tf.where(finite, w_new, w)
        residual = residual_of(w_new, gradient(w_new))
        done = (~ok) | (residual < tolerance) | ~finite
        return i + 1, w_new, done

    diag = tf.maximum(tf.linalg.diag_part(a), ridge)
    w0 = tf.pow(c / diag, alpha / (1.0 + alpha))
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


def max_min_in_ball(gramian, centre, radius, max_iterations=500):
    """Weights v of the d = J^T v that maximises min_k g_k . d subject to |d - J^T m| <=
    `radius` (CAGrad's problem, with m = `centre`, (K,) weights, and radius >= 0).

    The dual is min over the simplex of F(w) = (G m)^T w + radius |J^T w|, whose solution
    gives d = J^T m + radius J^T w / |J^T w|. That formula divides by |J^T w|, which
    vanishes near Pareto stationarity, so the dual only finds the active tasks here
    (pairwise Frank-Wolfe, `simplex_norm_penalty_min`); the answer comes from the primal
    KKT conditions on them. With d = J^T (m + y), y >= 0 zero off the support S:
        (G (m + y))_k = nu on S,   >= nu elsewhere,   |J^T y| = radius,
    so y_S = nu a - b with G_SS a = 1 and G_SS b = (G m)_S (least-norm solutions), and nu
    is the larger root of |J^T (nu a - b)|^2 = radius^2. The systems are solved on the
    cosines (G = D C D), so they are as exact whatever the tasks' scales. A negative y_k
    drops task k from S, a violated inequality adds task k, and a support on which no y
    reaches the sphere loses the task whose best value alone, (G m)_k + radius |g_k|, is
    largest, until the conditions hold (at most 3K + 3 steps). Should they not (a task
    with a zero gradient, or gradients so nearly dependent, near Pareto stationarity,
    that the systems cannot be trusted), the answer is the best of the feasible candidates by min_k g_k . d: the dual's formula,
    and the projection of J^T m onto the dual cone {x : J x >= 0} when it lies in the
    ball (which it does for radius >= |J^T m|; it attains min_k g_k . d >= 0, and is
    optimal when the best value is 0, at a Pareto-stationary point). So for
    radius >= |J^T m| the answer never conflicts with a task.

    Returns (K,) weights m + y in the input dtype.
    """
    g, dtype = _as64(gramian)
    c, d = cosine_gramian(g)
    g = d[:, None] * c * d[None, :]
    k = tf.shape(g)[0]
    m = tf.cast(centre, _F64)
    r = tf.cast(radius, _F64)
    gm = tf.linalg.matvec(g, m)
    centre_norm = tf.sqrt(tf.maximum(tf.tensordot(m, gm, 1), 0.0))
    spread = centre_norm + r  # >= |d|: the scale of g_k . d is |g_k| spread

    # The dual, for a first support and the fallback.
    scale = tf.reduce_max(d) ** 2
    unit = tf.where(scale > 0, scale, 1.0)
    w = tf.cast(simplex_norm_penalty_min(g / unit, gm / unit, r / tf.sqrt(unit),
                                         max_iterations=max_iterations), _F64)
    gw_norm = tf.sqrt(tf.maximum(tf.tensordot(w, tf.linalg.matvec(g, w), 1), 0.0))
    ok = gw_norm > 1e-10 * tf.maximum(centre_norm, 1e-150)
    dual = m + tf.where(ok, r / tf.where(ok, gw_norm, 1.0), 0.0) * w

    eye = tf.eye(k, dtype=_F64)
    inverse = divide_by_norms(tf.ones([k], _F64), d)

    def solve(support):
        """(y, nu, found): the KKT point on `support`."""
        free = tf.cast(support, _F64)
        system = c * free[:, None] * free[None, :] + eye * (1.0 - free)[None, :]
        # G_SS x = q is C_SS (D x) = D^-1 q: for a (q = 1) and b (q = G m) at once.
        rhs = tf.stack([inverse, inverse * gm], axis=1) * free[:, None]
        z = tf.matmul(cosine_pinv(system), rhs) * free[:, None]
        za, zb = z[:, 0], z[:, 1]
        qa = tf.tensordot(za, tf.linalg.matvec(c, za), 1)  # a^T G a
        qb = tf.tensordot(za, tf.linalg.matvec(c, zb), 1)  # a^T G b
        qc = tf.tensordot(zb, tf.linalg.matvec(c, zb), 1) - r * r  # b^T G b - r^2
        discriminant = qb * qb - qa * qc
        found = (qa > 0) & (discriminant >= 0)
        nu = (qb + tf.sqrt(tf.maximum(discriminant, 0.0))) / tf.where(qa > 0, qa, 1.0)
        y = divide_by_norms(nu * za - zb, d)
        found = found & tf.reduce_all(tf.math.is_finite(y))
        return tf.where(found, y, tf.zeros_like(y)), nu, found

    def cond(i, support, done, failed, y):
        return (i < 3 * k + 3) & ~done & ~failed

    def body(i, support, done, failed, y):
        y, nu, found = solve(support)
        negative = support & (y < -1e-12 * tf.reduce_max(tf.abs(y)))
        gap = (nu - tf.linalg.matvec(g, m + y)) / tf.maximum(d * spread, TINY)
        violation = tf.where(support, tf.constant(-np.inf, _F64), gap)
        violated = tf.reduce_max(violation) > 1e-10
        binding = tf.reduce_all(tf.where(support, tf.abs(gap) <= 1e-8, True))
        drop = tf.one_hot(tf.argmin(tf.where(negative, y, np.inf), output_type=tf.int32),
                          k, on_value=True, off_value=False)
        add = tf.one_hot(tf.argmax(violation, output_type=tf.int32), k, on_value=True,
                         off_value=False)
        # No root: no y on S reaches the sphere, S is too large. Drop the task least
        # likely to bind: the one whose best value alone, (G m)_k + radius |g_k| (an
        # upper bound of the answer's), is largest.
        alone = tf.where(support, gm + r * d, tf.constant(-np.inf, _F64))
        unbound = tf.one_hot(tf.argmax(alone, output_type=tf.int32), k, on_value=True,
                             off_value=False)
        has_negative = tf.reduce_any(negative)
        support = tf.where(~found, support & ~unbound,
                           tf.where(has_negative, support & ~drop,
                                    tf.where(violated, support | add, support)))
        done = found & binding & ~has_negative & ~violated
        failed = (found & ~binding) | ~tf.reduce_any(support)
        return i + 1, support, done, failed, y

    _, _, done, _, y = tf.while_loop(
        cond, body, (tf.constant(0), w > 0, tf.constant(False),
                     tf.reduce_any(d <= 0) | ~(r > 0), tf.zeros([k], _F64)),
        maximum_iterations=3 * (g.shape[0] or 40) + 3)
    primal = m + tf.maximum(y, 0.0)
    # Near a Pareto-stationary point: the centre's projection onto the dual cone, optimal
    # when the best value is 0, and in the ball for radius >= |J^T m|.
    projected = dual_cone_weights(g, m[None, :], max_iterations=max_iterations)[0]
    offset = tf.tensordot(projected - m, tf.linalg.matvec(g, projected - m), 1)
    # Of the feasible candidates, the one with the best objective min_k g_k . d (the
    # primal's when its conditions hold, up to rounding).
    candidates = tf.stack([primal, dual, projected, m])
    feasible = tf.stack([done, ok, offset <= r * r * (1 + 1e-12), tf.constant(True)])
    values = tf.reduce_min(tf.matmul(candidates, g), axis=1)
    values = tf.where(feasible & tf.math.is_finite(values), values,
                      tf.constant(-np.inf, _F64))
    best = tf.gather(candidates, tf.argmax(values, output_type=tf.int32))
    return tf.cast(best, dtype)
