"""The low-level API: combine per-task gradients with any strategy, outside `BalancedModel`.

    direction = lossbalance.aggregate("upgrad", jacobian)          # (P,) = J^T w
    weights = lossbalance.task_weights("mgda", gramian=jacobian @ jacobian.T)

`jacobian` is a (K, P) array or tensor whose rows are the K tasks' gradients (flattened and
concatenated over the shared parameters); the direction is what `BalancedModel` would apply
to the shared parameters for those gradients, before the optimizer. A strategy given by name
or config is created afresh on every call; pass a strategy *instance* to keep state between
calls (GradVac's targets, Nash-MTL's cached weights, MoCo's tracked gradients, seeds).

Notes:
* An unbound strategy is bound to K generic task names ("task_0", ...); a bound one must
  have K tasks.
* `transform_losses` is not applied: the gradients given are taken to be those of the
  losses the strategy balances (for DB-MTL, of log L_k; for IMTL, of the scaled losses).
* Strategies with per-parameter state get it built here from the Jacobian's width.
* In eager mode the computation runs through a `tf.function` cached on the strategy (one
  trace per input shape and dtype); inside a `tf.function` it is traced in place.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from lossbalance import strategies as _strategies
from lossbalance.combination import combine, gramian_of, weights_and_direction


def _resolve(strategy, num_tasks):
    strategy = _strategies.get(strategy)
    if strategy._task_names is None:
        strategy.bind([f"task_{k}" for k in range(num_tasks)])
    elif strategy.num_tasks != num_tasks:
        raise ValueError(
            f"Strategy {strategy.name!r} is bound to {strategy.num_tasks} tasks "
            f"{list(strategy.task_names)}, but the input has {num_tasks} rows.")
    return strategy


def _as_tensor(value, name):
    if isinstance(value, (tf.Tensor, tf.Variable)) or hasattr(value, "dtype") and not \
            isinstance(value, np.ndarray):
        tensor = tf.convert_to_tensor(value)
    else:
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32)
        tensor = tf.convert_to_tensor(array)
    if not tensor.dtype.is_floating:
        tensor = tf.cast(tensor, tf.float32)
    if tensor.shape.rank != 2:
        raise ValueError(f"`{name}` must be 2-D (K, P); got shape {tensor.shape}.")
    return tensor


def _losses(strategy, losses, k, dtype):
    if losses is None:
        if strategy.uses_losses or strategy.family == "loss":
            raise ValueError(
                f"Strategy {strategy.name!r} needs the task losses: pass losses=[...].")
        return tf.ones([k], dtype)
    losses = tf.cast(tf.reshape(tf.convert_to_tensor(losses), [-1]), dtype)
    if losses.shape[0] is not None and losses.shape[0] != k:
        raise ValueError(f"`losses` has {losses.shape[0]} entries for {k} tasks.")
    return losses


def _cached(strategy, key, fn):
    cache = strategy.__dict__.setdefault("_lossbalance_functions", {})
    if key not in cache:
        cache[key] = tf.function(fn, reduce_retracing=True, autograph=False)
    return cache[key]


def _direction_and_weights(strategy, jacobian, losses):
    weights, direction = weights_and_direction(
        strategy, losses, gramian=lambda: gramian_of(jacobian), jacobian=lambda: jacobian)
    if direction is None:
        direction = combine(jacobian, weights)
    return tf.cast(direction, jacobian.dtype), tf.cast(weights, jacobian.dtype)


def aggregate_with_weights(strategy, jacobian, losses=None):
    """`aggregate`, also returning the (K,) weights (effective weights for aggregators)."""
    jacobian = _as_tensor(jacobian, "jacobian")
    k = jacobian.shape[0]
    strategy = _resolve(strategy, k)
    losses = _losses(strategy, losses, k, jacobian.dtype)
    if strategy.needs_parameter_state and tf.executing_eagerly():
        strategy.build_parameter_state(jacobian.shape[1])
    if not tf.executing_eagerly():
        return _direction_and_weights(strategy, jacobian, losses)
    fn = _cached(strategy, "aggregate",
                 lambda j, l: _direction_and_weights(strategy, j, l))
    return fn(jacobian, losses)


def aggregate(strategy, jacobian, losses=None):
    """The (P,) update direction a strategy makes of K task gradients.

    Args:
        strategy: a registered name ("upgrad"), a `Strategy` instance (kept, with its
            state, between calls) or a config dict ({"name": "cagrad", "c": 0.5}).
        jacobian: (K, P) array or tensor, one task gradient per row.
        losses: optional (K,) task losses, for strategies that use them (MGDA's "loss"
            normalisations, loss-weighting strategies); ones otherwise.

    Returns:
        A (P,) tensor of the Jacobian's dtype: J^T w for Gramian and loss weightings, the
        aggregator's direction for Jacobian aggregators (GradDrop, MoCo, ...).
    """
    return aggregate_with_weights(strategy, jacobian, losses)[0]


def task_weights(strategy, jacobian=None, *, gramian=None, losses=None):
    """The (K,) weights a strategy gives the tasks, from a Jacobian or its Gramian.

    Gramian strategies (MGDA, UPGrad, Nash-MTL, ...) need only the K x K Gramian
    G = J J^T; the update is then J^T w. Jacobian aggregators need `jacobian`, and their
    weights are the effective ones they report.

    Args:
        strategy: as for `aggregate`.
        jacobian: (K, P) task gradients, or
        gramian: (K, K) their Gramian (exactly one of the two).
        losses: optional (K,) task losses.
    """
    if (jacobian is None) == (gramian is None):
        raise ValueError("Give exactly one of `jacobian` and `gramian`.")
    if jacobian is not None:
        return aggregate_with_weights(strategy, jacobian, losses)[1]
    gramian = _as_tensor(gramian, "gramian")
    k = gramian.shape[0]
    if gramian.shape[1] != k:
        raise ValueError(f"`gramian` must be square; got shape {gramian.shape}.")
    strategy = _resolve(strategy, k)
    if strategy.family == "jacobian":
        raise ValueError(
            f"Strategy {strategy.name!r} needs the Jacobian itself, not its Gramian: "
            "pass jacobian=...")
    losses = _losses(strategy, losses, k, gramian.dtype)

    def weights_of(g, l):
        return tf.cast(weights_and_direction(strategy, l, gramian=lambda: g)[0], g.dtype)

    if not tf.executing_eagerly():
        return weights_of(gramian, losses)
    return _cached(strategy, "weights", weights_of)(gramian, losses)
