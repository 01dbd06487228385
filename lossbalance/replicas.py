"""Data parallelism: what one replica's training step must share with the others.

Under a `tf.distribute` strategy with N replicas, Keras runs `train_step` once per replica on
that replica's share of the global batch. Each task loss is the local mean divided by N, so
the sum over replicas is the global batch's loss, and `optimizer.apply` sums the replicas'
gradients. That is right for anything linear in the losses. A balancing strategy is not:
it must see global values (losses, per-task gradients, Gramians), so that N replicas make
the update one device would make on the same global batch, and every replica computes the
same weights and writes the same strategy state.

The helpers here are no-ops outside a replica context or with one replica, so the same step
serves both. Collective operations must run in the same order on every replica.
"""

from __future__ import annotations

import tensorflow as tf


def num_replicas() -> int:
    """Replicas in sync in the current context (1 outside `tf.distribute`)."""
    context = tf.distribute.get_replica_context()
    if context is None:  # cross-replica context
        return tf.distribute.get_strategy().num_replicas_in_sync
    return context.num_replicas_in_sync


def _replica_context():
    """The replica context when several replicas run this step, else None."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def sum_over_replicas(values):
    """Each tensor of the nest `values` summed over the replicas (one all-reduce call)."""
    context = _replica_context()
    if context is None:
        return values
    return context.all_reduce(tf.distribute.ReduceOp.SUM, values)


def any_replica(flag) -> tf.Tensor:
    """Whether the boolean `flag` is true on at least one replica (the same on all)."""
    if _replica_context() is None:
        return tf.convert_to_tensor(flag)
    return sum_over_replicas(tf.cast(flag, tf.float32)) > 0


def with_global_value(local):
    """`local`'s sum over replicas as its value, with `local`'s own gradient.

    A function f of these surrogates has f(global values) as its value, and its gradient on
    one replica is f'(global) times that replica's local gradient; summed over replicas (as
    `optimizer.apply` and the per-task gradients' all-reduce do) that is exactly the
    gradient of f on the global batch, f'(global) times the global gradient.
    """
    if _replica_context() is None:
        return local
    return local + tf.stop_gradient(sum_over_replicas(local) - local)


def replica_share(value):
    """`value` / N: a gradient that every replica computed identically, before
    `optimizer.apply` sums it over the N replicas."""
    replicas = num_replicas()
    if replicas <= 1 or value is None:
        return value
    return value / tf.cast(replicas, value.dtype)


def gather_columns(matrix):
    """All replicas' columns side by side (in replica order), and a function that takes
    this replica's columns back out of a vector over them. Identity with one replica.

    At the representation level each replica's Jacobian has one column per entry of its
    own samples' z; the global batch's Jacobian is their concatenation.
    """
    context = _replica_context()
    if context is None:
        return matrix, lambda vector: vector
    width = tf.shape(matrix)[1]
    widths = context.all_gather(width[None], axis=0)
    start = tf.reduce_sum(widths[:context.replica_id_in_sync_group])
    return context.all_gather(matrix, axis=1), lambda vector: vector[start:start + width]


def run_if(condition, fn, args=()):
    """`fn(*args)` in the graph, run only when the boolean tensor `condition` holds (it must
    be the same on every replica).

    `fn` may synchronise the replicas (`optimizer.apply` all-reduces the gradients), which
    MirroredStrategy cannot do inside a `tf.cond` in a replica context. There the condition
    is taken in the cross-replica context, as Keras' `LossScaleOptimizer` does, and `fn`
    runs on every replica with that replica's `args`.
    """
    context = _replica_context()
    if context is None or tf.__internal__.distribute.strategy_supports_no_merge_call():
        tf.cond(condition, lambda: _done(fn(*args)), lambda: tf.constant(False))
        return

    def across_replicas(distribution, condition, *args):
        agreed = distribution.experimental_local_results(condition)[0]

        def on_every_replica():
            distribution.extended.call_for_each_replica(fn, args=args)
            return tf.constant(True)

        tf.cond(agreed, on_every_replica, lambda: tf.constant(False))

    context.merge_call(across_replicas, args=(condition, *args))


def _done(_):
    return tf.constant(True)
