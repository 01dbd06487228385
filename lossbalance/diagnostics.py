"""Look inside a step: per-task gradients, their conflicts, and what a strategy makes of them.

`inspect_batch(model, x, y)` answers, for one batch, the question every new user asks: Keras
adds the per-head gradients (J^T 1 on the shared parameters); what does the chosen strategy
apply instead, and how does each task fare under either? `GradientDiagnostics` logs the same
figures every N steps to History and TensorBoard.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from lossbalance import strategies as strategies_module
from lossbalance.combination import combine, gramian_of, weights_and_direction
from lossbalance.gradients import TaskGradients, task_gradients
from lossbalance.levels.base import transformed_task_losses
from lossbalance.levels.groups import grouped_weights_and_update
from lossbalance.strategies.staging import staged


@dataclass
class BatchInspection:
    """Per-task gradient figures on the shared parameters for one batch.

    All gradients are of each task's loss as compiled (loss weights applied).
    `alignment_*[k]` is <g_k, d> / (|g_k| |d|): the cosine between task k's gradient and the
    update d; a negative value means the update increases task k's loss to first order.
    """

    strategy: str
    task_names: tuple
    losses: np.ndarray  # (K,) task losses
    gramian: np.ndarray  # (K, K) G = J J^T
    weights: np.ndarray  # (K,) weights the strategy gives the task gradients
    keras_norm: float  # |J^T 1|: the norm of what stock Keras applies
    strategy_norm: float  # |d| for the strategy's direction d
    cosine_keras_strategy: float  # between the two updates
    alignment_keras: np.ndarray  # (K,)
    alignment_strategy: np.ndarray  # (K,)
    #: compile(grouping=...): {group key: (K,) weights}; `weights` is their mean. None
    #: without groups.
    group_weights: dict | None = None

    @property
    def norms(self) -> np.ndarray:
        return np.sqrt(np.maximum(np.diag(self.gramian), 0.0))

    @property
    def cosines(self) -> np.ndarray:
        outer = np.outer(self.norms, self.norms)
        return np.divide(self.gramian, outer, out=np.zeros_like(self.gramian),
                         where=outer > 0)

    def summary(self) -> str:
        """A Markdown table of the per-task figures and the two updates."""
        lines = [
            f"Strategy `{self.strategy}`; update norms: Keras sum {self.keras_norm:.4g}, "
            f"strategy {self.strategy_norm:.4g}; cosine between them "
            f"{self.cosine_keras_strategy:.3f}.",
            "",
            "| task | loss | gradient norm | weight | cos(g, Keras sum) | cos(g, strategy) |",
            "|---|---|---|---|---|---|",
        ]
        for k, name in enumerate(self.task_names):
            lines.append(
                f"| {name} | {self.losses[k]:.4g} | {self.norms[k]:.4g} | "
                f"{self.weights[k]:.4g} | {self.alignment_keras[k]:.3f} | "
                f"{self.alignment_strategy[k]:.3f} |")
        for group, weights in (self.group_weights or {}).items():
            lines.append(f"| (group `{group}`) | | | "
                         + " / ".join(f"{w:.4g}" for w in weights) + " | | |")
        pairs = [(i, j) for i in range(len(self.task_names))
                 for j in range(i + 1, len(self.task_names))]
        if pairs:
            lines += ["", "Pairwise cosines between task gradients: " + ", ".join(
                f"{self.task_names[i]}/{self.task_names[j]} {self.cosines[i, j]:.3f}"
                for i, j in pairs) + "."]
        return "\n".join(lines)

    def plot(self, path=None):
        """Gradient norms, pairwise cosines, and each task's alignment with both updates."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        k = np.arange(len(self.task_names))
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        axes[0].bar(k, self.norms, color="tab:gray")
        axes[0].set_yscale("log")
        axes[0].set_title("task gradient norms (shared parameters)")
        image = axes[1].imshow(self.cosines, vmin=-1, vmax=1, cmap="coolwarm")
        axes[1].set_title("cosine between task gradients")
        fig.colorbar(image, ax=axes[1], fraction=0.046)
        width = 0.38
        axes[2].bar(k - width / 2, self.alignment_keras, width, label="Keras sum")
        axes[2].bar(k + width / 2, self.alignment_strategy, width, label=self.strategy)
        axes[2].axhline(0, color="black", lw=0.8)
        axes[2].set_ylim(-1.05, 1.05)
        axes[2].set_title("cos(task gradient, applied update)")
        axes[2].legend(fontsize=8)
        for ax in (axes[0], axes[2]):
            ax.set_xticks(k, self.task_names, rotation=30, ha="right")
        axes[1].set_xticks(k, self.task_names, rotation=30, ha="right")
        axes[1].set_yticks(k, self.task_names)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return fig


