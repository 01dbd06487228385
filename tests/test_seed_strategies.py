"""Uncertainty weighting's start and optimizer, GradNorm's balanced start: known answers."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import TWO_HEAD_LOSS, make_trunk_model

import lossbalance
from lossbalance import strategies
from lossbalance.strategies import GradNorm, UncertaintyWeighting

BATCH = 64  # the whole fixture: one step per epoch


def scaled(two_head_data, scale=100.0):
    """The users' case in miniature: the regression's loss ~10^4 times the classifier's."""
    x, y = two_head_data
    return x, {"cls": y["cls"], "reg": y["reg"] * scale}


def losses_of(model, x, y):
    """(cls, reg) losses of the model as it is, on the whole batch, in training mode."""
    outputs = model(x, training=True)
    return np.array([
        float(TWO_HEAD_LOSS["cls"](y["cls"], outputs["cls"])),
        float(keras.losses.MeanSquaredError()(y["reg"], outputs["reg"])),
    ])


def network_weights(model):
    """The layers' weights (`model.get_weights()` also holds the strategy's state)."""
    return [w for name in ("trunk", "cls", "reg")
            for w in model.get_layer(name).get_weights()]


def fit(model, x, y, epochs=1, batch_size=BATCH):
    return model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False,
                     verbose=0).history


# -- uncertainty weighting -----------------------------------------------------------------


@pytest.mark.parametrize("own", [None, {"learning_rate": 0.05, "optimizer": "sgd"}],
                         ids=["model-optimizer", "own-optimizer"])
def test_uncertainty_starts_at_the_first_batchs_optimum(two_head_data, own):
    """s* = log(2 c L): log(2 L) for the classification form (c = 1), log L for the
    regression form (c = 1/2); the first step's weights are 1 / (2 L) in both. The
    s-gradient is 0 there, so the first step's update leaves s at the optimum."""
    x, y = scaled(two_head_data)
    model = make_trunk_model()
    strategy = UncertaintyWeighting(forms={"cls": "classification"}, **(own or {}))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=TWO_HEAD_LOSS,
                  strategy=strategy)
    first = losses_of(model, x, y)
    assert first[1] > 1e3 * first[0]
    logs = fit(model, x, y)
    np.testing.assert_allclose(strategy.log_variance.numpy(),
                               np.log([2 * first[0], first[1]]), rtol=1e-5)
    np.testing.assert_allclose([logs["cls_weight"][0], logs["reg_weight"][0]],
                               0.5 / first, rtol=1e-5)
    assert float(strategy.started.numpy()) == 1.0


def test_uncertainty_papers_setup_takes_one_gradient_step_from_zero(two_head_data):
    """initial_log_variance=0.0 and the model's optimizer: s is a trainable variable of the
    model, and one SGD step from s = 0 gives s = -lr (1/2 - c L(0)) (the paper's set-up)."""
    x, y = two_head_data
    model = make_trunk_model()
    strategy = UncertaintyWeighting(forms={"cls": "classification"},
                                    initial_log_variance=0.0)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=TWO_HEAD_LOSS,
                  strategy=strategy)
    assert any(v is strategy.log_variance for v in model.trainable_variables)
    first = losses_of(model, x, y)
    logs = fit(model, x, y)
    np.testing.assert_allclose(strategy.log_variance.numpy(),
                               -0.1 * (0.5 - np.array([1.0, 0.5]) * first), rtol=1e-5)
    np.testing.assert_allclose([logs["cls_weight"][0], logs["reg_weight"][0]], [1.0, 0.5])


def test_uncertainty_own_optimizer_is_the_models_when_configured_alike(two_head_data):
    """The own optimizer's s-gradient is the exact gradient of the objective: Adam(0.01) of
    its own gives the run the model's Adam(0.01) gives (the model step uses the weights
    from before s's update, as when the model's optimizer updates s with the network)."""
    x, y = two_head_data
    runs = []
    for own in ({}, {"learning_rate": 0.01, "optimizer": "adam"}):
        model = make_trunk_model()
        strategy = UncertaintyWeighting(initial_log_variance=0.0, **own)
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss=TWO_HEAD_LOSS,
                      strategy=strategy)
        logs = fit(model, x, y, epochs=3, batch_size=16)
        runs.append((strategy.log_variance.numpy(), model.get_weights(), logs))
    (s_model, weights_model, logs_model), (s_own, weights_own, logs_own) = runs
    assert np.all(np.abs(s_model) > 0.05)  # it moved
    np.testing.assert_allclose(s_own, s_model, rtol=1e-5, atol=1e-6)
    for a, b in zip(weights_own, weights_model):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logs_own["loss"], logs_model["loss"], rtol=1e-5)


