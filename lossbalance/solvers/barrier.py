"""w > 0 with (G w)_k = c_k w_k^(-1/alpha): Nash-MTL's and FairGrad's conditions, by damped
Newton on a strictly convex function.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from lossbalance.solvers.gramians import _F64, _as64, normalize_gramian

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
