"""The interface every level implements, what a step hands it, and `make_level`."""

from __future__ import annotations

from dataclasses import dataclass, field

import tensorflow as tf

from lossbalance import replicas
from lossbalance.representation import RepresentationError, RepresentationForward
from lossbalance.strategies.base import Strategy

#: `compile(gradients=...)`: where gradient-level strategies balance the tasks.
GRADIENT_LEVELS = ("parameters", "representation", "auto")
#: `compile(precision=...)`: the dtype the Gramian and J^T w are accumulated in.
PRECISIONS = ("float64", "float32")


def add(a, b):
    """a + b, where either may be None (no term)."""
    if a is None:
        return b
    return a if b is None else a + b


def global_value(value):
    """Keras losses divide by the replica count; logs report the global value."""
    count = replicas.num_replicas()
    return value * count if count > 1 and value is not None else value


def transformed_task_losses(strategy, losses, separate=True):
    """Each task's loss after `strategy.transform_losses`, as K tensors.

    With `separate`, for per-task gradients: which variables a task's loss reaches decides
    what is shared, and slicing one stacked vector would connect every task to every head
    (with zero gradients), so task k's transform sees the other losses only through
    `tf.stop_gradient` (K transforms). Without it (one gradient of a weighted sum), one
    transform of the stacked losses. Computed inside the tape.
    """
    if type(strategy).transform_losses is Strategy.transform_losses:
        return list(losses)
    if not separate:
        return tf.unstack(strategy.transform_losses(tf.stack(losses)))
    transformed = []
    for k in range(len(losses)):
        isolated = tf.stack([loss if j == k else tf.stop_gradient(loss)
                             for j, loss in enumerate(losses)])
        transformed.append(strategy.transform_losses(isolated)[k])
    return transformed


@dataclass
class Objectives:
    """What one step differentiates, computed inside its tape (loss scaling included)."""

    raw: list  # the task losses as the loss functions give them (K scalars)
    tasks: list  # weighted by compile(loss_weights=...) and transformed: what is balanced
    losses: tf.Tensor  # `tasks`, stacked (K,)
    other: object  # regularisation + the strategy's extra term, or None
    scaled: dict = field(default_factory=dict)  # the level's loss-scaled objectives
    weights: object = None  # the strategy's weights, when they come from the losses
    objective: object = None  # the objective minimised, when it is one scalar


class Level:
    """Turns one step's task losses into a gradient for every trainable variable.

    `BalancedModel.train_step` calls, in order: `prepare` (state sized by the first batch,
    created before the step), `forward` and `objectives` inside its gradient tape, then
    `gradients`. Subclasses: `LossLevel`, `ParameterLevel`, `HalfBatchLevel`,
    `VectorizedLevel`, `RepresentationLevel`.
    """

    #: `BalancedModel.gradient_level`: "parameters", "representation" or None.
    name: str | None = None
    #: `compile(grouping=...)`: the function mapping a shared variable to its group's key
    #: (`lossbalance.levels.groups`), or None for one group (set by `make_level`).
    group_key = None
    #: The dtype the Gramian and the combination J^T w are accumulated in.
    accumulate = tf.float64

    def __init__(self, model, strategy):
        self.model, self.strategy = model, strategy

    @property
    def persistent_tape(self) -> bool:
        return True

    def prepare(self, x, y, sample_weight) -> None:
        """Create what the step needs and could not know before the first batch."""

    def forward(self, x):
        """(z or None, y_pred): the forward pass, in training mode."""
        return None, self.model(x, training=True)

    def objectives(self, raw_losses, regularization, batch=None) -> Objectives:
        """What the step differentiates, from the K task losses, the regularisation term
        (or None) and the batch (y, y_pred, sample_weight), inside the tape."""
        raise NotImplementedError

    def gradients(self, tape, step: Objectives, variables, z):
        """(grads, weights, logged objective, logged losses): a gradient for every
        trainable variable, the strategy's (K,) weights, and the step's objective and task
        losses at their global values."""
        raise NotImplementedError


