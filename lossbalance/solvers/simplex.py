"""Problems over the probability simplex: its projection, MGDA's min-norm point (Wolfe), and
CAGrad's max-min problem (its dual by Frank-Wolfe, then the primal's KKT conditions).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from lossbalance.solvers.box import dual_cone_weights
from lossbalance.solvers.gramians import (
    _F64, TINY, _as64, cosine_gramian, cosine_pinv, divide_by_norms)

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
