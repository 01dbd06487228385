"""IMTL: impartial multi-task learning (Liu et al., 2021): IMTL-G, and IMTL-G with IMTL-L."""

import tensorflow as tf

from lossbalance import solvers
from lossbalance.strategies.base import GramianWeighting
from lossbalance.strategies.imtl_l import LearnedLossScales
from lossbalance.strategies.registry import register


def imtl_g_weights(gramian):
    """IMTL-G's weights from a Gramian: w = G^+ d / (1^T G^+ d), d_k = |g_k| (float64 in).

    For linearly independent gradients this is the paper's closed form: the combination
    g = J^T w with sum_k w_k = 1 whose projection on every unit gradient u_k is the same,
    u_k . g = (G w)_k / |g_k| = 1 / (1^T G^+ d). It is computed on the cosines: with
    G = D C D, G^+ d = D^-1 C^+ 1, so w ∝ D^-1 C^+ 1 whatever the tasks' scales (a
    pseudo-inverse of G itself would drop the small task's direction: G's condition number
    is the square of the gradients' scale ratio). Dependent directions are cut on C
    (`lossbalance.solvers.cosine_pinv`). A task with a zero gradient gets weight 0; if
    1^T D^-1 C^+ 1 vanishes (e.g. two opposite gradients) every weight is zero.
    """
    cosines, norms = solvers.cosine_gramian(gramian)
    k = tf.shape(cosines)[0]
    v = tf.linalg.matvec(solvers.cosine_pinv(cosines), tf.ones([k], tf.float64))
    v = solvers.divide_by_norms(v, norms)
    total = tf.reduce_sum(v)
    ok = tf.abs(total) > 1e-12 * tf.reduce_sum(tf.abs(v)) + 1e-300
    return tf.where(ok, v / tf.where(ok, total, 1.0), tf.zeros_like(v))


@register("imtl_g", aliases=("imtlg",))
class IMTLG(GramianWeighting):
    """Impartial gradients: the update makes the same angle with every task's gradient.

    Formula (closed form of the paper's IMTL-G): find g = sum_k w_k g_k with sum_k w_k = 1
    such that g . u_k is equal for every unit gradient u_k = g_k / |g_k|. The paper solves
    it on differences, alpha_{2..K} = g_1 U^T (D U^T)^-1 with D = [g_1 - g_k], U = [u_1 - u_k];
    equivalently (TorchJD's form, used here) w = G^+ d / (1^T G^+ d) with d_k = |g_k|,
    computed on the Gramian alone, and on its cosines (w ∝ D^-1 C^+ 1 with D the gradient
    norms), so the small task keeps its whole direction when the tasks' gradients differ
    by orders of magnitude: its weight is about the large task's times their norm ratio,
    and the update's projections on both are equal. The pseudo-inverse makes it robust to
    linearly dependent gradients (where the paper's inverse fails); directions count as
    dependent when C's eigenvalue is under (K eps(float32))^2 times its largest, i.e. when
    the gradients' own precision cannot resolve them (`lossbalance.solvers.GRADIENT_EPS`).
    TorchJD cuts G's eigenvalues at K eps(dtype) times G's largest, which at a scale ratio
    of 1e4 in float32 drops the small task's direction and gives it weight ~0. Weights are zero when the normalising
    sum vanishes, and sum to 1 otherwise (a mean-like scale, not a sum). The direction
    does not depend on the tasks' scales (`scale_invariant`), except for its sign when
    1^T D^-1 C^+ 1 changes sign (possible for K >= 3 strongly conflicting tasks).

    Reference: L. Liu, Y. Li, Z. Kuang, J.-H. Xue, Y. Chen, W. Yang, Q. Liao, W. Zhang,
    "Towards Impartial Multi-task Learning", ICLR 2021.
    """

    scale_invariant = True

    def gramian_weights(self, gramian, losses):
        return tf.cast(imtl_g_weights(gramian), gramian.dtype)


@register("imtl", aliases=("imtl_hybrid",))
class IMTL(LearnedLossScales, IMTLG):
    """IMTL: IMTL-G on the gradients of losses balanced by IMTL-L's learned scales.

    Formula: each task has a trainable log-scale s_k (initial 0). The model balances the
    scaled losses L'_k = exp(s_k) L_k - s_k (IMTL-L; `transform_losses`), whose optimum
    in s_k makes every scaled loss equal to 1: d/ds_k (e^s_k L_k - s_k) = e^s_k L_k - 1.
    The shared parameters receive IMTL-G's combination of the scaled losses' gradients
    grad L'_k = e^s_k grad L_k; the scales s_k are trained by the model's optimizer on
    sum_k L'_k; head parameters receive grad L'_k of their task. This is the paper's hybrid
    IMTL (its strongest variant). Losses must be non-negative, as for IMTL-L (`fit` checks
    the logged means).

    Implementations differ: the paper (and LibMTL) learn s on L'_k = e^s_k L_k - s_k as here;
    some ports clamp s or learn it with a separate optimizer. The logged `<task>_weight` is
    the IMTL-G weight on the scaled gradients (multiply by e^s_k for the raw loss).
    Grouped (`compile(grouping=...)`), the scales are shared and each group gets IMTL-G.

    Args:
        initial_log_scale: starting s_k (default 0, i.e. scale 1).

    Reference: L. Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021.
    """

    def transform_losses(self, losses):
        s = tf.cast(self.log_scale, losses.dtype)
        return tf.exp(s) * losses - s

    def group_member(self, index):
        """Grouped (`compile(grouping=...)`): one set of learned scales for the whole model
        (this strategy's), and IMTL-G on each group's gradients of the scaled losses."""
        return IMTLG(name=f"{self.name}_group_{index}")
