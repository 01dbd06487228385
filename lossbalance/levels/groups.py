"""Grouped balancing: the strategy applied separately to groups of shared parameters
(`compile(grouping=...)`).

Each group of shared variables gets its own Gramian (or Jacobian), its own weights and its
own copy of the strategy's state (`Strategy.group_strategies`); the update of a group's
variables is J_g^T w_g. With one group this is the ordinary parameter level; with a strategy
linear in the gradients (`mean`, `sum`, `constant`) every grouping gives the same update.
GradVac's paper balances layer by layer this way (`grouping="layer"`).

Groupings: "variable" (each shared variable its own group), "layer" (the variables of one
layer: the same `variable.path` but for its last component), or a callable that maps a
variable to a hashable group key. Groups are ordered by their first shared variable.
The logged `<task>_weight` is the mean of the groups' weights; `inspect_batch` shows each
group's.
"""

from __future__ import annotations

import copy

import tensorflow as tf

from lossbalance.combination import weights_and_direction
from lossbalance.strategies.base import Strategy

GROUPINGS = ("layer", "variable")


def _layer_key(variable):
    path = getattr(variable, "path", None) or variable.name
    return path.rsplit("/", 1)[0]


def _variable_key(variable):
    return getattr(variable, "path", None) or variable.name


def key_function(grouping):
    """The function mapping a variable to its group key, for a `grouping` (checked)."""
    if grouping == "layer":
        return _layer_key
    if grouping == "variable":
        return _variable_key
    if callable(grouping) and not isinstance(grouping, str):
        return grouping
    raise ValueError(f"`grouping` must be None, one of {list(GROUPINGS)} or a callable "
                     f"that maps a variable to its group's key; got {grouping!r}.")


def check_strategy(grouping, strategy, gradients, name) -> None:
    """Refuse, saying why, a grouping that does not apply to the strategy or level."""
    key_function(grouping)
    reason = None
    if strategy.family == "loss":
        reason = "it weights the task losses and computes no per-task gradients"
    elif gradients != "parameters":
        reason = (f"groups are of shared parameters, and gradients={gradients!r} balances "
                  "elsewhere: use gradients='parameters'")
    elif strategy.trainable_variables and \
            type(strategy).group_member is Strategy.group_member:
        reason = ("it learns variables (loss scales) that its copies for the other groups "
                  "would duplicate")
    if reason is not None:
        raise ValueError(f"compile(grouping={grouping!r}) does not apply to strategy "
                         f"{name!r}: {reason}.")


def partition(items, key) -> dict:
    """{group key: [items]}: `items` grouped by `key(item)`, in order of first appearance."""
    groups = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def group_indices(gradients, key) -> list[tuple[object, list[int]]]:
    """[(group key, indices of its shared variables)], ordered by first shared variable."""
    return list(partition(gradients.shared, lambda i: key(gradients.variables[i])).items())


def restricted(gradients, indices):
    """A view of `gradients` whose shared variables are `indices` only (its Gramian,
    Jacobian and combination are the group's)."""
    view = copy.copy(gradients)
    view.shared = list(indices)
    return view


def grouped_weights_and_update(strategy, gradients, losses, key, gramian_of, jacobian_of,
                               combine, solve=None):
    """({variable index: update}, (K,) mean weights, [(group key, (K,) weights)]): the
    strategy's copy for each group applied to that group's gradients. `gramian_of`,
    `jacobian_of` and `combine` take a group's view (they apply the level's precision and
    loss scaling); `solve` replaces every copy's `gramian_weights` (a stateless
    strategy's compiled solver)."""
    groups = group_indices(gradients, key)
    strategy.build_groups(len(groups))
    update, per_group = {}, []
    for (group, indices), member in zip(groups, strategy.group_strategies()):
        view = restricted(gradients, indices)
        weights, direction = weights_and_direction(
            member, losses, gramian=lambda v=view: gramian_of(v),
            jacobian=lambda v=view: jacobian_of(v), solve=solve)
        update.update(combine(view, weights, direction))
        per_group.append((group, tf.cast(weights, losses.dtype)))
    mean = tf.reduce_mean(tf.stack([w for _, w in per_group]), axis=0)
    return update, mean, per_group
