"""ConFIG: conflict-free inverse gradients (Liu et al., 2024)."""

import tensorflow as tf

from lossbalance import solvers
from lossbalance.strategies.base import GramianWeighting
from lossbalance.strategies.registry import register


@register("config", aliases=("conflict_free",))
class ConFIG(GramianWeighting):
    """An update with the same cosine to every task's gradient, as long as their projections.

    Formula: with unit gradients u_k = g_k / |g_k| (rows of U; zero for a zero gradient),
        x = U^+ 1 (the least-norm x with u_k . x = 1 for all k),  x_hat = x / |x|,
        update = (sum_k g_k . x_hat) x_hat.
    The direction makes equal angles with every task's gradient, so it conflicts with none
    when such a direction exists; its length is the sum of the gradients' projections.
    On the Gramian: with D = diag(|g_k|) and C = D^-1 G D^-1 (the cosines), x = J^T v with
    v = D^-1 C^+ 1, and the weights are v (1^T G v) / (v^T G v).

    Conventions: the authors' default (`ProjectionLength`, equal preference, a
    pseudo-inverse through least squares) as in TorchJD's `ConFIG`; the preference only
    sets which cosines are equal, and the sum of projections sets the length, so the update
    has the scale of a *sum* of gradients. The pseudo-inverse drops eigenvalues of C under
    K eps(dtype) times the largest. The momentum variant (M-ConFIG) needs per-parameter
    state and is not provided.

    Reference: Q. Liu, M. Chu, N. Thuerey, "ConFIG: Towards Conflict-free Training of
    Physics Informed Neural Networks", ICLR 2025 (arXiv:2408.11104, 2024).
    """

    def gramian_weights(self, gramian, losses):
        g, _ = solvers.normalize_gramian(gramian)
        norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(g), 0.0))
        ok = norms > 1e-150
        inverse = tf.where(ok, 1.0 / tf.where(ok, norms, 1.0), 0.0)
        cosines = g * inverse[:, None] * inverse[None, :]
        k = self.num_tasks
        rcond = solvers._eps(gramian.dtype) * k
        pinv = tf.cast(solvers.psd_pinv(cosines, rcond=rcond), tf.float64)
        v = inverse * tf.linalg.matvec(pinv, tf.ones([k], tf.float64))
        gv = tf.linalg.matvec(g, v)
        squared = tf.tensordot(v, gv, 1)
        good = squared > 1e-300
        factor = tf.where(good, tf.reduce_sum(gv) / tf.where(good, squared, 1.0), 0.0)
        # Undo the normalisation: g = s G_hat, so v scales by s^(-1/2), the factor by s^(1/2)
        # and the weights not at all.
        return tf.cast(v * factor, gramian.dtype)
