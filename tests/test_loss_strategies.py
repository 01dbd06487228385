"""Loss-level strategies: DWA, RLW, GLS, SI, FAMO, STCH, IMTL-L.

Known answers where a method has one (DWA weights by hand, GLS/SI/STCH gradients in closed
form, IMTL-L's fixed point, FAMO's first Adam step), then every strategy in `fit`, errors for
bad hyper-parameters, and save/load of the stateful ones.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import lossbalance
from lossbalance import strategies
from conftest import REQUIRED_ARGUMENTS, TWO_HEAD_LOSS, make_trunk_model



def bound(name, tasks=("a", "b"), **kwargs):
    strategy = strategies.get(name, **kwargs)
    strategy.bind(list(tasks))
    return strategy


def objective(strategy, losses):
    """What BalancedModel minimises for a loss-level strategy: sum_k w_k L_k + extra."""
    weights = strategy.loss_weights(losses)
    total = tf.reduce_sum(weights * losses)
    extra = strategy.extra_loss(losses)
    return total if extra is None else total + extra


def tiny_problem(theta):
    """Three positive losses of a 3-vector, of very different scales."""
    return tf.stack([
        tf.reduce_sum((theta - 1.0) ** 2) + 0.5,
        100.0 * tf.reduce_sum(tf.exp(0.3 * theta)),
        0.01 * (tf.reduce_sum(theta * tf.constant([1.0, -2.0, 0.5])) ** 2 + 1.0),
    ])


def per_task_gradients(theta):
    with tf.GradientTape(persistent=True) as tape:
        losses = tiny_problem(theta)
        parts = tf.unstack(losses)
    grads = np.stack([tape.gradient(part, theta).numpy() for part in parts])
    return losses.numpy(), grads


def strategy_gradient(strategy, theta):
    with tf.GradientTape() as tape:
        losses = tiny_problem(theta)
        value = objective(strategy, losses)
    return float(value), tape.gradient(value, theta).numpy()


THETA = np.array([0.3, -1.2, 2.0], dtype=np.float32)


# -- DWA ----------------------------------------------------------------------------------


def dwa_by_hand(previous, before, temperature=2.0):
    ratios = np.asarray(previous) / np.asarray(before)
    e = np.exp(ratios / temperature)
    return len(ratios) * e / e.sum()


def test_dwa_weights_by_hand_from_a_loss_history():
    dwa = bound("dwa")
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


# -- GLS and SI ---------------------------------------------------------------------------


def test_gls_gradient_is_the_closed_form():
    theta = tf.Variable(THETA)
    losses, grads = per_task_gradients(theta)
    k = len(losses)
    geometric_mean = float(np.prod(losses.astype(np.float64)) ** (1.0 / k))
    expected = geometric_mean / k * (grads / losses[:, None]).sum(axis=0)
    value, gradient = strategy_gradient(bound("gls", tasks="abc"), theta)
    assert value == pytest.approx(geometric_mean, rel=1e-5)
    np.testing.assert_allclose(gradient, expected, rtol=1e-5)


def test_scale_invariant_gradient_is_the_closed_form():
    theta = tf.Variable(THETA)
    losses, grads = per_task_gradients(theta)
    expected = (grads / losses[:, None]).sum(axis=0)
    value, gradient = strategy_gradient(bound("si", tasks="abc"), theta)
    assert value == pytest.approx(float(np.log(losses).sum()), rel=1e-5)
    np.testing.assert_allclose(gradient, expected, rtol=1e-5)


def test_gls_and_si_ignore_the_scale_of_a_loss():
    losses = tf.constant([0.2, 3.0])
    for name in ("gls", "si"):
        strategy = bound(name)
        w = strategy.loss_weights(losses).numpy() * losses.numpy()
        w_scaled = (strategy.loss_weights(losses * [1.0, 1000.0]).numpy()
                    * losses.numpy() * [1.0, 1000.0])
        # The contribution w_k L_k of each task, hence its share of the step, is unchanged
        # up to one common factor.
        np.testing.assert_allclose(w / w.sum(), w_scaled / w_scaled.sum(), rtol=1e-6)


# -- RLW ----------------------------------------------------------------------------------


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
    rlw = bound("rlw", stddev=2.0)
    w = np.stack([rlw.loss_weights(tf.ones(2)).numpy() for _ in range(600)])
    diff = np.log(w[:, 0]) - np.log(w[:, 1])
    assert abs(diff.mean()) < 0.35
    assert diff.std() == pytest.approx(math.sqrt(8.0), rel=0.1)


# -- FAMO ---------------------------------------------------------------------------------


def test_famo_weights_and_first_step_by_hand():
    famo = bound("famo")
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
        famo.update_after_step(tf.constant(losses, tf.float32), tf.constant(after, tf.float32))
        losses = after
        preferences.append(famo.task_preferences)
    z = preferences[-1]
    assert z[1] > z[2] > z[0]  # slowest (b), then c, then the fastest (a)
    assert z[1] > preferences[0][1]


# -- STCH ---------------------------------------------------------------------------------


def test_stch_gradient_is_the_closed_form():
    theta = tf.Variable(THETA)
    losses, grads = per_task_gradients(theta)
    mu, k = 0.7, 3
    stch = bound("stch", tasks="abc", mu=mu, warmup_epochs=0, normalize=False)
    logs = np.log(losses.astype(np.float64))
    share = np.exp(logs / mu) / np.exp(logs / mu).sum()
    expected = k * (share[:, None] * grads / losses[:, None]).sum(axis=0)
    value, gradient = strategy_gradient(stch, theta)
    assert value == pytest.approx(k * mu * np.log(np.exp(logs / mu).sum()), rel=1e-5)
    np.testing.assert_allclose(gradient, expected, rtol=1e-4)


def test_stch_approaches_the_maximum_as_mu_goes_to_zero():
    losses = tf.constant([0.5, 2.0, 1.5])
    gaps = []
    for mu in (1.0, 0.1, 0.01, 0.001):
        stch = bound("stch", tasks="abc", mu=mu, warmup_epochs=0, normalize=False,
                     log_losses=False)
        value = float(objective(stch, losses)) / 3
        assert 2.0 <= value + 1e-6 <= 2.0 + mu * math.log(3) + 1e-6
        gaps.append(value - 2.0)
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-3
    np.testing.assert_allclose(stch.loss_weights(losses).numpy(), [0.0, 3.0, 0.0],
                               atol=1e-5)


def test_stch_warm_up_then_normalises_by_the_recorded_epoch():
    stch = bound("stch", mu=0.5, warmup_epochs=1)
    # Epoch 0: plain warm-up (sum of logs, weights 1 / L), nothing recorded.
    np.testing.assert_allclose(stch.loss_weights(tf.constant([2.0, 4.0])).numpy(),
                               [0.5, 0.25])
    stch.on_epoch_end(0)
    # Epoch 1: still warm-up; its average losses [1, 8] become the nadir.
    stch.loss_weights(tf.constant([1.5, 6.0]))
    stch.loss_weights(tf.constant([0.5, 10.0]))
    stch.on_epoch_end(1)
    np.testing.assert_allclose(stch.nadir.numpy(), [1.0, 8.0])
    # Epoch 2: STCH on log(L / n) = log([0.5, 0.5]): equal shares, w_k = K (1/2) / L_k.
    losses = tf.constant([0.5, 4.0])
    np.testing.assert_allclose(stch.loss_weights(losses).numpy(), [2.0, 0.25], rtol=1e-6)
    assert float(objective(stch, losses)) == pytest.approx(
        2 * 0.5 * math.log(2 * math.exp(math.log(0.5) / 0.5)), rel=1e-6)


# -- IMTL-L -------------------------------------------------------------------------------


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


# -- every strategy in fit ----------------------------------------------------------------

FIT_CONFIGS = {
    "dwa": "dwa",
    "rlw": "rlw",
    "gls": "gls",
    "scale_invariant": "si",
    "famo": "famo",
    "stch": {"name": "stch", "warmup_epochs": 1},
    "imtl_l": "imtl_l",
}


def fit(strategy, data, epochs=5, **compile_kwargs):
    x, y = data
    model = make_trunk_model()
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss=TWO_HEAD_LOSS,
                  strategy=strategy, **compile_kwargs)
    history = model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=False)
    return model, history.history


@pytest.mark.parametrize("name", list(FIT_CONFIGS))
def test_every_strategy_trains_a_two_head_model(name, two_head_data):
    model, logs = fit(FIT_CONFIGS[name], two_head_data)
    assert model.strategy.registry_name == name
    assert np.all(np.isfinite(logs["loss"]))
    task_sum = np.add(logs["cls_loss"], logs["reg_loss"])
    assert task_sum[-1] < 0.6 * task_sum[0]
    assert np.all(np.diff(task_sum) < 0)
    for task in ("cls", "reg"):
        assert np.all(np.isfinite(logs[f"{task}_weight"]))
        assert np.all(np.asarray(logs[f"{task}_weight"]) > 0)

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
    if name == "stch":
        assert float(model.strategy.epochs_done.numpy()) == 5
        assert np.all(model.strategy.nadir.numpy() != 1.0)


LOG_OR_LEARNED_SCALE = {"gls", "scale_invariant", "stch", "db_mtl", "uncertainty", "imtl_l",
                        "imtl", "famo", "pbi", "cosmos", "uw_so"}


@pytest.mark.parametrize("name", strategies.available())
def test_check_losses_holds_every_strategy_to_its_floor(name):
    """Methods that take log L_k, or whose learned scales diverge for L_k < 0, reject a
    negative mean loss with the task's name and a fix; the others accept any sign."""
    required = REQUIRED_ARGUMENTS.get(name, {})  # hyper-parameters without a default
    if strategies.get(name, **required).min_tasks > 2:
        pytest.skip(f"{name} is defined for 3 or more tasks (and has no loss floor)")
    strategy = bound(name, **required)
    strategy.check_losses({"a": 0.0, "b": 2.0}, "in epoch 1")  # a loss of 0 is in range
    if name not in LOG_OR_LEARNED_SCALE:
        assert strategy.loss_floors() is None
        strategy.check_losses({"a": -3.0, "b": -1e9}, "in epoch 1")
        return
    with pytest.raises(ValueError, match=r"in epoch 2: 'b' averaged -0.25 < 0\. ") as error:
        strategy.check_losses({"a": 1.0, "b": -0.25}, "in epoch 2")
    assert ("min_losses" if name == "famo" else "'fixed', 'rlw'") in str(error.value)


