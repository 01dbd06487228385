"""Box-constrained quadratic programs: min_{w >= u} w^T G w (UPGrad, DualProj, and CAGrad's
stationary fallback).
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
