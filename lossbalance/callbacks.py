"""Callbacks: `BackupAndRestore`, which resumes exactly where an interrupted run stopped,
and the strategy's end-of-epoch hook that `BalancedModel.fit` adds (`StrategyEpochHook`).

Keras' `keras.callbacks.BackupAndRestore(save_freq=N)` saves mid-epoch, but on restart it
replays the interrupted epoch from its first batch, so a resumed run takes more steps than
an uninterrupted one. This subclass also records how many batches of the epoch were done and
has `BalancedModel` skip them (it consumes those batches without training), so that, with
the same data order, the resumed run ends with the same weights and strategy state.
"""

from __future__ import annotations

import json

import keras

METADATA_KEY = "lossbalance_batches_done"


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """Drop-in replacement for `keras.callbacks.BackupAndRestore` with exact mid-epoch
    resume for `BalancedModel` (same arguments).

    Exact resume needs the same data order on restart: `shuffle=False`, or a `tf.data`
    pipeline whose shuffling is seeded. Strategy state is part of the model's weights (the
    strategy is a layer; its RNG seeds and GradNorm's optimizer included), so it is saved
    and restored with them.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._batches_done = 0

    def on_train_batch_end(self, batch, logs=None):
        self._batches_done = batch + 1
        super().on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._batches_done = 0
        super().on_epoch_end(epoch, logs)

    def _save_model(self):
        super()._save_model()
        with open(self._training_metadata_path) as handle:
            metadata = json.load(handle)
        metadata[METADATA_KEY] = self._batches_done
        with open(self._training_metadata_path, "w") as handle:
            json.dump(metadata, handle)

    def _load_model(self):
        super()._load_model()
        try:
            with open(self._training_metadata_path) as handle:
                done = json.load(handle).get(METADATA_KEY, 0)
        except FileNotFoundError:
            return
        if done and hasattr(self.model, "skip_batches"):
            self.model.skip_batches(done)


class StrategyEpochHook(keras.callbacks.Callback):
    """Tells the strategy that an epoch ended (epoch-level methods such as DWA), and has it
    check the logged task losses (`Strategy.check_losses`) after the first batch and after
    every epoch."""

    def on_train_begin(self, logs=None):
        self._first_batch = True

    def on_train_batch_end(self, batch, logs=None):
        if self._first_batch:
            self._first_batch = False
            self._check_losses(logs, "after the first batch")

    def on_epoch_end(self, epoch, logs=None):
        self._check_losses(logs, f"in epoch {epoch + 1}")
        self.model.strategy.on_epoch_end(epoch)

    def _check_losses(self, logs, when):
        """The strategy sees each task's loss times its `compile(loss_weights=...)`."""
        task_losses, logs = self.model._task_losses, logs or {}
        means = {task: float(logs[f"{task}_loss"]) * weight
                 for task, weight in zip(task_losses.names, task_losses.loss_weights)
                 if f"{task}_loss" in logs}
        self.model.strategy.check_losses(means, when)
