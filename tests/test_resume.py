"""An interrupted run resumed with lossbalance's BackupAndRestore ends where an
uninterrupted run ends: weights, optimizer and strategy state."""

import keras
import numpy as np
import pytest
from conftest import TWO_HEAD_LOSS, make_trunk_model

from lossbalance.callbacks import BackupAndRestore


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, after_batches):
        super().__init__()
        self.after_batches, self.seen = after_batches, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.after_batches:
            raise KeyboardInterrupt("simulated interruption")


def _train(two_head_data, strategy, callbacks=(), seed=0):
    x, y = two_head_data
    keras.utils.set_random_seed(seed)
    model = make_trunk_model(seed=seed)
    model.compile(optimizer="adam", loss=TWO_HEAD_LOSS, strategy=strategy)
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0,
              callbacks=list(callbacks))
    return model


def _everything(model):
    return ([v.numpy() for v in model.weights]
            + [v.numpy() for v in model.optimizer.variables]
            + [v.numpy() for v in model.strategy.state_variables()])


@pytest.mark.parametrize("strategy", ["uncertainty", "gradnorm", "pcgrad", "dwa", "famo",
                                      "gradvac", "nash_mtl", "imtl"])
def test_mid_epoch_resume_is_exact(two_head_data, strategy, tmp_path):
    uninterrupted = _train(two_head_data, strategy)
    with pytest.raises(KeyboardInterrupt):  # stops in the middle of the second epoch
        _train(two_head_data, strategy,
               [BackupAndRestore(tmp_path, save_freq=1), _Interrupt(6)])
    # A fresh process would build the model from scratch: different seed, same backup.
    resumed = _train(two_head_data, strategy, [BackupAndRestore(tmp_path, save_freq=1)],
                     seed=99)
    assert int(resumed.optimizer.iterations) == int(uninterrupted.optimizer.iterations) == 12
    for a, b in zip(_everything(uninterrupted), _everything(resumed)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_keras_backup_replays_the_epoch_which_ours_avoids(two_head_data, tmp_path):
    """Why the subclass exists: Keras' own callback restarts the interrupted epoch."""
    with pytest.raises(KeyboardInterrupt):
        _train(two_head_data, "fixed",
               [keras.callbacks.BackupAndRestore(tmp_path, save_freq=1), _Interrupt(6)])
    resumed = _train(two_head_data, "fixed",
                     [keras.callbacks.BackupAndRestore(tmp_path, save_freq=1)])
    assert int(resumed.optimizer.iterations) == 14  # 2 batches trained twice


@pytest.mark.parametrize("strategy", [{"name": "stch", "warmup_epochs": 1}, "dwa"])
def test_epoch_backup_holds_the_strategys_end_of_epoch_update(two_head_data, strategy,
                                                              tmp_path):
    """A backup saved at an epoch's end (the default `save_freq`) holds the state the
    strategy has after that epoch (STCH's epoch count and nadir, DWA's loss history), so a
    run resumed from it ends where an uninterrupted one does."""
    uninterrupted = _train(two_head_data, strategy)
    with pytest.raises(KeyboardInterrupt):  # in the second epoch, after the first's backup
        _train(two_head_data, strategy, [BackupAndRestore(tmp_path), _Interrupt(6)])
    resumed = _train(two_head_data, strategy, [BackupAndRestore(tmp_path)], seed=99)
    for a, b in zip(_everything(uninterrupted), _everything(resumed)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
