"""Gradient Vaccine: adaptive gradient-similarity targets (Wang et al., 2021)."""

import tensorflow as tf

from lossbalance import solvers
from lossbalance.strategies.arguments import check_number, random_orders
from lossbalance.strategies.base import GramianWeighting
from lossbalance.strategies.registry import register


@register("gradvac", aliases=("gradient_vaccine",))
class GradVac(GramianWeighting):
    """Raise each pair of tasks' gradient similarity toward a moving target, then sum.

    Formula: for every task i, start from g_i' = g_i and visit the other tasks j in a random
    order; with phi = cos(g_i', g_j) and the target phi_hat_ij, if phi < phi_hat_ij:
        g_i' <- g_i' + g_j |g_i'| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
                                    / (|g_j| sqrt(1 - phi_hat^2)),
    which sets cos(g_i', g_j) to phi_hat. After each visit the target follows an exponential
    moving average, phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi. The update is sum_i g_i'.
    PCGrad is the special case of a constant target 0.

    Every g_i' is a combination of the original gradients, so the method runs on the
    Gramian, tracking coefficients as `PCGrad` does. The targets are a K x K non-trainable
    variable (saved with the model), starting at 0.

    Conventions: as in LibMTL's port (the paper's public code base), the targets are
    updated on every visit with the current phi, and the whole shared parameter vector is
    treated as one block; the paper's per-layer variant (layer-wise targets) is
    `compile(grouping="layer")`, which gives each layer its own copy and targets.
    Projected gradients are summed. Orders are drawn per step from a
    Keras `SeedGenerator` (`seed=` or `keras.utils.set_random_seed`).

    Args:
        beta: EMA rate of the targets, in [0, 1] (default 0.5, LibMTL's; the paper uses
            1e-2).
        seed: optional int seed for the task orders.

    Reference: Z. Wang, Y. Tsvetkov, O. Firat, Y. Cao, "Gradient Vaccine: Investigating and
    Improving Multi-task Optimization in Massively Multilingual Models", ICLR 2021.
    """

    def __init__(self, beta=0.5, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.beta = check_number("beta", beta, minimum=0.0, maximum=1.0)
        self.seed_generator = self.add_seed_generator(seed)  # checks the seed
        self.seed = seed

    def build_state(self, num_tasks):
        self.targets = self.add_state("targets", (num_tasks, num_tasks))

    def gramian_weights(self, gramian, losses):
        k = self.num_tasks
        g = tf.cast(gramian, tf.float64)
        g = solvers.finite_or_zero(g)
        orders = random_orders(self.seed_generator, k)
        norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(g), 0.0))
        targets = tf.cast(self.read(self.targets), tf.float64)
        coefficients = tf.eye(k, dtype=tf.float64)
        rows = tf.range(k)
        tiny = 1e-300
        for step in range(k - 1):
            other = orders[:, step]
            dots = tf.reduce_sum(coefficients * tf.gather(g, other), axis=1)
            own_sq = tf.reduce_sum(coefficients * tf.matmul(coefficients, g), axis=1)
            own = tf.sqrt(tf.maximum(own_sq, 0.0))
            other_norm = tf.gather(norms, other)
            valid = (own > tiny) & (other_norm > tiny)
            phi = tf.where(valid, dots / tf.where(valid, own * other_norm, 1.0), 0.0)
            phi = tf.clip_by_value(phi, -1.0, 1.0)
            index = tf.stack([rows, other], axis=1)
            target = tf.gather_nd(targets, index)
            adjust = valid & (phi < target)
            root_target = tf.sqrt(tf.maximum(1.0 - target ** 2, 0.0))
            ok = adjust & (root_target > 1e-12)
            factor = own * (target * tf.sqrt(tf.maximum(1.0 - phi ** 2, 0.0))
                            - phi * root_target) / tf.where(ok, other_norm * root_target, 1.0)
            factor = tf.where(ok, factor, 0.0)
            coefficients += factor[:, None] * tf.one_hot(other, k, dtype=tf.float64)
            updated = (1.0 - self.beta) * target + self.beta * phi
            targets = tf.tensor_scatter_nd_update(targets, index,
                                                  tf.where(valid, updated, target))
        if k > 1:
            self.write(self.targets, targets)
        return tf.cast(tf.reduce_sum(coefficients, axis=0), gramian.dtype)

    def get_config(self):
        return {**super().get_config(), "beta": self.beta, "seed": self.seed}
