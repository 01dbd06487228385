"""Non-finite losses and gradients: skip the step, or stop with the task's name.

`compile(nonfinite=...)`:
* `None` (default): Keras' behaviour, no check and no cost.
* `"skip"`: a step whose task losses or gradients are not finite applies no update: model
  weights, optimizer slots and strategy state stay exactly as they were. The number of
  skipped steps is logged as `skipped_steps` (per epoch).
* `"raise"`: the same step is skipped, then training stops with a `FloatingPointError` that
  names the task(s) and the step.

Under a `LossScaleOptimizer` (mixed precision) an overflowing gradient is expected and is the
optimizer's to handle (it skips the step and lowers the scale); it does not count as a
non-finite step, but the strategy's staged state changes are still dropped, so overflow never
leaks into its state.

In "skip" and "raise" modes a batch without rows (a `tf.data` filter can make one) also
changes nothing: no optimizer update (Keras would step its optimizer on zero gradients,
moving weights by momentum), strategy state unchanged, and it is not counted as a skipped
step. With `None`, such a batch gets Keras' behaviour. In every mode it adds nothing to the
logs.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from lossbalance import replicas

MODES = (None, "skip", "raise")


def batch_size(x):
    """The number of rows of a batch: a Python int when static, else a tensor."""
    first = next(t for t in tf.nest.flatten(x) if t is not None)
    static = first.shape[0]
    return static if static is not None else tf.shape(first)[0]


def has_rows(batch_size):
    """Whether a batch is non-empty: a Python bool when its size is static, else a tensor."""
    return batch_size > 0


def all_finite(tensors) -> tf.Tensor:
    checks = [tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(t)))
              for t in tensors if t is not None]
    return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)


class NonFiniteGuard:
    """Checks one training step: whether its update, and its staged strategy state
    changes (`lossbalance.strategies.staging`), are applied.

    Args:
        mode: "skip", "raise" or None.
        task_names: the model's tasks, for error messages.
        loss_scaling: whether the optimizer is a `LossScaleOptimizer`.
    """

    def __init__(self, mode, task_names, loss_scaling):
        if mode not in MODES:
            raise ValueError(
                f"`nonfinite` must be None, 'skip' or 'raise'; got {mode!r}.")
        self.mode = mode
        self.task_names = tuple(task_names)
        self.loss_scaling = loss_scaling
        self.skipped_steps = keras.metrics.Sum(name="skipped_steps") if mode else None
        # [step + 1 of the first bad step (0: none), loss-not-finite flag per task]. A plain
        # tf.Variable: diagnostic state that Keras neither trains nor saves.
        self.report = tf.Variable(tf.zeros(len(self.task_names) + 1, tf.int64),
                                  trainable=False, name="nonfinite_report")

    @property
    def active(self) -> bool:
        """Whether steps are checked at all (never when there is nothing to do)."""
        return self.mode is not None or self.loss_scaling

    def run(self, changes, update, args, *, raw_losses, grads, rows, optimizer, variables):
        """Commit the strategy's staged `changes` and call `update(*args, healthy)` (the
        optimizer step) only where the step, of `rows` rows, is finite and non-empty;
        `healthy` says whether a post-step strategy update is kept (not after an overflow
        under loss scaling). `args` are passed, not captured, so that under tf.distribute
        each replica runs with its own. Returns the "skipped" flag the logs need (None when
        steps are unchecked)."""
        if not self.active:
            changes.commit()
            update(*args, True)
            return None
        step = optimizer.iterations + 0
        apply, healthy, bad, losses_ok = self.decide(raw_losses, grads, rows)
        changes.commit(healthy)  # not after an overflow under loss scaling either
        if apply is True:
            update(*args, healthy)
        else:
            if not optimizer.built:
                optimizer.build(variables)
            replicas.run_if(tf.convert_to_tensor(apply), update, (*args, healthy))
        self.finish(bad, losses_ok, step)
        return bad if self.mode is not None else None

    def decide(self, raw_losses, grads, batch_size=1):
        """(apply the update?, keep the strategy state?, a true non-finite step?, which
        losses are finite). `apply` is Python True when the update needs no condition.

        An empty batch is neither applied nor kept, and is not a non-finite step (mean
        losses over zero rows may well be NaN).
        """
        rows = has_rows(batch_size)
        # under tf.distribute: one decision for all replicas, from every replica's values
        losses_ok = ~replicas.any_replica(~tf.math.is_finite(tf.stack(raw_losses)))
        grads_ok = ~replicas.any_replica(~all_finite(grads))
        if rows is not True:
            rows = replicas.any_replica(rows)
        healthy = tf.reduce_all(losses_ok) & grads_ok
        bad = ~tf.reduce_all(losses_ok)
        if not self.loss_scaling:
            bad = bad | ~grads_ok
        apply = ~bad if self.mode is not None else True
        if rows is not True:
            apply, healthy, bad = apply & rows, healthy & rows, bad & rows
        return apply, healthy, bad, losses_ok

    def finish(self, bad, losses_ok, step):
        """Count and report the non-finite steps."""
        if self.mode is None:
            return
        # every replica adds its 1/N: the metric sums over replicas
        self.skipped_steps.update_state(tf.cast(bad, tf.float32) / replicas.num_replicas())
        first = bad & tf.equal(self.report[0], 0)
        entry = tf.concat([[tf.cast(step, tf.int64) + 1], tf.cast(~losses_ok, tf.int64)], 0)
        self.report.assign(tf.where(first, entry, self.report))

    def check_report(self):
        """Raise for the first recorded non-finite step (in "raise" mode); eager."""
        report = self.report.numpy()
        if self.mode != "raise" or report[0] == 0:
            return
        self.report.assign(tf.zeros_like(self.report))
        tasks = [name for name, flag in zip(self.task_names, report[1:]) if flag]
        what = (f"non-finite loss in task(s) {tasks}" if tasks else
                "non-finite gradients (every task's loss was finite)")
        raise FloatingPointError(
            f"Training step {int(report[0]) - 1} produced {what}. The update was skipped: "
            "the model, optimizer and strategy are unchanged. Check the targets and "
            "predictions of the task(s) named, or compile with nonfinite='skip' to skip "
            "such steps and count them in the logs as `skipped_steps`."
        )


class NonFiniteCallback(keras.callbacks.Callback):
    """Raises, between batches, for a step that the guard recorded as non-finite."""

    def __init__(self, guard):
        super().__init__()
        self.guard = guard

    def on_train_batch_end(self, batch, logs=None):
        self.guard.check_report()
