"""PCGrad: projecting conflicting gradients (Yu et al., 2020)."""

import tensorflow as tf

from lossbalance.strategies.arguments import random_orders
from lossbalance.strategies.base import GramianWeighting
from lossbalance.strategies.registry import register


@register("pcgrad")
class PCGrad(GramianWeighting):
    """Project each task's gradient off the gradients it conflicts with, then sum.

    Formula: for every task i, start from g_i^PC = g_i and visit the other tasks j in a
    random order; whenever g_i^PC . g_j < 0, set g_i^PC <- g_i^PC - (g_i^PC . g_j / |g_j|^2) g_j
    (projection against the *original* g_j). The shared update is sum_i g_i^PC.

    Every g_i^PC is a combination of the original gradients, so the method runs on the
    K x K Gramian: it tracks the coefficients c_i with g_i^PC = J^T c_i and returns
    w = sum_i c_i. Cost does not depend on the number of parameters. A task whose gradient
    is zero is never projected against (no division by zero).

    Defaults and conventions: the projected gradients are summed, as in the paper and the
    authors' code (some ports take the mean, which only rescales the step). A fresh random
    order is drawn for every task at every step from a Keras `SeedGenerator`, so
    `keras.utils.set_random_seed` (or `seed=`) makes runs repeatable. Head-specific
    parameters receive their own task's gradient, unprojected.

    Args:
        seed: optional int seed for the task orders.

    Reference: T. Yu, S. Kumar, A. Gupta, S. Levine, K. Hausman, C. Finn, "Gradient Surgery
    for Multi-Task Learning", NeurIPS 2020.
    """

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = self.add_seed_generator(seed)  # checks the seed
        self.seed = seed

    def projection_orders(self):
        """(K, K-1) int tensor: row i is the random order in which task i visits the others."""
        return random_orders(self.seed_generator, self.num_tasks)

    def gramian_weights(self, gramian, losses):
        k = self.num_tasks
        orders = self.projection_orders()
        squared_norms = tf.linalg.diag_part(gramian)
        coefficients = tf.eye(k, dtype=gramian.dtype)  # row i: g_i^PC in terms of J's rows
        for step in range(k - 1):
            other = orders[:, step]
            dots = tf.reduce_sum(coefficients * tf.gather(gramian, other), axis=1)
            other_norm = tf.gather(squared_norms, other)
            project = (dots < 0) & (other_norm > 0)
            factor = tf.where(project, dots / tf.where(project, other_norm, 1), 0)
            coefficients -= factor[:, None] * tf.one_hot(other, k, dtype=gramian.dtype)
        return tf.reduce_sum(coefficients, axis=0)

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}
