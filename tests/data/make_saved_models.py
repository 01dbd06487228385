"""Writes the saved models that tests/test_saved_format.py loads with the current code.

    PYTHONPATH=<checkout of the version> python tests/data/make_saved_models.py DIR

For each configuration: a small two-head BalancedModel (8 inputs, a Dense(16) trunk, a
classifier and a regressor on ~10^4 larger targets) trained two epochs, saved as
`DIR/<name>.keras`, with `DIR/<name>.npz` holding the inputs, its predictions and its
strategy's variables by path. The committed files in tests/data/saved_0.1.0 were made with
lossbalance 0.1.0 as it was before the architecture rework (commit b680319).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import lossbalance  # noqa: E402

#: name -> compile arguments: a state of every kind a strategy saves (learned variables,
#: caches, K x P buffers, RNG seeds, an own optimizer, loss histories, post-step state)
CONFIGS = {
    "fixed": {"strategy": "fixed"},
    "uncertainty": {"strategy": "uncertainty"},
    "imtl": {"strategy": "imtl"},
    "nash_mtl": {"strategy": "nash_mtl"},
    "moco": {"strategy": "moco"},
    "db_mtl": {"strategy": "db_mtl"},
    "pcgrad": {"strategy": {"name": "pcgrad", "seed": 3}},
    "gradnorm": {"strategy": "gradnorm"},
    "dwa": {"strategy": "dwa"},
    "famo": {"strategy": "famo"},
    "mgda_representation": {"strategy": "mgda", "gradients": "representation"},
}


def model():
    keras.utils.set_random_seed(0)
    x = keras.Input((8,), name="x")
    h = keras.layers.Dense(16, activation="tanh", name="trunk")(x)
    return lossbalance.BalancedModel(x, {"cls": keras.layers.Dense(3, name="cls")(h),
                                         "reg": keras.layers.Dense(1, name="reg")(h)})


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    return x, {"cls": rng.integers(0, 3, size=64),
               "reg": (100.0 * x[:, :1] + 50.0).astype("float32")}


LOSSES = {"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "reg": "mse"}


def main(directory):
    os.makedirs(directory, exist_ok=True)
    x, y = data()
    for name, arguments in CONFIGS.items():
        trained = model()
        trained.compile(optimizer=keras.optimizers.Adam(0.01), loss=LOSSES, **arguments)
        trained.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
        trained.save(os.path.join(directory, f"{name}.keras"))
        state = {f"state:{v.path}": v.numpy() for v in trained.strategy.variables}
        np.savez(os.path.join(directory, f"{name}.npz"), x=x,
                 **{f"predict:{k}": v for k, v in trained.predict(x, verbose=0).items()},
                 **state)
        print(name, lossbalance.__file__, len(state), "state variables")


if __name__ == "__main__":
    main(sys.argv[1])
