"""The parameter level: each task's exact gradient on every shared parameter."""

from __future__ import annotations

import math

from lossbalance.gradients import TaskGradients, shared_variables, task_gradients
from lossbalance.levels.gradient import GradientLevel
from lossbalance.levels.groups import partition


class ParameterLevel(GradientLevel):
    """One backward pass per task (a persistent tape); the strategy combines the rows of
    the shared variables, each head gets its own task's gradient."""

    name = "parameters"

    def prepare(self, x, y, sample_weight) -> None:
        """Before the first step, state sized by the shared parameters: K x P buffers
        (MoCo, DB-MTL, ExcessMTL) and/or one strategy copy per parameter group
        (`compile(grouping=...)`), each copy's buffers sized by its group. The shared
        variables are found by tracing, not running, the per-task gradients
        (`lossbalance.gradients.shared_variables`)."""
        strategy, model = self.strategy, self.model
        wants_size = strategy.needs_parameter_state and strategy.num_parameters is None
        wants_groups = self.group_key is not None and strategy.num_groups is None
        if not (wants_size or wants_groups):
            return
        own = {id(v) for v in strategy.trainable_variables}
        shared = shared_variables(
            lambda x, y, sw: model._task_losses(y, model(x, training=True), sw),
            lambda: [v for v in model.trainable_variables if id(v) not in own],
            x, y, sample_weight)
        if self.group_key is None:
            strategy.build_parameter_state(_size(shared))
            return
        groups = partition(shared, self.group_key).values()
        strategy.build_groups(len(groups))
        if wants_size:
            for member, variables in zip(strategy.group_strategies(), groups):
                member.build_parameter_state(_size(variables))

    def task_gradients(self, tape, scaled_losses, variables, z) -> TaskGradients:
        return TaskGradients(task_gradients(tape, scaled_losses, variables), variables)

    def task_update(self, tape, step, variables, other, z):
        gradients = self.task_gradients(tape, step.scaled["tasks"], variables, z)
        self.check(gradients)
        shared, weights = self.combine_shared(gradients, step.losses)
        return gradients.gradients(shared, other), weights

    def check(self, gradients) -> None:
        """Refuse, naming the tasks, a model whose tasks share nothing to balance."""
        name = self.strategy.registry_name
        if not gradients.has_shared:
            raise ValueError(
                "No trainable variable is shared by two or more tasks, so there is nothing "
                f"for strategy {name!r} to balance: the heads share "
                "no trunk. Check that every head is built on the shared layers."
            )
        detached = [self.model._task_losses.names[k] for k in gradients.tasks_without_shared]
        if detached:
            raise ValueError(
                f"Task(s) {detached} do not depend on any variable shared with the other "
                f"tasks, so strategy {name!r} cannot balance them "
                "against the others. Build every head on the shared trunk, or train such "
                "a task separately."
            )


def _size(variables) -> int:
    """The number of scalar parameters in `variables`."""
    return sum(math.prod(v.shape) for v in variables)