def test_famo_floor_is_its_min_losses():
    strategy = bound("famo", min_losses={"b": -2.0})
    strategy.check_losses({"a": 0.5, "b": -1.5}, "in epoch 1")
    with pytest.raises(ValueError, match=r"'a' averaged -0.5 < 0, 'b' averaged -2.5 < -2"):
        strategy.check_losses({"a": -0.5, "b": -2.5}, "in epoch 1")


def constant_loss(y_true, y_pred):
    """The batch mean of the targets: a loss whose sign the data sets (no gradient)."""
    return keras.ops.mean(y_true + 0.0 * y_pred, axis=-1)


@pytest.mark.parametrize("loss_weight, first_target, error", [
    (1.0, -1.0, "after the first batch"),  # negative from the first batch: one step taken
    (1.0, 1.0, "in epoch 1"),  # the first batch is positive, the epoch's mean is not
    (0.5, -1.0, "after the first batch"),  # the weighted loss is what the strategy sees
])
def test_fit_stops_on_a_loss_below_the_strategys_floor(loss_weight, first_target, error,
                                                       two_head_data):
    x, y = two_head_data
    y = {"cls": y["cls"], "reg": np.where(np.arange(64) < 16, first_target, -5.0)[:, None]}
    model = make_trunk_model()
    model.compile(optimizer="sgd", loss={"cls": TWO_HEAD_LOSS["cls"], "reg": constant_loss},
                  loss_weights={"cls": 1.0, "reg": loss_weight}, strategy="scale_invariant")
    mean = ((first_target - 15.0) / 4 if "epoch" in error else first_target) * loss_weight
    with pytest.raises(ValueError, match=f"{error}: 'reg' averaged {mean:g} < 0"):
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    assert int(model.optimizer.iterations) == (4 if "epoch" in error else 1)

    fixed = make_trunk_model()  # linear scalarisation takes losses of any sign
    fixed.compile(optimizer="sgd", loss={"cls": TWO_HEAD_LOSS["cls"], "reg": constant_loss},
                  strategy="fixed")
    logs = fixed.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False).history
    assert logs["reg_loss"][0] == pytest.approx((first_target - 15.0) / 4)


