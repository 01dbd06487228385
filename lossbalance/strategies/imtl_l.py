"""IMTL-L: impartial multi-task learning, loss balance (Liu et al., 2021)."""

import keras
import tensorflow as tf

from lossbalance.replicas import replica_share
from lossbalance.strategies.arguments import check_number
from lossbalance.strategies.base import LossWeighting
from lossbalance.strategies.registry import register


class LearnedLossScales:
    """Mixin: one trainable log-scale s_k per task, trained by the model's optimizer and
    saved with the model (IMTL-L, and the IMTL hybrid)."""

    loss_floor = 0.0  # for L_k < 0, e^{s_k} L_k - s_k has no minimum

    def __init__(self, initial_log_scale=0.0, **kwargs):
        super().__init__(**kwargs)
        self.initial_log_scale = check_number("initial_log_scale", initial_log_scale)

    def build_state(self, num_tasks):
        #: s_k, trained by the model's optimizer.
        self.log_scale = self.add_weight(
            shape=(num_tasks,), name="log_scale", trainable=True,
            initializer=keras.initializers.Constant(self.initial_log_scale),
            aggregation="mean")

    @property
    def scales(self):
        """e^{s_k} for every task, as a NumPy array."""
        return tf.exp(self.log_scale.value).numpy()

    def get_config(self):
        return {**super().get_config(), "initial_log_scale": self.initial_log_scale}


@register("imtl_l")
class IMTLL(LearnedLossScales, LossWeighting):
    """Learn one loss scale per task so that the scaled losses stay equal.

    Formula, with s_k a trainable variable per task:
        minimise  sum_k ( e^{s_k} L_k - s_k )
    jointly over the model and s. For the model this is sum_k w_k L_k with w_k = e^{s_k};
    for s_k the gradient is e^{s_k} L_k - 1, zero where e^{s_k} L_k = 1: at its fixed point
    every scaled loss equals 1, whatever the scale of the raw losses, so no task dominates
    for being measured in larger units. The logged `<task>_weight` is e^{s_k}. Losses must
    be non-negative: for L_k < 0 the objective falls without bound as s_k grows; `fit`
    stops with an error naming the task when a task's logged mean loss is negative
    (`Strategy.check_losses`).

    Defaults: s_k starts at `initial_log_scale=0` (every weight 1). The scales are trained by
    the model's own optimizer, with the model's learning rate, as uncertainty weighting
    does; they are variables of the strategy and saved with the model. Under
    `tf.distribute` the -s_k term is divided by the replica count, because the optimizer
    sums the replicas' gradients.

    Implementations differ little: the paper and LibMTL (the loss part of its `IMTL`)
    learn s with the model's optimizer, as here. The paper's full method, IMTL, adds IMTL-G,
    a gradient-level step on the shared parameters; this strategy is the loss part alone.
    The formula is uncertainty weighting's classification form with s = -log sigma^2 and
    the log term doubled, which moves the fixed point to scaled losses equal to 1.

    Args:
        initial_log_scale: starting s_k for every task (a number).

    Reference: L. Liu, Y. Li, Z. Kuang, J.-H. Xue, Y. Chen, W. Yang, Q. Liao, W. Zhang,
    "Towards Impartial Multi-task Learning", ICLR 2021.
    """

    def loss_weights(self, losses):
        # Differentiable: its gradient trains s through e^{s_k} L_k.
        return tf.exp(tf.cast(self.log_scale, losses.dtype))

    def extra_loss(self, losses):
        return replica_share(-tf.reduce_sum(tf.cast(self.log_scale, losses.dtype)))

