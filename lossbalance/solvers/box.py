"""Box-constrained quadratic programs: min_{w >= u} w^T G w (UPGrad, DualProj, and CAGrad's
stationary fallback), and min (1/2) x^T A x + b^T x over 0 <= x <= h (PCD's dual).
"""

from __future__ import annotations

import tensorflow as tf

from lossbalance.solvers.gramians import _F64, TINY, _as64, cosine_gramian


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
        w = _projected_gradient(g, None, u, None, max_iterations, relative_stop=False)
        active = (w - u) <= 1e-9 * scale
        candidate = _box_active_set(g, u, active, active_set_iterations)
        return _better_of(candidate, w, u, None, 1e-12 * scale, objective)

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


def nonnegative_qp(matrix, linear, upper=None, ridge=0.0, max_iterations=500,
                   active_set_iterations=20):
    """argmin_{0 <= x <= upper} (1/2) x^T (A + ridge I) x + b^T x, for one linear term
    b (K,) or for every row of `linear` (M, K), with the same matrix A (K, K).

    `A` must be positive semi-definite; `upper` (broadcast to `linear`'s shape; None: no
    upper bound) must be >= 0, and an entry 0 fixes x_i = 0. Without an upper bound the
    problem must be bounded below (A positive definite, or b^T v >= 0 for every v >= 0 with
    A v = 0); an unbounded one gets a finite answer that minimises nothing. The problem is
    solved for the matrix as given: scale it (to cosines, say) and choose the ridge before
    calling, where the caller's method allows.

    Solver: a primal-dual active-set method (Hintermueller, Ito & Kunisch 2002), started
    from x = 0: with g = (A + ridge I) x + b, the gradient, and c the largest diagonal
    entry of A, each step fixes x_i = 0 where x_i - g_i / c <= 0 and x_i = h_i where it is
    >= h_i, solves g_i = 0 for the other entries (a K x K system per row), and stops when
    the sets repeat; the answer is then exact. Should a row fail the optimality check
    (the natural residual |x - clip(x - g / c, 0, h)| under 1e-9 of the problem's scale)
    after `active_set_iterations` (a rank-deficient A can make the sets cycle), every row
    is solved again by projected gradient (FISTA with adaptive restart, step
    1 / lambda_max, at most `max_iterations`), then by the active-set method from the
    bounds that one found, keeping for each row whichever of the two answers is feasible
    and lower. The systems carry 1e-14 c on their diagonal, so that a singular A does not
    make them singular.

    Returns x with `linear`'s shape, in `matrix`'s dtype.
    """
    a, dtype = _as64(matrix)
    b = tf.cast(linear, _F64)
    single = b.shape.rank == 1
    if single:
        b = b[None, :]
    k = tf.shape(a)[0]
    a = 0.5 * (a + tf.transpose(a)) + ridge * tf.eye(k, dtype=_F64)
    if upper is None:
        h = tf.fill(tf.shape(b), tf.constant(float("inf"), _F64))
    else:
        h = tf.maximum(tf.broadcast_to(tf.cast(upper, _F64), tf.shape(b)), 0.0)
    diagonal = tf.reduce_max(tf.linalg.diag_part(a))
    c = tf.where(diagonal > TINY, diagonal, tf.ones_like(diagonal))

    def objective(x):
        return tf.reduce_sum(x * (0.5 * tf.matmul(x, a) + b), axis=-1)

    def residual(x):
        """The natural residual |x - clip(x - g / c, 0, h)|, per row, and its tolerance."""
        gradient = tf.matmul(x, a) + b
        projected = tf.clip_by_value(x - gradient / c, 0.0, h)
        size = (c * tf.reduce_max(tf.abs(x), axis=-1)
                + tf.reduce_max(tf.abs(b), axis=-1) + TINY)
        gap = tf.reduce_max(tf.abs(x - projected), axis=-1) * c
        return tf.where(tf.math.is_finite(gap), gap, tf.constant(float("inf"), _F64)), \
            1e-9 * size

    zero = tf.zeros_like(b)
    lower, at_upper = _bounds_from(zero, b, h, c)
    x = _nonnegative_active_set(a, b, h, c, lower, at_upper, active_set_iterations)
    gap, tolerance = residual(x)
    solved = tf.reduce_all(gap <= tolerance)

    def fallback():
        w = _projected_gradient(a, b, zero, h, max_iterations, relative_stop=True)
        scale = 1e-9 * (1.0 + tf.reduce_max(tf.abs(w), axis=-1, keepdims=True))
        polished = _nonnegative_active_set(
            a, b, h, c, w <= scale, (w >= h - scale) & (w > scale), active_set_iterations)
        return _better_of(polished, w, zero, h, scale, objective)

    x = tf.cond(solved, lambda: tf.clip_by_value(x, 0.0, h), fallback)
    x = tf.where(tf.math.is_finite(x), x, tf.zeros_like(x))
    return tf.cast(x[0] if single else x, dtype)


