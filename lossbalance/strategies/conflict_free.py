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
    (K eps(float32))^2 times the largest (directions the gradients' precision cannot
    resolve), whatever the gradients' scales (the direction does not depend on them). The momentum variant (M-ConFIG) needs per-parameter state and is
    not provided.

    Reference: Q. Liu, M. Chu, N. Thuerey, "ConFIG: Towards Conflict-free Training of
    Physics Informed Neural Networks", ICLR 2025 (arXiv:2408.11104, 2024).
    """

    scale_invariant = True

    def gramian_weights(self, gramian, losses):
        cosines, norms = solvers.cosine_gramian(gramian)
        k = tf.shape(cosines)[0]
        # v = D^-1 C^+ 1; with G = D C D: G v = D C C^+ 1 and v^T G v = 1^T C^+ 1.
        z = tf.linalg.matvec(solvers.cosine_pinv(cosines), tf.ones([k], tf.float64))
        v = solvers.divide_by_norms(z, norms)
        length = tf.reduce_sum(norms * tf.linalg.matvec(cosines, z))  # 1^T G v
        squared = tf.reduce_sum(tf.where(norms > 0, z, 0.0))  # v^T G v (C block-diagonal
        # in the zero tasks, whose z_k = 1 do not enter v)
        good = squared > 1e-300
        factor = tf.where(good, length / tf.where(good, squared, 1.0), 0.0)
        return tf.cast(v * factor, gramian.dtype)
