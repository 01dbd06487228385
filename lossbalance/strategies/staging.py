"""A training step's changes to a strategy's state, made explicit.

A strategy changes its state in a step (Nash-MTL's cached weights, GradVac's targets, moving
averages, RNG draws, the step of an optimizer it owns) through `Strategy.write` and
`Strategy.defer`, never by assigning its variables directly. While a step is being computed
those changes are *staged*: `Strategy.read` returns a variable's staged value for the rest of
the step, and nothing is assigned. `BalancedModel` then commits them with the update, or
drops them when `compile(nonfinite=...)` skips the step (FAMO's `update_after_step`, after
the update, is staged and committed alike); `lossbalance.diagnostics.inspect_batch` drops
them always. Outside a training step (`lossbalance.aggregate`, `on_epoch_end`, a custom
loop) writes are assigned at once.

So neither the non-finite guard nor the diagnostics snapshot and restore a strategy's state:
a change that is not committed never happened.
"""

from __future__ import annotations

import contextlib
import threading

import keras
import tensorflow as tf

from lossbalance import replicas


class StagedChanges:
    """The writes and deferred calls of one step, in the order the strategy made them."""

    def __init__(self):
        self._entries = []  # ("write", variable, value) or ("call", fn, tensors)
        self._latest = {}  # id(variable) -> its last staged value

    def write(self, variable, value) -> None:
        value = tf.cast(value, variable.dtype)
        self._entries.append(("write", variable, value))
        self._latest[id(variable)] = value

    def read(self, variable):
        return self._latest.get(id(variable))

    def defer(self, fn, tensors) -> None:
        self._entries.append(("call", fn, tuple(tensors)))

    def commit(self, condition=True) -> None:
        """Make the step's changes, in order, where `condition` (a boolean tensor, the same
        on every replica, or Python True) holds. A write keeps the variable's value where
        it does not (no branch: it works in any replica context); a deferred call (an
        optimizer's apply, which may synchronise replicas) runs under `replicas.run_if`."""
        for kind, target, value in self._entries:
            if kind == "write":
                target.assign(value if condition is True else
                              tf.where(condition, value, tf.convert_to_tensor(target)))
            elif condition is True:
                target(*value)
            else:
                replicas.run_if(condition, target, value)


# The changes being staged, by strategy, per thread: under MirroredStrategy each replica's
# step runs in a thread of its own.
_local = threading.local()


def current(strategy):
    """The `StagedChanges` that `strategy`'s changes go to in this thread, or None."""
    return getattr(_local, "changes", {}).get(id(strategy))


@contextlib.contextmanager
def staged(strategy):
    """Stage the changes `strategy` (and the strategies it holds) makes inside the block, in
    this thread; yields the `StagedChanges`, which the caller commits or drops."""
    changes = StagedChanges()
    previous = getattr(_local, "changes", {})
    members = [strategy, *strategy._flatten_layers(include_self=False)]
    _local.changes = {**previous, **{id(layer): changes for layer in members}}
    try:
        yield changes
    finally:
        _local.changes = previous


class StagedState:
    """The state API of `Strategy`: how a strategy reads and changes its variables, so
    that a step's changes are staged."""

    @property
    def _staged(self):
        """The changes of the step being computed in this thread, or None."""
        return current(self)

    def read(self, variable) -> tf.Tensor:
        """A state variable's value: as staged so far in this step, else its own."""
        staged = None if self._staged is None else self._staged.read(variable)
        return tf.convert_to_tensor(variable) if staged is None else staged

    def write(self, variable, value) -> None:
        """Set a state variable: staged in a training step (committed with its update,
        dropped when the step is skipped), at once otherwise."""
        if self._staged is None:
            variable.assign(tf.cast(value, variable.dtype))
        else:
            self._staged.write(variable, value)

    def defer(self, fn, *tensors) -> None:
        """Call `fn(*tensors)` with the step's commit (at once outside a step): for a
        change that is not a plain write, such as an owned optimizer's `apply`."""
        if self._staged is None:
            fn(*tensors)
        else:
            self._staged.defer(fn, tensors)

    def state_variables(self) -> list:
        """Every variable the strategy's steps may change: its weights, RNG seed states,
        and the slots of any optimizer it owns (GradNorm's)."""
        variables = list(self.variables)
        for value in vars(self).values():
            if isinstance(value, keras.optimizers.Optimizer):
                variables.extend(value.variables)
        unique = {id(v): v for v in variables}
        return list(unique.values())
