"""Small helpers shared by the loss-level strategies (DWA, RLW, GLS, SI, FAMO, STCH, IMTL-L).

Under a `tf.distribute` strategy, `BalancedModel.train_step` runs once per replica and hands a
strategy that replica's task losses, which Keras has already divided by the replica count N.
The sum of those over replicas is the loss of the global batch. Strategies whose weights are a
non-linear function of the losses compute them from that global value, so that N replicas make
the same update as one device on the same global batch, and every replica agrees on the state
they write (written with `aggregation="only_first_replica"` or `"mean"`).
"""

from __future__ import annotations

import tensorflow as tf

from lossbalance.replicas import num_replicas, replica_share, sum_over_replicas


def global_losses(losses: tf.Tensor) -> tf.Tensor:
    """The (K,) task losses of the global batch, without gradient.

    In a replica context with N > 1 replicas: the sum over replicas of the local losses
    (each already divided by N by Keras), i.e. the global mean loss. Otherwise `losses`.

    Collective ops must run in the same order on every replica: a strategy computes it
    once per step (in `LossWeighting.weighting`), and since its weights depend on it, it
    runs before the gradients' all-reduce on every replica.
    """
    if num_replicas() == 1:
        return tf.stop_gradient(losses)
    return sum_over_replicas(tf.stop_gradient(losses))


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
