"""compile(vectorize=True): the parameter level's per-task gradients of the trunk from one
vectorised backward pass of the K cotangents dL_k/dz; the same update as the loop."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import TWO_HEAD_LOSS, make_trunk_model

import lossbalance
from lossbalance.gradients import TaskGradients, task_gradients
from lossbalance.representation import RepresentationError


class SubclassedTrunk(lossbalance.BalancedModel):
    """Dense trunk -> Representation -> heads, as a subclassed model."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.t1 = keras.layers.Dense(16, activation="tanh", name="t1")
        self.z = lossbalance.Representation(name="z")
        self.cls = keras.layers.Dense(3, name="cls")
        self.reg = keras.layers.Dense(1, name="reg")

    def call(self, x, training=None):
        z = self.z(self.t1(x))
        return {"cls": self.cls(z), "reg": self.reg(z)}


def _build(kind, seed=0):
    """A tiny two-head model with the trunk layers named by `kind`; heads "cls", "reg"."""
    keras.utils.set_random_seed(seed)
    if kind == "subclassed":
        return SubclassedTrunk()
    if kind == "mixed":  # embedding -> conv -> batch norm -> dropout -> dense
        x = keras.Input((16,), dtype="int32", name="x")
        h = keras.layers.Reshape((4, 4, 2))(keras.layers.Embedding(20, 2, name="embed")(x))
        h = keras.layers.Conv2D(3, 2, activation="relu", name="conv")(h)
        h = keras.layers.Flatten()(keras.layers.BatchNormalization(name="bn")(h))
        h = keras.layers.Dropout(0.5)(h)
    elif kind == "bilinear":  # ResizeBilinearGrad has no pfor converter
        x = keras.Input((8,), name="x")
        h = keras.layers.Reshape((2, 2, 4))(keras.layers.Dense(16, name="t0")(x))
        h = keras.layers.Flatten()(keras.layers.UpSampling2D(2, interpolation="bilinear")(h))
    elif kind == "rnn":
        x = keras.Input((8,), name="x")
        h = keras.layers.SimpleRNN(4, name="rnn")(keras.layers.Reshape((4, 2))(x))
    else:  # "dense", "shared_after_z"
        x = keras.Input((8,), name="x")
        h = keras.layers.Dense(16, activation="tanh", name="t0")(x)
    h = keras.layers.Dense(8, activation="tanh", name="t1")(h)
    if kind == "shared_after_z":  # named z = t1; "t2" comes after it, shared by both heads
        h = keras.layers.Dense(8, activation="tanh", name="t2")(h)
    return lossbalance.BalancedModel(x, {"cls": keras.layers.Dense(3, name="cls")(h),
                                         "reg": keras.layers.Dense(1, name="reg")(h)})


def _data(kind, n=32):
    rng = np.random.default_rng(0)
    if kind == "mixed":
        x = rng.integers(0, 20, (n, 16))
    else:
        x = rng.normal(size=(n, 8)).astype("float32")
    return x, {"cls": rng.integers(0, 3, n), "reg": rng.normal(size=(n, 1)).astype("float32")}


def _train(kind, vectorize, strategy="mgda", jit_compile=False, representation=None):
    """Two SGD steps; returns the model, its weights after them, and the warnings."""
    model = _build(kind)
    keras.utils.set_random_seed(5)  # the strategy's random draws (PCGrad's task order)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=TWO_HEAD_LOSS,
                  strategy=strategy, vectorize=vectorize, jit_compile=jit_compile,
                  representation=representation if vectorize else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(*_data(kind), batch_size=16, epochs=1, shuffle=False, verbose=0)
    weights = [w.numpy() for w in model.trainable_weights]
    vectorize_warnings = [str(w.message) for w in caught if "vectorize" in str(w.message)]
    return model, weights, history.history, vectorize_warnings


def _assert_same_training(kind, strategy="mgda", jit_compile=False, representation=None):
    """Vectorised (with z at `representation`, XLA or not) and looped (without XLA, to
    save compiling) runs agree; returns the vectorised run's warnings."""
    _, looped, looped_logs, _ = _train(kind, False, strategy)
    model, vectorised, logs, caught = _train(kind, True, strategy, jit_compile,
                                            representation)
    assert model.gradient_level == "parameters"
    for a, b in zip(vectorised, looped):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for name in ("cls_weight", "reg_weight"):
        np.testing.assert_allclose(logs[name], looped_logs[name], rtol=1e-5)
    return caught


