"""BalancedModel under MirroredStrategy, run in a fresh process by tests/test_distribute.py
(the CPU must be split into logical devices before TensorFlow starts).

    python tests/distributed_check.py '<JSON list of runs>'

trains every run on one device, then with MirroredStrategy over two logical CPUs on the same
global batches, and prints RESULT[...]: per run, the largest differences of the model
weights, the strategy state and the epoch logs from one device's, and between the replicas'
copies of every variable.

A run is a dict: `strategy` (name or config), and optionally `gradients`, `vectorize`,
`nonfinite`, `poison` (a NaN target in the second batch) and `epochs`.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

GLOBAL_BATCH, SAMPLES = 16, 32


def data(poison=False):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, 8)).astype("float32")
    y = {"cls": rng.integers(0, 3, size=SAMPLES),
         "reg": (x[:, :1] * 2.0).astype("float32")}
    if poison:
        y["reg"][GLOBAL_BATCH + 3] = np.nan  # second batch, first replica's half
    return x, y


def build(run):
    """The conftest model (seeded), compiled for `run`."""
    import keras
    from conftest import TWO_HEAD_LOSS, make_trunk_model

    model = make_trunk_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=TWO_HEAD_LOSS,
                  strategy=run["strategy"], gradients=run.get("gradients", "parameters"),
                  vectorize=run.get("vectorize", False), nonfinite=run.get("nonfinite"),
                  grouping=run.get("grouping"))
    return model


def fit(model, run):
    """Train on the global batches in order."""
    x, y = data(run.get("poison", False))
    return model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=run.get("epochs", 2), verbose=0,
                     shuffle=False).history


def _largest_gap(a, b):
    return max((float(np.max(np.abs(np.subtract(u, v)))) for u, v in zip(a, b)),
               default=0.0)


def mirrored(runs):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    result = []
    for run in runs:
        trained = []
        for scope in (tf.distribute.get_strategy().scope(), strategy.scope()):
            with scope:
                model = build(run)
            trained.append((model, fit(model, run)))
        (one, one_logs), (two, two_logs) = trained
        assert sorted(one_logs) == sorted(two_logs), (one_logs, two_logs)
        copies = [[c.numpy() for c in v.value.values] for v in two.variables]
        result.append({
            "replicas": _largest_gap(*zip(*copies)),  # every replica holds the same values
            "weights": _largest_gap(one.get_weights(), two.get_weights()),
            "state": _largest_gap([v.numpy() for v in one.strategy.variables],
                                  [v.numpy() for v in two.strategy.variables]),
            "logs": _largest_gap([one_logs[k] for k in sorted(one_logs)],
                                 [two_logs[k] for k in sorted(two_logs)]),
        })
    print("RESULT" + json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    mirrored(json.loads(sys.argv[1]))
