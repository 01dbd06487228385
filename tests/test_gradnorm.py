"""GradNorm (Chen et al.): balanced training rates, the layer its norms are taken at,
and its balanced or paper's start: known answers."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import TWO_HEAD_LOSS, fit_whole_batches, make_trunk_model, scaled_targets

import lossbalance
from lossbalance import strategies
from lossbalance.strategies import GradNorm


def network_weights(model):
    """The layers' weights (`model.get_weights()` also holds the strategy's state)."""
    return [w for name in ("trunk", "cls", "reg")
            for w in model.get_layer(name).get_weights()]


def _gradnorm_synthetic(n=1024, d=50, outputs=10, sigmas=(1.0, 3.0, 10.0), seed=0):
    """The GradNorm paper's regression: f_i(x) = sigma_i tanh((B + eps_i) x)."""
    rng = np.random.default_rng(seed)
    b = rng.normal(0.0, np.sqrt(10.0), size=(d, outputs))
    x = rng.uniform(-1.0, 1.0, size=(n, d)).astype("float32")
    y = {f"t{i}": (s * np.tanh(x @ (b + rng.normal(0.0, np.sqrt(3.5), size=(d, outputs)))
                               / np.sqrt(d))).astype("float32")
         for i, s in enumerate(sigmas)}
    return x, y


def _train_synthetic(strategy, x, y, epochs):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((x.shape[1],))
    h = keras.layers.Dense(32, activation="relu", name="trunk_1")(inputs)
    h = keras.layers.Dense(32, activation="relu", name="trunk_2")(h)
    model = lossbalance.BalancedModel(
        inputs, {name: keras.layers.Dense(10, name=name)(h) for name in y})
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", strategy=strategy)
    history = model.fit(x, y, batch_size=128, epochs=epochs, verbose=0)
    losses = np.array([history.history[f"{name}_loss"] for name in y])
    return model, history, losses[:, -1] / losses[:, 0]


def trunk_norms(model, x, y):
    """Each task's gradient norm at the `trunk` layer (the last one both tasks share)."""
    with tf.GradientTape(persistent=True) as tape:
        outputs = model(x, training=True)
        losses = [TWO_HEAD_LOSS["cls"](y["cls"], outputs["cls"]),
                  keras.losses.MeanSquaredError()(y["reg"], outputs["reg"])]
    trunk = [v.value for v in model.get_layer("trunk").trainable_weights]
    return np.array([float(tf.linalg.global_norm(tape.gradient(loss, trunk)))
                     for loss in losses])


def constant_loss(y_true, y_pred):
    """A loss without gradient: its norm at every layer is 0."""
    return keras.ops.mean(y_true + 0.0 * y_pred, axis=-1)


def test_gradnorm_balances_training_rates():
    x, y = _gradnorm_synthetic()
    _, _, fixed_rates = _train_synthetic("fixed", x, y, epochs=60)
    model, history, rates = _train_synthetic("gradnorm", x, y, epochs=60)
    weights = model.strategy.task_weights.numpy()
    assert np.all(weights > 0)
    assert weights.sum() == pytest.approx(3.0, rel=1e-5)
    # Every logged epoch average sums to K too, but the first: its first step (of 8) only
    # measures the gradient norms, with weights 0 (initial_weights="balanced").
    logged = np.array([history.history[f"t{i}_weight"] for i in range(3)]).sum(axis=0)
    np.testing.assert_allclose(logged[1:], 3.0, rtol=1e-5)
    assert logged[0] == pytest.approx(3.0 * 7 / 8, rel=1e-5)
    # Larger-scale tasks (larger gradients) get smaller weights...
    assert weights[0] > weights[1] > weights[2]
    # ...and the tasks' training rates L(t)/L(0) end up much closer together.
    assert np.std(np.log(rates)) < 0.5 * np.std(np.log(fixed_rates))


def test_gradnorm_uses_the_named_layer(two_head_data):
    x, y = two_head_data
    model = make_trunk_model()
    model.compile(optimizer="sgd", loss=TWO_HEAD_LOSS,
                  strategy=strategies.GradNorm(layer="trunk"))
    model.fit(x, y, epochs=1, verbose=0)
    assert int(model.strategy.weight_optimizer.iterations) == 2
    assert model.strategy.task_weights.numpy().sum() == pytest.approx(2.0, rel=1e-6)


def test_gradnorm_balanced_start_measures_then_equalises_the_weighted_norms(two_head_data):
    """The first step sets w = K (1/n) / sum(1/n), where L_grad = 0 at r = 1 (equal
    weighted norms w_k n_k), and does not move the model (weights 0, logged as 0)."""
    x, y = scaled_targets(two_head_data)
    model = make_trunk_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=TWO_HEAD_LOSS,
                  strategy="gradnorm")
    before = network_weights(model)
    norms = trunk_norms(model, x, y)
    logs = fit_whole_batches(model, x, y)
    weights = model.strategy.task_weights.numpy()
    np.testing.assert_allclose(weights, 2.0 / norms / np.sum(1.0 / norms), rtol=1e-5)
    np.testing.assert_allclose(weights * norms, np.mean(weights * norms), rtol=1e-5)
    assert weights[1] < 1e-2  # the large regression's weight, from the first step
    for a, b in zip(before, network_weights(model)):
        np.testing.assert_array_equal(b, a)
    assert logs["cls_weight"] == [0.0] and logs["reg_weight"] == [0.0]
    assert int(model.strategy.weight_optimizer.iterations) == 1

    logs = fit_whole_batches(model, x, y)  # the second step trains with the balanced weights
    np.testing.assert_allclose([logs["cls_weight"][0], logs["reg_weight"][0]], weights,
                               rtol=1e-6)
    assert any(np.any(a != b) for a, b in zip(before, network_weights(model)))


def test_gradnorm_ones_start_is_the_papers_first_step(two_head_data):
    """initial_weights="ones": the first step is a plain sum, as `fixed` takes it."""
    x, y = scaled_targets(two_head_data)
    models = {}
    for strategy in ({"name": "gradnorm", "initial_weights": "ones"}, "fixed"):
        model = make_trunk_model()
        model.compile(optimizer=keras.optimizers.SGD(1e-4), loss=TWO_HEAD_LOSS,
                      strategy=strategy)
        logs = fit_whole_batches(model, x, y)
        models[model.strategy.registry_name] = model
        assert logs["cls_weight"] == [1.0] and logs["reg_weight"] == [1.0]
    for a, b in zip(models["gradnorm"].get_weights(), models["fixed"].get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_gradnorm_balanced_start_falls_back_to_ones_when_a_norm_is_zero(two_head_data):
    x, y = two_head_data
    y = {"cls": y["cls"], "reg": np.abs(y["reg"])}
    model = make_trunk_model()
    model.compile(optimizer="sgd", loss={"cls": TWO_HEAD_LOSS["cls"], "reg": constant_loss},
                  strategy="gradnorm")
    fit_whole_batches(model, x, y)
    np.testing.assert_array_equal(model.strategy.task_weights.numpy(), [1.0, 1.0])


def test_gradnorm_initial_weights_is_validated_and_round_trips():
    with pytest.raises(ValueError,
                       match="`initial_weights` must be one of 'balanced', 'ones'"):
        GradNorm(initial_weights="uniform")
    strategy = GradNorm(initial_weights="ones", alpha=0.5)
    config = strategy.get_config()
    assert config["initial_weights"] == "ones"
    assert GradNorm.from_config(config).get_config() == config
    assert GradNorm().initial_weights == "balanced"
    assert lossbalance.strategies.get({"name": "gradnorm"}).initial_weights == "balanced"
