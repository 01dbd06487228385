"""`TaskMeans`: K running means in one metric, logged as `<task><suffix>` entries.

`BalancedModel` logs each task's loss and weight. One metric per task and quantity costs a
handful of graph operations each, per step; with many tasks that shows in the step time.
One metric holding a K-vector costs the same as one `keras.metrics.Mean`.
"""

from __future__ import annotations

import keras
import tensorflow as tf


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
        values = tf.cast(values, self.total.dtype)
        weight = tf.constant(1.0, self.total.dtype) if sample_weight is None else \
            tf.cast(sample_weight, self.total.dtype)
        self.total.assign_add(values * weight)
        self.count.assign_add(weight)

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