def test_rlw_fit_is_repeatable(two_head_data):
    _, first = fit("rlw", two_head_data, epochs=2)
    _, again = fit("rlw", two_head_data, epochs=2)
    np.testing.assert_allclose(first["cls_weight"], again["cls_weight"], rtol=1e-6)


@pytest.mark.parametrize("name", ["dwa", "rlw", "famo"])
def test_stateful_strategies_compile_with_xla(name, two_head_data):
    _, logs = fit(FIT_CONFIGS[name], two_head_data, epochs=3, jit_compile=True)
    assert np.all(np.isfinite(logs["loss"]))


# -- construction errors and configs ------------------------------------------------------


@pytest.mark.parametrize("name, kwargs, error", [
    ("dwa", {"temperature": 0.0}, ValueError),
    ("dwa", {"T": -1.0}, ValueError),
    ("dwa", {"temperature": "hot"}, TypeError),
    ("rlw", {"distribution": "uniform"}, ValueError),
    ("rlw", {"stddev": 0.0}, ValueError),
    ("rlw", {"alpha": -1.0}, ValueError),
    ("rlw", {"weights_sum": "two"}, ValueError),
    ("rlw", {"seed": 1.5}, TypeError),
    ("gls", {"epsilon": 0.0}, ValueError),
    ("si", {"epsilon": float("nan")}, ValueError),
    ("famo", {"learning_rate": 0.0}, ValueError),
    ("famo", {"lr": -0.1}, ValueError),
    ("famo", {"gamma": -1e-3}, ValueError),
    ("famo", {"min_losses": [0.0, "x"]}, TypeError),
    ("stch", {"mu": 0.0}, ValueError),
    ("stch", {"warmup_epochs": -1}, ValueError),
    ("stch", {"warmup_epochs": 1.5}, TypeError),
    ("stch", {"normalize": "yes"}, TypeError),
    ("imtl_l", {"initial_log_scale": float("inf")}, ValueError),
    ("imtl_l", {"initial_log_scale": None}, TypeError),
])
def test_bad_hyper_parameters_raise_at_construction(name, kwargs, error):
    with pytest.raises(error):
        strategies.get(name, **kwargs)


