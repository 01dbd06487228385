"""The running means `BalancedModel` logs, in as few graph operations per step as possible.

`BalancedModel` logs its objective and each task's loss and weight. In a training step of
small operations each one costs executor time, and the loss-level strategies aim at the cost
of plain Keras. `TaskMeans` keeps K means in one metric (one metric per task and quantity
would cost a handful of operations each); both metrics here update their variables with one
`AssignAddVariableOp` each, where Keras' `Mean` reads, adds and assigns.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from lossbalance.variables import assign_add


class ObjectiveMean(keras.metrics.Mean):
    """The `loss` tracker: a `keras.metrics.Mean` of one scalar per step, weighted by the
    step's batch size (`sample_weight`), in three operations (a multiply and two adds)."""

    def update_state(self, values, sample_weight=None):
        _add_weighted(self.total, self.count, values, sample_weight)


class TaskMeans(keras.metrics.Metric):
    """Weighted running means of a (K,) vector; `result()` maps `<task><suffix>` to each.

    Args:
        task_names: the K task names, in order.
        suffix: appended to each task name in the logs (e.g. "_loss").
    """

    def __init__(self, task_names, suffix, name=None, **kwargs):
        super().__init__(name=name or f"tasks{suffix}", **kwargs)
        self.task_names = tuple(task_names)
        self.suffix = suffix
        self.keys = tuple(f"{task}{suffix}" for task in self.task_names)
        self.total = self.add_variable(shape=(len(self.task_names),), initializer="zeros",
                                       name="total", aggregation="sum")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count",
                                       aggregation="sum")

    def update_state(self, values, sample_weight=None):
        _add_weighted(self.total, self.count, values, sample_weight)

    def result(self):
        means = tf.unstack(tf.math.divide_no_nan(tf.convert_to_tensor(self.total),
                                                 tf.convert_to_tensor(self.count)))
        return dict(zip(self.keys, means))

    def reset_state(self):
        self.total.assign(tf.zeros_like(self.total))
        self.count.assign(tf.zeros_like(self.count))

    def get_config(self):
        return {**super().get_config(), "task_names": list(self.task_names),
                "suffix": self.suffix}


def _add_weighted(total, count, values, sample_weight=None):
    """total += values * w, count += w, with w the sample weight (default 1)."""
    weight = tf.constant(1.0, total.dtype) if sample_weight is None else \
        tf.cast(sample_weight, total.dtype)
    assign_add(total, tf.cast(values, total.dtype) * weight)
    assign_add(count, weight)
