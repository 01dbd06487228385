"""What every gradient level shares: the objectives, the strategy's own variables, and the
strategy's combination of the per-task gradients (`combine_shared`)."""

from __future__ import annotations

import keras
import tensorflow as tf

from lossbalance import replicas
from lossbalance.combination import weights_and_direction
from lossbalance.levels.base import Level, Objectives, add, global_value, \
    transformed_task_losses
from lossbalance.levels.groups import grouped_weights_and_update


class GradientLevel(Level):
    """A level that takes each task's gradient: subclasses say where (`task_update`)."""

    def __init__(self, model, strategy):
        super().__init__(model, strategy)
        #: The weight solver compiled with XLA on its own, or None for the strategy's
        #: `gramian_weights` as it is (`GramianWeighting.compiled_solver`).
        self.solve = strategy.compiled_solver() if strategy.family == "gramian" else None

    def objectives(self, raw_losses, regularization, batch=None) -> Objectives:
        strategy, scale = self.strategy, self.model.optimizer.scale_loss
        # global values, local gradients (tf.distribute)
        raw = [replicas.with_global_value(loss) for loss in raw_losses]
        tasks = transformed_task_losses(strategy, self.model._task_losses.weighted(raw))
        losses = tf.stack(tasks)
        extra = strategy.extra_loss(losses)
        other = add(regularization, extra)
        return Objectives(raw=raw, tasks=tasks, losses=losses, other=other, scaled={
            "tasks": [scale(loss) for loss in tasks],
            "other": None if other is None else scale(other),
            # the strategy's own variables follow the sum of the task losses
            "own": scale(add(tf.add_n(tasks), extra))})

    def gradients(self, tape, step, variables, z):
        """Model variables get the strategy's combination on shared variables and each
        task's own gradient on its head; the strategy's own trainable variables (e.g.
        learned loss scales) follow the plain sum of the (transformed) task losses and its
        extra term. Their gradient depends on the global losses alone, so under
        tf.distribute every replica hands the optimizer its 1/N share."""
        own = self.strategy.trainable_variables
        own_ids = {id(v) for v in own}
        model_variables = [v for v in variables if id(v) not in own_ids]
        other = None
        if step.scaled["other"] is not None:
            other = tape.gradient(step.scaled["other"], [v.value for v in model_variables])
        grads, weights = self.task_update(tape, step, model_variables, other, z)
        by_id = dict(zip(map(id, model_variables), grads))
        if own:
            by_id.update(zip(map(id, own), map(replicas.replica_share,
                                               tape.gradient(step.scaled["own"], own))))
        objective = add(tf.reduce_sum(tf.stop_gradient(weights) * step.losses),
                        global_value(step.other))
        return [by_id[id(v)] for v in variables], weights, objective, step.raw

    def task_update(self, tape, step, variables, other, z):
        """(gradients of `variables`, weights): the per-task gradients of the step's
        loss-scaled task losses, combined; `other` holds the gradients of the rest of the
        objective (regularisation), or is None."""
        raise NotImplementedError

    def combine_shared(self, gradients, losses, local_rows=False, gramian_of=None):
        """The strategy's combination of the shared rows: ({index: update}, weights).
        `gramian_of(view)` replaces a view's Gramian (e.g. the halves' J1 J2^T).

        Under tf.distribute (`losses` are then global): at the parameter level the
        replicas' per-task gradients are summed first, giving the global J, and the
        update, the same on every replica, is handed to the optimizer as each replica's
        1/N share. With `local_rows` (the representation level) each replica keeps the
        rows of its own samples, dL_k/dz, and only their Gramian is summed (Jacobian
        aggregators get every replica's columns); the update of z, each replica's own
        columns, stays local. The gradients are loss-scaled under mixed precision: the
        strategy sees them unscaled, and the combination stays scaled for
        `optimizer.apply` to unscale.
        """
        if not local_rows:
            gradients.sum_over_replicas()
        scale = self.loss_scale(losses.dtype)
        own_columns = None

        def gramian(view):
            g = tf.cast(view.gramian(self.accumulate) if gramian_of is None
                        else gramian_of(view), tf.float64)
            if local_rows:
                g = replicas.sum_over_replicas(g)
            return g if scale is None else g / tf.cast(scale, g.dtype) ** 2

        def jacobian(view):
            nonlocal own_columns
            j = view.jacobian()
            if local_rows:
                j, own_columns = replicas.gather_columns(j)
            return j if scale is None else j / tf.cast(scale, j.dtype)

        def combine(view, weights, direction):
            if direction is None:
                return view.combine(tf.cast(weights, losses.dtype), self.accumulate)
            if scale is not None:
                direction *= tf.cast(scale, direction.dtype)
            if local_rows:
                direction = own_columns(direction)
            return view.unflatten(direction)

        if self.group_key is None:
            weights, direction = weights_and_direction(
                self.strategy, losses, gramian=lambda: gramian(gradients),
                jacobian=lambda: jacobian(gradients), solve=self.solve)
            update = combine(gradients, weights, direction)
        else:
            update, weights, _ = grouped_weights_and_update(
                self.strategy, gradients, losses, self.group_key, gramian, jacobian, combine,
                solve=self.solve)
        weights = tf.cast(weights, losses.dtype)
        if not local_rows:
            update = {i: replicas.replica_share(g) for i, g in update.items()}
        return update, weights

    def loss_scale(self, dtype):
        """The factor the optimizer scales the loss by (mixed precision), or None: the
        per-task gradients are divided by it before the strategy sees them."""
        optimizer = self.model.optimizer
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) or (
                getattr(optimizer, "loss_scale_factor", None) is not None):
            return optimizer.scale_loss(tf.ones((), dtype))
        return None
