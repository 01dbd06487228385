"""UW-SO: analytical (soft optimal) uncertainty weighting (Kirchdorfer et al., 2024)."""

import tensorflow as tf

from lossbalance.strategies._loss_utils import global_losses
from lossbalance.strategies.arguments import check_choice, check_number
from lossbalance.strategies.base import LossWeighting
from lossbalance.strategies.registry import register

SUMS = ("one", "num_tasks")


@register("uw_so", aliases=("uwso", "soft_optimal_uncertainty"))
class SoftOptimalUncertaintyWeighting(LossWeighting):
    """Weights from the closed-form optimum of uncertainty weighting, softened by a softmax.

    Formula. Uncertainty weighting (Kendall et al., 2018; `"uncertainty"`) learns one
    variance per task; its optimum for the current losses is analytic, and gives each task
    a weight proportional to 1 / L_k ("UW-O"; the weights of `"scale_invariant"`). UW-SO
    normalises those inverse losses with a softmax at temperature T:
        w_k = exp(1 / (T L_k)) / sum_j exp(1 / (T L_j)),
    held constant (stop_gradient), and the model takes one backward pass of
    sum_k w_k L_k; no parameters are learned and the weights follow each step's losses.
    The task with the smallest loss gets the largest weight. T sets how sharply: as
    T -> infinity the weights tend to 1/K each (equal weighting), as T -> 0 all the weight
    goes to the task with the smallest loss. The logged `loss` is sum_k w_k L_k.

    Task scales: the softmax compares 1 / L_k across tasks in absolute terms, so the
    method depends on the losses' units (not `scale_invariant`): tasks whose losses are all
    well above 1 / T get nearly equal weights (a raw-unit regression with loss ~1e4 beside
    a classifier with loss ~2 gets ~0.38 against ~0.62 at T = 1), and losses well below
    1 / T make the weights one-hot on the smallest loss. T is the knob to tune.

    Defaults: `temperature=1.0` (the default of the authors' published code; the paper
    tunes T per data set and model, and the authors' later experiments search T over
    {1, 3, 5, 7, 10, 15, 20}), `weights_sum="one"` (the paper's softmax weights, summing to
    1), `epsilon=1e-20`. Losses must be non-negative: 1 / L_k is the optimal uncertainty
    only for L_k > 0 (`fit` stops with an error naming a task whose mean loss is negative).
    A loss is clamped below at epsilon before the inverse.

    Implementations differ only numerically: the authors' code computes
    softmax(1 / (L + 1e-8) / T); here the loss is clamped at `epsilon` instead of shifted,
    which is the formula itself for every loss above 1e-20 (the shift halves the inverse of
    a loss of 1e-8), and the softmax is taken in float64, which keeps the weights equal to
    the formula for float32 losses from 1e-8 to 1e8 (1 / (T L_k) up to 1e8 / T; a float32
    softmax would lose relative precision ~1e-7 of those exponents). `weights_sum=
    "num_tasks"` multiplies the weights by K, so that the objective has the scale of the
    plain sum of losses (as `fixed` or DWA) and a learning rate tuned for equal weighting
    carries over.

    Args:
        temperature: T, > 0 (also accepted as `T`).
        weights_sum: "one" (the paper) or "num_tasks" (weights summing to K).
        epsilon: lower clamp of the losses before the inverse, > 0.

    Reference: L. Kirchdorfer, C. Elich, S. Kutsche, H. Stuckenschmidt, L. Schott,
    J. M. Köhler, "Analytical Uncertainty-Based Loss Weighting in Multi-Task Learning",
    GCPR 2024 (arXiv:2408.07985).
    """

    loss_floor = 0.0

    def __init__(self, temperature=1.0, weights_sum="one", epsilon=1e-20, T=None, **kwargs):
        super().__init__(**kwargs)
        if T is not None:
            temperature = T
        self.temperature = check_number("temperature", temperature, minimum=0.0,
                                        strict=True)
        self.weights_sum = check_choice("weights_sum", weights_sum, SUMS)
        self.epsilon = check_number("epsilon", epsilon, minimum=0.0, strict=True)

    def loss_weights(self, losses):
        total = tf.cast(global_losses(losses), tf.float64)
        inverse = 1.0 / (self.temperature * tf.maximum(total, self.epsilon))
        weights = tf.nn.softmax(inverse)
        if self.weights_sum == "num_tasks":
            weights = weights * float(self.num_tasks)
        return tf.stop_gradient(tf.cast(weights, losses.dtype))

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature,
                "weights_sum": self.weights_sum, "epsilon": self.epsilon}
