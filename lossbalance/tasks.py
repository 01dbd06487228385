"""Per-task losses: which output is a task, its loss function and its compile weight.

`keras.Model.compile` sums the per-output losses; balancing needs them one by one. `TaskLosses`
resolves `compile(loss=..., loss_weights=...)` with Keras' conventions (a dict by output name,
a list in output order, or one loss for every output; `None` leaves an output untrained) and
computes the K task losses from `y_true`, `y_pred` and sample weights of the same structures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import keras
import tensorflow as tf

from lossbalance.compat import get_loss
from lossbalance.strategies.arguments import check_number, resolve_per_task


@dataclass(frozen=True)
class Task:
    name: str  # output name; also the prefix of its logs (`<name>_loss`, `<name>_weight`)
    position: int  # index among the model's outputs, used when data come as lists
    loss_fn: keras.losses.Loss | str  # a str only for Keras' data-dependent "crossentropy"
    loss_weight: float  # compile(loss_weights=...), 1 by default


def _is_sequence(value) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


# "crossentropy" picks binary, sparse or categorical from the data, as in Keras.
_DATA_DEPENDENT_LOSSES = ("crossentropy", "ce")


def resolve_loss(identifier, where: str, y_true=None, y_pred=None) -> keras.losses.Loss:
    """A Keras `Loss` object (with batch reduction) from a name, function or Loss."""
    if isinstance(identifier, keras.losses.Loss):
        return identifier
    try:
        return get_loss(identifier, y_true, y_pred)
    except (ValueError, TypeError) as error:
        raise ValueError(f"Unknown loss {identifier!r} for {where}: {error}") from None


def _is_data_dependent(identifier) -> bool:
    return isinstance(identifier, str) and identifier.lower() in _DATA_DEPENDENT_LOSSES


def _check_shapes(task, target, prediction):
    """Refuse targets that a loss would silently broadcast against the output.

    Allowed, as in Keras: different ranks (sparse labels, squeezed targets) and a last
    dimension of 1 in the targets (sparse class indices). Refused: another batch size, or
    the same rank with different trailing sizes (e.g. (B, 3) targets for a (B, 1) output,
    which MSE would broadcast to (B, 3) without a word).
    """
    t, p = getattr(target, "shape", None), getattr(prediction, "shape", None)
    if t is None or p is None:
        return
    t, p = tf.TensorShape(t), tf.TensorShape(p)  # NumPy arrays in eager mode give tuples
    if t.rank is None or p.rank is None or t.rank == 0:
        return
    if t[0] is not None and p[0] is not None and t[0] != p[0]:
        raise ValueError(
            f"Task {task!r}: {t[0]} targets for {p[0]} predictions in the batch; give one "
            "target per sample.")
    if t.rank == p.rank and t.rank >= 2 and t[-1] != 1 and t[1:] != p[1:] and \
            None not in (*t[1:], *p[1:]):
        raise ValueError(
            f"Task {task!r}: targets of shape {tuple(t)} do not match its output of shape "
            f"{tuple(p)}; the loss would broadcast them silently. Reshape the targets (or "
            "the output) so that they match.")


def _is_keras_loss(loss_fn) -> bool:
    """Whether `loss_fn` is one of Keras' own losses (which expect dense targets)."""
    fn = getattr(loss_fn, "fn", None)  # a LossFunctionWrapper wraps a plain function
    owner = fn if callable(fn) else type(loss_fn)
    return getattr(owner, "__module__", "").startswith("keras.")


def _check_ragged(task, target, prediction, loss_fn):
    """Refuse ragged targets that a Keras loss would broadcast against a dense output."""
    if not isinstance(target, tf.RaggedTensor) or isinstance(prediction, tf.RaggedTensor) \
            or not _is_keras_loss(loss_fn):
        return
    raise ValueError(
        f"Task {task!r}: the targets are a tf.RaggedTensor (rows of different lengths) but "
        f"the model's output is dense, of shape {tuple(prediction.shape)}, and Keras' loss "
        f"{getattr(loss_fn, 'name', loss_fn)!r} would broadcast every row against it "
        "without an error. Make the targets dense (`targets.to_tensor()`, or "
        "`padded_batch` in tf.data, with a sample weight of 0 on the padding), or give "
        f"task {task!r} a loss function of your own that handles ragged targets.")


def _check_trainable(task, prediction):
    """Refuse, in training, an output that no gradient can flow through."""
    dtype = getattr(prediction, "dtype", None)
    if dtype is None or tf.as_dtype(dtype).is_floating or tf.as_dtype(dtype).is_complex:
        return
    raise ValueError(
        f"Task {task!r}: the model's output has dtype {tf.as_dtype(dtype).name}, which "
        "carries no gradient, so its loss cannot train the model. Output float values "
        "(logits or probabilities) and take argmax or rounding outside the model, or give "
        f"output {task!r} the loss None (metrics still work) to leave it untrained.")