def _bounds_from(x, gradient, h, c):
    """The primal-dual active sets at x: (x_i = 0 fixed, x_i = h_i fixed), from the
    projection of x - gradient / c onto [0, h]."""
    z = x - gradient / c
    lower = z <= 0.0
    return lower, (z >= h) & ~lower


def _nonnegative_active_set(a, b, h, c, lower, upper, iterations):
    """Primal-dual active-set steps for min_{0 <= x <= h} x^T A x / 2 + b^T x, every row of
    b at once, from the sets `lower` (x_i = 0) and `upper` (x_i = h_i), both (M, K). Returns
    the last step's x (exact once the sets repeat)."""
    k = tf.shape(a)[0]
    eye = tf.eye(k, dtype=_F64)
    # Row i of a row's system: row i of A (+ 1e-14 c I) where i is free (gradient 0), of
    # the identity where i is fixed at a bound: rows of one (2K, K) table.
    table = tf.concat([a + 1e-14 * c * eye, eye], 0)
    positions = tf.range(k)

    def body(i, lower, upper, x, changed):
        fixed = lower | upper
        systems = tf.gather(table, positions + k * tf.cast(fixed, positions.dtype))
        rhs = tf.where(upper, h, tf.where(lower, tf.zeros_like(b), -b))
        x = tf.linalg.solve(systems, rhs[:, :, None])[:, :, 0]
        new_lower, new_upper = _bounds_from(x, tf.matmul(x, a) + b, h, c)
        changed = tf.reduce_any((new_lower != lower) | (new_upper != upper))
        return i + 1, new_lower, new_upper, x, changed

    state = (tf.constant(0), lower, upper, tf.zeros_like(b), tf.constant(True))
    state = tf.while_loop(lambda i, lower, upper, x, changed: changed, body, state,
                          maximum_iterations=max(iterations, 1))
    return state[3]


def _better_of(candidate, fallback, lower, upper, slack, objective):
    """Per row, the active-set `candidate` (clipped to [lower, upper]) where it is finite,
    within `slack` of the bounds and no worse than the projected-gradient `fallback`;
    else `fallback`. `upper` None: no upper bound."""
    finite = tf.reduce_all(tf.math.is_finite(candidate), axis=-1)
    candidate = tf.where(finite[:, None], candidate, fallback)
    inside = candidate >= lower - slack
    if upper is not None:
        inside &= candidate <= upper + slack
    feasible = finite & tf.reduce_all(inside, axis=-1)
    candidate = tf.maximum(candidate, lower) if upper is None else \
        tf.clip_by_value(candidate, lower, upper)
    better = feasible & (objective(candidate)
                         <= objective(fallback) + 1e-14 * tf.abs(objective(fallback)))
    return tf.where(better[:, None], candidate, fallback)


def _projected_gradient(a, linear, lower, upper, max_iterations, relative_stop):
    """FISTA with adaptive restart for min_{lower <= w <= upper} w^T A w / 2 + b^T w, every
    row of `lower` at once, from w = lower (`linear` b None: 0; `upper` None: no upper
    bound). Stops when no entry moves more than 1e-15 (times 1 + max |w| with
    `relative_stop`), or after `max_iterations`."""
    lipschitz = tf.reduce_max(tf.linalg.eigvalsh(a))
    step = 1.0 / tf.where(lipschitz > TINY, lipschitz, tf.ones_like(lipschitz))

    def project(w):
        return tf.maximum(lower, w) if upper is None else tf.clip_by_value(w, lower, upper)

    def gradient(w):
        return tf.matmul(w, a) if linear is None else tf.matmul(w, a) + linear

    def cond(i, w, y, t, moved):
        return (i < max_iterations) & (moved > 0)

    def body(i, w, y, t, moved):
        w_new = project(y - step * gradient(y))
        t_new = 0.5 * (1.0 + tf.sqrt(1.0 + 4.0 * t * t))
        # Adaptive restart (O'Donoghue & Candes): drop momentum where it points uphill.
        restart = tf.reduce_sum((y - w_new) * (w_new - w), axis=-1) > 0
        momentum = tf.where(restart, tf.zeros_like(t), (t - 1.0) / t_new)
        y_new = w_new + momentum[:, None] * (w_new - w)
        t_new = tf.where(restart, tf.ones_like(t_new), t_new)
        threshold = 1e-15 * (1.0 + tf.reduce_max(tf.abs(w_new))) if relative_stop \
            else 1e-15
        moved = tf.reduce_max(tf.abs(w_new - w)) - threshold
        return i + 1, w_new, y_new, t_new, moved

    ones = tf.ones([tf.shape(lower)[0]], _F64)
    _, w, _, _, _ = tf.while_loop(
        cond, body, (tf.constant(0), lower, lower, ones, tf.constant(1.0, _F64)),
        maximum_iterations=max_iterations)
    return w
