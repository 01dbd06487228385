"""Checks shared by the tests of the loss-level strategies: a strategy bound to tasks, one
call's weights and objective, float32 loss vectors from 1e-8 to 1e8, the direction a
step's weights give the task gradients, training (the README's quick start model, the
two-head trunk model) and save/load (config round trips:
`conftest.check_config_round_trip`)."""

import keras
import numpy as np
import tensorflow as tf
from conftest import TWO_HEAD_LOSS, make_trunk_model
from quick_start import quick_start_data, quick_start_losses, quick_start_model

import lossbalance
from lossbalance import strategies


def bound(name, tasks=("a", "b", "c"), **kwargs):
    strategy = strategies.get(name, **kwargs)
    strategy.bind(list(tasks))
    return strategy


def step(strategy, losses):
    """(weights, logged objective sum_k w_k L_k + extra) of one call, as float64."""
    losses = tf.constant(np.asarray(losses, np.float32))
    weights, extra = strategy.weighting(losses)
    total = tf.reduce_sum(weights * losses) + (0.0 if extra is None else extra)
    return weights.numpy().astype(np.float64), float(total)


def objective(strategy, losses):
    """What BalancedModel minimises for a loss-level strategy: sum_k w_k L_k + extra."""
    weights = strategy.loss_weights(losses)
    total = tf.reduce_sum(weights * losses)
    extra = strategy.extra_loss(losses)
    return total if extra is None else total + extra


def loss_vectors(rng, k, count=12):
    """Float32 loss vectors whose entries span up to 1e-8 .. 1e8, some nearly equal."""
    vectors = [np.array([1e8, 1e-8, 3.0][:k] + [1.0] * max(k - 3, 0))]
    for _ in range(count):
        exponent = rng.uniform(-8, 8, size=k)
        if rng.uniform() < 0.3:
            exponent[1:] = exponent[0] + 1e-6 * rng.normal(size=k - 1)  # nearly equal
        vectors.append(10.0 ** exponent)
    return [v.astype(np.float32) for v in vectors]


def direction(strategy, losses, factors):
    """The weights' direction in gradient space, sum_k w_k c_k g_k, up to the g_k: the
    vector (w_k c_k) for losses c_k L_k, normalised."""
    weights, _ = step(strategy, losses * factors)
    combined = weights * factors
    return combined / np.linalg.norm(combined)


def check_scale_dependence_is_declared(name, params):
    """Not declared scale-invariant, and indeed not: scaling one loss turns the step."""
    assert not strategies.get(name, **params).scale_invariant
    losses = np.array([0.5, 2.0, 1.0], np.float32)
    factors = np.array([1.0, 1e3, 1.0], np.float32)
    a = direction(bound(name, **params), losses, np.ones(3, np.float32))
    b = direction(bound(name, **params), losses, factors)
    assert a @ b < 0.999


def check_quick_start_trains_one_epoch(strategy):
    """The README's quick start model (128 samples) trained one epoch: finite losses,
    weights and parameters. Returns the model and its logs."""
    x, y = quick_start_data(128)
    model = quick_start_model()
    model.compile(optimizer="adam", loss=quick_start_losses(),
                  metrics={"label": ["accuracy"]}, strategy=strategy)
    logs = model.fit(x, y, epochs=1, batch_size=64, verbose=0).history
    for key in ("loss", "label_loss", "value_loss", "label_weight", "value_weight"):
        assert np.all(np.isfinite(logs[key])), (key, logs[key])
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    return model, logs


def fit(strategy, data, epochs=5, **compile_kwargs):
    """The two-head trunk model (conftest) trained with Adam(0.02), in order."""
    x, y = data
    model = make_trunk_model()
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss=TWO_HEAD_LOSS,
                  strategy=strategy, **compile_kwargs)
    history = model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=False)
    return model, history.history


def check_trains_a_two_head_model(name, strategy, data):
    """Five epochs of `fit`: the strategy registered as `name`, finite logs, the summed
    task loss falling every epoch to under 60% of its start, finite positive weights.
    Returns the model and its logs."""
    model, logs = fit(strategy, data)
    assert model.strategy.registry_name == name
    assert np.all(np.isfinite(logs["loss"]))
    task_sum = np.add(logs["cls_loss"], logs["reg_loss"])
    assert task_sum[-1] < 0.6 * task_sum[0]
    assert np.all(np.diff(task_sum) < 0)
    for task in ("cls", "reg"):
        assert np.all(np.isfinite(logs[f"{task}_weight"]))
        assert np.all(np.asarray(logs[f"{task}_weight"]) > 0)
    return model, logs


def check_save_load_keeps_the_state(name, strategy, data, path):
    """Three epochs, saved to `path` and loaded: the strategy's variables come back (some
    non-zero), give the same weights (a random strategy: the next draw of its sequence),
    and the loaded model trains on."""
    model, _ = fit(strategy, data, epochs=3)
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
    x, y = data
    logs = loaded.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert np.isfinite(logs["loss"][0])
