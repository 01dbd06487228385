"""Every use of Keras' internals, in one place, with why it is needed.

`lossbalance` extends `keras.Model`'s training step, so it leans on a few things Keras does
not export. Each item says what it is for; all were checked with Keras 3.15.1 on TensorFlow
2.21.0 (the versions the test suite runs against, `SUPPORTED`). Older versions are refused
at import (`check_versions`): Keras 3.0 lacks `add_weight(aggregation=...)`, and Keras 3.8
cannot reload a functional `BalancedModel` nor run the mirrored and multi-worker steps.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

#: The oldest TensorFlow and Keras the test suite has been run against.
SUPPORTED = {"tensorflow": (2, 21), "keras": (3, 15)}

# Functional models: `BalancedModel(inputs=..., outputs=...)` must become a functional model
# without Keras rewriting the subclass's bases in place (which would change every subclassed
# BalancedModel too), so it builds a `Functional` subclass itself, initialised as Keras does.
from keras.src.models.functional import Functional  # noqa: E402
from keras.src.models.model import Trainer, functional_init_arguments  # noqa: E402,F401

# Keras' resolution of a loss identifier ("mse", "crossentropy" chosen from the data),
# so that each task's loss is resolved exactly as `compile(loss=...)` resolves it.
from keras.src.trainers.compile_utils import get_loss  # noqa: E402,F401

__all__ = ["Functional", "Trainer", "functional_init_arguments", "get_loss", "SUPPORTED",
           "check_versions", "multi_worker", "unlocked_tracking", "untrack", "track_variable",
           "sublayers", "regularization_term", "producer", "output_tensors",
           "functional_with_outputs", "local_first_batch", "StagedSeedGenerator"]


def _version(text):
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


def check_versions() -> None:
    """Refuse, with the fix, a TensorFlow or Keras older than `SUPPORTED`."""
    found = {"tensorflow": tf.__version__, "keras": keras.__version__}
    old = [f"{name} {found[name]} (needs >= {'.'.join(map(str, SUPPORTED[name]))})"
           for name in SUPPORTED if _version(found[name]) < SUPPORTED[name]]
    if old:
        raise ImportError(
            f"lossbalance needs newer versions: {', '.join(old)}. Upgrade with "
            "`pip install -U 'tensorflow>=2.21' 'keras>=3.15'`.")


def multi_worker(strategy) -> bool:
    """Whether `strategy` runs MultiWorkerMirroredStrategy across several workers, where
    Keras' log reduction fails on scalars (keras-team/keras#20585; Keras' own test, as in
    keras.src.backend.tensorflow.trainer)."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and \
        strategy.extended._in_multi_worker_mode()


@contextlib.contextmanager
def unlocked_tracking(layer):
    """Let `layer` track new attributes after it was built (Keras locks its tracker then):
    to attach a strategy and its trackers at `compile`, or per-parameter state created
    at the first step."""
    tracker = getattr(layer, "_tracker", None)
    was_locked = bool(tracker and tracker.locked)
    if was_locked:
        tracker.unlock()
    try:
        yield
    finally:
        if was_locked:
            tracker.lock()


def untrack(layer, value) -> None:
    """Stop `layer` tracking `value` (a replaced strategy or tracker at a re-compile)."""
    layer._tracker.untrack(value)


def track_variable(layer, variable) -> None:
    """Make `variable` part of `layer`'s weights (a `SeedGenerator`'s state, which Keras
    does not save by itself)."""
    layer._track_variable(variable)


def sublayers(model) -> list:
    """Every layer inside `model`, nested ones included (not `model` itself)."""
    return list(model._flatten_layers(include_self=False))


def regularization_term(model, loss):
    """An `add_loss` or regulariser term, scaled for tf.distribute as Keras scales it."""
    return model._aggregate_additional_loss(loss)


def producer(tensor):
    """(the operation that produced a symbolic KerasTensor, or None; its input tensors)."""
    history = getattr(tensor, "_keras_history", None)
    if history is None or history.operation is None:
        return None, []
    node = history.operation._inbound_nodes[history.node_index]
    return history.operation, node.input_tensors


def output_tensors(layer) -> list:
    """The symbolic outputs of every call of `layer` in its functional models."""
    return [t for node in layer._inbound_nodes for t in node.output_tensors]


def functional_with_outputs(model, outputs, name):
    """A functional model on `model`'s inputs (and layers) with other `outputs`."""
    return Functional(model._inputs_struct, outputs(model._outputs_struct), name=name)


def local_first_batch(model, iterator):
    """The first batch of a distributed iterator, each value its first local replica's
    part (enough to build a model: shapes only); None without tf.distribute."""
    distribution = model._distribute_strategy
    if iterator is None or distribution is None:
        return None
    local = distribution.experimental_local_results
    for _, _, batches in iterator:
        return tf.nest.map_structure(
            lambda v: local(v)[0] if isinstance(v, tf.distribute.DistributedValues) else v,
            next(batches))
    return None


class StagedSeedGenerator(keras.random.SeedGenerator):
    """A Keras `SeedGenerator` whose advance is a staged write of its owner strategy.

    Relies on Keras' random functions drawing a seed through `SeedGenerator.next()`
    (`keras.src.random.seed_generator.draw_seed`), which assigns the advanced state; here
    the advance goes through `owner.write` (`lossbalance.strategies.staging`), so a
    skipped step draws nothing. The seeds drawn are the ones a plain `SeedGenerator`
    gives; `tests/test_staging.py` fails if Keras stops drawing through `next`.
    """

    def __init__(self, owner, seed=None, **kwargs):
        super().__init__(seed, **kwargs)
        self.__dict__["_owner"] = owner

    def next(self, ordered=True):
        state = self._owner.read(self.state)
        if ordered:
            advanced = state + tf.constant([0, 1], state.dtype)
        else:  # Keras' unordered sequence
            advanced = (state + 1) * 5387 % 933199
        self._owner.write(self.state, advanced)
        return state * 1
