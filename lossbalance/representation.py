"""The shared representation: the tensor z where the task heads branch off the trunk.

At the representation level (`compile(gradients="representation")`, MGDA-UB, Sener & Koltun
2018) a gradient strategy balances the per-task gradients with respect to z, dL_k/dz, which
cost one pass through the heads each, instead of the per-task gradients of every trunk
parameter. The combined cotangent sum_k w_k dL_k/dz then takes ONE backward pass through the
trunk. This is exact for the update J^T w only when z is a cut: every path from the inputs to
every task's output goes through z.

How the model tells where z is:
* functional models: found automatically (the deepest tensor that every path from the inputs
  to every task output passes through), or named: `compile(representation="layer_name")`;
* any model (subclassed ones in particular): pass the tensor through a `Representation` layer
  in `call`, `z = lossbalance.Representation()(h)`; it is the identity.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from lossbalance import compat


@keras.saving.register_keras_serializable(package="lossbalance")
class Representation(keras.layers.Layer):
    """Marks the shared representation where the task heads branch (the identity).

    Put it at the end of the trunk, `z = lossbalance.Representation()(trunk_output)`, and
    call every head on `z`. `BalancedModel.compile(gradients="representation")` then
    balances the tasks' gradients with respect to `z`.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True
        self._captured = None  # a list while a training step records z

    def call(self, inputs):
        if self._captured is not None:
            self._captured.append(inputs)
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


class RepresentationError(ValueError):
    """The model has no usable shared representation."""


def _producer_inputs(tensor):
    """The KerasTensors the operation that produced `tensor` was called on."""
    return compat.producer(tensor)[1]


def _ancestors(tensor):
    """`tensor` and every KerasTensor it was computed from, by id."""
    seen, stack = {}, [tensor]
    while stack:
        t = stack.pop()
        if id(t) not in seen:
            seen[id(t)] = t
            stack.extend(_producer_inputs(t))
    return seen


def _is_cut(candidate, inputs, outputs):
    """Whether every path from `inputs` to each of `outputs` goes through `candidate`."""
    input_ids = {id(t) for t in inputs}
    for output in outputs:
        seen, stack = set(), [output]
        while stack:
            t = stack.pop()
            if t is candidate or id(t) in seen:
                continue
            if id(t) in input_ids:
                return False
            seen.add(id(t))
            stack.extend(_producer_inputs(t))
    return True


def _layer_name(tensor):
    return getattr(compat.producer(tensor)[0], "name", "?")


def find_representation(model, task_outputs: list, layer: str | None = None):
    """The KerasTensor z where the task heads branch, in a functional `model`.

    Args:
        model: a functional model.
        task_outputs: the KerasTensors of the outputs that are tasks.
        layer: the name of the layer whose output is z; by default the deepest tensor that
            every path from the inputs to every task output goes through (a `Representation`
            layer's output, if the model has one).
    """
    inputs = list(model.inputs)
    if layer is not None:
        try:
            named = model.get_layer(layer)
        except ValueError:
            names = [l.name for l in model.layers]
            raise RepresentationError(
                f"representation={layer!r}: the model has no layer of that name. Its "
                f"layers: {names}.") from None
        outputs = [t for t in compat.output_tensors(named)
                   if any(t is a for out in task_outputs for a in _ancestors(out).values())]
        if len(outputs) != 1:
            raise RepresentationError(
                f"representation={layer!r}: the layer must produce exactly one tensor that "
                f"the tasks use; it produces {len(outputs)}. Name a layer called once with "
                "one output.")
        z = outputs[0]
        if not _is_cut(z, inputs, task_outputs):
            raise RepresentationError(
                f"representation={layer!r}: some task output is also computed from the "
                "inputs by a path that avoids this layer, so its output is not where the "
                "heads branch. Name the last layer that every head is built on.")
        return z
    common = None
    for output in task_outputs:
        ids = _ancestors(output)
        common = ids if common is None else {i: t for i, t in common.items() if i in ids}
    input_ids = {id(t) for t in inputs}
    output_ids = {id(t) for t in task_outputs}
    cuts = [t for i, t in common.items() if i not in input_ids and i not in output_ids
            and _is_cut(t, inputs, task_outputs)]
    if not cuts:
        raise RepresentationError(
            "The task outputs do not branch from one shared tensor: no tensor lies on every "
            "path from the inputs to every task output (or the heads share no layer). Name "
            "one with compile(representation='layer_name'), or use "
            "gradients='parameters'.")
    # The cuts lie on one chain; the deepest descends from all the others.
    marked = [t for t in cuts if isinstance(compat.producer(t)[0], Representation)]
    return _deepest(marked or cuts)


def _deepest(cuts):
    for t in cuts:
        ancestors = _ancestors(t)
        if all(id(other) in ancestors for other in cuts):
            return t
    raise AssertionError("the cuts of a graph lie on one chain")  # unreachable


class RepresentationForward:
    """Computes (z, y_pred) in one forward pass, z being the model's shared representation.

    Held by `BalancedModel` outside Keras' tracking (it shares the model's layers).
    """

    def __init__(self, model, task_positions, layer=None):
        self.model = model
        self.wrapper = self.marker = None
        if isinstance(model, compat.Functional):
            task_outputs = [model.outputs[p] for p in task_positions]
            z = find_representation(model, task_outputs, layer)
            self.layer_name = _layer_name(z)
            # One forward pass returns z beside the outputs; the layers are the model's own.
            self.wrapper = compat.functional_with_outputs(
                model, lambda outputs: [z, outputs], name=f"{model.name}_with_representation")
            return
        if layer is not None:
            raise RepresentationError(
                f"representation={layer!r} names a layer, which only a functional model "
                "can be split at. In a subclassed model, pass the shared tensor through "
                "`lossbalance.Representation()` in `call` instead.")
        markers = [l for l in compat.sublayers(model) if isinstance(l, Representation)]
        if len(markers) != 1:
            raise RepresentationError(
                f"{type(model).__name__} is a subclassed model, so its shared "
                "representation must be declared: in `call`, pass the tensor where the "
                "heads branch through one `lossbalance.Representation()` layer "
                f"(found {len(markers)}).")
        self.marker = markers[0]
        self.layer_name = self.marker.name

    def __call__(self, x, training=True):
        if self.wrapper is not None:
            z, y_pred = self.wrapper(x, training=training)
            return z, y_pred
        marker = self.marker
        marker._captured = []
        try:
            y_pred = self.model(x, training=training)
            # A first call builds the model by tracing `call` in a scratch graph, which
            # records z too; keep z of this graph (or the eager one).
            graph = None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()
            captured = [t for t in marker._captured if getattr(t, "graph", None) is graph]
        finally:
            marker._captured = None
        if len(captured) != 1:
            raise RepresentationError(
                f"The Representation layer {marker.name!r} was called {len(captured)} "
                "times in one forward pass; call it exactly once, on the tensor where the "
                "heads branch.")
        return captured[0], y_pred
