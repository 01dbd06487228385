"""Small helpers shared by the loss-level strategies (DWA, RLW, GLS, SI, FAMO, STCH, IMTL-L).

Under a `tf.distribute` strategy, `BalancedModel.train_step` runs once per replica and hands a
strategy that replica's task losses, which Keras has already divided by the replica count N.
The sum of those over replicas is the loss of the global batch. Strategies whose weights are a
non-linear function of the losses compute them from that global value, so that N replicas make
the same update as one device on the same global batch, and every replica agrees on the state
they write (written with `aggregation="only_first_replica"` or `"mean"`).
"""

from __future__ import annotations

import threading

import tensorflow as tf

from lossbalance.replicas import num_replicas, replica_share, sum_over_replicas


def per_step(owner, key: str, losses: tf.Tensor, compute):
    """`compute()`, evaluated once per traced training step for one `losses` tensor.

    `BalancedModel.train_step` calls `extra_loss(losses)` and then `loss_weights(losses)`
    with the same tensor; a strategy that needs the same quantities in both (its weights
    and the value of its scalarisation, or the global losses) computes them once. Only
    while tracing a graph: in eager mode every call computes afresh, since the strategy's
    state may have changed between two calls with the same tensor.

    Entries are kept per thread: `tf.distribute.MirroredStrategy` traces each replica's
    step in its own thread, interleaved at its synchronisation points, and each replica
    must find its own entries (else the replicas would run different collectives). An
    entry serves the graph it was computed in and the graphs nested in it (`tf.cond`
    branches), never another trace: an eager `losses` tensor captured by two traces is
    the same object in both.
    """
    if tf.executing_eagerly():
        return compute()
    hit = _per_step_cached(owner, key, losses)
    if hit is not None:
        return hit
    value = compute()
    owner.__dict__.setdefault("_per_step_cache", {})[(key, threading.get_ident())] = (
        losses, tf.compat.v1.get_default_graph(), value)  # a plain dict: not tracked
    return value


def _per_step_cached(owner, key: str, losses: tf.Tensor):
    """The value `per_step` holds for `key` and this `losses` tensor in the graph being
    traced, or None (always None in eager mode)."""
    if tf.executing_eagerly():
        return None
    hit = owner.__dict__.get("_per_step_cache", {}).get((key, threading.get_ident()))
    if hit is None or hit[0] is not losses:
        return None
    graph = tf.compat.v1.get_default_graph()
    while graph is not None and graph is not hit[1]:
        graph = getattr(graph, "outer_graph", None)
    return None if graph is None else hit[2]


def global_losses(losses: tf.Tensor, owner=None) -> tf.Tensor:
    """The (K,) task losses of the global batch, without gradient.

    In a replica context with N > 1 replicas: the sum over replicas of the local losses
    (each already divided by N by Keras), i.e. the global mean loss. Otherwise `losses`.

    Collective ops must run in the same order on every replica. A strategy that needs the
    global losses in both `extra_loss` and `loss_weights` passes itself as `owner`: the
    all-reduce of one `losses` tensor is then done once per step and reused, and since the
    weights depend on it, it runs before the gradients' all-reduce on every replica.
    """
    if num_replicas() == 1:
        return tf.stop_gradient(losses)

    def all_reduce():
        return sum_over_replicas(tf.stop_gradient(losses))

    if owner is None:
        return all_reduce()
    return per_step(owner, "global_losses", losses, all_reduce)


def surrogate_offset(value: tf.Tensor, weights: tf.Tensor, losses: tf.Tensor) -> tf.Tensor:
    """A constant that makes the logged objective equal a scalarisation's value.

    A strategy that minimises a non-linear scalarisation S(L_1..L_K) (a geometric mean, a sum
    of logs, a log-sum-exp) does so with one backward pass of sum_k w_k L_k, where
    w_k = dS/dL_k is held constant: the gradients agree. Adding this offset,
    stop_gradient(S - sum_k w_k L_k), makes the objective's *value* equal S as well, so the
    logged `loss` is the quantity the method minimises. It adds no gradient. Under
    `tf.distribute` the offset is divided by the replica count, because every replica adds it
    and the logged loss is the sum over replicas.

    Args:
        value: S at the global losses.
        weights: the (K,) weights w at the global losses.
        losses: the (K,) global losses.
    """
    return tf.stop_gradient(replica_share(value - tf.reduce_sum(weights * losses)))
