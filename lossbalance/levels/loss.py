"""The loss level: weights from the task losses, one backward pass of sum_k w_k L_k."""

from __future__ import annotations

import tensorflow as tf

from lossbalance.levels import layer_norms
from lossbalance.levels.base import Level, Objectives, add, global_value, \
    transformed_task_losses


class LossLevel(Level):
    """Loss-weighting strategies: the cost of plain Keras (plus, for strategies that ask for
    it, each task's gradient norm at one shared layer: `uses_layer_gradients`)."""

    @property
    def name(self):
        return "parameters" if self.strategy.uses_layer_gradients else None

    @property
    def persistent_tape(self) -> bool:
        return self.strategy.uses_layer_gradients  # per-task gradients at one layer

    def objectives(self, raw_losses, regularization, batch=None) -> Objectives:
        strategy = self.strategy
        tasks = transformed_task_losses(strategy, self.model._task_losses.weighted(raw_losses),
                                        separate=self.persistent_tape)
        losses = tf.stack(tasks)
        weights, extra = strategy.weighting(losses)
        other = add(regularization, extra)
        objective = add(tf.reduce_sum(weights * losses), other)
        return Objectives(raw=raw_losses, tasks=tasks, losses=losses, other=other,
                          weights=weights, objective=objective,
                          scaled={"objective": self.model.optimizer.scale_loss(objective)})

    def gradients(self, tape, step, variables, z):
        grads = tape.gradient(step.scaled["objective"], variables)
        if self.strategy.uses_layer_gradients:
            layer_norms.update_strategy(self.model, tape, step.tasks, variables)
        # each replica holds its share of the global values (Keras divides losses by N)
        return (grads, step.weights, global_value(step.objective),
                [global_value(loss) for loss in step.raw])
