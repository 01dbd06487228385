"""The README quick start's data, model and losses, for the tests that train it: a
classifier ("label", logits) and a regression in raw units ("value", targets 100 x + 50)
on one shared Dense trunk; with `extra_task`, a third task ("other", a second
regression) for the strategies that need three."""

import keras
import numpy as np

import lossbalance


def quick_start_data(n=512, extra_task=False):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 16)).astype("float32")
    y = {"label": (x[:, 0] > 0).astype("int64"),
         "value": (100 * x[:, 1:2] + 50).astype("float32")}
    if extra_task:
        y["other"] = (x[:, 2:3] - x[:, 3:4]).astype("float32")
    return x, y


def quick_start_model(extra_task=False, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16,))
    h = keras.layers.Dense(32, activation="relu", name="trunk")(inputs)
    outputs = {"label": keras.layers.Dense(2, name="label")(h),
               "value": keras.layers.Dense(1, name="value")(h)}
    if extra_task:
        outputs["other"] = keras.layers.Dense(1, name="other")(h)
    return lossbalance.BalancedModel(inputs, outputs)


def quick_start_losses(extra_task=False):
    losses = {"label": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              "value": "mse"}
    if extra_task:
        losses["other"] = "mse"
    return losses
