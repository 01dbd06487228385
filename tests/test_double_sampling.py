"""MoDo and SDMGrad: weights from two independent halves of each batch
(`lossbalance.levels.halves`), against their formulas in numpy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import lossbalance
from lossbalance import strategies


def project_simplex(v):
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1
    rho = np.nonzero(u - css / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1), 0)


def normalized(a):
    return a / np.mean(np.sqrt(np.abs(np.diag(a)))) ** 2


def modo_step(a, lam, gamma=0.1, rho=0.1):
    a = normalized(a)
    return project_simplex(lam - gamma * (a @ lam + rho * lam))


def sdmgrad_step(a, w, lamda=0.3, n_iter=20, lr=10.0, momentum=0.5):
    a = normalized(a)
    k = len(w)
    pref = np.full(k, 1 / k)
    velocity = np.zeros(k)
    for _ in range(n_iter):
        velocity = momentum * velocity + a @ (w + lamda * pref)
        w = project_simplex(w - lr * velocity)
    return w, (w + lamda * pref) / (1 + lamda)


def test_steps_match_their_formulas_over_several_calls():
    """Given one Jacobian (the low-level API), A = G; the weights are kept between calls."""
    rng = np.random.default_rng(0)
    modo, sdmgrad = strategies.get("modo"), strategies.get("sdmgrad")
    lam, w = np.full(3, 1 / 3), np.full(3, 1 / 3)
    for _ in range(4):
        j = rng.normal(size=(3, 7)) * np.array([[1.0], [10.0], [0.1]])
        g = j @ j.T
        lam = modo_step(g, lam)
        np.testing.assert_allclose(
            lossbalance.task_weights(modo, gramian=g).numpy(), lam, rtol=1e-6, atol=1e-12)
        w, expected = sdmgrad_step(g, w)
        np.testing.assert_allclose(
            lossbalance.task_weights(sdmgrad, gramian=g).numpy(), expected, rtol=1e-6,
            atol=1e-12)


def _model():
    keras.utils.set_random_seed(0)
    x = keras.Input((6,))
    z = keras.layers.Dense(8, activation="tanh", name="trunk")(x)
    return lossbalance.BalancedModel(x, {"cls": keras.layers.Dense(3, name="cls")(z),
                                         "reg": keras.layers.Dense(1, name="reg")(z)})


LOSSES = {"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "reg": "mse"}


def _task_gradients(model, x, y, sample_weight, rows):
    """(K, P) gradients of the trunk for the batch's `rows` (float64), and the heads'."""
    with tf.GradientTape(persistent=True) as tape:
        y_pred = model(x[rows], training=True)
        losses = model._task_losses({k: v[rows] for k, v in y.items()},
                                    {k: v for k, v in y_pred.items()},
                                    {k: v[rows] for k, v in sample_weight.items()})
    trunk = model.get_layer("trunk").trainable_variables
    jac = np.stack([np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, trunk)])
                    for loss in losses])
    heads = [[g.numpy() for g in tape.gradient(loss, model.get_layer(name).trainable_variables)]
             for loss, name in zip(losses, ("cls", "reg"))]
    return jac.astype(np.float64), heads


@pytest.mark.parametrize("grouping", [None, "variable"])
@pytest.mark.parametrize("name", ["modo", "sdmgrad"])
def test_training_step_uses_the_two_halves(name, grouping):
    """The step's weights come from A = J1 J2^T of the even and odd rows (sample weights
    split alike), the trunk's update is J^T w of the whole batch, each head gets its own
    task's gradient. Grouped, each group (the trunk's kernel, its bias) has its own A_g,
    weights and state, and gets J_g^T w_g."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 6)).astype("float32")
    y = {"cls": rng.integers(0, 3, size=12), "reg": 50 * rng.normal(size=(12, 1)).astype("f4")}
    sample_weight = {"cls": rng.uniform(0.5, 2, size=12).astype("f4"),
                     "reg": rng.uniform(0.5, 2, size=12).astype("f4")}
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=LOSSES, strategy=name,
                  grouping=grouping)
    assert type(model._level).__name__ == "HalfBatchLevel"
    records = [tf.Variable(tf.zeros_like(v)) for v in model.trainable_variables]
    apply = model.optimizer.apply

    def recording(grads, variables=None):
        for record, grad in zip(records, grads):
            record.assign(grad)
        return apply(grads, variables)

    model.optimizer.apply = recording
    groups = [slice(None)] if grouping is None else [slice(0, 6 * 8), slice(6 * 8, None)]
    states = [np.full(2, 0.5) for _ in groups]
    for _ in range(2):  # the weights are carried over from step to step
        j1, _ = _task_gradients(model, x, y, sample_weight, slice(0, None, 2))
        j2, _ = _task_gradients(model, x, y, sample_weight, slice(1, None, 2))
        full, heads = _task_gradients(model, x, y, sample_weight, slice(None))
        expected = []
        for index, columns in enumerate(groups):
            cross = j1[:, columns] @ j2[:, columns].T
            if name == "modo":
                states[index] = weights = modo_step(cross, states[index])
            else:
                states[index], weights = sdmgrad_step(cross, states[index])
            expected.append(full[:, columns].T @ weights)
        model.train_on_batch(x, y, sample_weight=sample_weight)
        trunk = np.concatenate([records[i].numpy().ravel() for i, v in enumerate(
            model.trainable_variables) if "trunk" in v.path])
        np.testing.assert_allclose(trunk, np.concatenate(expected), rtol=1e-4, atol=1e-6)
        for name_, own in zip(("cls", "reg"), heads):
            got = [records[i].numpy() for i, v in enumerate(model.trainable_variables)
                   if v.path.startswith(name_ + "/")]
            for a, b in zip(got, own):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"vectorize": True}, "two independent halves"),
    ({"gradients": "representation"}, "only defined at the parameter level"),
])
def test_other_levels_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _model().compile(loss=LOSSES, strategy="modo", **kwargs)


@pytest.mark.parametrize("name, params", [
    ("modo", {"gamma": 0.0}), ("modo", {"rho": -1.0}), ("modo", {"scale_free": 1}),
    ("sdmgrad", {"momentum": 1.0}), ("sdmgrad", {"n_iter": 0}), ("sdmgrad", {"lr": 0.0}),
])
def test_invalid_hyper_parameters_raise_at_construction(name, params):
    with pytest.raises((ValueError, TypeError)):
        strategies.get(name, **params)
