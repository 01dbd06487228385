"""compile(gradients=...): balancing at the parameter level or at the shared representation."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import TWO_HEAD_LOSS, make_trunk_model

import lossbalance
from lossbalance.representation import RepresentationError, find_representation


def _two_trunk_layers_model(marker=False, seed=0):
    """x -> t1 -> t2 (-> Representation) -> heads "cls" (two layers) and "reg"."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((8,), name="x")
    h = keras.layers.Dense(16, activation="tanh", name="t1")(x)
    h = keras.layers.Dense(16, activation="tanh", name="t2")(h)
    if marker:
        h = lossbalance.Representation(name="z")(h)
    cls_hidden = keras.layers.Dense(8, activation="relu", name="cls_hidden")(h)
    outputs = {"cls": keras.layers.Dense(3, name="cls")(cls_hidden),
               "reg": keras.layers.Dense(1, name="reg")(h)}
    return lossbalance.BalancedModel(x, outputs)


def _history_name(tensor):
    return tensor._keras_history.operation.name


# -- finding the representation -----------------------------------------------------------


def test_representation_is_found_where_the_heads_branch():
    model = _two_trunk_layers_model()
    assert _history_name(find_representation(model, model.outputs)) == "t2"
    assert _history_name(find_representation(model, model.outputs, layer="t2")) == "t2"
    marked = _two_trunk_layers_model(marker=True)
    assert _history_name(find_representation(marked, marked.outputs)) == "z"


def test_a_named_layer_that_is_not_a_cut_is_refused():
    keras.utils.set_random_seed(0)
    x = keras.Input((4,))
    h = keras.layers.Dense(4, name="t1")(x)
    g = keras.layers.Dense(4, name="t2")(h)
    skip = keras.layers.Concatenate(name="skip")([g, h])  # h reaches the heads around t2
    model = lossbalance.BalancedModel(x, {"a": keras.layers.Dense(1, name="a")(skip),
                                          "b": keras.layers.Dense(1, name="b")(skip)})
    assert _history_name(find_representation(model, model.outputs)) == "skip"
    with pytest.raises(RepresentationError, match="avoids this layer"):
        find_representation(model, model.outputs, layer="t2")
    with pytest.raises(RepresentationError, match="no layer of that name"):
        find_representation(model, model.outputs, layer="nope")


def test_heads_without_a_common_trunk_have_no_representation():
    x = keras.Input((4,))
    model = lossbalance.BalancedModel(x, {"a": keras.layers.Dense(1, name="a")(x),
                                          "b": keras.layers.Dense(1, name="b")(x)})
    with pytest.raises(RepresentationError, match="do not branch from one shared tensor"):
        model.compile(loss="mse", strategy="mgda", gradients="representation")
    model.compile(loss="mse", strategy="mgda", gradients="auto")
    assert model.gradient_level == "parameters"


# -- choosing the level at compile ----------------------------------------------------------


@pytest.mark.parametrize("gradients, strategy, level", [
    ("parameters", "mgda", "parameters"),
    ("representation", "mgda", "representation"),
    ("auto", "mgda", "representation"),
    ("auto", "moco", "parameters"),  # per-parameter state: parameter level only
    ("auto", "fixed", None),
    ("parameters", "fixed", None),
])
def test_gradient_level_chosen_at_compile(gradients, strategy, level):
    model = make_trunk_model()
    model.compile(loss=TWO_HEAD_LOSS, strategy=strategy, gradients=gradients)
    assert model.gradient_level == level


@pytest.mark.parametrize("kwargs, match", [
    ({"gradients": "layers"}, "must be one of"),
    ({"gradients": "representation", "strategy": "fixed"}, "computes no per-task"),
    ({"gradients": "representation", "strategy": "moco"}, "only defined at the parameter"),
    ({"gradients": "parameters", "strategy": "mgda", "representation": "trunk"},
     "only used with"),
    ({"gradients": "representation", "strategy": "mgda", "representation": "cls"},
     "avoids this layer"),
])
def test_bad_gradient_options_fail_at_compile(kwargs, match):
    model = make_trunk_model()
    with pytest.raises(ValueError, match=match):
        model.compile(loss=TWO_HEAD_LOSS, **kwargs)


def test_a_layer_shared_after_the_representation_is_refused(two_head_data):
    model = _two_trunk_layers_model()
    model.compile(loss=TWO_HEAD_LOSS, strategy="mgda", gradients="representation",
                  representation="t1")  # t2 is shared by both heads, after t1
    with pytest.raises(ValueError, match="shared by several tasks"):
        model.fit(*two_head_data, epochs=1, verbose=0)


# -- what the representation level computes -------------------------------------------------


def _one_step(model, x, y):
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    return [w.numpy() for w in model.trainable_weights]


