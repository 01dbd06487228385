"""Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, 2018)."""

import copy

import keras
import tensorflow as tf

from lossbalance.replicas import replica_share
from lossbalance.strategies._loss_utils import global_losses
from lossbalance.strategies.arguments import check_choice, check_number, resolve_per_task
from lossbalance.strategies.base import LossWeighting
from lossbalance.strategies.registry import register

FORMS = ("regression", "classification")
_FORM_SCALE = {"regression": 0.5, "classification": 1.0}
#: `initial_log_variance` value that starts every s_k at its optimum for the first batch.
FIRST_BATCH = "first_batch"
# The smallest loss whose logarithm the first-batch start takes (guards the log of the
# branch `tf.where` leaves out); as STCH's epsilon.
_TINY_LOSS = 1e-20


@register("uncertainty", aliases=("uw", "kendall"))
class UncertaintyWeighting(LossWeighting):
    """Learn one log-variance per task, starting from its optimum for the first batch.

    Formula, with s_k = log sigma_k^2 one variable per task and c_k the form's factor:
        regression (c = 1/2):     (1/2) exp(-s_k) L_k + (1/2) s_k   (L/(2 sigma^2) + log sigma)
        classification (c = 1):        exp(-s_k) L_k + (1/2) s_k   (L/sigma^2 + log sigma)
    summed over tasks; the model minimises it, i.e. sum_k w_k L_k with w_k = c_k exp(-s_k),
    the weight logged as `<task>_weight`. For a fixed loss L the term is smallest at
        s* = log(2 c L):   s* = log L (regression form), log(2 L) (classification form),
    where w = 1 / (2 L) in both forms: at its optimum every weighted loss is 1/2, so a task
    whose loss is 10^4 times larger gets a 10^4 times smaller weight, and the gradient is
    that of sum_k (1/2) log L_k (the `scale_invariant` objective). The gradient in s_k is
    1/2 - c_k exp(-s_k) L_k. Losses must be non-negative: for L_k < 0 the objective falls
    without bound as s_k -> -inf; `fit` stops with an error naming the task when a task's
    logged mean loss is negative (`Strategy.check_losses`).

    Defaults, and why they depart from the paper's start. The paper learns s_k with the
    network's optimizer from s_k = 0 (sigma = 1, weight 1/2). With Adam that moves s_k by
    about the learning rate per step whatever the gradient: at 1e-3, a few hundred steps
    move s by a few tenths, while a loss of 10^4 wants s = 9.2. On the `clfreg` benchmark
    (a classifier beside a regressor whose loss starts ~4 x 10^4 times larger; 340 steps)
    both weights stay between 0.37 and 0.50 for all 20 epochs: a plain sum, the classifier
    drowned (digit accuracy 16%). So by default (`initial_log_variance="first_batch"`) the
    first training step sets every s_k to its optimum for that batch, s_k = log(2 c_k L_k(0))
    (global batch under `tf.distribute`), before the weights are computed: the first step is
    already balanced (weights 1 / (2 L_k(0)), here ~0.2 and ~5e-6) and the objective is the
    paper's, its minimiser unchanged. Starting balanced matters beyond the steps it saves:
    with its own fast optimizer from s = 0 (`initial_log_variance=0.0, learning_rate=0.05`)
    the clfreg weights do reach 1 / (2 L) within a few epochs, yet the classifier stays at
    16-23% (3 seeds): the first, unbalanced epochs are not undone within the budget.

    After the start, s follows the losses at the pace of the optimizer that trains it. By
    default that is the model's optimizer (`learning_rate=None`), as in the paper: with
    Adam at 1e-3 the weights stay near their first-batch values through a short budget and
    approach 1 / (2 L_k) in long runs. With `learning_rate=<float>` s has its own optimizer
    (Adam unless `optimizer=` says otherwise, built with the strategy, like GradNorm's) and
    tracks its optimum closely whatever the model's learning rate: a falling loss at up to
    `learning_rate` per step with Adam (0.05: ~200 steps for a 10^4-fold fall; the
    s-gradient is at most 1/2 there), a rising one more slowly (its gradient starts large
    and shrinks, and Adam's normaliser remembers the start). The s-gradient is the exact
    gradient of the objective above on the batch, and the model step uses the weights from
    before the update. Tracking closely makes the method the scale-invariant objective: a
    task whose loss keeps falling gains weight as 1 / L. On clfreg that is the classifier,
    whose weight grows 30- to 50-fold as its cross-entropy falls, while the regression,
    still far from fitted, is starved: 97% digit accuracy but ink MAE 256 (3 seeds;
    `scale_invariant`: 97% and 255), against 96% and ink MAE 8.4 for the default (the
    paper's set-up: 16% and 2.9; a single-task regressor: 2.8;
    docs/results/uncertainty-clfreg.png). The default's weight ratio stays near the first
    batch's loss ratio (~4 x 10^4) while the losses' ratio later falls to ~10^3. Hence the
    default; an own optimizer is for runs whose model learning rate is far from the pace
    the weights should have.

    The paper's set-up is `UncertaintyWeighting(initial_log_variance=0.0)` (s trainable by
    the model's optimizer from s = 0), plus `forms={"<classifier>": "classification"}` for
    its softmax derivation.

    Default form: regression for every task. It is the form derived from a Gaussian
    likelihood, the form most public implementations use for all tasks, and its optimum
    sigma^2 = L treats every task alike; choose the classification form per task with
    `forms={"cls": "classification"}` to follow the paper's softmax derivation (the
    weights at the optimum are the same, 1 / (2 L)).

    Implementations differ: the paper writes the loss with sigma and notes that learning
    s = log sigma^2 is more stable; some code learns log sigma instead, drops the 1/2
    factors (which doubles the log term's pull), or starts elsewhere (LibMTL: s = -0.5);
    they train s with the network's optimizer. This one learns s = log sigma^2 with the
    paper's factors and the paper's optimizer by default; only its start differs.

    Args:
        forms: "regression" or "classification", for all tasks, as a list in task order, or
            a dict by task name (missing tasks take "regression").
        initial_log_variance: "first_batch" (default: every s_k starts at its optimum for
            the first training batch; a task whose first loss is <= 0, for which no optimum
            exists, at 0), or a number, the starting s_k of every task (the paper: 0, i.e.
            sigma = 1).
        learning_rate: None (default: s is a trainable variable of the model, updated by
            the model's optimizer with the network, as in the paper), or the learning rate
            (> 0) of the strategy's own optimizer for s.
        optimizer: name or config of the Keras optimizer for s (default "adam"); only with
            a `learning_rate`.

    Reference: A. Kendall, Y. Gal, R. Cipolla, "Multi-Task Learning Using Uncertainty to
    Weigh Losses for Scene Geometry and Semantics", CVPR 2018.
    """

    loss_floor = 0.0

    def __init__(self, forms="regression", initial_log_variance=FIRST_BATCH,
                 learning_rate=None, optimizer=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(forms, str):
            check_choice("forms", forms, FORMS)
        elif isinstance(forms, dict):
            for task, form in forms.items():
                check_choice(f"forms[{task!r}]", form, FORMS)
        else:
            for i, form in enumerate(forms):
                check_choice(f"forms[{i}]", form, FORMS)
        self.forms = forms if isinstance(forms, str) else (
            dict(forms) if isinstance(forms, dict) else list(forms))
        if isinstance(initial_log_variance, str):
            if initial_log_variance != FIRST_BATCH:
                raise ValueError(
                    f"`initial_log_variance` must be a number or {FIRST_BATCH!r} (start at "
                    f"the optimum for the first batch); got {initial_log_variance!r}.")
            self.initial_log_variance = FIRST_BATCH
        else:
            self.initial_log_variance = check_number(
                "initial_log_variance", initial_log_variance)
        if learning_rate is None:
            if optimizer is not None:
                raise ValueError(
                    f"`optimizer={optimizer!r}` needs a `learning_rate`: with "
                    "learning_rate=None the log-variances are trained by the model's own "
                    "optimizer. Give learning_rate=<float> to train them with their own "
                    "optimizer, or leave `optimizer` out.")
            self.learning_rate = None
            self.optimizer_config = None
        else:
            self.learning_rate = check_number("learning_rate", learning_rate, minimum=0.0,
                                              strict=True)
            try:
                # a copy: Keras' deserialisation edits a config dict in place
                probe = keras.optimizers.get(
                    "adam" if optimizer is None else copy.deepcopy(optimizer))
            except ValueError as error:
                raise ValueError(f"UncertaintyWeighting `optimizer`: {error}") from None
            self.optimizer_config = keras.optimizers.serialize(probe)

    @property
    def starts_at_first_batch(self) -> bool:
        return self.initial_log_variance == FIRST_BATCH

    def build_state(self, num_tasks):
        forms = resolve_per_task(
            "forms", self.forms, self.task_names, default="regression",
            validate=lambda name, value: check_choice(name, value, FORMS))
        self._scales = tf.constant([_FORM_SCALE[f] for f in forms], tf.float32)
        start = 0.0 if self.starts_at_first_batch else self.initial_log_variance
        # Trainable (by the model's optimizer) only in the paper's set-up.
        self.log_variance = self.add_weight(
            shape=(num_tasks,), name="log_variance",
            trainable=self.learning_rate is None,
            initializer=keras.initializers.Constant(start), aggregation="mean")
        if self.starts_at_first_batch:
            #: 1 once the first batch has set s (saved, so a resumed run does not reset it).
            self.started = self.add_state("started")
        if self.learning_rate is not None:
            self.variance_optimizer = keras.optimizers.deserialize(self.optimizer_config)
            self.variance_optimizer.learning_rate = self.learning_rate
            self.variance_optimizer.build([self.log_variance])  # built now so its slots load

    def _log_variance(self, losses):
        """(s for this step, the global losses or None): the variable's value, or at the
        first step the first batch's optimum."""
        if not self.starts_at_first_batch:
            return tf.cast(self.log_variance, losses.dtype), None
        s = tf.cast(self.log_variance, losses.dtype)  # the variable: its gradient flows
        total = tf.cast(global_losses(losses), losses.dtype)
        scales = tf.cast(self._scales, losses.dtype)
        # a loss <= 0 has no optimum (the method needs L > 0): that task starts at s = 0
        optimum = tf.where(total > 0, tf.math.log(tf.maximum(2.0 * scales * total,
                                                            _TINY_LOSS)), 0.0)
        # the variable's branch keeps its gradient for the model's optimizer; at the first
        # step s is at the batch optimum, where that gradient is 0 anyway
        # (whether s was set before this step: a second call in the step finds the same)
        return tf.where(tf.cast(self.started, tf.bool), s, optimum), total

    def weighting(self, losses):
        """The weights c_k exp(-s_k) and the term (1/2) sum_k s_k, from one s; at the first
        step s is then stored, and with an own optimizer s takes its step."""
        s, total = self._log_variance(losses)
        extra = self._extra(s)
        scales = tf.cast(self._scales, losses.dtype)
        weights = scales * tf.exp(-s)
        if self.starts_at_first_batch:
            self.write(self.log_variance, tf.stop_gradient(s))
            self.write(self.started, 1.0)
        if self.learning_rate is None:
            return weights, extra
        if total is None:
            total = tf.cast(global_losses(losses), losses.dtype)
        # d/ds_k of c_k exp(-s_k) L_k + s_k / 2 on the (global) batch; every replica computes
        # it alike and the optimizer sums the replicas' shares
        gradient = 0.5 - tf.stop_gradient(weights) * total
        self.defer(lambda g: self.variance_optimizer.apply([replica_share(g)],
                                                           [self.log_variance]),
                   tf.cast(gradient, self.log_variance.dtype))
        return tf.stop_gradient(weights), extra

    def extra_loss(self, losses):
        return self._extra(self._log_variance(losses)[0])

    def _extra(self, s):
        if self.learning_rate is not None:
            s = tf.stop_gradient(s)  # a logged value only: s has its own optimizer
        # Every replica adds this term and the optimizer sums their gradients: divide by
        # the replica count, as Keras does for the task losses.
        return replica_share(0.5 * tf.reduce_sum(s))

    @property
    def variances(self):
        """sigma_k^2 for every task, as a NumPy array."""
        return tf.exp(self.log_variance.value).numpy()

    def get_config(self):
        forms = self.forms if isinstance(self.forms, str) else (
            dict(self.forms) if isinstance(self.forms, dict) else list(self.forms))
        return {**super().get_config(), "forms": forms,
                "initial_log_variance": self.initial_log_variance,
                "learning_rate": self.learning_rate, "optimizer": self.optimizer_config}
