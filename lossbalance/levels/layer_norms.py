"""Each task's gradient norm at one shared layer, for strategies that ask for it
(`Strategy.uses_layer_gradients`: GradNorm)."""

from __future__ import annotations

import tensorflow as tf

from lossbalance import compat, replicas
from lossbalance.gradients import TaskGradients, task_gradients


def update_strategy(model, tape, task_losses, variables) -> None:
    """Hand the strategy each task's gradient norm at its layer, and the global losses."""
    strategy = model.strategy
    values = [v.value for v in _layer_variables(model, tape, task_losses, variables)]
    norms, unreached = [], []
    for task, task_loss in zip(model._task_losses.names, task_losses):
        grads = [g for g in tape.gradient(task_loss, values) if g is not None]
        # the global batch's gradient (tf.distribute), whose norm is not a sum
        grads = replicas.sum_over_replicas(grads) if grads else grads
        norms.append(tf.linalg.global_norm(grads) if grads else tf.zeros(()))
        if not grads:
            unreached.append(task)
    if unreached:  # only a named layer can miss a task
        raise ValueError(
            f"{type(strategy).__name__}(layer={strategy.layer!r}): task(s) "
            f"{unreached} do not depend on that layer, so their gradient norm there is "
            "0 and cannot be balanced. Name a layer of the trunk that every task "
            "depends on, or leave layer=None for the last layer they all share.")
    strategy.update_with_gradient_norms(
        tf.stack(norms), replicas.sum_over_replicas(tf.stack(task_losses)))


def check_layer(model, strategy) -> None:
    """At compile: a layer named by the strategy must exist (nested ones too)."""
    layer = strategy.layer
    if strategy.uses_layer_gradients and layer is not None:
        names = [l.name for l in compat.sublayers(model)]
        if layer not in names:
            raise ValueError(
                f"{type(strategy).__name__}(layer={layer!r}): the model has no layer "
                f"of that name. Its layers: {names}.")


def _layer_variables(model, tape, task_losses, variables):
    """The named layer's trainable weights, or those of the last layer every task
    reaches (its variables that every task reaches)."""
    name = model.strategy.layer
    if name is not None:  # nested layers too, as `check_layer` accepts them
        layer = next((l for l in compat.sublayers(model) if l.name == name),
                     None) or model.get_layer(name)
        if not layer.trainable_weights:
            raise ValueError(
                f"Layer {name!r} has no trainable weights to balance at (frozen, or "
                "without weights). Name a trainable layer of the shared trunk, or leave "
                "layer=None for the last layer every task depends on.")
        return layer.trainable_weights
    gradients = TaskGradients(task_gradients(tape, task_losses, variables), variables)
    if not gradients.common:
        why = ("the heads share no trunk" if not gradients.has_shared else
               "some heads branch off separately")
        raise ValueError(
            f"Strategy {model.strategy.registry_name!r} needs a layer that every task "
            f"depends on, but no trainable variable is shared by all tasks: {why}. "
            "Build every head on a common trunk.")
    last_common = variables[gradients.common[-1]]
    holders = [layer for layer in compat.sublayers(model)
               if any(w is last_common for w in layer.trainable_weights)]
    owner = min(holders, key=lambda layer: len(layer.trainable_weights))  # innermost
    common_ids = {id(variables[i]) for i in gradients.common}
    return [v for v in owner.trainable_weights if id(v) in common_ids]
