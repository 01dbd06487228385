"""Plain reference combinations of the per-task gradients: mean, sum and random weights."""

import keras
import tensorflow as tf

from lossbalance.strategies.base import GramianWeighting
from lossbalance.strategies.registry import register


@register("mean")
class Mean(GramianWeighting):
    """The mean of the task gradients: w_k = 1/K.

    Equal to the `fixed` strategy with weights 1/K (linear scalarisation), but computed
    through the per-task gradient path, so it costs K backward passes in `BalancedModel`;
    use it as the reference point of the gradient-level API (`lossbalance.aggregate`) and
    to check the per-task machinery. For training, `fixed` gives the same update at the
    cost of plain Keras.
    """

    def gramian_weights(self, gramian, losses):
        k = self.num_tasks
        return tf.fill([k], tf.constant(1.0 / k, gramian.dtype))


@register("sum")
class Sum(GramianWeighting):
    """The sum of the task gradients: w_k = 1 (stock Keras' update, through the per-task
    gradient path; `fixed` does the same at the cost of plain Keras)."""

    def gramian_weights(self, gramian, losses):
        return tf.ones([self.num_tasks], gramian.dtype)


@register("random", aliases=("rgw",))
class RandomWeights(GramianWeighting):
    """Random weights at every step: w = softmax(z), z ~ N(0, I_K).

    The gradient-level form of random loss weighting (Lin et al., "Reasonable Effectiveness
    of Random Weighting", TMLR 2022) and of TorchJD's `Random` aggregator: weights are
    positive and sum to 1. Since sum_k w_k g_k is also the gradient of sum_k w_k L_k, the
    loss-level form (cheaper, one backward pass) gives the same update. Drawn from a Keras
    `SeedGenerator` (`seed=` or `keras.utils.set_random_seed`).

    Also registered as `rgw`: LibMTL's Random Gradient Weighting (`RGW`, the paper's
    gradient-level variant) draws `softmax(randn(K))` once per step and weights the task
    gradients with it, at the parameter or representation level: the same definition
    (a standard normal draw, a softmax over the tasks, fresh every step), so the two
    names give the same class and, from the same seed, the same weights.

    Args:
        seed: optional int seed.
    """

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = self.add_seed_generator(seed)  # checks the seed
        self.seed = seed

    def gramian_weights(self, gramian, losses):
        z = keras.random.normal((self.num_tasks,), seed=self.seed_generator)
        return tf.cast(tf.nn.softmax(z), gramian.dtype)

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}
