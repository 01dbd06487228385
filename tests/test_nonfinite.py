"""compile(nonfinite=...): a non-finite task loss or gradient never reaches the model."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import TWO_HEAD_LOSS, make_trunk_model

import lossbalance

BATCH = 16


def _poisoned(two_head_data, value, batch_index, task="reg"):
    x, y = two_head_data
    y = {k: v.copy() for k, v in y.items()}
    rows = slice(batch_index * BATCH, (batch_index + 1) * BATCH)
    y[task] = y[task].astype("float32")
    y[task][rows] = value
    return x, y, rows


def _without(x, y, *rows):
    keep = np.ones(len(x), bool)
    for part in rows:
        keep[part] = False
    return x[keep], {k: v[keep] for k, v in y.items()}


def _state(model):
    return [v.numpy() for v in model.weights] + [v.numpy() for v in model.optimizer.variables] \
        + [v.numpy() for v in model.strategy.state_variables()]


@pytest.mark.parametrize("strategy, bad_batches", [
    ("fixed", (1,)), ("uncertainty", (1,)), ("gradnorm", (1,)), ("pcgrad", (1,)),
    ("gradvac", (1,)), ("nash_mtl", (1,)),
    # MoCo's K x P state: a poisoned very first step (before any state was written) and a
    # later one (restoring tracked gradients that had moved).
    ("moco", (0, 2)),
])
def test_skip_leaves_model_optimizer_and_strategy_untouched(two_head_data, strategy,
                                                            bad_batches):
    """Training through poisoned batches with nonfinite='skip' ends exactly where training
    on the data without them ends: weights, optimizer slots and strategy state."""
    x, y = two_head_data
    rows = []
    for index in bad_batches:
        x, y, part = _poisoned((x, y), np.nan, batch_index=index)
        rows.append(part)
    skipping = make_trunk_model()
    skipping.compile(optimizer="adam", loss=TWO_HEAD_LOSS, strategy=strategy,
                     nonfinite="skip")
    skipped_logs = skipping.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False,
                                verbose=0).history
    assert skipped_logs["skipped_steps"] == [float(len(bad_batches))]

    clean = make_trunk_model()
    clean.compile(optimizer="adam", loss=TWO_HEAD_LOSS, strategy=strategy, nonfinite="skip")
    x_clean, y_clean = _without(x, y, *rows)
    clean_logs = clean.fit(x_clean, y_clean, batch_size=BATCH, epochs=1, shuffle=False,
                           verbose=0).history
    assert clean_logs["skipped_steps"] == [0.0]
    # the skipped steps' NaN losses stay out of the epoch's logs
    for key in ("loss", "cls_loss", "reg_loss", "cls_weight", "reg_weight"):
        np.testing.assert_allclose(skipped_logs[key], clean_logs[key], rtol=1e-6, err_msg=key)

    steps = len(x) // BATCH - len(bad_batches)
    assert int(skipping.optimizer.iterations) == int(clean.optimizer.iterations) == steps
    skipped_state, clean_state = _state(skipping), _state(clean)
    assert len(skipped_state) == len(clean_state)  # MoCo's tracked gradients included
    for a, b in zip(skipped_state, clean_state):
        np.testing.assert_array_equal(a, b)


def test_a_skipped_first_step_keeps_per_parameter_state(two_head_data):
    """MoCo's K x P state exists before the first step, so a non-finite first step restores
    it with the rest. Eager mode: there, no retrace of the step hides state created in the
    middle of it."""
    x, y, rows = _poisoned(two_head_data, np.nan, batch_index=0)
    batches = [(x[part], {k: v[part] for k, v in y.items()})
               for part in (rows, slice(BATCH, 2 * BATCH))]
    models = []
    for first in (0, 1):  # through the poisoned batch, and without it
        model = make_trunk_model()
        model.compile(optimizer="adam", loss=TWO_HEAD_LOSS, strategy="moco",
                      nonfinite="skip", run_eagerly=True)
        for batch in batches[first:]:
            model.train_on_batch(*batch)
        models.append(model)
    skipping, clean = models
    assert skipping.strategy.num_parameters == skipping.get_layer("trunk").count_params()
    assert int(skipping.optimizer.iterations) == int(clean.optimizer.iterations) == 1
    for a, b in zip(_state(skipping), _state(clean), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_raise_names_the_task_and_step_and_keeps_the_model(two_head_data, value):
    x, y, rows = _poisoned(two_head_data, value, batch_index=2)
    model = make_trunk_model()
    model.compile(optimizer="adam", loss=TWO_HEAD_LOSS, strategy="uncertainty",
                  nonfinite="raise")
    with pytest.raises(FloatingPointError, match=r"task\(s\) \['reg'\]") as info:
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert "step 2" in str(info.value)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())

    reference = make_trunk_model()
    reference.compile(optimizer="adam", loss=TWO_HEAD_LOSS, strategy="uncertainty")
    reference.fit(x[:2 * BATCH], {k: v[:2 * BATCH] for k, v in y.items()},
                  batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_nonfinite_predictions_are_caught(two_head_data):
    """A head that predicts NaN for some inputs (log of a negative number)."""
    x, y = two_head_data
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    h = keras.layers.Dense(16, activation="tanh", name="trunk")(inputs)
    reg = keras.layers.Dense(1, name="reg_linear")(h)
    reg = keras.layers.Lambda(lambda t: tf.math.log(t), name="reg")(reg)
    model = lossbalance.BalancedModel(inputs, {"cls": keras.layers.Dense(3, name="cls")(h),
                                               "reg": reg})
    model.compile(optimizer="sgd", loss=TWO_HEAD_LOSS, strategy="pcgrad", nonfinite="raise")
    with pytest.raises(FloatingPointError, match=r"\['reg'\]"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)


def test_default_keeps_keras_behaviour(two_head_data):
    x, y, _ = _poisoned(two_head_data, np.nan, batch_index=0)
    model = make_trunk_model()
    model.compile(optimizer="sgd", loss=TWO_HEAD_LOSS)
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    assert "skipped_steps" not in history.history
    assert np.isnan(history.history["loss"][0])


def test_invalid_mode_is_refused():
    with pytest.raises(ValueError, match="nonfinite"):
        make_trunk_model().compile(optimizer="sgd", loss=TWO_HEAD_LOSS, nonfinite="ignore")
