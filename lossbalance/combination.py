"""The family dispatch: what a strategy makes of the task losses or gradients, in one place.

`BalancedModel`'s training step, `lossbalance.aggregate` / `task_weights` and
`lossbalance.diagnostics.inspect_batch` all ask a strategy the same question; each family
answers it from what it needs (see `lossbalance.strategies.base`):
* loss weightings from the losses alone;
* Gramian weightings from G = J J^T (float64, exact products of the gradients);
* Jacobian aggregators from J itself, returning their direction beside effective weights.
"""

from __future__ import annotations

import tensorflow as tf


def weights_and_direction(strategy, losses, *, gramian=None, jacobian=None, solve=None):
    """(weights, direction): the strategy's (K,) weights, and its (P,) direction when it
    aggregates the Jacobian itself (None otherwise: the direction is J^T w).

    `gramian` and `jacobian` are zero-argument callables, called only for the family that
    needs them (a Gramian is not formed for an aggregator, nor J for a Gramian weighting).
    `solve` replaces `strategy.gramian_weights` (e.g. its XLA-compiled form).
    """
    if strategy.family == "gramian":
        return (solve or strategy.gramian_weights)(gramian(), losses), None
    if strategy.family == "jacobian":
        direction, weights = strategy.aggregate(jacobian(), losses)
        return weights, direction
    return strategy.loss_weights(losses), None


def gramian_of(jacobian):
    """G = J J^T in float64: the products of float32 gradients are exact there."""
    rows = tf.cast(jacobian, tf.float64)
    return tf.matmul(rows, rows, transpose_b=True)


def combine(jacobian, weights):
    """J^T w accumulated in float64, rounded once to J's dtype (see
    `TaskGradients.combine`)."""
    direction = tf.linalg.matvec(tf.cast(jacobian, tf.float64),
                                 tf.cast(weights, tf.float64), transpose_a=True)
    return tf.cast(direction, jacobian.dtype)
