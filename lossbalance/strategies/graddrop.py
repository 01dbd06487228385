"""GradDrop: gradient sign dropout (Chen et al., 2020)."""

import keras
import tensorflow as tf

from lossbalance import solvers
from lossbalance.strategies.arguments import check_number
from lossbalance.strategies.base import JacobianAggregator
from lossbalance.strategies.registry import register


@register("graddrop", aliases=("grad_drop",))
class GradDrop(JacobianAggregator):
    """Keep, per coordinate, only the gradients of one sign, chosen by sign purity.

    Formula, element-wise over the shared parameters with task gradients g_i:
        P = (1/2) (1 + sum_i g_i / sum_i |g_i|)        (sign purity, in [0, 1]),
        U ~ Uniform(0, 1),   M_i = 1[P > U] 1[g_i > 0] + 1[P < U] 1[g_i < 0],
        update = sum_i (leak_i + (1 - leak_i) M_i) g_i.
    Where all gradients agree in sign nothing is dropped; where they conflict, positive
    gradients survive with probability P. A coordinate with all-zero gradients has P = 1/2.

    Conventions: the paper applies GradDrop to the gradients at a shared activation layer
    (with the activations' sign as a modulation for batch-separated inputs); like LibMTL's
    parameter-level mode and TorchJD's `GradDrop`, this one applies it to the per-task
    gradients on the shared parameters, without modulation. `leak` lets a fraction of every
    gradient through (default 0: the paper). The updates are summed (the paper sums).
    The weight logged per task is the fraction of its squared gradient norm kept,
    g_i . g_i' / |g_i|^2 (1 when nothing is dropped). Randomness comes from a Keras
    `SeedGenerator` (`seed=` or `keras.utils.set_random_seed`).

    Args:
        leak: in [0, 1]; one value for all tasks (default 0.0).
        seed: optional int seed.

    Reference: Z. Chen, J. Ngiam, Y. Huang, T. Luong, H. Kretzschmar, Y. Chai, D. Anguelov,
    "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
    NeurIPS 2020.
    """

    def __init__(self, leak=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.leak = check_number("leak", leak, minimum=0.0, maximum=1.0)
        self.seed_generator = self.add_seed_generator(seed)  # checks the seed
        self.seed = seed

    def aggregate(self, jacobian, losses):
        j = tf.convert_to_tensor(jacobian)
        j = solvers.finite_or_zero(j)
        total = tf.reduce_sum(j, axis=0)
        magnitude = tf.reduce_sum(tf.abs(j), axis=0)
        purity = 0.5 * (1.0 + tf.math.divide_no_nan(total, magnitude))
        noise = tf.cast(keras.random.uniform(tf.shape(total), seed=self.seed_generator),
                        j.dtype)
        keep_positive = tf.cast(purity > noise, j.dtype)
        keep_negative = tf.cast(purity < noise, j.dtype)
        mask = (keep_positive[None, :] * tf.cast(j > 0, j.dtype)
                + keep_negative[None, :] * tf.cast(j < 0, j.dtype))
        mask = self.leak + (1.0 - self.leak) * mask
        kept = mask * j
        direction = tf.reduce_sum(kept, axis=0)
        squared = tf.reduce_sum(j * j, axis=1)
        weights = tf.math.divide_no_nan(tf.reduce_sum(kept * j, axis=1), squared)
        return direction, weights

    def get_config(self):
        return {**super().get_config(), "leak": self.leak, "seed": self.seed}