class TaskLosses:
    """The model's tasks and how to compute each task's loss.

    Args:
        loss: as for `keras.Model.compile`.
        loss_weights: None, a list in output order, or a dict by output name.
        output_names: the model's output names in order, or None when they are not known
            yet (an unbuilt subclassed model); then `loss` must be a dict or a list.
    """

    def __init__(self, loss, loss_weights=None, output_names=None):
        if loss is None:
            raise ValueError(
                "BalancedModel.compile() needs a `loss`: one loss for every output, a list "
                "in output order, or a dict by output name, e.g. "
                "loss={'class': 'sparse_categorical_crossentropy', 'value': 'mse'}."
            )
        names = list(output_names) if output_names is not None else None
        if isinstance(loss, Mapping):
            if names is None:
                names = list(loss)
            unknown = sorted(set(loss) - set(names))
            if unknown:
                raise ValueError(
                    f"`loss` names output(s) {unknown} that the model does not have; its "
                    f"outputs are {names}."
                )
            missing = [n for n in names if n not in loss]
            if missing:
                raise ValueError(
                    f"`loss` has no entry for output(s) {missing}; give every output a "
                    "loss, or None to leave it untrained."
                )
            per_output = [loss[n] for n in names]
        elif _is_sequence(loss):
            if names is None:
                names = [f"output_{i}" for i in range(len(loss))]
            if len(loss) != len(names):
                raise ValueError(
                    f"`loss` has {len(loss)} entries but the model has {len(names)} "
                    f"outputs {names}; give one loss per output (None to skip one)."
                )
            per_output = list(loss)
        else:
            if names is None:
                raise ValueError(
                    "The model's outputs are not known yet, so a single `loss` cannot be "
                    "matched to them. Build the model first (call it on a batch), or pass "
                    "`loss` as a dict by output name."
                )
            per_output = [loss] * len(names)

        weights = resolve_per_task(
            "loss_weights", loss_weights, names, default=1.0, kind="output",
            validate=lambda where, w: check_number(where, w, minimum=0.0))
        self.num_outputs = len(names)
        self.tasks = tuple(
            Task(name, i, spec if _is_data_dependent(spec)
                 else resolve_loss(spec, f"output {name!r}"), weights[i])
            for i, (name, spec) in enumerate(zip(names, per_output))
            if spec is not None
        )
        if not self.tasks:
            raise ValueError("Every output's loss is None: there is nothing to train.")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(task.name for task in self.tasks)

    @property
    def loss_weights(self) -> list[float]:
        return [task.loss_weight for task in self.tasks]

    def check_zero_weights(self, strategy) -> None:
        """Refuse a loss weight of 0 where `strategy` balances the tasks against each
        other (`Strategy.allows_zero_loss_weights`)."""
        zero = [task.name for task in self.tasks if task.loss_weight == 0]
        if zero and not strategy.allows_zero_loss_weights:
            raise ValueError(
                f"compile(loss_weights=...) gives task(s) {zero} the weight 0, but strategy "
                f"{strategy.registry_name or type(strategy).__name__!r} balances the tasks "
                "against each other, and a loss held at 0 breaks that (a zero gradient "
                "makes MGDA's update zero; a log of 0 or a ratio 0 / 0 makes weights "
                "infinite or NaN). To leave a task untrained, give it no loss "
                f"(compile(loss={{{zero[0]!r}: None, ...}}), and follow it with a metric); "
                "otherwise give it a positive weight.")

    def weighted(self, losses):
        """Each task's loss times its compile loss weight (what strategies balance)."""
        return [task.loss_weight * loss for task, loss in zip(self.tasks, losses)]

    def _select(self, structure, task: Task, what: str):
        """The part of `y_true`, `y_pred` or `sample_weight` that belongs to `task`."""
        if isinstance(structure, Mapping):
            if task.name not in structure:
                raise ValueError(
                    f"{what} has no entry for task {task.name!r} (keys: "
                    f"{sorted(structure)}); give one per task, keyed by output name."
                )
            return structure[task.name]
        if _is_sequence(structure):
            if len(structure) != self.num_outputs:
                raise ValueError(
                    f"{what} has {len(structure)} entries but the model has "
                    f"{self.num_outputs} outputs; give one per output, in output order, "
                    "or a dict by output name."
                )
            return structure[task.position]
        if self.num_outputs != 1 and what != "sample_weight":
            raise ValueError(
                f"{what} is a single array but the model has {self.num_outputs} outputs "
                f"{list(self.names)}; give a dict by output name or a list in output order."
            )
        return structure

    def __call__(self, y_true, y_pred, sample_weight=None, training=False):
        """The K task losses, unweighted, in task order (a list of scalar tensors).

        With `training`, an output that no gradient flows through (an integer or boolean
        dtype, e.g. an argmax) is refused, as its loss could not train anything.
        """
        losses = []
        for task in self.tasks:
            target = self._select(y_true, task, "y (the targets)")
            prediction = self._select(y_pred, task, "The model's output")
            weight = None
            if sample_weight is not None:
                weight = self._select(sample_weight, task, "sample_weight")
            _check_shapes(task.name, target, prediction)
            if training:
                _check_trainable(task.name, prediction)
            loss_fn = task.loss_fn
            if isinstance(loss_fn, str):
                loss_fn = resolve_loss(loss_fn, f"output {task.name!r}", target, prediction)
            _check_ragged(task.name, target, prediction, loss_fn)
            loss = loss_fn(target, prediction, weight)
            if loss.shape.rank and loss.shape.num_elements() == 0:
                # A batch known to be empty: Keras returns the unreduced, empty per-sample
                # losses. Their sum is 0, what Keras' reduction gives when the size is only
                # known later, and keeps the loss connected to the model's variables.
                loss = tf.reduce_sum(loss)
            losses.append(loss)
        return losses
