"""Smooth Tchebycheff scalarisation (Lin et al., 2024)."""

import tensorflow as tf

from lossbalance.strategies._loss_utils import global_losses, surrogate_offset
from lossbalance.strategies.arguments import check_number
from lossbalance.strategies.base import LossWeighting
from lossbalance.strategies.registry import register


@register("stch", aliases=("smooth_tchebycheff",))
class SmoothTchebycheff(LossWeighting):
    """Minimise a smooth approximation of the worst (normalised, log) task loss.

    Formula. The Tchebycheff scalarisation max_k l_k is smoothed with temperature mu:
        S_mu = K mu log sum_k exp(l_k / mu),    max_k l_k <= S_mu / K <= max_k l_k + mu log K,
    so S_mu / K tends to the maximum as mu -> 0 and to the mean (plus a constant) as mu
    grows. Its gradient is K sum_k softmax(l / mu)_k dl_k, a convex combination of the task
    gradients that favours the worst task. Here
        l_k = log(L_k / n_k)       (default, `log_losses=True`), dl_k = g_k / L_k, or
        l_k = L_k / n_k            (`log_losses=False`),          dl_k = g_k / n_k,
    with n_k a "nadir" normaliser: the task's average loss over one warm-up epoch.
    One backward pass of sum_k w_k L_k with w_k = stop_gradient(K softmax(l/mu)_k dl_k/dL_k);
    the logged `loss` is S_mu.

    Warm-up: for the first `warmup_epochs` epochs, and for one more epoch in which the
    average losses are recorded as n_k, the model minimises sum_k log L_k (the
    scale-invariant loss, weights 1 / L_k); the smooth Tchebycheff objective starts after
    that. With `normalize=False` no epoch is recorded, n_k = 1, and STCH starts right
    after `warmup_epochs` epochs (`warmup_epochs=0, normalize=False` uses STCH from the
    first step). Epochs are counted by the strategy's own variable, advanced by
    `BalancedModel.fit` through `on_epoch_end`; in a custom loop call
    `strategy.on_epoch_end(epoch)` after every epoch.

    Defaults: `mu=1.0`, `warmup_epochs=4`, `normalize=True`, `log_losses=True`: the values
    and the multi-task form of the authors' code (their LibMTL-based STCH_MTL, with
    STCH_warmup_epoch=4: epochs 0..4 minimise the log losses, epoch 4 records the nadir).
    Losses are clamped below at `epsilon=1e-20` before logarithms and must be non-negative:
    `fit` stops with an error naming the task when a task's logged mean loss is negative
    (`Strategy.check_losses`).

    Implementations differ: the paper states the general form mu log sum exp(lambda_k
    (L_k - z*_k) / mu) with preferences lambda and an ideal point z*; the authors' multi-task
    code uses log(L_k / n_k), uniform preferences, the factor K and the warm-up above, which
    this class follows. `log_losses=False` gives the paper's form with z* = 0 and
    lambda_k = 1 / n_k.

    Args:
        mu: smoothing temperature, > 0.
        warmup_epochs: epochs of sum-of-log-losses training before recording the nadir,
            an integer >= 0.
        normalize: divide the losses by their average over the recording epoch.
        log_losses: smooth the maximum of log(L_k / n_k) (True) or of L_k / n_k.
        epsilon: lower clamp of the losses, > 0.

    Reference: X. Lin, X. Zhang, Z. Yang, F. Liu, Z. Wang, Q. Zhang, "Smooth Tchebycheff
    Scalarization for Multi-Objective Optimization", ICML 2024.
    """

    loss_floor = 0.0

    def __init__(self, mu=1.0, warmup_epochs=4, normalize=True, log_losses=True,
                 epsilon=1e-20, **kwargs):
        super().__init__(**kwargs)
        self.mu = check_number("mu", mu, minimum=0.0, strict=True)
        self.warmup_epochs = check_number("warmup_epochs", warmup_epochs, minimum=0,
                                          integer=True)
        for flag, value in (("normalize", normalize), ("log_losses", log_losses)):
            if not isinstance(value, bool):
                raise TypeError(f"`{flag}` must be True or False; got {value!r}.")
        self.normalize = normalize
        self.log_losses = log_losses
        self.epsilon = check_number("epsilon", epsilon, minimum=0.0, strict=True)

    @property
    def scale_invariant(self):
        return self.log_losses  # log(c L_k / (c n_k)) = log(L_k / n_k)

    @property
    def stch_start_epoch(self) -> int:
        """Index of the first epoch that uses the smooth Tchebycheff objective."""
        return self.warmup_epochs + (1 if self.normalize else 0)

    def build_state(self, num_tasks):
        #: Completed epochs.
        self.epochs_done = self.add_state("epochs_done")
        #: Sum of the losses and number of steps in the current epoch.
        self.nadir_sum = self.add_state("nadir_sum", (num_tasks,))
        self.nadir_steps = self.add_state("nadir_steps")
        #: n_k, the losses' normaliser (1 until recorded).
        self.nadir = self.add_state("nadir", (num_tasks,), "ones")
        #: How the step blends the two objectives, set from `epochs_done` (`_set_phase`):
        #: (1, 0) in warm-up, (0, K) once STCH is on. Kept as variables, the step reads
        #: them rather than deriving them with a few more small ops.
        self.warmup_factor = self.add_state("warmup_factor")
        self.stch_factor = self.add_state("stch_factor")
        self._set_phase(epochs_done=0)

    def _set_phase(self, epochs_done):
        on = epochs_done >= self.stch_start_epoch
        self.warmup_factor.assign(0.0 if on else 1.0)
        self.stch_factor.assign(float(self.num_tasks) if on else 0.0)

    def _compute(self, losses):
        """(weights, value of the scalarisation, global losses)."""
        total = tf.cast(global_losses(losses), tf.float32)
        positive = tf.maximum(total, self.epsilon)
        log_positive = tf.math.log(positive)
        if self.log_losses:
            # l_k = log L_k - log n_k: log L_k also gives the warm-up value, and
            # log n_k does not wait for this step's losses.
            scaled = (log_positive - tf.math.log(tf.convert_to_tensor(self.nadir))
                      if self.normalize else log_positive)
        else:
            inverse_nadir = 1.0 / tf.convert_to_tensor(self.nadir)
            scaled = total * inverse_nadir
        tempered = scaled if self.mu == 1.0 else scaled / self.mu
        # The softmax and log-sum-exp of `tempered` share one maximum and one sum.
        largest = tf.reduce_max(tempered)
        exps = tf.exp(tempered - largest)
        sum_exps = tf.reduce_sum(exps)
        share = exps / sum_exps
        log_sum_exp = largest + tf.math.log(sum_exps)

        # Warm-up: w_k = 1 / L_k (the sum of log losses); STCH: K share_k dl_k/dL_k. The
        # weights lie on the path from the losses to the backward pass, so the phases blend
        # with element-wise ops (`tf.where` or `tf.cond` would cost more here, as TensorFlow's
        # executor hands them to its thread pool); both terms are finite, so the blend is
        # exact.
        warmup = tf.convert_to_tensor(self.warmup_factor)
        stch = tf.convert_to_tensor(self.stch_factor)
        if self.log_losses:  # both phases' weights are a factor times 1 / L_k
            weights = (warmup + stch * share) / positive
        else:
            weights = warmup / positive + stch * share * inverse_nadir
        stch_value = log_sum_exp if self.mu == 1.0 else self.mu * log_sum_exp
        value = warmup * tf.reduce_sum(log_positive) + stch * stch_value
        return weights, value, total

    def weighting(self, losses):
        """This step's weights and the offset that makes the logged objective S; adds the
        losses to the epoch's sums for the nadir."""
        weights, value, total = self._compute(losses)
        if self.normalize:  # every epoch; `on_epoch_end` uses the recording epoch's sums
            self.write(self.nadir_sum, self.read(self.nadir_sum) + total)
            self.write(self.nadir_steps, self.read(self.nadir_steps) + 1.0)
        return (tf.stop_gradient(tf.cast(weights, losses.dtype)),
                tf.cast(surrogate_offset(value, weights, total), losses.dtype))

    def extra_loss(self, losses):
        weights, value, total = self._compute(losses)
        return tf.cast(surrogate_offset(value, weights, total), losses.dtype)

    def on_epoch_end(self, epoch):
        done = int(self.epochs_done.numpy())
        if self.normalize and done == self.warmup_epochs:
            steps = float(self.nadir_steps.numpy())
            if steps == 0:  # an empty recording epoch: record during the next one instead
                return
            average = self.nadir_sum.numpy() / steps
            # A task whose loss averaged 0 keeps n_k = 1 rather than dividing by zero.
            self.nadir.assign(tf.where(average > 0, average, 1.0))
        if self.normalize:
            self.nadir_sum.assign(tf.zeros_like(self.nadir_sum))
            self.nadir_steps.assign(0.0)
        self.epochs_done.assign(float(done + 1))
        self._set_phase(done + 1)

    def get_config(self):
        return {**super().get_config(), "mu": self.mu, "warmup_epochs": self.warmup_epochs,
                "normalize": self.normalize, "log_losses": self.log_losses,
                "epsilon": self.epsilon}