def test_uncertainty_own_optimizer_tracks_the_optimum_the_models_does_not():
    """Losses 3 and 3000 at the first step, then 3 and 3: with its own Adam(0.05), s starts
    at log L and follows the 1000-fold fall to log 3 (weights 1 / (2 L)) in a few hundred
    steps; with learning_rate=None the strategy leaves s to the model's optimizer."""
    own = UncertaintyWeighting(learning_rate=0.05)
    paper = UncertaintyWeighting()
    for strategy in (own, paper):
        strategy.bind(["a", "b"])
    step = tf.function(lambda losses: (own.loss_weights(losses), paper.loss_weights(losses)))
    step(tf.constant([3.0, 3000.0]))
    np.testing.assert_allclose(paper.log_variance.numpy(), np.log([3.0, 3000.0]), rtol=1e-6)
    later = tf.constant([3.0, 3.0])
    for _ in range(400):
        weights, _ = step(later)
    np.testing.assert_allclose(own.log_variance.numpy(), np.log([3.0, 3.0]), atol=0.05)
    np.testing.assert_allclose(weights.numpy(), 0.5 / later.numpy(), rtol=0.06)
    np.testing.assert_allclose(paper.log_variance.numpy(), np.log([3.0, 3000.0]), rtol=1e-6)
    assert not own.log_variance.trainable and paper.log_variance.trainable


def test_uncertainty_starts_a_task_without_optimum_at_zero():
    """A first loss <= 0 has no optimum (the objective falls without bound): s = 0 there,
    as in the paper's start, rather than the log of a clamp (a weight of ~1e20)."""
    strategy = UncertaintyWeighting()
    strategy.bind(["a", "b", "c"])
    weights = strategy.loss_weights(tf.constant([2.0, -1.0, 0.0]))
    np.testing.assert_allclose(strategy.log_variance.numpy(), [np.log(2.0), 0.0, 0.0],
                               rtol=1e-6)
    np.testing.assert_allclose(weights.numpy(), [0.25, 0.5, 0.5], rtol=1e-6)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"initial_log_variance": "auto"}, ValueError, "`initial_log_variance` must be a number"),
    ({"initial_log_variance": float("nan")}, ValueError, "initial_log_variance"),
    ({"learning_rate": 0.0}, ValueError, "`learning_rate` must be > 0"),
    ({"learning_rate": "fast"}, TypeError, "learning_rate"),
    ({"optimizer": "sgd"}, ValueError, "needs a `learning_rate`"),
    ({"learning_rate": 0.1, "optimizer": "nope"}, ValueError, "`optimizer`"),
])
def test_uncertainty_refuses_bad_hyper_parameters_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        UncertaintyWeighting(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {},
    {"initial_log_variance": 0.0},
    {"initial_log_variance": -1.5, "forms": {"cls": "classification"}},
    {"learning_rate": 0.05},
    {"learning_rate": 0.2, "optimizer": "sgd", "forms": ["classification", "regression"]},
])
def test_uncertainty_config_round_trips(kwargs):
    strategy = UncertaintyWeighting(**kwargs)
    config = strategy.get_config()
    assert UncertaintyWeighting.from_config(config).get_config() == config
    again = strategies.get(keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(strategy)))
    assert again.get_config() == config


def test_uncertainty_own_optimizer_state_saves_and_resumes(tmp_path, two_head_data):
    x, y = scaled(two_head_data)
    model = make_trunk_model()
    model.compile(optimizer="adam", loss=TWO_HEAD_LOSS,
                  strategy={"name": "uncertainty", "learning_rate": 0.05})
    fit(model, x, y, epochs=2, batch_size=16)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    strategy, restored = model.strategy, loaded.strategy
    assert restored.get_config() == strategy.get_config()
    assert restored.variance_optimizer.built
    assert int(restored.variance_optimizer.iterations) == 8
    for a, b in zip(strategy.state_variables(), restored.state_variables()):
        np.testing.assert_array_equal(b.numpy(), a.numpy())
    assert float(restored.started.numpy()) == 1.0  # a resumed run does not restart s
    fit(model, x, y, batch_size=16)
    fit(loaded, x, y, batch_size=16)
    np.testing.assert_array_equal(loaded.strategy.log_variance.numpy(),
                                  strategy.log_variance.numpy())
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(b, a)


