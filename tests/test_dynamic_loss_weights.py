"""Loss weights that move during training: DWA (from the last epochs' loss ratios), RLW (a
random draw every step), FAMO (logits learned from how fast each loss falls) and IMTL-L
(loss scales trained with the model).

Known answers (DWA's weights by hand, RLW's draws and their distribution, FAMO's first
Adam step, IMTL-L's fixed point), then each strategy in `fit`, compiled with XLA, errors
for bad hyper-parameters, configs, and save/load of their state.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import check_config_round_trip
from loss_helpers import (bound, check_save_load_keeps_the_state,
                          check_trains_a_two_head_model, fit, objective)

from lossbalance import strategies


# -- DWA -----------------------------------------------------------------------------------


def dwa_by_hand(previous, before, temperature=2.0):
    ratios = np.asarray(previous) / np.asarray(before)
    e = np.exp(ratios / temperature)
    return len(ratios) * e / e.sum()


def test_dwa_weights_by_hand_from_a_loss_history():
    dwa = bound("dwa", tasks="ab")
    history = [  # epoch -> steps -> losses of tasks a, b
        [[2.0, 4.0], [4.0, 8.0]],  # averages [3, 6]
        [[1.0, 5.0], [2.0, 7.0], [3.0, 6.0]],  # averages [2, 6]
        [[1.0, 6.0]],  # averages [1, 6]
    ]
    seen = []
    for epoch, steps in enumerate(history):
        for losses in steps:
            seen.append(dwa.loss_weights(tf.constant(losses)).numpy())
        dwa.on_epoch_end(epoch)
        seen.append(dwa.loss_weights(tf.constant([1.0, 1.0])).numpy())  # next epoch's
        dwa.epoch_loss_sum.assign([0.0, 0.0])  # forget the probe
        dwa.epoch_steps.assign(0.0)
    # seen: epoch 0 (2 steps, probe), epoch 1 (3 steps, probe), epoch 2 (1 step, probe).
    # Equal weights during the first two epochs.
    for weights in seen[:6]:
        np.testing.assert_allclose(weights, [1.0, 1.0])
    # From epoch 2: r = [2/3, 6/6]; weights = 2 softmax(r / 2), for the whole epoch.
    expected = dwa_by_hand([2.0, 6.0], [3.0, 6.0])
    np.testing.assert_allclose(seen[6], expected, rtol=1e-6)
    np.testing.assert_allclose(seen[7], expected, rtol=1e-6)
    # After epoch 2 the history rolls: r = [1/2, 6/6].
    np.testing.assert_allclose(seen[8], dwa_by_hand([1.0, 6.0], [2.0, 6.0]), rtol=1e-6)
    assert seen[8].sum() == pytest.approx(2.0)
    assert seen[8][1] > seen[8][0]  # task b's loss fell slowest


def test_dwa_temperature_sharpens_and_sums_to_k():
    dwa = bound("dwa", tasks=("a", "b", "c"), T=0.5)
    for epoch, losses in enumerate([[1.0, 1.0, 1.0], [0.5, 1.0, 2.0]]):
        dwa.loss_weights(tf.constant(losses))
        dwa.on_epoch_end(epoch)
    weights = dwa.loss_weights(tf.constant([1.0, 1.0, 1.0])).numpy()
    np.testing.assert_allclose(weights, dwa_by_hand([0.5, 1.0, 2.0], [1, 1, 1], 0.5),
                               rtol=1e-6)
    assert weights.sum() == pytest.approx(3.0)


# -- RLW -----------------------------------------------------------------------------------


def draws(global_seed, steps=4, **kwargs):
    keras.utils.set_random_seed(global_seed)
    rlw = bound("rlw", tasks="abc", **kwargs)
    return np.stack([rlw.loss_weights(tf.ones(3)).numpy() for _ in range(steps)])


@pytest.mark.parametrize("options", [{}, {"distribution": "dirichlet", "alpha": 0.5}])
def test_rlw_is_repeatable_under_a_seed_and_sums_to_one(options):
    first, again, other = draws(7, **options), draws(7, **options), draws(8, **options)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    assert not np.allclose(first[0], first[1])  # a new draw every step
    assert np.all(first > 0)
    np.testing.assert_allclose(first.sum(axis=1), 1.0, rtol=1e-6)


def test_rlw_weights_sum_to_k_on_request_and_explicit_seed():
    weights = draws(1, weights_sum="num_tasks", seed=3)
    np.testing.assert_allclose(weights.sum(axis=1), 3.0, rtol=1e-6)
    np.testing.assert_array_equal(weights, draws(2, weights_sum="num_tasks", seed=3))


def test_rlw_normal_draw_is_a_softmax_of_normals():
    # Over many draws, log-weight differences are N(0, 2 stddev^2).
    keras.utils.set_random_seed(0)
    rlw = bound("rlw", tasks="ab", stddev=2.0)
    w = np.stack([rlw.loss_weights(tf.ones(2)).numpy() for _ in range(600)])
    diff = np.log(w[:, 0]) - np.log(w[:, 1])
    assert abs(diff.mean()) < 0.35
    assert diff.std() == pytest.approx(math.sqrt(8.0), rel=0.1)


# -- FAMO ----------------------------------------------------------------------------------


def test_famo_weights_and_first_step_by_hand():
    famo = bound("famo", tasks="ab")
    losses = tf.constant([1.0, 4.0])
    # Equal logits: w_k proportional to 1 / L_k, summing to 1.
    np.testing.assert_allclose(famo.loss_weights(losses).numpy(), [0.8, 0.2], rtol=1e-6)
    # Task a's loss halves, task b's falls by 10%: a's logit goes down, b's up, and
    # Adam's first step has length lr (plus the decay, zero at zero logits).
    famo.update_after_step(tf.constant([1.0, 1.0]), tf.constant([0.5, 0.9]))
    np.testing.assert_allclose(famo.logits.numpy(), [-0.025, 0.025], rtol=1e-4)


def test_famo_logits_move_toward_the_task_whose_loss_falls_slowest():
    famo = bound("famo", tasks="abc")
    rates = np.array([0.90, 0.99, 0.95])  # per-step factor of each task's loss
    losses = np.array([2.0, 1.0, 5.0])
    preferences = []
    for _ in range(40):
        famo.loss_weights(tf.constant(losses, tf.float32))
        after = losses * rates
        famo.update_after_step(tf.constant(losses, tf.float32),
                               tf.constant(after, tf.float32))
        losses = after
        preferences.append(famo.task_preferences)
    z = preferences[-1]
    assert z[1] > z[2] > z[0]  # slowest (b), then c, then the fastest (a)
    assert z[1] > preferences[0][1]


# -- IMTL-L --------------------------------------------------------------------------------


def test_imtl_l_scale_gradient_and_fixed_point():
    imtl = bound("imtl_l", tasks="abc")
    losses = tf.constant([0.05, 1.0, 40.0])
    with tf.GradientTape() as tape:
        value = objective(imtl, losses)
    (grad,) = tape.gradient(value, imtl.trainable_variables)
    np.testing.assert_allclose(grad.numpy(), losses.numpy() - 1.0, rtol=1e-6)  # e^0 L - 1

    optimizer = keras.optimizers.SGD(0.2)
    for _ in range(300):
        with tf.GradientTape() as tape:
            value = objective(imtl, losses)
        optimizer.apply(tape.gradient(value, imtl.trainable_variables),
                        imtl.trainable_variables)
    # At the fixed point every scaled loss e^{s_k} L_k equals 1.
    np.testing.assert_allclose(imtl.scales * losses.numpy(), 1.0, rtol=1e-3)
    np.testing.assert_allclose(imtl.log_scale.numpy(), -np.log(losses.numpy()), atol=1e-3)


# -- in fit --------------------------------------------------------------------------------

FIT_CONFIGS = {"dwa": "dwa", "rlw": "rlw", "famo": "famo", "imtl_l": "imtl_l"}


@pytest.mark.parametrize("name", list(FIT_CONFIGS))
def test_trains_a_two_head_model(name, two_head_data):
    model, logs = check_trains_a_two_head_model(name, FIT_CONFIGS[name], two_head_data)
    if name == "dwa":  # the logged weights of epoch 3 follow from epochs 1 and 2 by hand
        np.testing.assert_allclose([logs["cls_weight"][:2], logs["reg_weight"][:2]], 1.0)
        expected = dwa_by_hand([logs["cls_loss"][1], logs["reg_loss"][1]],
                               [logs["cls_loss"][0], logs["reg_loss"][0]])
        np.testing.assert_allclose([logs["cls_weight"][2], logs["reg_weight"][2]],
                                   expected, rtol=1e-4)
    if name == "famo":  # the classifier's loss falls slowest here; FAMO prefers it
        z = model.strategy.task_preferences
        assert z[0] > 0.5 > z[1]
        np.testing.assert_allclose(
            np.add(logs["cls_weight"], logs["reg_weight"]), 1.0, rtol=1e-5)
    if name == "imtl_l":  # the scales are trained by the model's optimizer
        assert any(v is model.strategy.log_scale for v in model.trainable_variables)
        assert not np.allclose(model.strategy.log_scale.numpy(), 0.0)


def test_rlw_fit_is_repeatable(two_head_data):
    _, first = fit("rlw", two_head_data, epochs=2)
    _, again = fit("rlw", two_head_data, epochs=2)
    np.testing.assert_allclose(first["cls_weight"], again["cls_weight"], rtol=1e-6)


@pytest.mark.parametrize("name", ["dwa", "rlw", "famo"])
def test_stateful_strategies_compile_with_xla(name, two_head_data):
    _, logs = fit(FIT_CONFIGS[name], two_head_data, epochs=3, jit_compile=True)
    assert np.all(np.isfinite(logs["loss"]))


# -- construction errors and configs -------------------------------------------------------


@pytest.mark.parametrize("name, kwargs, error", [
    ("dwa", {"temperature": 0.0}, ValueError),
    ("dwa", {"T": -1.0}, ValueError),
    ("dwa", {"temperature": "hot"}, TypeError),
    ("rlw", {"distribution": "uniform"}, ValueError),
    ("rlw", {"stddev": 0.0}, ValueError),
    ("rlw", {"alpha": -1.0}, ValueError),
    ("rlw", {"weights_sum": "two"}, ValueError),
    ("rlw", {"seed": 1.5}, TypeError),
    ("famo", {"learning_rate": 0.0}, ValueError),
    ("famo", {"lr": -0.1}, ValueError),
    ("famo", {"gamma": -1e-3}, ValueError),
    ("famo", {"min_losses": [0.0, "x"]}, TypeError),
    ("imtl_l", {"initial_log_scale": float("inf")}, ValueError),
    ("imtl_l", {"initial_log_scale": None}, TypeError),
])
def test_bad_hyper_parameters_raise_at_construction(name, kwargs, error):
    with pytest.raises(error):
        strategies.get(name, **kwargs)


def test_famo_min_losses_must_name_known_tasks():
    with pytest.raises(ValueError, match="unknown task"):
        bound("famo", tasks="ab", min_losses={"nope": 0.1})


@pytest.mark.parametrize("name, kwargs", [
    ("dwa", {"T": 3.0}),
    ("rlw", {"distribution": "dirichlet", "alpha": 2.0, "weights_sum": "num_tasks",
             "seed": 4}),
    ("famo", {"lr": 0.01, "gamma": 0.0, "min_losses": {"b": 0.1}}),
    ("imtl_l", {"initial_log_scale": -1.0}),
])
def test_config_round_trip(name, kwargs):
    check_config_round_trip(name, kwargs)


# -- save / load ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dwa", "famo", "imtl_l", "rlw"])
def test_save_load_keeps_the_strategy_state(name, two_head_data, tmp_path):
    check_save_load_keeps_the_state(name, FIT_CONFIGS[name], two_head_data,
                                    tmp_path / f"{name}.keras")