@pytest.mark.parametrize("kind, strategy, representation", [
    ("mixed", "mgda", None),  # a Gramian strategy
    ("shared_after_z", "pcgrad", "t1"),  # a Jacobian one; t2, after z, is shared
    ("subclassed", "upgrad", None),  # z marked by a Representation layer
])
def test_vectorised_training_equals_the_loop(kind, strategy, representation):
    assert _assert_same_training(kind, strategy, representation=representation) == []


def test_vectorised_training_equals_the_loop_under_xla():
    # no dropout: XLA draws other masks than the looped reference, run without it
    assert _assert_same_training("dense", "mgda", jit_compile=True) == []


def test_per_task_gradients_equal_the_loop():
    """One forward pass (one set of dropout masks and batch statistics), both ways."""
    model = _build("mixed")
    model.compile(loss=TWO_HEAD_LOSS, strategy="mgda", vectorize=True)
    x, y = _data("mixed", 8)
    with tf.GradientTape(persistent=True) as tape:
        z, y_pred = model._level.forward(x)
        losses = model._task_losses(y, y_pred)
    variables = model.trainable_variables
    vectorised = model._level.task_gradients(tape, losses, variables, z)
    looped = TaskGradients(task_gradients(tape, losses, variables), variables)
    assert vectorised.shared == looped.shared and vectorised.owner == looped.owner
    np.testing.assert_allclose(vectorised.jacobian(), looped.jacobian(), rtol=1e-5,
                               atol=1e-5)
    for a, b in zip(vectorised.gradients({}), looped.gradients({})):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-6)


def test_an_op_without_a_vectorised_form_falls_back_to_the_loop():
    caught = _assert_same_training("bilinear")  # ResizeBilinearGrad: no pfor converter
    assert len(caught) == 1 and "one by one" in caught[0]
    assert "ResizeBilinearGrad" in caught[0]


def test_a_loop_in_the_trunk_falls_back_to_the_loop_under_xla():
    """pfor's form of an RNN's backward loop does not compile with XLA: seen when
    tracing, before XLA fails (traced only, as compiling is slow; run end to end, the
    step then compiles and matches the loop)."""
    model = _build("rnn")
    model.compile(loss=TWO_HEAD_LOSS, strategy="mgda", vectorize=True, jit_compile=True)
    x, y = _data("rnn", 8)
    with pytest.warns(UserWarning, match="one by one.*with a loop.*XLA cannot compile"):
        tf.function(model.train_step, jit_compile=True).get_concrete_function((x, y))


def test_vectorize_survives_save_and_load(tmp_path):
    model = _build("dense")
    model.compile(loss=TWO_HEAD_LOSS, strategy="mgda", vectorize=True)
    model.optimizer.build(model.trainable_variables)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded._level).__name__ == "VectorizedLevel"
    assert loaded.gradient_level == "parameters"


@pytest.mark.parametrize("kwargs, match", [
    ({"strategy": "fixed"}, "computes none"),
    ({"strategy": "mgda", "gradients": "representation"}, "applies to gradients='parameters'"),
    ({"strategy": "mgda", "gradients": "auto"}, "applies to gradients='parameters'"),
    ({"strategy": "mgda", "vectorize": "yes"}, "must be True or False"),
    ({"strategy": "mgda", "representation": "cls"}, "vectorize=True sends"),
])
def test_bad_vectorize_options_fail_at_compile(kwargs, match):
    model = make_trunk_model()
    with pytest.raises(ValueError, match=match):
        model.compile(loss=TWO_HEAD_LOSS, **{"vectorize": True, **kwargs})


def test_vectorize_needs_a_representation():
    x = keras.Input((4,))
    heads_on_the_input = lossbalance.BalancedModel(
        x, {"a": keras.layers.Dense(1, name="a")(x), "b": keras.layers.Dense(1, name="b")(x)})
    with pytest.raises(RepresentationError, match="vectorize=True sends.*no tensor lies"):
        heads_on_the_input.compile(loss="mse", strategy="mgda", vectorize=True)
