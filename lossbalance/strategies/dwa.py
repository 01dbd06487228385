"""Dynamic Weight Average (Liu, Johns & Davison, 2019)."""

import numpy as np
import tensorflow as tf

from lossbalance.replicas import num_replicas
from lossbalance.strategies._loss_utils import global_losses
from lossbalance.strategies.arguments import check_number
from lossbalance.strategies.base import LossWeighting
from lossbalance.strategies.registry import register


@register("dwa")
class DynamicWeightAverage(LossWeighting):
    """Weight each task by how slowly its loss fell over the last two epochs.

    Formula, with Lbar_k(t) the average loss of task k over the steps of epoch t:
        r_k(t-1) = Lbar_k(t-1) / Lbar_k(t-2)                  (relative descending rate)
        w_k(t)   = K exp(r_k(t-1) / T) / sum_i exp(r_i(t-1) / T)
    so the weights sum to K, and a task whose loss fell less (r close to or above 1) gets a
    larger weight. In the first two epochs there is no history and w_k = 1. The model
    minimises sum_k w_k L_k with one backward pass; the weights are constants within an
    epoch and receive no gradient.

    Defaults: temperature `T=2`, the paper's value. The epoch averages are of the losses the
    strategy sees (with `compile(loss_weights=...)` applied; the ratios do not depend on
    those constant factors).

    How it keeps its history: every training step adds its task losses to per-epoch sums held
    in non-trainable variables; `BalancedModel.fit` calls `on_epoch_end`, which turns the sums
    into the epoch's averages, rolls the two-epoch history and sets the next epoch's weights
    (a step only reads them). All of it is saved with the model, so a resumed run continues
    with the same weights. In a custom training loop, call `loss_weights` once per step and
    `strategy.on_epoch_end(epoch)` after every epoch.
    Under `tf.distribute`, the losses recorded are those of the global batch.

    Implementations differ: the authors' code (MTAN) and LibMTL use the average of the
    epoch's training losses, as here; some re-implementations use the losses of the last
    one or two *steps* instead, which makes the weights noisy. This one follows the paper.

    Args:
        temperature: T > 0; large T makes the weights nearly equal, small T sharpens them.
            Also accepted as `T`.

    Reference: S. Liu, E. Johns, A. J. Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019.
    """

    def __init__(self, temperature=2.0, T=None, **kwargs):
        super().__init__(**kwargs)
        if T is not None:
            temperature = T
        self.temperature = check_number("temperature", temperature, minimum=0.0,
                                        strict=True)

    def build_state(self, num_tasks):
        #: Sum of each task's loss over the steps of the current epoch.
        self.epoch_loss_sum = self.add_state("epoch_loss_sum", (num_tasks,))
        #: Number of steps recorded in the current epoch.
        self.epoch_steps = self.add_state("epoch_steps")
        #: Average losses of the previous two epochs: row 0 is epoch t-2, row 1 epoch t-1.
        self.loss_history = self.add_state("loss_history", (2, num_tasks))
        #: Number of completed epochs recorded in the history (stops counting at 2).
        self.epochs_recorded = self.add_state("epochs_recorded")
        #: The weights of the current epoch: 1 until two epochs are recorded, then set
        #: from the history by `on_epoch_end` (they are constant within an epoch).
        self.epoch_weights = self.add_state("epoch_weights", (num_tasks,), "ones")

    def loss_weights(self, losses):
        """The weights of this epoch; also records the step's losses (call once a step)."""
        recorded = global_losses(losses)
        self.write(self.epoch_loss_sum, self.read(self.epoch_loss_sum) + recorded)
        self.write(self.epoch_steps, self.read(self.epoch_steps) + 1.0)
        weights = tf.convert_to_tensor(self.epoch_weights)
        if num_replicas() > 1:
            # Under tf.distribute the gradients' all-reduce must follow the losses' one on
            # every replica: the weights (hence the gradients) wait for it.
            with tf.control_dependencies([recorded]):
                weights = tf.identity(weights)
        return tf.stop_gradient(tf.cast(weights, losses.dtype))

    def on_epoch_end(self, epoch):
        steps = float(self.epoch_steps.numpy())
        if steps > 0:  # an epoch without training steps leaves the history as it was
            average = self.epoch_loss_sum.numpy() / steps
            older, last = self.loss_history.numpy()[1], average
            self.loss_history.assign([older, last])
            recorded = min(float(self.epochs_recorded.numpy()) + 1.0, 2.0)
            self.epochs_recorded.assign(recorded)
            if recorded == 2.0:
                self.epoch_weights.assign(self._weights_from_history(older, last))
        self.epoch_loss_sum.assign(tf.zeros_like(self.epoch_loss_sum))
        self.epoch_steps.assign(0.0)

    def _weights_from_history(self, older, last):
        """K softmax(r / T), r = last / older (0 where older is 0), in float64."""
        older, last = np.asarray(older, np.float64), np.asarray(last, np.float64)
        ratios = np.divide(last, older, out=np.zeros_like(last), where=older != 0)
        exps = np.exp((ratios - ratios.max()) / self.temperature)
        return self.num_tasks * exps / exps.sum()

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}
