"""Uncertainty weighting (Kendall et al.): the learned variances' optimum, the
classification form, the first-batch start and the own optimizer: known answers. UW-SO,
its analytic optimum softened by a softmax: the weights against the float64 formula for
float32 losses from 1e-8 to 1e8, the temperature's two limits, declared properties, the
README's quick start model trained one epoch, errors and configs."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import (TWO_HEAD_LOSS, check_config_round_trip, fit_whole_batches,
                      make_trunk_model, scaled_targets)
from loss_helpers import (bound, check_quick_start_trains_one_epoch,
                          check_scale_dependence_is_declared, loss_vectors)
from loss_helpers import step as one_step  # (`step` names a training step below)

import lossbalance
from lossbalance import strategies
from lossbalance.strategies import UncertaintyWeighting


def losses_of(model, x, y):
    """(cls, reg) losses of the model as it is, on the whole batch, in training mode."""
    outputs = model(x, training=True)
    return np.array([
        float(TWO_HEAD_LOSS["cls"](y["cls"], outputs["cls"])),
        float(keras.losses.MeanSquaredError()(y["reg"], outputs["reg"])),
    ])


def test_uncertainty_learns_the_residual_variances():
    """Two regressions with known noise variances: at the optimum sigma_k^2 = L_k, and a
    model that can fit the means leaves L_k = the noise variance."""
    rng = np.random.default_rng(0)
    n, variances = 2048, np.array([0.25, 4.0])
    x = rng.normal(size=(n, 4)).astype("float32")
    y = {
        "a": (x @ [[1.0], [0.5], [-1.0], [0.0]] + np.sqrt(variances[0])
              * rng.normal(size=(n, 1))).astype("float32"),
        "b": (x @ [[0.0], [-1.0], [2.0], [1.0]] + np.sqrt(variances[1])
              * rng.normal(size=(n, 1))).astype("float32"),
    }
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    trunk = keras.layers.Dense(8, name="trunk")(inputs)
    model = lossbalance.BalancedModel(
        inputs, {"a": keras.layers.Dense(1, name="a")(trunk),
                 "b": keras.layers.Dense(1, name="b")(trunk)})
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse", strategy="uw")
    history = model.fit(x, y, batch_size=256, epochs=40, verbose=0)
    learned = model.strategy.variances
    final_losses = np.array([history.history["a_loss"][-1], history.history["b_loss"][-1]])
    np.testing.assert_allclose(final_losses, variances, rtol=0.1)
    np.testing.assert_allclose(learned, variances, rtol=0.15)
    # The logged weight is the regression form's 1 / (2 sigma^2).
    np.testing.assert_allclose(history.history["b_weight"][-1], 0.5 / learned[1], rtol=0.1)


def test_uncertainty_classification_form_optimum():
    """For a fixed loss L the classification form's optimum is sigma^2 = 2 L."""
    strategy = strategies.UncertaintyWeighting(forms=["regression", "classification"])
    strategy.bind(["r", "c"])
    losses = tf.constant([3.0, 3.0])
    optimizer = keras.optimizers.Adam(0.05)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            objective = tf.reduce_sum(strategy.loss_weights(losses) * losses) + \
                strategy.extra_loss(losses)
        optimizer.apply(tape.gradient(objective, strategy.trainable_variables),
                        strategy.trainable_variables)

    for _ in range(600):
        step()
    np.testing.assert_allclose(strategy.variances, [3.0, 6.0], rtol=1e-2)


@pytest.mark.parametrize("own", [None, {"learning_rate": 0.05, "optimizer": "sgd"}],
                         ids=["model-optimizer", "own-optimizer"])
def test_uncertainty_starts_at_the_first_batchs_optimum(two_head_data, own):
    """s* = log(2 c L): log(2 L) for the classification form (c = 1), log L for the
    regression form (c = 1/2); the first step's weights are 1 / (2 L) in both. The
    s-gradient is 0 there, so the first step's update leaves s at the optimum."""
    x, y = scaled_targets(two_head_data)
    model = make_trunk_model()
    strategy = UncertaintyWeighting(forms={"cls": "classification"}, **(own or {}))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=TWO_HEAD_LOSS,
                  strategy=strategy)
    first = losses_of(model, x, y)
    assert first[1] > 1e3 * first[0]
    logs = fit_whole_batches(model, x, y)
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
    logs = fit_whole_batches(model, x, y)
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
        logs = fit_whole_batches(model, x, y, epochs=3, batch_size=16)
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
    check_config_round_trip("uncertainty", kwargs)


def test_uncertainty_own_optimizer_state_saves_and_resumes(tmp_path, two_head_data):
    x, y = scaled_targets(two_head_data)
    model = make_trunk_model()
    model.compile(optimizer="adam", loss=TWO_HEAD_LOSS,
                  strategy={"name": "uncertainty", "learning_rate": 0.05})
    fit_whole_batches(model, x, y, epochs=2, batch_size=16)
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
    fit_whole_batches(model, x, y, batch_size=16)
    fit_whole_batches(loaded, x, y, batch_size=16)
    np.testing.assert_array_equal(loaded.strategy.log_variance.numpy(),
                                  strategy.log_variance.numpy())
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(b, a)


