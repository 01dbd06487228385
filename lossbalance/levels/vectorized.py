"""The parameter level with the trunk's K backward passes vectorised into one, from z
(`compile(vectorize=True)`)."""

from __future__ import annotations

import warnings

import tensorflow as tf

from lossbalance.gradients import TaskGradients, task_gradients
from lossbalance.levels.parameters import ParameterLevel
from lossbalance.levels.trunk import Trunk


def _loops_upstream(tensor):
    """Names of the loop operations (an RNN's, say) a graph tensor is computed from: while
    loops, or the tensor lists they iterate over (under XLA the while op itself is hidden
    in a function call)."""
    seen, stack, loops = set(), [tensor.op], []
    while stack:
        op = stack.pop()
        if op.name not in seen:
            seen.add(op.name)
            if op.type in ("While", "StatelessWhile") or op.type.startswith("TensorList"):
                loops.append(op.name)
            stack.extend(t.op for t in op.inputs)
    return loops


class VectorizedLevel(ParameterLevel):
    """The parameter level's per-task gradients, found through z.

    A pass through the heads gives each task's cotangent dL_k/dz and its gradients of the
    variables after z; the trunk's, (dz/dθ)^T dL_k/dz, come stacked from the K cotangents'
    backward passes through the trunk, vectorised into one (`trunk_rows`). As z is a cut,
    these are exactly the per-task gradients of every variable, and the stacked trunk rows
    are the only K x P copy. `loop_reason` says why the trunk's passes run as a loop
    instead, once that is known.
    """

    def __init__(self, model, strategy, forward):
        super().__init__(model, strategy)
        self.trunk = Trunk(forward)
        self.loop_reason = None

    def forward(self, x):
        return self.trunk.forward(x, training=True)

    def task_gradients(self, tape, scaled_losses, variables, z) -> TaskGradients:
        trunk, after = self.trunk.split(tape, z, variables)
        through_heads = task_gradients(
            tape, scaled_losses, [z] + [variables[i] for i in after])
        reaching = [k for k, g in enumerate(through_heads) if g[0] is not None]
        cotangents = [tf.zeros_like(z) if g[0] is None else g[0] for g in through_heads]
        rows = self.trunk_rows(tape, z, [variables[i].value for i in trunk], cotangents)
        per_task = [[None] * len(variables) for _ in through_heads]
        for k, g in enumerate(through_heads):
            for i, gradient in zip(after, g[1:]):
                per_task[k][i] = gradient
        return TaskGradients(per_task, variables, stacked=dict(zip(trunk, rows)),
                             stacked_tasks=reaching)

    def trunk_rows(self, tape, z, trunk, cotangents):
        """(K, *shape) for each trunk variable: the backward passes from z with each of the
        K cotangents, vectorised into one where possible, else run one by one."""
        if not trunk:
            return []
        if self.loop_reason is None:
            reason = self._xla_obstacle(z)
            if reason is None:
                try:  # no silent while-loop fallback: it may not compile under XLA
                    return tf.vectorized_map(
                        lambda dz: [tf.convert_to_tensor(g) for g in  # dense embeddings'
                                    tape.gradient(z, trunk, output_gradients=dz)],
                        tf.stack(cotangents), fallback_to_while_loop=False)
                except ValueError as err:  # an op without a pfor converter
                    first_line = str(err).splitlines()[0] if str(err) else repr(err)
                    reason = f"its backward pass cannot be vectorised ({first_line})"
            self._loop_instead(reason)
        passes = [tape.gradient(z, trunk, output_gradients=dz) for dz in cotangents]
        return [tf.stack([tf.convert_to_tensor(g) for g in rows]) for rows in zip(*passes)]

    def _xla_obstacle(self, z):
        """Why XLA cannot compile the vectorised trunk pass, when that is known before
        compiling: pfor turns a while loop of the trunk (an RNN's) into one over tensor
        lists of unknown shape, which XLA rejects only when the step first runs."""
        if not self.model.jit_compile or tf.executing_eagerly():
            return None
        loops = _loops_upstream(z)
        if loops:
            return (f"it computes z with a loop (operation {loops[0]!r}, e.g. an RNN's), "
                    "whose vectorised backward pass XLA cannot compile (jit_compile=True)")
        return None

    def _loop_instead(self, reason):
        """Run the trunk's per-task passes one by one from now on, saying why once."""
        if self.loop_reason is None:
            warnings.warn(
                f"compile(vectorize=True): the trunk of {self.model.name!r} (before "
                f"{self.trunk.forward.layer_name!r}) takes its K per-task backward passes "
                f"one by one instead, as {reason}. The gradients are the same; only the "
                "speed-up is lost.", stacklevel=2)
        self.loop_reason = reason
