"""The Gramian split into the tasks' scales and their cosines, and what is decided on the
cosines: dependent directions, pseudo-inverses, G's eigenpairs to each one's precision.
"""

from __future__ import annotations

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


def finite_or_zero(x):
    """`x` with its non-finite entries replaced by 0 (one overflowed task must not poison
    the others' weights)."""
    x = tf.convert_to_tensor(x)
    return tf.where(tf.math.is_finite(x), x, tf.zeros_like(x))


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