def _cosine(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def inspect_batch(model, x, y, sample_weight=None, strategy=None) -> BatchInspection:
    """Per-task gradients of one batch and the update a strategy would make of them.

    Args:
        model: a compiled `BalancedModel`.
        x, y, sample_weight: one batch, as for `train_on_batch`.
        strategy: a name, instance or config to inspect instead of the model's own. The
            strategy's state (RNG draws, moving averages) is left as it was.

    The model runs in inference mode (no dropout); nothing is trained.
    """

    model._require_compiled()
    if strategy is None:
        strategy = model.strategy
    else:
        strategy = strategies_module.get(strategy)
        strategy.bind(model._task_losses.names)
    with staged(strategy):  # its state changes are dropped: nothing is trained
        own = {id(v) for v in strategy.trainable_variables}
        variables = [v for v in model.trainable_variables if id(v) not in own]
        with tf.GradientTape(persistent=True) as tape:
            y_pred = model(x, training=False)
            raw = model._task_losses(y, y_pred, sample_weight)
            task_losses = transformed_task_losses(strategy, model._task_losses.weighted(raw))
            losses = tf.stack(task_losses)
        gradients = TaskGradients(task_gradients(tape, task_losses, variables), variables)
        del tape
        if not gradients.has_shared:
            raise ValueError("The tasks share no trainable variable: nothing to inspect.")
        jacobian = tf.cast(gradients.jacobian(), tf.float64)
        gramian = gramian_of(jacobian)
        group_key, group_weights = model._level.group_key, None
        if group_key is None:
            weights, direction = weights_and_direction(
                strategy, losses, gramian=lambda: gramian,
                jacobian=lambda: tf.cast(jacobian, losses.dtype))
            weights = tf.cast(weights, tf.float64)
            direction = (combine(jacobian, weights) if direction is None
                         else tf.cast(direction, tf.float64))
        else:
            weights, direction, group_weights = _grouped(strategy, gradients, losses,
                                                         group_key)

    jacobian, direction = jacobian.numpy(), direction.numpy()
    keras_sum = jacobian.sum(axis=0)
    return BatchInspection(
        strategy=strategy.registry_name or type(strategy).__name__,
        task_names=tuple(model._task_losses.names),
        losses=losses.numpy().astype(float),
        gramian=gramian.numpy(),
        weights=np.asarray(tf.convert_to_tensor(weights), float),
        keras_norm=float(np.linalg.norm(keras_sum)),
        strategy_norm=float(np.linalg.norm(direction)),
        cosine_keras_strategy=_cosine(keras_sum, direction),
        alignment_keras=np.array([_cosine(g, keras_sum) for g in jacobian]),
        alignment_strategy=np.array([_cosine(g, direction) for g in jacobian]),
        group_weights=group_weights,
    )


def _grouped(strategy, gradients, losses, group_key):
    """(mean weights, (P,) direction, {group: weights}) of a grouped strategy."""
    def combine_group(view, weights, direction):
        if direction is None:
            return view.combine(tf.cast(weights, tf.float64))
        return view.unflatten(tf.cast(direction, tf.float64))

    update, weights, per_group = grouped_weights_and_update(
        strategy, gradients, losses, group_key,
        gramian_of=lambda view: gramian_of(view.jacobian()),
        jacobian_of=lambda view: view.jacobian(), combine=combine_group)
    direction = tf.concat([tf.reshape(tf.cast(update[i], tf.float64), [-1])
                           for i in gradients.shared], axis=0)
    groups = {key: np.asarray(w, float) for key, w in per_group}
    return tf.cast(weights, tf.float64), direction, groups


class GradientDiagnostics(keras.callbacks.Callback):
    """Every `every_n_steps` steps, inspect a fixed batch and log what the strategy does.

    Logs, per task: `<task>_grad_norm` (the task gradient's norm on the shared parameters)
    and, per pair, `cos_<a>_<b>` (cosine between their gradients); the weights each task
    received are the model's own `<task>_weight` logs. The latest values are added to the
    epoch logs (so History keeps them), every inspection is kept in `self.records`, and
    with `log_dir` they are written as TensorBoard scalars at the training step.

    Args:
        x, y, sample_weight: the batch to inspect (keep it small: one batch).
        every_n_steps: how often, in training steps (default 100).
        log_dir: optional TensorBoard folder.
    """

    def __init__(self, x, y, sample_weight=None, every_n_steps=100, log_dir=None):
        super().__init__()
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be a positive int; got {every_n_steps!r}.")
        if log_dir is not None and importlib.util.find_spec("tensorboard") is None:
            raise ImportError("GradientDiagnostics(log_dir=...) writes TensorBoard logs: "
                              "pip install tensorboard, or leave log_dir out.")
        self.batch = (x, y, sample_weight)
        self.every_n_steps = every_n_steps
        self.log_dir = log_dir
        self.records = []  # (step, {name: value})
        self._writer = None
        self._latest = {}

    def _figures(self, inspection):
        names = inspection.task_names
        figures = {f"{name}_grad_norm": float(n) for name, n in zip(names, inspection.norms)}
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                figures[f"cos_{names[i]}_{names[j]}"] = float(inspection.cosines[i, j])
        return figures

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations)
        if step % self.every_n_steps:
            return
        figures = self._figures(inspect_batch(self.model, *self.batch))
        weights = {key: float(value)
                   for key, value in self.model._task_weight_tracker.result().items()}
        self.records.append((step, {**figures, **weights}))
        self._latest = figures
        if self.log_dir is not None:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(str(self.log_dir))
            with self._writer.as_default():
                for name, value in {**figures, **weights}.items():
                    tf.summary.scalar(f"diagnostics/{name}", value, step=step)
            self._writer.flush()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self._latest)