def test_uncertainty_skipped_first_step_starts_at_the_next_batch(two_head_data):
    """A non-finite first batch (nonfinite="skip") leaves s unset; the next batch sets it."""
    x, y = scaled_targets(two_head_data)
    poisoned = {"cls": y["cls"][:16], "reg": y["reg"][:16].copy()}
    poisoned["reg"][3] = np.nan
    model = make_trunk_model()
    model.compile(optimizer="adam", loss=TWO_HEAD_LOSS, strategy="uncertainty",
                  nonfinite="skip")
    fit_whole_batches(model, x[:16], poisoned, batch_size=16)
    assert float(model.strategy.started.numpy()) == 0.0
    np.testing.assert_array_equal(model.strategy.log_variance.numpy(), [0.0, 0.0])
    clean = {k: v[16:32] for k, v in y.items()}
    first = losses_of(model, x[16:32], clean)
    fit_whole_batches(model, x[16:32], clean, batch_size=16)
    np.testing.assert_allclose(model.strategy.log_variance.numpy(), np.log(first), rtol=1e-5)


# -- UW-SO ---------------------------------------------------------------------------------


def uw_so_weights(losses, temperature=1.0):
    exponents = 1.0 / (temperature * losses)
    e = np.exp(exponents - exponents.max())
    return e / e.sum()


@pytest.mark.parametrize("temperature", [1.0, 0.05, 20.0, 1e6, 1e-6])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_uw_so_weights_equal_the_definition(temperature, k):
    """Including exponents 1 / (T L_k) up to 1e14: the float64 softmax keeps the weights
    equal to the formula where a float32 one would not."""
    rng = np.random.default_rng(3)
    strategy = bound("uw_so", tasks=[f"t{i}" for i in range(k)], temperature=temperature)
    for losses in loss_vectors(rng, k, 16):
        weights, objective = one_step(strategy, losses)
        want = uw_so_weights(losses.astype(np.float64), temperature)
        assert np.all(np.isfinite(weights))
        np.testing.assert_allclose(weights, want, rtol=1e-6, atol=1e-30)
        assert weights.sum() == pytest.approx(1.0, rel=1e-6)
        assert objective == pytest.approx(float(want @ losses), rel=1e-6)


def test_uw_so_needs_float64_for_nearly_equal_small_losses():
    """Losses ~1e-8 apart by 1e-6 relative at T = 1e6: exponents ~100 whose differences
    decide the weights; the result equals the float64 formula to float32's precision."""
    losses = np.array([1e-8, 1.000001e-8, 1.000003e-8], np.float32)
    weights, _ = one_step(bound("uw_so", T=1e6), losses)
    want = uw_so_weights(losses.astype(np.float64), 1e6)
    np.testing.assert_allclose(weights, want, rtol=1e-6)
    assert weights[0] > weights[1] > weights[2]


def test_uw_so_weights_sum_to_k_on_request_and_follow_the_authors_formula():
    losses = np.array([0.3, 2.0, 40.0], np.float32)
    one, _ = one_step(bound("uw_so", temperature=2.0), losses)
    k, _ = one_step(bound("uw_so", temperature=2.0, weights_sum="num_tasks"), losses)
    np.testing.assert_allclose(k, 3 * one, rtol=1e-7)
    # the authors' code: softmax(1 / (L + 1e-8) / T); the same for losses far above 1e-8
    authors = np.exp(1 / (losses.astype(np.float64) + 1e-8) / 2.0)
    np.testing.assert_allclose(one, authors / authors.sum(), rtol=1e-6)
    assert one[0] > one[1] > one[2]  # the smallest loss weighs most


def test_uw_so_temperature_moves_from_one_hot_to_equal():
    losses = np.array([0.5, 1.0, 4.0], np.float32)
    hot, _ = one_step(bound("uw_so", temperature=1e-3), losses)
    np.testing.assert_allclose(hot, [1.0, 0.0, 0.0], atol=1e-12)
    flat, _ = one_step(bound("uw_so", temperature=1e6), losses)
    np.testing.assert_allclose(flat, 1 / 3, rtol=1e-5)


def test_uw_so_scale_dependence_is_declared():
    check_scale_dependence_is_declared("uw_so", {})


def test_uw_so_declares_neither_scale_invariance_nor_non_conflict():
    assert not strategies.get("uw_so").scale_invariant
    assert not strategies.get("uw_so").non_conflicting


def test_uw_so_readme_quick_start_trains_one_epoch():
    _, logs = check_quick_start_trains_one_epoch("uw_so")
    assert logs["label_weight"][0] + logs["value_weight"][0] == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"temperature": 0.0}, ValueError, "`temperature` must be > 0"),
    ({"T": -2.0}, ValueError, "`temperature` must be > 0"),
    ({"temperature": None}, TypeError, "must be a number"),
    ({"weights_sum": "k"}, ValueError, "`weights_sum` must be one of"),
    ({"epsilon": 0.0}, ValueError, "`epsilon` must be > 0"),
])
def test_uw_so_refuses_bad_hyper_parameters_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        strategies.get("uw_so", **kwargs)


def test_uw_so_config_round_trips():
    kwargs = {"T": 5.0, "weights_sum": "num_tasks", "epsilon": 1e-12}
    config = check_config_round_trip("uw_so", kwargs)
    for key, value in kwargs.items():
        assert config["temperature" if key == "T" else key] == value
