"""Aligned-MTL: aligning the task gradients' principal components (Senushkin et al., 2023)."""

import numpy as np
import tensorflow as tf

from lossbalance import solvers
from lossbalance.strategies.arguments import check_choice
from lossbalance.strategies.base import GramianWeighting
from lossbalance.strategies.registry import register

SCALE_MODES = ("min", "median", "rmse")
PREFERENCES = ("sum", "mean")
TRUNCATIONS = ("cosine", "gramian")


@register("aligned_mtl", aliases=("alignedmtl",))
class AlignedMTL(GramianWeighting):
    """Make the task gradients an orthogonal system of equal magnitudes, then combine.

    Formula: with G = V diag(lambda) V^T (r eigenpairs kept) the aligned gradients are
    J_hat = B J with
        B = sqrt(sigma) V_r diag(lambda_r)^(-1/2) V_r^T,
    whose Gramian B G B = sigma V_r V_r^T makes all singular values sqrt(sigma) (the
    condition number of the system becomes 1). The update is J_hat^T p = J^T (B p) for a
    preference vector p, so the weights are w = B p.

    Scale modes (`scale_mode`): "min" sigma = the smallest kept eigenvalue (the paper's
    choice, default), "median" (lower median) and "rmse" (mean of the kept eigenvalues), as in
    the authors' code. Preference (`preference`): "sum" p = 1 (the authors' code:
    B.sum(0); default), "mean" p = 1/K (TorchJD's default, which gives the issue-3 reference
    values); they differ only by the factor K. A zero Gramian gives zero weights.

    Which eigenpairs are kept (`truncation`): by default ("cosine") the rank is decided on
    the cosine matrix C (G = D C D, D the gradient norms): directions count as dependent
    when C's eigenvalue is under (K eps(float32))^2 times its largest (directions the
    gradients' precision cannot resolve), whatever the tasks' scales; G's eigenpairs are then found on that range from the SVD of a graded factor
    (`lossbalance.solvers.graded_eigh`), each eigenvalue to its own relative precision.
    The authors' code ("gramian") drops G's eigenvalues under lambda_max K eps(float32):
    at a scale ratio of 1e4 between two tasks, G's small eigenvalue is ~1e-8 lambda_max,
    so it keeps the large task's direction alone (the update is then that task's gradient
    rescaled, cosine 0.71 to the full-rank definition on two orthogonal gradients).
    Unlike IMTL-G or Nash-MTL, Aligned-MTL's direction does depend on the tasks' scales by
    definition: the aligned gradients B J are the orthonormal polar factor of J (times
    sqrt(sigma)), which leans toward the larger gradients.

    Args:
        scale_mode: "min", "median" or "rmse".
        preference: "sum" or "mean".
        truncation: "cosine" (default) or "gramian" (the authors' rank cut).

    Reference: D. Senushkin, N. Patakin, A. Kuznetsov, A. Konushin, "Independent Component
    Alignment for Multi-Task Learning", CVPR 2023.
    """

    def __init__(self, scale_mode="min", preference="sum", truncation="cosine", **kwargs):
        super().__init__(**kwargs)
        self.scale_mode = check_choice("scale_mode", scale_mode, SCALE_MODES)
        self.preference = check_choice("preference", preference, PREFERENCES)
        self.truncation = check_choice("truncation", truncation, TRUNCATIONS)

    def _eigenpairs(self, gramian):
        """(values ascending, vectors, kept) of G, padding where not kept (float64)."""
        if self.truncation == "cosine":
            return solvers.graded_eigh(*solvers.cosine_gramian(gramian))
        g = tf.cast(gramian, tf.float64)
        g = solvers.finite_or_zero(g)
        g = 0.5 * (g + tf.transpose(g))
        trace = tf.linalg.trace(g)
        g = g / tf.where(trace > 0, trace, 1.0)  # B does not depend on G's scale
        values, vectors = tf.linalg.eigh(g)
        tol = tf.reduce_max(values) * self.num_tasks * float(np.finfo(np.float32).eps)
        return values, vectors, (values > tol) & (values > 0)

    def gramian_weights(self, gramian, losses):
        values, vectors, keep = self._eigenpairs(gramian)
        k = self.num_tasks
        rank = tf.reduce_sum(tf.cast(keep, tf.int32))
        safe = tf.where(keep, values, 1.0)
        if self.scale_mode == "min":
            sigma = tf.reduce_min(tf.where(keep, values, np.inf))
        elif self.scale_mode == "median":
            index = k - rank + (rank - 1) // 2  # lower median of the kept (the last rank)
            sigma = tf.gather(values, tf.clip_by_value(index, 0, k - 1))
        else:
            sigma = tf.reduce_sum(tf.where(keep, values, 0.0)) / tf.cast(
                tf.maximum(rank, 1), tf.float64)
        sigma = tf.where(rank > 0, sigma, 0.0)
        inverse_root = tf.where(keep, 1.0 / tf.sqrt(safe), 0.0)
        b = tf.sqrt(sigma) * tf.matmul(vectors * inverse_root[None, :], vectors,
                                       transpose_b=True)
        p = tf.ones([k], tf.float64)
        if self.preference == "mean":
            p = p / k
        w = tf.linalg.matvec(b, p)
        return tf.cast(w, gramian.dtype)

    def get_config(self):
        return {**super().get_config(), "scale_mode": self.scale_mode,
                "preference": self.preference, "truncation": self.truncation}
