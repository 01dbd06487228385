"""Strategies given a model whose outputs they cannot handle: clear errors, at compile or at
the first step, that name the problem and the fix. (Unknown layers and per-task settings of
the wrong length are in test_registry.py; heads without a shared trunk and targets of the
wrong shape in test_properties.py.)"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import TWO_HEAD_LOSS, make_trunk_model

import lossbalance
from lossbalance import strategies


def test_a_strategy_with_state_serves_one_model_at_a_time():
    shared = strategies.get("moco")
    first = make_trunk_model()
    first.compile(optimizer="sgd", loss=TWO_HEAD_LOSS, strategy=shared)
    first.compile(optimizer="sgd", loss=TWO_HEAD_LOSS, strategy=shared)  # re-compiling: fine
    second = make_trunk_model(seed=1)
    with pytest.raises(ValueError, match=r"already used by model .*its own strategy"):
        second.compile(optimizer="sgd", loss=TWO_HEAD_LOSS, strategy=shared)
    first.compile(optimizer="sgd", loss=TWO_HEAD_LOSS, strategy="mgda")  # frees it
    second.compile(optimizer="sgd", loss=TWO_HEAD_LOSS, strategy=shared)
    assert second.strategy is shared

    stateless = strategies.get("mean")  # nothing to share
    for model in (first, second):
        model.compile(optimizer="sgd", loss=TWO_HEAD_LOSS, strategy=stateless)
    assert first.strategy is second.strategy is stateless

    inputs = keras.Input((8,))
    h = keras.layers.Dense(4)(inputs)
    other_tasks = lossbalance.BalancedModel(
        inputs, {name: keras.layers.Dense(1, name=name)(h) for name in ("a", "b", "c")})
    with pytest.raises(ValueError, match=r"already bound to tasks \['cls', 'reg'\]; create "
                                         r"a new strategy for tasks \['a', 'b', 'c'\]"):
        other_tasks.compile(optimizer="sgd", loss="mse", strategy=stateless)


def _three_tasks():
    """A nested backbone ("inner"), then a layer ("mid") shared by tasks a and b only;
    task c branches off right after the backbone."""
    keras.utils.set_random_seed(0)
    backbone_in = keras.Input((8,))
    backbone = keras.Model(backbone_in, keras.layers.Dense(8, activation="tanh",
                                                           name="inner")(backbone_in),
                           name="backbone")
    inputs = keras.Input((8,))
    h = backbone(inputs)
    mid = keras.layers.Dense(8, activation="tanh", name="mid")(h)
    return lossbalance.BalancedModel(inputs, {
        "a": keras.layers.Dense(1, name="a")(mid),
        "b": keras.layers.Dense(1, name="b")(mid),
        "c": keras.layers.Dense(1, name="c")(h)})


def test_gradnorm_balances_at_a_layer_every_task_depends_on(two_head_data):
    x, _ = two_head_data
    y = {"a": x[:, :1], "b": x[:, 1:2], "c": x[:, 2:3]}
    runs = []
    for layer in (None, "inner"):  # automatic: the last layer all three share, nested
        model = _three_tasks()
        model.compile(optimizer="adam", loss="mse",
                      strategy={"name": "gradnorm", "layer": layer}, run_eagerly=True)
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        runs.append(model)
    assert np.any(runs[0].strategy.task_weights.numpy() != 1.0)
    for a, b in zip(runs[0].weights, runs[1].weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    model = _three_tasks()
    model.compile(optimizer="adam", loss="mse", strategy={"name": "gradnorm", "layer": "mid"},
                  run_eagerly=True)
    with pytest.raises(ValueError, match=r"layer='mid'\): task\(s\) \['c'\] do not depend "
                                         r"on that layer.*layer=None"):
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)

    model = make_trunk_model()
    model.get_layer("trunk").trainable = False
    model.compile(optimizer="adam", loss=TWO_HEAD_LOSS,
                  strategy={"name": "gradnorm", "layer": "trunk"}, run_eagerly=True)
    with pytest.raises(ValueError, match="'trunk' has no trainable weights.*frozen"):
        model.fit(x, two_head_data[1], batch_size=32, epochs=1, verbose=0)


def _with_argmax_output():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,), name="x")
    h = keras.layers.Dense(16, activation="tanh", name="trunk")(inputs)
    cls = keras.layers.Dense(3, name="cls")(h)
    label = keras.layers.Lambda(lambda t: tf.argmax(t, axis=-1), name="label")(cls)
    return lossbalance.BalancedModel(
        inputs, {"cls": cls, "reg": keras.layers.Dense(1, name="reg")(h), "label": label})


def test_an_output_without_gradient_cannot_be_a_task(two_head_data):
    """An integer output (an argmax) with a loss is refused in training, naming the task;
    with loss None it is just an output, and training is that of the two other tasks."""
    x, y = two_head_data
    targets = dict(y, label=y["cls"])
    model = _with_argmax_output()
    model.compile(optimizer="sgd", loss=dict(TWO_HEAD_LOSS, label="mse"), strategy="mean",
                  run_eagerly=True)
    with pytest.raises(ValueError, match=r"Task 'label': the model's output has dtype int64"
                                         r".*the loss None"):
        model.fit(x, targets, batch_size=32, epochs=1, verbose=0)

    with pytest.raises(ValueError, match=r"unknown task\(s\) \['label'\]"):
        model.compile(optimizer="sgd", loss=dict(TWO_HEAD_LOSS, label=None),
                      strategy={"name": "fixed", "weights": {"label": 2.0}})
    model.compile(optimizer="sgd", loss=dict(TWO_HEAD_LOSS, label=None), strategy="mean",
                  run_eagerly=True)
    model.fit(x, targets, batch_size=32, epochs=1, shuffle=False, verbose=0)
    two_heads = make_trunk_model()  # same layers, names and seed, without the argmax
    two_heads.compile(optimizer="sgd", loss=TWO_HEAD_LOSS, strategy="mean", run_eagerly=True)
    two_heads.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), two_heads.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
