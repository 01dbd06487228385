"""Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, 2018)."""

import keras
import tensorflow as tf

from lossbalance.replicas import replica_share
from lossbalance.strategies.base import LossWeighting, check_choice, check_number, resolve_per_task
from lossbalance.strategies.registry import register

FORMS = ("regression", "classification")
_FORM_SCALE = {"regression": 0.5, "classification": 1.0}


@register("uncertainty", aliases=("uw", "kendall"))
class UncertaintyWeighting(LossWeighting):
    """Learn one log-variance per task jointly with the model.

    Formula, with s_k = log sigma_k^2 a trainable variable per task:
        regression form:      (1/2) exp(-s_k) L_k + (1/2) s_k   (= L_k / (2 sigma^2) + log sigma)
        classification form:       exp(-s_k) L_k + (1/2) s_k   (= L_k / sigma^2 + log sigma)
    summed over tasks. For a fixed loss the optimum is sigma_k^2 = L_k (regression form) or
    sigma_k^2 = 2 L_k (classification form), so the learned weight of a task falls as its
    loss grows. The weight logged as `<task>_weight` is (1/2) exp(-s_k) or exp(-s_k).
    Losses must be non-negative: for L_k < 0 the objective falls without bound as s_k -> -inf
    (the weight grows without bound); `fit` stops with an error naming the task when a
    task's logged mean loss is negative (`Strategy.check_losses`).

    Default: the regression form for every task. It is the form derived from a Gaussian
    likelihood, the form most public implementations use for all tasks, and its optimum
    sigma^2 = L treats every task alike; choose the classification form per task with
    `forms={"cls": "classification"}` to follow the paper's softmax derivation.

    Implementations differ: the paper writes the loss with sigma and notes that learning
    s = log sigma^2 is more stable; some code learns log sigma instead, or drops the 1/2
    factors (which doubles the log term's pull). This one learns s = log sigma^2 with the
    paper's factors. The variances are trained by the model's own optimizer.

    Args:
        forms: "regression" or "classification", for all tasks, as a list in task order, or
            a dict by task name (missing tasks take "regression").
        initial_log_variance: starting s_k for every task (default 0, i.e. sigma = 1).

    Reference: A. Kendall, Y. Gal, R. Cipolla, "Multi-Task Learning Using Uncertainty to
    Weigh Losses for Scene Geometry and Semantics", CVPR 2018.
    """

    loss_floor = 0.0

    def __init__(self, forms="regression", initial_log_variance=0.0, **kwargs):
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
        self.initial_log_variance = check_number(
            "initial_log_variance", initial_log_variance)

    def build_state(self, num_tasks):
        forms = resolve_per_task(
            "forms", self.forms, self.task_names, default="regression",
            validate=lambda name, value: check_choice(name, value, FORMS))
        self._scales = tf.constant([_FORM_SCALE[f] for f in forms], tf.float32)
        self.log_variance = self.add_weight(
            shape=(num_tasks,), name="log_variance", trainable=True,
            initializer=keras.initializers.Constant(self.initial_log_variance),
            aggregation="mean")

    def loss_weights(self, losses):
        s = tf.cast(self.log_variance, losses.dtype)
        return tf.cast(self._scales, losses.dtype) * tf.exp(-s)

    def extra_loss(self, losses):
        # Every replica adds this term and the optimizer sums their gradients: divide by
        # the replica count, as Keras does for the task losses.
        return replica_share(0.5 * tf.reduce_sum(tf.cast(self.log_variance, losses.dtype)))

    @property
    def variances(self):
        """sigma_k^2 for every task, as a NumPy array."""
        return tf.exp(self.log_variance.value).numpy()

    def get_config(self):
        forms = self.forms if isinstance(self.forms, str) else (
            dict(self.forms) if isinstance(self.forms, dict) else list(self.forms))
        return {**super().get_config(), "forms": forms,
                "initial_log_variance": self.initial_log_variance}
