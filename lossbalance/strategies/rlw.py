"""Random Loss Weighting (Lin et al., 2022)."""

import keras
import tensorflow as tf

from lossbalance.strategies.arguments import check_choice, check_number
from lossbalance.strategies.base import LossWeighting
from lossbalance.strategies.registry import register

DISTRIBUTIONS = ("normal", "dirichlet")
SUMS = ("one", "num_tasks")


@register("rlw")
class RandomLossWeighting(LossWeighting):
    """Draw fresh random task weights at every training step.

    Formula, at every step:
        normal (default):  w = softmax(u),  u ~ N(0, stddev^2 I_K)
        dirichlet:         w ~ Dirichlet(alpha 1_K)  (drawn as normalised Gamma(alpha) draws)
    and the model minimises sum_k w_k L_k with one backward pass (the weights receive no
    gradient). Both give weights on the simplex: positive, summing to 1, equal in
    expectation. `weights_sum="num_tasks"` multiplies them by K, so the objective has the
    scale of the plain sum of losses (as `fixed` or DWA) and the learning rate tuned for
    equal weighting carries over; the paper's weights sum to 1.

    Defaults: `distribution="normal"`, `stddev=1` (the paper's main variant and LibMTL's),
    `alpha=1` for the Dirichlet option (uniform on the simplex), `weights_sum="one"`.

    Randomness comes from a `keras.random.SeedGenerator`, created when the strategy is bound
    to the model (at `compile`): `keras.utils.set_random_seed(s)` before `compile` (or an
    explicit `seed=`) makes the sequence of weights repeatable. The generator's state is
    saved with the model, so a reloaded model continues the sequence. Under `tf.distribute`
    every replica starts from the same state and so draws the same weights. Every call of
    `loss_weights` advances the generator: call it once per training step.

    Implementations differ: the paper studies several distributions, each normalised with a
    softmax except the Dirichlet, which already lies on the simplex; LibMTL implements the
    normal-softmax variant only. This one offers both, with the paper's normalisations.

    Args:
        distribution: "normal" (softmax of a normal draw) or "dirichlet".
        stddev: standard deviation of the normal draw, > 0.
        alpha: Dirichlet concentration, > 0.
        weights_sum: "one" (the paper) or "num_tasks" (sum K).
        seed: integer seed of the generator, or None to take one from Keras' global seed.

    Reference: B. Lin, F. Ye, Y. Zhang, I. W. Tsang, "Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022.
    """

    allows_zero_loss_weights = True

    def __init__(self, distribution="normal", stddev=1.0, alpha=1.0, weights_sum="one",
                 seed=None, **kwargs):
        super().__init__(**kwargs)
        self.distribution = check_choice("distribution", distribution, DISTRIBUTIONS)
        self.stddev = check_number("stddev", stddev, minimum=0.0, strict=True)
        self.alpha = check_number("alpha", alpha, minimum=0.0, strict=True)
        self.weights_sum = check_choice("weights_sum", weights_sum, SUMS)
        if seed is not None:
            seed = check_number("seed", seed, minimum=0, integer=True)
        self.seed = seed

    def build_state(self, num_tasks):
        self.seed_generator = self.add_seed_generator(self.seed)

    def loss_weights(self, losses):
        """A new random draw of weights; every call advances the generator."""
        k = self.num_tasks
        if self.distribution == "normal":
            draw = keras.random.normal((k,), stddev=self.stddev, seed=self.seed_generator)
            weights = tf.nn.softmax(tf.cast(draw, tf.float32))
        else:
            draw = keras.random.gamma((k,), alpha=self.alpha, seed=self.seed_generator)
            draw = tf.maximum(tf.cast(draw, tf.float32), 1e-30)  # tiny alpha underflows
            weights = draw / tf.reduce_sum(draw)
        if self.weights_sum == "num_tasks":
            weights = weights * float(k)
        return tf.stop_gradient(tf.cast(weights, losses.dtype))

    def get_config(self):
        return {**super().get_config(), "distribution": self.distribution,
                "stddev": self.stddev, "alpha": self.alpha,
                "weights_sum": self.weights_sum, "seed": self.seed}
