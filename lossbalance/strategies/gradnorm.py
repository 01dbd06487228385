"""GradNorm: balancing by gradient magnitudes (Chen et al., 2018)."""

import keras
import tensorflow as tf

from lossbalance.replicas import replica_share
from lossbalance.strategies.base import LossWeighting, check_number
from lossbalance.strategies.registry import register


@register("gradnorm")
class GradNorm(LossWeighting):
    """Learn task weights so that every task trains at a similar rate.

    Formula, at every step t with task weights w (sum_k w_k = K) and W the parameters of one
    shared layer:
        G_k = || grad_W (w_k L_k) || = w_k n_k,    mean_G = (1/K) sum_k G_k,
        r_k = (L_k(t) / L_k(0)) / mean_j (L_j(t) / L_j(0))        (relative inverse rate),
        L_grad = sum_k | G_k - mean_G * r_k^alpha |,  the target treated as a constant.
    The model minimises sum_k w_k L_k; the weights take one step of their own optimizer on
    dL_grad/dw_k = sign(G_k - target_k) n_k and are then clipped positive and renormalised to
    sum to K. A task that trains slowly (large r_k) is pushed toward a larger gradient.

    Defaults: `alpha=1.5` (the paper's value for its multi-task experiments); weights
    start at 1; L_k(0) is the loss at the first training step; W is the layer closest to
    the heads that every task depends on, found automatically, or named with `layer=`; the
    weight optimizer is Adam with `learning_rate=0.025`. The paper does not fix the
    weights' optimizer; 0.025 is this package's choice (tune it like any learning rate).
    The gradient norms are taken of each task's loss as compiled (with
    `compile(loss_weights=...)` applied), costing one partial backward pass per task down
    to W only. Published code differs in whether the weights are renormalised before or
    after the model update; here the model step uses the weights from before the update.

    Args:
        alpha: asymmetry, >= 0; 0 pulls all gradient norms to the same value.
        learning_rate: learning rate of the weights' optimizer, > 0.
        optimizer: name or config of a Keras optimizer for the weights (default "adam").
        layer: name of the shared layer whose weights define W (default: automatic).

    Reference: Z. Chen, V. Badrinarayanan, C.-Y. Lee, A. Rabinovich, "GradNorm: Gradient
    Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018.
    """

    #: `BalancedModel` gives `update_with_gradient_norms` each task's gradient norm at the
    #: layer named by `layer` (or the last layer every task depends on).
    uses_layer_gradients = True

    def __init__(self, alpha=1.5, learning_rate=0.025, optimizer="adam", layer=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.alpha = check_number("alpha", alpha, minimum=0.0)
        self.learning_rate = check_number("learning_rate", learning_rate, minimum=0.0,
                                          strict=True)
        if layer is not None and not isinstance(layer, str):
            raise TypeError(f"`layer` must be a layer name or None; got {layer!r}.")
        self.layer = layer
        try:
            probe = keras.optimizers.get(optimizer)
        except ValueError as error:
            raise ValueError(f"GradNorm `optimizer`: {error}") from None
        self.optimizer_config = keras.optimizers.serialize(probe)

    def build_state(self, num_tasks):
        self.task_weights = self.add_weight(
            shape=(num_tasks,), name="task_weights", initializer="ones", trainable=False,
            aggregation="only_first_replica")
        self.initial_losses = self.add_weight(
            shape=(num_tasks,), name="initial_losses", initializer="zeros",
            trainable=False, aggregation="only_first_replica")
        self.has_initial_losses = self.add_weight(
            shape=(), name="has_initial_losses", initializer="zeros", trainable=False,
            aggregation="only_first_replica")
        self.weight_optimizer = keras.optimizers.deserialize(self.optimizer_config)
        self.weight_optimizer.learning_rate = self.learning_rate
        self.weight_optimizer.build([self.task_weights])  # built now so its slots load

    def loss_weights(self, losses):
        return tf.stop_gradient(tf.cast(self.task_weights, losses.dtype))

    def update_with_gradient_norms(self, norms, losses):
        """One GradNorm step on the weights, given n_k = ||grad_W L_k|| and the losses."""
        norms = tf.cast(norms, tf.float32)
        losses = tf.stop_gradient(tf.cast(losses, tf.float32))
        initial = tf.where(self.has_initial_losses > 0, self.initial_losses, losses)
        self.initial_losses.assign(initial)
        self.has_initial_losses.assign(1.0)

        weights = tf.convert_to_tensor(self.task_weights)
        weighted_norms = weights * norms
        rates = tf.math.divide_no_nan(losses, initial)
        relative_rates = tf.math.divide_no_nan(rates, tf.reduce_mean(rates))
        target = tf.reduce_mean(weighted_norms) * relative_rates**self.alpha
        gradient = tf.sign(weighted_norms - target) * norms
        # every replica computes this same gradient; the optimizer sums the replicas'
        self.weight_optimizer.apply([replica_share(gradient)], [self.task_weights])

        k = float(self.num_tasks)
        positive = tf.maximum(tf.convert_to_tensor(self.task_weights), 1e-6 * k)
        self.task_weights.assign(k * positive / tf.reduce_sum(positive))

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha,
                "learning_rate": self.learning_rate,
                "optimizer": self.optimizer_config, "layer": self.layer}
