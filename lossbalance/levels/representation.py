"""The representation level: per-task gradients at the shared representation z, combined
there, and one backward pass through the trunk (MGDA-UB; `compile(gradients=
"representation")`)."""

from __future__ import annotations

import tensorflow as tf

from lossbalance import replicas
from lossbalance.gradients import TaskGradients, task_gradients
from lossbalance.levels.base import add
from lossbalance.levels.gradient import GradientLevel
from lossbalance.levels.trunk import Trunk


class RepresentationLevel(GradientLevel):
    """Per-task gradients with respect to z and the heads' variables only, combined on z;
    the combination goes through the trunk (the variables upstream of z) in one backward
    pass. Each replica keeps its own samples' rows of dL_k/dz (see `combine_shared`)."""

    name = "representation"

    def __init__(self, model, strategy, forward):
        super().__init__(model, strategy)
        self.trunk = Trunk(forward)

    def forward(self, x):
        return self.trunk.forward(x, training=True)

    def task_update(self, tape, step, variables, other, z):
        trunk, heads = self.trunk.split(tape, z, variables)
        sources = [z] + [variables[i] for i in heads]
        gradients = TaskGradients(task_gradients(tape, step.scaled["tasks"], sources), sources)
        self.check(gradients)
        if self.strategy.uses_item_norms:
            self.strategy.update_with_item_norms(self.item_norms(gradients, step.losses.dtype))
        shared, weights = self.combine_shared(gradients, step.losses, local_rows=True)
        grads = [None] * len(variables)
        trunk_grads = tape.gradient(z, [variables[i].value for i in trunk],
                                    output_gradients=shared[0])
        for i, g in zip(trunk, trunk_grads):
            grads[i] = g
        for i, g in zip(heads, gradients.gradients(shared)[1:]):
            grads[i] = g
        if other is not None:
            grads = [add(g, o) for g, o in zip(grads, other)]
        return grads, weights

    def item_norms(self, gradients, dtype):
        """(K,) float64: each task's gradient norm at z per batch item (row of z),
        averaged over the global batch; unscaled under mixed precision."""
        rows = tf.cast(gradients.stacked(0), tf.float64)  # (K, local rows, ...)
        rows = tf.reshape(rows, [tf.shape(rows)[0], tf.shape(rows)[1], -1])
        local = (tf.reduce_sum(tf.norm(rows, axis=2), axis=1),
                 tf.cast(tf.shape(rows)[1], tf.float64))
        sums, count = replicas.sum_over_replicas(local)
        norms = tf.math.divide_no_nan(sums, count)
        scale = self.loss_scale(dtype)
        return norms if scale is None else norms / tf.cast(scale, tf.float64)

    def check(self, gradients) -> None:
        """Every task must depend on z, and nothing after z may be shared."""
        if not gradients.has_shared:
            return
        name = self.strategy.registry_name
        where = f"the representation {self.trunk.forward.layer_name!r}"
        detached = [self.model._task_losses.names[k] for k in range(gradients.num_tasks)
                    if gradients.per_task[k][0] is None]
        if detached:
            raise ValueError(
                f"Task(s) {detached} do not depend on {where}, so strategy {name!r} "
                "cannot balance them there. Build every head on it, or use "
                "gradients='parameters'.")
        after = [gradients.variables[i].path for i in gradients.shared if i != 0]
        if after:
            raise ValueError(
                f"Variables {after} come after {where} and are shared by several "
                "tasks, so it is not where the heads branch. Name a later layer with "
                "compile(representation=...), or use gradients='parameters'.")