def make_level(model, strategy, task_losses, gradients="parameters", representation=None,
               vectorize=False, precision="float64", grouping=None) -> Level:
    """The level `compile(gradients=..., representation=..., vectorize=...,
    precision=..., grouping=...)` asks for, with its arguments checked against the strategy
    and the model."""
    from lossbalance.levels import groups

    level = _make_level(model, strategy, task_losses, gradients, representation, vectorize)
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {list(PRECISIONS)}; got {precision!r}.")
    level.accumulate = tf.as_dtype(precision)
    if grouping is not None:
        groups.check_strategy(grouping, strategy, level.name,
                              strategy.registry_name or type(strategy).__name__)
        level.group_key = groups.key_function(grouping)
    return level


def _make_level(model, strategy, task_losses, gradients, representation, vectorize):
    from lossbalance.levels.halves import HalfBatchLevel
    from lossbalance.levels.loss import LossLevel
    from lossbalance.levels.parameters import ParameterLevel
    from lossbalance.levels.representation import RepresentationLevel
    from lossbalance.levels.vectorized import VectorizedLevel

    name = strategy.registry_name or type(strategy).__name__
    if gradients not in GRADIENT_LEVELS:
        raise ValueError(f"`gradients` must be one of {list(GRADIENT_LEVELS)}; got "
                         f"{gradients!r}.")
    if vectorize not in (True, False):
        raise ValueError(f"`vectorize` must be True or False; got {vectorize!r}.")
    positions = [task.position for task in task_losses.tasks]
    if strategy.uses_independent_halves:
        if vectorize:
            raise ValueError(
                f"Strategy {name!r} takes its weights from two independent halves of each "
                "batch, which vectorize=True does not provide; leave `vectorize` out.")
    parameter_level = HalfBatchLevel if strategy.uses_independent_halves else ParameterLevel
    if "parameters" not in strategy.gradient_levels and (vectorize or gradients == "parameters"):
        raise ValueError(
            f"Strategy {name!r} is defined at the representation level only (the "
            "per-task gradients at the shared representation z); compile with "
            "gradients='representation' (or 'auto'), without vectorize=True.")
    if vectorize:
        if strategy.family == "loss":
            raise ValueError(
                f"vectorize=True vectorises per-task gradients, and strategy {name!r} "
                "weights the task losses and computes none. Leave `vectorize` out, or use "
                "a gradient-level strategy (e.g. 'mgda').")
        if gradients != "parameters":
            raise ValueError(
                f"vectorize=True applies to gradients='parameters' (got {gradients!r}): "
                "the representation level already takes a single backward pass through "
                "the trunk. Pass gradients='parameters', or leave `vectorize` out.")
        try:
            forward = RepresentationForward(model, positions, representation)
        except RepresentationError as err:
            raise RepresentationError(
                "vectorize=True sends the K per-task gradients through the trunk together "
                "from the shared representation z where the heads branch, and this model "
                f"has none usable: {err} (With vectorize=True: mark or name z; or else "
                "compile with vectorize=False.)") from None
        return VectorizedLevel(model, strategy, forward)
    if strategy.family == "loss":
        if gradients == "representation":
            raise ValueError(
                f"Strategy {name!r} weights the task losses and computes no per-task "
                "gradients, so gradients='representation' does not apply to it. Use a "
                "gradient-level strategy (e.g. 'mgda'), or leave `gradients` out.")
        return LossLevel(model, strategy)
    if gradients == "parameters":
        if representation is not None:
            raise ValueError(
                f"representation={representation!r} is only used with "
                "gradients='representation' or 'auto', or with vectorize=True.")
        return parameter_level(model, strategy)
    if "representation" not in strategy.gradient_levels:
        if gradients == "auto":
            return parameter_level(model, strategy)
        reason = ("it keeps state for every shared parameter"
                  if strategy.needs_parameter_state else
                  "it takes its weights from the parameter gradients of two halves of "
                  "each batch" if strategy.uses_independent_halves else
                  "where the method is defined")
        raise ValueError(f"Strategy {name!r} is only defined at the parameter level "
                         f"({reason}); use gradients='parameters'.")
    try:
        return RepresentationLevel(model, strategy,
                                   RepresentationForward(model, positions, representation))
    except RepresentationError:
        if gradients == "auto" and representation is None and \
                "parameters" in strategy.gradient_levels:
            return parameter_level(model, strategy)
        raise
