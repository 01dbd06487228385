"""MGDA: the multiple-gradient descent algorithm as a min-norm problem (Sener & Koltun, 2018)."""

import tensorflow as tf

from lossbalance import solvers
from lossbalance.strategies.arguments import check_choice, check_number
from lossbalance.strategies.base import GramianWeighting
from lossbalance.strategies.registry import register

NORMALIZATIONS = ("none", "l2", "loss", "loss+")
WEIGHTS_ON = ("original", "normalized")


@register("mgda")
class MGDA(GramianWeighting):
    """Follow the min-norm element of the convex hull of the task gradients.

    Formula: with n_k a per-task normaliser and h_k = g_k / n_k,
        w* = argmin_{w >= 0, sum_k w_k = 1} | sum_k w_k h_k |^2 = argmin w^T N^-1 G N^-1 w,
    and the shared update is J^T w* (Sener & Koltun's scaled back-propagation: the weights
    multiply the *unnormalised* task losses). The min-norm point is a common descent
    direction of all tasks, or zero at a Pareto-stationary point. Weights sum to 1.

    Normalisers (`normalization`, from the authors' code): "none" n_k = 1 (the paper's
    method, default), "l2" n_k = |g_k|, "loss" n_k = L_k, "loss+" n_k = L_k |g_k|. A task
    whose normaliser is zero (zero gradient, zero loss) gets h_k = 0.

    Solver: pairwise Frank-Wolfe with the closed-form two-point line search, then an exact
    solve on the support found (`lossbalance.solvers.min_norm_simplex`); the authors' code
    stops after 250 plain Frank-Wolfe steps or a change under 1e-5, which can leave the
    answer visibly inexact for many tasks. Implementations differ in where the weights go
    when gradients are normalised: the authors apply them to the original losses (default,
    `weights_on="original"`); LibMTL applies them to the normalised gradients
    (`weights_on="normalized"`, i.e. the update J^T N^-1 w*). With "none" both agree.

    This is the parameter-level MGDA; the paper's MGDA-UB bound (gradients at the shared
    representation) is a choice of where per-task gradients are taken, not a strategy.

    Args:
        normalization: "none", "l2", "loss" or "loss+".
        weights_on: "original" or "normalized" (see above).
        max_iterations: cap on Frank-Wolfe steps (default 1000).

    Reference: O. Sener, V. Koltun, "Multi-Task Learning as Multi-Objective Optimization",
    NeurIPS 2018; J.-A. Desideri, "Multiple-gradient descent algorithm (MGDA) for
    multiobjective optimization", C. R. Math. 2012.
    """

    xla_max_tasks = 16  # Wolfe's loop of small solves (see GramianWeighting)

    def __init__(self, normalization="none", weights_on="original", max_iterations=1000,
                 **kwargs):
        super().__init__(**kwargs)
        self.normalization = check_choice("normalization", normalization, NORMALIZATIONS)
        self.weights_on = check_choice("weights_on", weights_on, WEIGHTS_ON)
        self.max_iterations = check_number("max_iterations", max_iterations, minimum=1,
                                           integer=True)

    @property
    def non_conflicting(self):
        # (G w)_k >= w^T G w >= 0 for the min-norm point of the gradients themselves, and
        # of the normalised ones when the weights go to them; "loss" normalisers need
        # positive losses, which the other strategies' floors do not ask of MGDA.
        return self.normalization == "none" or (self.weights_on == "normalized"
                                                and self.normalization == "l2")

    @property
    def scale_invariant(self):
        return self.normalization == "l2" and self.weights_on == "normalized"

    @property
    def uses_losses(self):
        return self.normalization in ("loss", "loss+")

    def gramian_weights(self, gramian, losses):
        g = tf.cast(gramian, tf.float64)
        norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(g), 0.0))
        losses = tf.cast(losses, tf.float64)
        if self.normalization == "none":
            normalizer = tf.ones_like(norms)
        elif self.normalization == "l2":
            normalizer = norms
        elif self.normalization == "loss":
            normalizer = losses
        else:
            normalizer = losses * norms
        ok = tf.math.is_finite(normalizer) & (tf.abs(normalizer) > 0)
        inverse = tf.where(ok, 1.0 / tf.where(ok, normalizer, 1.0), 0.0)
        normalized = g * inverse[:, None] * inverse[None, :]
        w = solvers.min_norm_simplex(normalized, max_iterations=self.max_iterations)
        if self.weights_on == "normalized":
            w = w * inverse
        return tf.cast(w, gramian.dtype)

    def get_config(self):
        return {**super().get_config(), "normalization": self.normalization,
                "weights_on": self.weights_on, "max_iterations": self.max_iterations}
