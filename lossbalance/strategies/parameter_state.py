"""Per-parameter strategy state (K x P buffers) for Jacobian aggregators.

A few methods keep, between steps, a vector per task as long as the shared parameters
(MoCo's tracked gradients, DB-MTL's gradient moving averages, ExcessMTL's AdaGrad-style
accumulators). The strategy contract's `build_state(num_tasks)` does not know the parameter
count P, so these strategies create that state in `build_parameter_state(P)`:
* by `BalancedModel`, before its first training step: it counts the shared parameters by
  tracing (not running) one step's per-task gradients
  (`lossbalance.gradients.shared_variables`), so the state exists before the step
  begins and a non-finite first step (`compile(nonfinite="skip")`) leaves it as created;
* on first use otherwise (the low-level `lossbalance.aggregate`, a custom loop), from the
  Jacobian's static width: `aggregate` calls it when the state is missing, and the
  variables are created eagerly (`tf.init_scope`) even inside a traced function;
* P is then part of the strategy's config (`num_parameters`), so a saved model rebuilds
  the state in `bind` (at `compile_from_config`) before its weights are loaded. With
  grouped balancing (`compile(grouping=...)`) each group's copy holds K x P_g state for its
  own P_g shared parameters, and `num_parameters` lists the groups' sizes.
Calling `build_parameter_state(P)` yourself before training does the same, explicitly.
"""

import tensorflow as tf

from lossbalance import compat
from lossbalance.strategies.arguments import check_number
from lossbalance.strategies.base import JacobianAggregator


class ParameterStateAggregator(JacobianAggregator):
    """A `JacobianAggregator` that keeps K x P state, created by `build_parameter_state`."""

    #: True when this instance needs `build_parameter_state` before its first step.
    needs_parameter_state = True
    #: The state is sized by the shared parameters, so there is no representation level.
    gradient_levels = ("parameters",)

    def __init__(self, num_parameters=None, **kwargs):
        super().__init__(**kwargs)
        grouped = isinstance(num_parameters, (list, tuple))
        sizes = [None if n is None else check_number("num_parameters", n, minimum=1,
                                                      integer=True)
                 for n in (num_parameters if grouped else [num_parameters])]
        if grouped and len(sizes) != (self._configured_groups or 1):
            raise ValueError(f"`num_parameters` lists {len(sizes)} group sizes for "
                             f"groups={self._configured_groups}.")
        # Known from a saved config: the state is created with the others in `bind`, so
        # saved weights load into it. Grouped, one size per group (`group_member_config`).
        self._configured_sizes = sizes
        self.num_parameters = None

    def bind(self, task_names):
        super().bind(task_names)
        if self._configured_sizes[0] is not None and self.num_parameters is None:
            self.build_parameter_state(self._configured_sizes[0])

    def get_config(self):
        sizes = [member.num_parameters for member in self.group_strategies()]
        return {**super().get_config(),
                "num_parameters": sizes if len(sizes) > 1 and None not in sizes else sizes[0]}

    def group_member_config(self, index):
        sizes = self._configured_sizes
        return {**super().group_member_config(index),
                "num_parameters": sizes[index] if len(sizes) > index else None}

    def build_parameter_state(self, num_parameters: int) -> None:
        """Create the K x P state once; calling again with the same P is a no-op."""
        if not self.needs_parameter_state:
            return
        num_parameters = int(num_parameters)
        if self.num_parameters is not None:
            if self.num_parameters != num_parameters:
                raise ValueError(
                    f"{type(self).__name__} already holds state for {self.num_parameters} "
                    f"shared parameters; got {num_parameters}. Its state belongs to the "
                    "model it was first trained with: give this model a new strategy "
                    "(pass the name or a config dict).")
            return
        self.num_parameters = num_parameters
        # eager, also when first reached inside a traced step
        with compat.unlocked_tracking(self), tf.init_scope():
            self.create_parameter_state(self.num_tasks, num_parameters)

    def create_parameter_state(self, num_tasks: int, num_parameters: int) -> None:
        raise NotImplementedError

    def check_parameter_state(self, jacobian) -> None:
        """Create the state on first use (from the Jacobian's static width), or check it."""
        if not self.needs_parameter_state:
            return
        size = jacobian.shape[-1]
        if self.num_parameters is None:
            if size is None:
                raise RuntimeError(
                    f"{type(self).__name__} keeps per-parameter state and needs the number "
                    "of shared parameters: call `strategy.build_parameter_state(P)` first.")
            self.build_parameter_state(size)
        elif size is not None and size != self.num_parameters:
            raise ValueError(
                f"{type(self).__name__} holds state for {self.num_parameters} shared "
                f"parameters, but the Jacobian has {size} columns. Its state belongs to "
                "another model or input width: use a new strategy (pass the name or a "
                "config dict).")
