"""The output balancer (EnCodec's `Balancer`): each task's gradient at the representation
scaled to its share of a total norm, against its formula in numpy."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import TWO_HEAD_LOSS, make_trunk_model, scaled_targets

import lossbalance
from lossbalance import strategies


def balancer_weights(jacobians, ratios, total_norm=1.0, decay=0.999, epsilon=1e-12):
    """The weights of each step: total_norm r_k / (epsilon + n_k), n_k the bias-corrected
    moving average of |g_k| over the steps so far."""
    sums, count, out = 0.0, 0.0, []
    for j in jacobians:
        sums = decay * sums + np.linalg.norm(j, axis=1)
        count = decay * count + 1.0
        out.append(total_norm * np.asarray(ratios) / (epsilon + sums / count))
    return out


def test_weights_follow_the_formula_over_steps_whatever_the_scales():
    rng = np.random.default_rng(0)
    scales = np.array([[1e-3], [1.0], [1e4]])
    jacobians = [rng.normal(size=(3, 12)) * scales * rng.uniform(0.5, 2.0) for _ in range(4)]
    strategy = strategies.get("output_balancer", shares=[1.0, 2.0, 1.0], ema_decay=0.9,
                              total_norm=3.0)
    expected = balancer_weights(jacobians, [0.25, 0.5, 0.25], total_norm=3.0, decay=0.9)
    for j, want in zip(jacobians, expected):
        direction, weights = lossbalance.aggregate_with_weights(strategy,
                                                                j.astype(np.float32))
        np.testing.assert_allclose(weights.numpy(), want, rtol=1e-6)
        np.testing.assert_allclose(direction.numpy(), j.T @ want, rtol=1e-5,
                                   atol=1e-6 * np.abs(j.T @ want).max())


def test_each_task_reaches_the_trunk_with_its_share_of_the_norm():
    """At the first step (n_k = |g_k|), task k's part of the update has norm
    total_norm r_k: a loss 1e6 times larger does not make its gradient larger."""
    rng = np.random.default_rng(1)
    j = rng.normal(size=(2, 20)) * np.array([[1.0], [1e6]])
    _, weights = lossbalance.aggregate_with_weights(
        strategies.get("output_balancer", shares=[3.0, 1.0]), j.astype(np.float32))
    parts = np.linalg.norm(j, axis=1) * weights.numpy()
    np.testing.assert_allclose(parts, [0.75, 0.25], rtol=1e-6)


def test_a_task_without_gradient_gets_weight_zero_even_without_epsilon():
    j = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]], np.float32)
    _, weights = lossbalance.aggregate_with_weights(
        strategies.get("output_balancer", epsilon=0.0), j)
    np.testing.assert_allclose(weights.numpy(), [0.0, 0.5 / 3.0], rtol=1e-6)


def _representation_gradients(model, x, y):
    """(K, rows, width): each task's gradient of its batch loss at the trunk's output z."""
    z = model.get_layer("trunk")(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(z)
        losses = [TWO_HEAD_LOSS["cls"](y["cls"], model.get_layer("cls")(z)),
                  keras.losses.MeanSquaredError()(y["reg"], model.get_layer("reg")(z))]
    return np.stack([tape.gradient(loss, z).numpy() for loss in losses]).astype(np.float64)


@pytest.mark.parametrize("per_batch_item", [False, True])
def test_a_training_step_measures_the_norms_at_the_representation(two_head_data,
                                                                   per_batch_item):
    """Over three steps of the users' case (a regression loss ~1e4 times the classifier's),
    the norms' averages and the logged weights follow the formula, with |g_k| the norm of
    dL_k/dz over the batch, or per batch item and averaged (`per_batch_item`)."""
    x, y = scaled_targets(two_head_data)
    model = make_trunk_model()
    model.compile(keras.optimizers.SGD(0.01), loss=TWO_HEAD_LOSS, gradients="representation",
                  strategy={"name": "output_balancer", "ema_decay": 0.9,
                            "per_batch_item": per_batch_item})
    sums = count = 0.0
    for _ in range(3):
        g = _representation_gradients(model, x, y)
        norms = (np.linalg.norm(g, axis=2).mean(axis=1) if per_batch_item
                 else np.linalg.norm(g.reshape(2, -1), axis=1))
        sums, count = 0.9 * sums + norms, 0.9 * count + 1.0
        model.reset_metrics()
        logs = model.train_on_batch(x, y, return_dict=True)
        np.testing.assert_allclose(model.strategy.norm_sums.numpy(), sums, rtol=1e-5)
        np.testing.assert_allclose([logs["cls_weight"], logs["reg_weight"]],
                                   0.5 / (1e-12 + sums / count), rtol=1e-5)


def test_per_batch_item_norms_need_a_training_step():
    strategy = strategies.get("output_balancer", per_batch_item=True)
    with pytest.raises(ValueError, match="use per_batch_item=False"):
        lossbalance.aggregate(strategy, np.ones((2, 3), np.float32))


@pytest.mark.parametrize("params, message", [
    ({"total_norm": 0.0}, "total_norm"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"shares": [1.0, -1.0]}, "shares"),
    ({"shares": "equal"}, "shares"),
    ({"per_batch_item": 1}, "per_batch_item"),
])
def test_bad_hyper_parameters_fail_at_construction(params, message):
    with pytest.raises((ValueError, TypeError), match=message):
        strategies.get("output_balancer", **params)


def test_shares_are_checked_against_the_tasks_at_compile():
    model = make_trunk_model()
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['depth'\].*\['cls', 'reg'\]"):
        model.compile("sgd", loss=TWO_HEAD_LOSS, gradients="representation",
                      strategy={"name": "output_balancer", "shares": {"depth": 1.0}})
    with pytest.raises(ValueError, match="must not all be 0"):
        make_trunk_model().compile(
            "sgd", loss=TWO_HEAD_LOSS, gradients="representation",
            strategy={"name": "output_balancer", "shares": [0.0, 0.0]})


def test_defined_at_the_representation_only():
    for extra in ({}, {"vectorize": True}):
        with pytest.raises(ValueError, match="representation level only.*gradients="
                                             "'representation'"):
            make_trunk_model().compile("sgd", loss=TWO_HEAD_LOSS, strategy="output_balancer",
                                       **extra)


def test_trains_and_saves_its_norm_averages(two_head_data, tmp_path):
    x, y = two_head_data
    model = make_trunk_model()
    model.compile(keras.optimizers.SGD(0.05), loss=TWO_HEAD_LOSS, gradients="representation",
                  strategy="output_balancer")
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    weights = [history.history["cls_weight"][-1], history.history["reg_weight"][-1]]
    assert np.all(np.isfinite(weights)) and min(weights) > 0
    assert model.strategy.norm_count.numpy() == pytest.approx(
        sum(0.999 ** t for t in range(4)), rel=1e-6)  # 4 steps
    path = tmp_path / "balanced.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.strategy.norm_sums.numpy(),
                               model.strategy.norm_sums.numpy())