def test_famo_min_losses_must_name_known_tasks():
    with pytest.raises(ValueError, match="unknown task"):
        bound("famo", min_losses={"nope": 0.1})


@pytest.mark.parametrize("name, kwargs", [
    ("dwa", {"T": 3.0}),
    ("rlw", {"distribution": "dirichlet", "alpha": 2.0, "weights_sum": "num_tasks",
             "seed": 4}),
    ("gls", {"epsilon": 1e-9}),
    ("si", {}),
    ("famo", {"lr": 0.01, "gamma": 0.0, "min_losses": {"b": 0.1}}),
    ("stch", {"mu": 0.2, "warmup_epochs": 2, "normalize": False, "log_losses": False}),
    ("imtl_l", {"initial_log_scale": -1.0}),
])
def test_config_round_trip(name, kwargs):
    strategy = strategies.get(name, **kwargs)
    config = strategy.get_config()
    clone = type(strategy).from_config(config)
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(strategy)
    assert keras.saving.deserialize_keras_object(serialized).get_config() == config


# -- save / load --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dwa", "famo", "imtl_l", "stch", "rlw"])
def test_save_load_keeps_the_strategy_state(name, two_head_data, tmp_path):
    model, _ = fit(FIT_CONFIGS[name], two_head_data, epochs=3)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, lossbalance.BalancedModel)
    assert type(loaded.strategy) is type(model.strategy)
    before = {v.path: v.numpy() for v in model.strategy.variables}
    after = {v.path: v.numpy() for v in loaded.strategy.variables}
    assert before.keys() == after.keys() and before
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)
    assert np.any([np.any(v != 0) for v in before.values()])
    losses = tf.constant([0.7, 0.3])
    if name != "rlw":  # the same state gives the same weights
        np.testing.assert_allclose(loaded.strategy.loss_weights(losses).numpy(),
                                   model.strategy.loss_weights(losses).numpy(), rtol=1e-6)
    else:  # the random sequence continues where it stopped
        np.testing.assert_array_equal(loaded.strategy.loss_weights(losses).numpy(),
                                      model.strategy.loss_weights(losses).numpy())
    x, y = two_head_data
    logs = loaded.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert np.isfinite(logs["loss"][0])
