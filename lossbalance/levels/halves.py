"""Two independent halves of each batch, for strategies whose weights need two independent
gradient samples (`Strategy.uses_independent_halves`: MoDo, SDMGrad).

The batch's rows are split by parity: half 1 holds rows 0, 2, 4, ..., half 2 rows 1, 3, 5,
... (sample weights split alike). Under tf.distribute each replica splits its own share; as
long as every replica's share has an even number of rows, the replicas' halves together
are exactly the global batch's, so N replicas make the update one device makes.

Per step: the K task gradients on each half (J1, J2: 2K backward passes over half
batches, about the cost of the parameter level's K), the strategy's weights from
A = J1 J2^T (`gramian_weights` receives A, which is not symmetric), then the update
J^T w of the *whole* batch's task gradients on the shared variables, taken as one backward
pass of sum_k w_k L_k(batch), and each head its own task's gradient on the whole batch.
With grouped balancing (`compile(grouping=...)`) each group's copy of the strategy gets its
group's A_g = J1_g J2_g^T, and the update J_g^T w_g is formed from the K task gradients of
the whole batch (K more backward passes).
"""

from __future__ import annotations

import tensorflow as tf

from lossbalance import replicas
from lossbalance.gradients import TaskGradients, task_gradients
from lossbalance.levels.base import transformed_task_losses
from lossbalance.levels.groups import restricted
from lossbalance.levels.parameters import ParameterLevel


def half(structure, parity):
    """Rows `parity`, `parity + 2`, ... of every array in a (nested) batch structure."""
    return tf.nest.map_structure(
        lambda t: None if t is None else tf.convert_to_tensor(t)[parity::2], structure)


class HalfBatchLevel(ParameterLevel):
    """The parameter level with the weights taken from two independent halves."""

    def objectives(self, raw_losses, regularization, batch=None):
        step = super().objectives(raw_losses, regularization, batch)
        model, scale = self.model, self.model.optimizer.scale_loss
        y, y_pred, sample_weight = batch
        halves = []
        for parity in (0, 1):
            raw = model._task_losses(half(y, parity), half(y_pred, parity),
                                     half(sample_weight, parity), training=True)
            raw = [replicas.with_global_value(loss) for loss in raw]
            tasks = transformed_task_losses(self.strategy, model._task_losses.weighted(raw))
            halves.append([scale(loss) for loss in tasks])
        step.scaled["halves"] = halves
        return step

    def task_update(self, tape, step, variables, other, z):
        scaled_losses, losses = step.scaled["tasks"], step.losses
        first, second = (TaskGradients(task_gradients(tape, h, variables), variables)
                         for h in step.scaled["halves"])
        self.check(first)
        first.sum_over_replicas()
        second.sum_over_replicas()

        def cross(view):  # A = J1 J2^T on the view's shared variables
            return restricted(first, view.shared).cross_gramian(
                restricted(second, view.shared))

        if self.group_key is not None:  # each group's A and weights, the batch's J_g^T w_g
            gradients = self.task_gradients(tape, scaled_losses, variables, z)
            shared, weights = self.combine_shared(gradients, losses, gramian_of=cross)
            return gradients.gradients(shared, other), weights
        products, scale = cross(first), self.loss_scale(losses.dtype)
        if scale is not None:
            products /= tf.cast(scale, products.dtype) ** 2
        weights = tf.cast(self.strategy.gramian_weights(products, losses), losses.dtype)
        # One backward pass each (the targets' gradients summed, weighted by
        # `output_gradients`): the whole batch's J^T w, and J^T 1, where each head gets its
        # own task's gradient. (A sum formed here, after the tape, would not be recorded.)
        values = [v.value for v in variables]
        weighted = tape.gradient(scaled_losses, values, output_gradients=[
            tf.cast(w, loss.dtype) for w, loss in zip(tf.unstack(weights), scaled_losses)])
        own = tape.gradient(scaled_losses, values)
        shared = set(first.shared)
        grads = []
        for i in range(len(variables)):
            g = weighted[i] if i in shared else (own[i] if i in first.owner else None)
            if other is not None and other[i] is not None:
                g = other[i] if g is None else g + other[i]
            grads.append(g)
        return grads, weights
