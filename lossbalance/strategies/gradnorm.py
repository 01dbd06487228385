"""GradNorm: balancing by gradient magnitudes (Chen et al., 2018)."""

import copy

import keras
import tensorflow as tf

from lossbalance.replicas import replica_share
from lossbalance.strategies.arguments import check_choice, check_number
from lossbalance.strategies.base import LossWeighting
from lossbalance.strategies.registry import register

INITIAL_WEIGHTS = ("balanced", "ones")


@register("gradnorm")
class GradNorm(LossWeighting):
    """Learn task weights so that every task trains at a similar rate.

    Formula, at every step t with task weights w (sum_k w_k = K) and W the parameters of one
    shared layer:
        G_k = || grad_W (w_k L_k) || = w_k n_k,    mean_G = (1/K) sum_k G_k,
        r_k = (L_k(t) / L_k(0)) / mean_j (L_j(t) / L_j(0))        (relative inverse rate),
        L_grad = sum_k | G_k - mean_G * r_k^alpha |,  the target treated as a constant.
    The model minimises sum_k w_k L_k; the weights take one step of their own optimizer on
    dL_grad/dw_k = sign(G_k - target_k) n_k and are then clipped positive (>= 1e-6 K) and
    renormalised to sum to K. A task that trains slowly (large r_k) is pushed toward a
    larger gradient; when every task trains at the same rate the weighted gradient norms at
    W are equal, w_k proportional to 1 / n_k.

    Defaults: `alpha=1.5` (the paper's value for NYUv2; its synthetic example uses 0.12);
    L_k(0) is the loss at the first training step; W is the layer closest to the heads that
    every task depends on, found automatically, or named with `layer=`; the weight optimizer
    is Adam with `learning_rate=0.025` (the paper does not fix it; tune it like any learning
    rate); `initial_weights="balanced"`: the first step measures n_k and sets
    w_k = K (1 / n_k) / sum_j (1 / n_j), the weights at which L_grad is 0 for r = 1, and does
    not update the model (its weights are logged as 0); training starts at the second step.
    The gradient norms are taken of each task's loss as compiled (with
    `compile(loss_weights=...)` applied), costing one partial backward pass per task down
    to W only. Here the model step uses the weights from before the weights' update.

    Why the balanced start. The paper starts at w = 1 (`initial_weights="ones"`). With tasks
    on different scales that start is a plain sum, and the weights, moving about one
    learning rate per step, take tens of steps to reach the balance. On the `clfreg`
    benchmark (a classifier beside a regressor in raw units; at the last shared layer n_ink
    / n_digit is ~3000 at the start) the ink weight falls from 1 to the floor in ~40 steps.
    Meanwhile the regression's gradients dominate the shared layers, and the model's Adam
    keeps their scale in its second-moment estimate (beta_2 = 0.999: ~1000 steps), so
    afterwards the last shared layer's steps are 17 times shorter than with the balanced
    start (steps 60-100; 5 times at steps 140-160) and neither task learns in the 340-step
    budget: digit accuracy 49-69% and ink MAE 254-286 against 2.8 for a plain sum (3 seeds;
    with Adam's beta_2 = 0.9, seed 0, the ink MAE is 17). It is not a bug: with a weight
    learning rate of 1e-12 the weights stay at 1 and the run reproduces `fixed` to the
    digit, and the L_grad formulas are the paper's (and LibMTL's). Nor is it the weights
    GradNorm settles at: they are the same with either start after epoch 4 (~2 and ~1e-3),
    and fixed weights at that ratio, (2, 8e-4), give 91% and MAE 3.7 (seed 0). With the
    balanced start the same three runs give 89-90% and MAE 9.5-12.6
    (docs/results/gradnorm-clfreg.png).

    What remains is the method. Once the regression's loss has fallen by orders of magnitude
    (which its loss can, a cross-entropy from 2.3 cannot), its inverse training rate r_k is
    tiny and alpha > 0 lowers its target, so GradNorm holds the fast task back: on clfreg
    the ink weight falls from ~1e-3 to ~1e-4 over the last ten epochs, which is why its MAE
    stays at ~10. That is the paper's intent (equal training rates), right for tasks on
    comparable loss curves and a poor fit for a regression in raw units beside a
    classifier; a smaller alpha fits that case better (clfreg, 3 seeds: alpha=0.5 gives
    90-91% and MAE 4.3-4.9, alpha=0 89-91% and MAE 1.5-1.8, below the single-task 2.8),
    while on the `synthetic` benchmark (the paper's regressions, scales 1 to 100) alpha=1.5
    does better (3 seeds: the largest task's test loss ~5050, against ~6540 with alpha=0.5,
    alpha=0 or `fixed`). Additive steps of 0.025 on a weight whose balance lies at
    ~1e-3 also make it jump between the floor and a few times 1e-3 from step to step; a
    smaller `learning_rate` trades that for slower tracking.

    Implementations differ: the paper updates the weights additively from w = 1 and
    renormalises after each step (as here with `initial_weights="ones"`); LibMTL learns
    w = K softmax(theta) (multiplicative steps) with the network's optimizer, takes L_k(0)
    as the mean loss of a first epoch trained with equal weights, and takes the gradient
    norms over all shared parameters rather than one layer.

    Args:
        alpha: asymmetry, >= 0; 0 pulls all gradient norms to the same value.
        learning_rate: learning rate of the weights' optimizer, > 0.
        optimizer: name or config of a Keras optimizer for the weights (default "adam").
        layer: name of the shared layer whose weights define W (default: automatic).
        initial_weights: "balanced" (default: set from the first step's gradient norms, see
            above) or "ones" (the paper: w = 1, the model trained from the first step).

    Reference: Z. Chen, V. Badrinarayanan, C.-Y. Lee, A. Rabinovich, "GradNorm: Gradient
    Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018.
    """

    #: `BalancedModel` gives `update_with_gradient_norms` each task's gradient norm at the
    #: layer named by `layer` (or the last layer every task depends on).
    uses_layer_gradients = True

    def __init__(self, alpha=1.5, learning_rate=0.025, optimizer="adam", layer=None,
                 initial_weights="balanced", **kwargs):
        super().__init__(**kwargs)
        self.alpha = check_number("alpha", alpha, minimum=0.0)
        self.learning_rate = check_number("learning_rate", learning_rate, minimum=0.0,
                                          strict=True)
        if layer is not None and not isinstance(layer, str):
            raise TypeError(f"`layer` must be a layer name or None; got {layer!r}.")
        self.layer = layer
        self.initial_weights = check_choice("initial_weights", initial_weights,
                                            INITIAL_WEIGHTS)
        try:
            # a copy: Keras' deserialisation edits a config dict in place
            probe = keras.optimizers.get(copy.deepcopy(optimizer))
        except ValueError as error:
            raise ValueError(f"GradNorm `optimizer`: {error}") from None
        self.optimizer_config = keras.optimizers.serialize(probe)

    def build_state(self, num_tasks):
        self.task_weights = self.add_state("task_weights", (num_tasks,), "ones")
        self.initial_losses = self.add_state("initial_losses", (num_tasks,))
        self.has_initial_losses = self.add_state("has_initial_losses")
        self.weight_optimizer = keras.optimizers.deserialize(self.optimizer_config)
        self.weight_optimizer.learning_rate = self.learning_rate
        self.weight_optimizer.build([self.task_weights])  # built now so its slots load

    def loss_weights(self, losses):
        weights = tf.convert_to_tensor(self.task_weights)
        if self.initial_weights == "balanced":  # 0 until the first step has measured
            weights = weights * self.has_initial_losses
        return tf.stop_gradient(tf.cast(weights, losses.dtype))

    def update_with_gradient_norms(self, norms, losses):
        """One GradNorm step on the weights, given n_k = ||grad_W L_k|| and the losses."""
        norms = tf.cast(norms, tf.float32)
        losses = tf.stop_gradient(tf.cast(losses, tf.float32))
        first = self.read(self.has_initial_losses) <= 0
        initial = tf.where(first, losses, self.read(self.initial_losses))
        self.write(self.initial_losses, initial)
        self.write(self.has_initial_losses, 1.0)

        weights = self.read(self.task_weights)
        if self.initial_weights == "balanced":
            weights = tf.where(first, self._balanced(norms, weights), weights)
            self.write(self.task_weights, weights)
        weighted_norms = weights * norms
        rates = tf.math.divide_no_nan(losses, initial)
        relative_rates = tf.math.divide_no_nan(rates, tf.reduce_mean(rates))
        target = tf.reduce_mean(weighted_norms) * relative_rates**self.alpha
        gradient = tf.sign(weighted_norms - target) * norms
        if self.initial_weights == "balanced":  # the measuring step leaves w where it set it
            gradient = tf.where(first, tf.zeros_like(gradient), gradient)
        self.defer(self._step_weights, gradient)

    def _step_weights(self, gradient):
        """The weights' optimizer step, then the weights renormalised to sum to K."""
        # every replica computes this same gradient; the optimizer sums the replicas'
        self.weight_optimizer.apply([replica_share(gradient)], [self.task_weights])
        k = float(self.num_tasks)
        positive = tf.maximum(tf.convert_to_tensor(self.task_weights), 1e-6 * k)
        self.task_weights.assign(k * positive / tf.reduce_sum(positive))

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha,
                "learning_rate": self.learning_rate,
                "optimizer": self.optimizer_config, "layer": self.layer,
                "initial_weights": self.initial_weights}

    def _balanced(self, norms, fallback):
        """K (1 / n_k) / sum_j (1 / n_j): equal weighted norms summing to K, or `fallback`
        when a norm is 0 or not finite (no balance exists)."""
        usable = tf.reduce_all(tf.logical_and(norms > 0, tf.math.is_finite(norms)))
        inverse = 1.0 / tf.where(usable, norms, tf.ones_like(norms))
        balanced = float(self.num_tasks) * inverse / tf.reduce_sum(inverse)
        return tf.where(usable, balanced, fallback)
