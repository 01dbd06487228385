"""FAMO: Fast Adaptive Multitask Optimization (Liu et al., 2023)."""

import tensorflow as tf

from lossbalance.strategies._loss_utils import global_losses
from lossbalance.strategies.arguments import check_number, resolve_per_task
from lossbalance.strategies.base import LossWeighting
from lossbalance.strategies.registry import register


def _check_min_loss(name, value):
    return check_number(name, value)


@register("famo")
class FAMO(LossWeighting):
    """Balance the rate at which every task's log loss falls, at O(1) cost per step.

    Formula. The strategy keeps task logits xi (K,), z = softmax(xi). With
    D_k = L_k - m_k + eps (m_k a known lower bound of the loss, default 0) and
    c = sum_k z_k / D_k, the model takes one backward pass of
        sum_k (z_k / c) log D_k,  i.e. of sum_k w_k L_k with w_k = stop_gradient(z_k / (c D_k)),
    so the weights are the z-weighted inverse losses, normalised to sum to 1. After the
    model's optimizer step, with the same batch's losses L'_k:
        delta_k = log D_k - log D'_k                       (decrease of each log loss)
        grad    = J_softmax(xi)^T delta + gamma xi  = z * (delta - <z, delta>) + gamma xi
        xi     <- Adam step on grad with learning rate `learning_rate`.
    Descending on <z, delta> moves weight away from the tasks whose loss fell most, toward
    the task whose loss falls slowest; gamma decays the logits toward equal weights.

    Defaults: `learning_rate=0.025`, `gamma=1e-3` (LibMTL's and the paper's usual values;
    the authors' class defaults to gamma=0.01), logits start at 0 (equal weights),
    `min_losses=0`, `epsilon=1e-8`; the logits' optimizer is Adam (beta_1=0.9,
    beta_2=0.999, epsilon 1e-8) with the decay added to the gradient (coupled L2), as the
    authors' code does with `torch.optim.Adam(weight_decay=gamma)`. The paper writes the
    update as plain gradient descent; the published code and LibMTL use Adam, as here.

    Post-step losses and their cost: the update needs the losses of the *same* batch after
    the model's parameters changed. The strategy sets `uses_post_step_losses = True`, and
    `BalancedModel.train_step` then runs one extra forward pass on the batch after
    `optimizer.apply` (in training mode, as the authors' code does) and calls
    `update_after_step(losses_before, losses_after)`. That forward pass is the whole
    overhead: about a third of a plain training step for a typical network, no extra
    backward pass and no per-task gradients. In a custom training loop, call
    `update_after_step` yourself after each optimizer step. Under `tf.distribute` the
    update uses the global batch's losses, so all replicas keep the same logits.

    The logits and the Adam moments are variables of the strategy, saved with the model.
    The Adam step is written out rather than a `keras.optimizers.Adam`: Keras' Adam puts
    epsilon outside sqrt(v) before the bias correction (an effective epsilon of
    1e-8 / sqrt(1 - beta_2^t), larger in the first steps) and decays weights decoupled,
    so it would not be the authors' update; and its slots would change the saved format
    of every FAMO model.
    The logged `loss` is sum_k w_k L_k, a z-weighted harmonic mean of the losses.

    Args:
        learning_rate: step size of the logits' Adam, > 0 (also accepted as `lr`).
        gamma: decay of the logits, >= 0.
        min_losses: m_k, a lower bound of each task's loss: a number, a list in task order,
            or a dict by task name (default 0 for every task). `fit` stops with an error
            when a task's logged mean loss falls below it.
        epsilon: the eps in D_k, > 0.

    Reference: B. Liu, Y. Feng, P. Stone, Q. Liu, "FAMO: Fast Adaptive Multitask
    Optimization", NeurIPS 2023.
    """

    uses_post_step_losses = True
    scale_invariant = True  # balances log losses (up to epsilon in D_k)

    def __init__(self, learning_rate=0.025, gamma=1e-3, min_losses=None, epsilon=1e-8,
                 lr=None, **kwargs):
        super().__init__(**kwargs)
        if lr is not None:
            learning_rate = lr
        self.learning_rate = check_number("learning_rate", learning_rate, minimum=0.0,
                                          strict=True)
        self.gamma = check_number("gamma", gamma, minimum=0.0)
        self.epsilon = check_number("epsilon", epsilon, minimum=0.0, strict=True)
        if isinstance(min_losses, dict):
            self.min_losses = {k: _check_min_loss(f"min_losses[{k!r}]", v)
                               for k, v in min_losses.items()}
        elif min_losses is None or isinstance(min_losses, (int, float)):
            self.min_losses = (None if min_losses is None
                               else _check_min_loss("min_losses", min_losses))
        else:
            self.min_losses = [_check_min_loss(f"min_losses[{i}]", v)
                               for i, v in enumerate(min_losses)]
        self.beta_1, self.beta_2, self.adam_epsilon = 0.9, 0.999, 1e-8

    def build_state(self, num_tasks):
        self._min_losses = tf.constant(
            resolve_per_task("min_losses", self.min_losses, self.task_names, default=0.0,
                             validate=_check_min_loss), tf.float32)

        #: Task logits xi; the task weights before normalisation are softmax(xi).
        self.logits = self.add_state("logits", (num_tasks,))
        self.adam_m = self.add_state("adam_m", (num_tasks,))
        self.adam_v = self.add_state("adam_v", (num_tasks,))
        self.adam_steps = self.add_state("adam_steps")

    def loss_floors(self):
        return self._min_losses.numpy().tolist()

    def loss_floor_fix(self):
        return ("FAMO balances log(L_k - min_losses_k): pass `min_losses` with a lower bound "
                "of each such task's loss (a number, a list in task order, or a dict by "
                "task name).")

    def _log_gap(self, global_loss_values):
        gap = tf.cast(global_loss_values, tf.float32) - self._min_losses
        return tf.math.log(tf.maximum(gap, 0.0) + self.epsilon)

    @property
    def task_preferences(self):
        """z = softmax(xi), as a NumPy array."""
        return tf.nn.softmax(tf.convert_to_tensor(self.logits)).numpy()

    def loss_weights(self, losses):
        gap = tf.exp(self._log_gap(global_losses(losses)))
        z = tf.nn.softmax(tf.convert_to_tensor(self.logits))
        scaled = z / gap
        weights = scaled / tf.reduce_sum(scaled)
        return tf.stop_gradient(tf.cast(weights, losses.dtype))

    def update_after_step(self, losses_before, losses_after):
        """One Adam step of the logits from the same batch's losses before and after."""
        # One all-reduce of both, which depends on the post-step forward pass and so runs
        # after the gradients' all-reduce on every replica.
        before, after = tf.unstack(global_losses(tf.stack([losses_before, losses_after])))
        delta = self._log_gap(before) - self._log_gap(after)
        logits = self.read(self.logits)
        z = tf.nn.softmax(logits)
        grad = z * (delta - tf.reduce_sum(z * delta)) + self.gamma * logits

        step = self.read(self.adam_steps) + 1.0
        m = self.beta_1 * self.read(self.adam_m) + (1.0 - self.beta_1) * grad
        v = self.beta_2 * self.read(self.adam_v) + (1.0 - self.beta_2) * grad**2
        m_hat = m / (1.0 - tf.pow(self.beta_1, step))
        v_hat = v / (1.0 - tf.pow(self.beta_2, step))
        self.write(self.adam_steps, step)
        self.write(self.adam_m, m)
        self.write(self.adam_v, v)
        self.write(self.logits, logits - self.learning_rate * m_hat
                   / (tf.sqrt(v_hat) + self.adam_epsilon))

    def get_config(self):
        min_losses = self.min_losses
        if isinstance(min_losses, dict):
            min_losses = dict(min_losses)
        elif min_losses is not None and not isinstance(min_losses, float):
            min_losses = list(min_losses)
        return {**super().get_config(), "learning_rate": self.learning_rate,
                "gamma": self.gamma, "min_losses": min_losses, "epsilon": self.epsilon}