def test_representation_level_update_by_hand(two_head_data):
    """Trunk update = J_z^T (sum_k w_k dL_k/dz) with w = MGDA weights of the Gramian of
    the flattened dL_k/dz; heads get their own task's gradient."""
    x, y = two_head_data
    x, y = x[:16], {k: v[:16] for k, v in y.items()}
    model = _two_trunk_layers_model()
    before = [w.numpy() for w in model.trainable_weights]
    lr = 0.1

    trunk = model.get_layer("t2").output
    probe = keras.Model(model.inputs[0], [trunk, model.outputs])
    loss_fns = {"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                "reg": keras.losses.MeanSquaredError()}
    with tf.GradientTape(persistent=True) as tape:
        z, outputs = probe(x, training=True)
        out = dict(zip(model.output_names, outputs))
        losses = [loss_fns[k](y[k], out[k]) for k in ("cls", "reg")]
    dz = [tape.gradient(loss, z).numpy() for loss in losses]
    rows = np.stack([d.ravel() for d in dz]).astype("float64")
    weights = lossbalance.task_weights("mgda", rows).numpy().astype("float32")
    trunk_vars = [v for v in model.trainable_weights if v.path.split("/")[0] in ("t1", "t2")]
    expected = {v.path: v.numpy() - lr * g.numpy() for v, g in zip(
        trunk_vars, tape.gradient(z, trunk_vars, output_gradients=weights[0] * dz[0]
                                  + weights[1] * dz[1]))}
    for k, task in enumerate(("cls", "reg")):
        heads = [v for v in model.trainable_weights
                 if v.path.split("/")[0] in ((task, "cls_hidden") if task == "cls" else (task,))]
        for v, g in zip(heads, tape.gradient(losses[k], heads)):
            expected[v.path] = v.numpy() - lr * g.numpy()

    model.compile(optimizer=keras.optimizers.SGD(lr), loss=TWO_HEAD_LOSS, strategy="mgda",
                  gradients="representation")
    after = _one_step(model, x, y)
    assert len(expected) == len(after)
    for v, b, a in zip(model.trainable_weights, before, after):
        np.testing.assert_allclose(a, expected[v.path], rtol=1e-4, atol=1e-6)
        assert not np.array_equal(a, b)


class _Shift(keras.layers.Layer):
    """z = x + b: a trunk whose Jacobian dz/db is the identity."""

    def build(self, input_shape):
        self.b = self.add_weight(shape=input_shape[-1:], initializer="random_normal")

    def call(self, x):
        return x + self.b


def _identity_trunk_model():
    keras.utils.set_random_seed(3)
    x = keras.Input((5,))
    z = _Shift(name="shift")(x)
    return lossbalance.BalancedModel(x, {
        "a": keras.layers.Dense(1, name="a")(z),
        "b": keras.layers.Dense(2, name="b")(keras.layers.Dense(4, activation="tanh")(z))})


@pytest.mark.parametrize("strategy", ["mgda", "upgrad", "cagrad"])
def test_representation_equals_parameters_when_the_trunk_is_the_identity(strategy):
    """With z = x + b and one sample, dL_k/db = dL_k/dz: both levels give one update."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 5)).astype("float32")
    y = {"a": rng.normal(size=(1, 1)), "b": rng.normal(size=(1, 2))}
    results = []
    for gradients in ("parameters", "representation"):
        model = _identity_trunk_model()
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", strategy=strategy,
                      gradients=gradients)
        for _ in range(3):
            weights = _one_step(model, x, y)
        results.append(weights)
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# -- subclassed models declare the representation -----------------------------------------


class SubclassedTwoHead(lossbalance.BalancedModel):
    def __init__(self, marker=True, **kwargs):
        super().__init__(**kwargs)
        self.t1 = keras.layers.Dense(16, activation="tanh", name="t1")
        self.t2 = keras.layers.Dense(16, activation="tanh", name="t2")
        self.z = lossbalance.Representation(name="z") if marker else None
        self.cls_hidden = keras.layers.Dense(8, activation="relu", name="cls_hidden")
        self.cls = keras.layers.Dense(3, name="cls")
        self.reg = keras.layers.Dense(1, name="reg")

    def call(self, x, training=None):
        h = self.t2(self.t1(x))
        if self.z is not None:
            h = self.z(h)
        return {"cls": self.cls(self.cls_hidden(h)), "reg": self.reg(h)}


def test_subclassed_model_with_a_representation_layer_matches_functional(two_head_data):
    x, y = two_head_data
    functional = _two_trunk_layers_model()
    subclassed = SubclassedTwoHead()
    subclassed(x[:1])
    subclassed.set_weights(functional.get_weights())
    results = []
    for model in (functional, subclassed):
        keras.utils.set_random_seed(5)  # seeds PCGrad's random task order
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=TWO_HEAD_LOSS,
                      strategy="pcgrad", gradients="representation")
        assert model.gradient_level == "representation"
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        results.append([w.numpy() for w in model.trainable_weights])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_subclassed_model_without_a_representation_layer():
    model = SubclassedTwoHead(marker=False)
    with pytest.raises(RepresentationError, match="must be declared"):
        model.compile(loss=TWO_HEAD_LOSS, strategy="mgda", gradients="representation")
    model.compile(loss=TWO_HEAD_LOSS, strategy="mgda", gradients="auto")
    assert model.gradient_level == "parameters"


def test_gradient_level_survives_save_and_load(two_head_data, tmp_path):
    model = _two_trunk_layers_model()
    model.compile(optimizer="sgd", loss=TWO_HEAD_LOSS, strategy="mgda",
                  gradients="representation", representation="t2")
    model.fit(*two_head_data, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.gradient_level == "representation"
    assert loaded._level.trunk.forward.layer_name == "t2"