def test_uncertainty_skipped_first_step_starts_at_the_next_batch(two_head_data):
    """A non-finite first batch (nonfinite="skip") leaves s unset; the next batch sets it."""
    x, y = scaled(two_head_data)
    poisoned = {"cls": y["cls"][:16], "reg": y["reg"][:16].copy()}
    poisoned["reg"][3] = np.nan
    model = make_trunk_model()
    model.compile(optimizer="adam", loss=TWO_HEAD_LOSS, strategy="uncertainty",
                  nonfinite="skip")
    fit(model, x[:16], poisoned, batch_size=16)
    assert float(model.strategy.started.numpy()) == 0.0
    np.testing.assert_array_equal(model.strategy.log_variance.numpy(), [0.0, 0.0])
    clean = {k: v[16:32] for k, v in y.items()}
    first = losses_of(model, x[16:32], clean)
    fit(model, x[16:32], clean, batch_size=16)
    np.testing.assert_allclose(model.strategy.log_variance.numpy(), np.log(first), rtol=1e-5)


# -- GradNorm -----------------------------------------------------------------------------


def trunk_norms(model, x, y):
    """Each task's gradient norm at the `trunk` layer (the last one both tasks share)."""
    with tf.GradientTape(persistent=True) as tape:
        outputs = model(x, training=True)
        losses = [TWO_HEAD_LOSS["cls"](y["cls"], outputs["cls"]),
                  keras.losses.MeanSquaredError()(y["reg"], outputs["reg"])]
    trunk = [v.value for v in model.get_layer("trunk").trainable_weights]
    return np.array([float(tf.linalg.global_norm(tape.gradient(loss, trunk)))
                     for loss in losses])


def test_gradnorm_balanced_start_measures_then_equalises_the_weighted_norms(two_head_data):
    """The first step sets w = K (1/n) / sum(1/n), where L_grad = 0 at r = 1 (equal
    weighted norms w_k n_k), and does not move the model (weights 0, logged as 0)."""
    x, y = scaled(two_head_data)
    model = make_trunk_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=TWO_HEAD_LOSS,
                  strategy="gradnorm")
    before = network_weights(model)
    norms = trunk_norms(model, x, y)
    logs = fit(model, x, y)
    weights = model.strategy.task_weights.numpy()
    np.testing.assert_allclose(weights, 2.0 / norms / np.sum(1.0 / norms), rtol=1e-5)
    np.testing.assert_allclose(weights * norms, np.mean(weights * norms), rtol=1e-5)
    assert weights[1] < 1e-2  # the large regression's weight, from the first step
    for a, b in zip(before, network_weights(model)):
        np.testing.assert_array_equal(b, a)
    assert logs["cls_weight"] == [0.0] and logs["reg_weight"] == [0.0]
    assert int(model.strategy.weight_optimizer.iterations) == 1

    logs = fit(model, x, y)  # the second step trains with the balanced weights
    np.testing.assert_allclose([logs["cls_weight"][0], logs["reg_weight"][0]], weights,
                               rtol=1e-6)
    assert any(np.any(a != b) for a, b in zip(before, network_weights(model)))


def test_gradnorm_ones_start_is_the_papers_first_step(two_head_data):
    """initial_weights="ones": the first step is a plain sum, as `fixed` takes it."""
    x, y = scaled(two_head_data)
    models = {}
    for strategy in ({"name": "gradnorm", "initial_weights": "ones"}, "fixed"):
        model = make_trunk_model()
        model.compile(optimizer=keras.optimizers.SGD(1e-4), loss=TWO_HEAD_LOSS,
                      strategy=strategy)
        logs = fit(model, x, y)
        models[model.strategy.registry_name] = model
        assert logs["cls_weight"] == [1.0] and logs["reg_weight"] == [1.0]
    for a, b in zip(models["gradnorm"].get_weights(), models["fixed"].get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def constant_loss(y_true, y_pred):
    """A loss without gradient: its norm at every layer is 0."""
    return keras.ops.mean(y_true + 0.0 * y_pred, axis=-1)


def test_gradnorm_balanced_start_falls_back_to_ones_when_a_norm_is_zero(two_head_data):
    x, y = two_head_data
    y = {"cls": y["cls"], "reg": np.abs(y["reg"])}
    model = make_trunk_model()
    model.compile(optimizer="sgd", loss={"cls": TWO_HEAD_LOSS["cls"], "reg": constant_loss},
                  strategy="gradnorm")
    fit(model, x, y)
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
