"""TorchJD's robust aggregators, (Multi-)Krum and the coordinate-wise trimmed mean: against
float64 evaluations of their definitions (`tests/definitions.py`) at every scale, ties and
the distances Krum scores with, the tasks each needs, hyper-parameter checks, configs,
declared properties, and training (the README's quick start model with a third task; one
step's update against the definition)."""

import itertools

import definitions
import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import check_config_round_trip, record_applied_gradients
from gradient_helpers import (check_quick_start_trains_one_epoch, relative_error,
                              weights_and_direction)
from quick_start import quick_start_data, quick_start_losses, quick_start_model
from test_scales import KINDS, RATIOS, scaled_jacobian

import lossbalance
from lossbalance import strategies

METHODS = ("krum", "trimmed_mean")


# -- Krum ----------------------------------------------------------------------------------


KRUM_CONFIGS = [{}, {"n_byzantine": 1, "n_selected": 2},
                {"n_byzantine": 1, "distance": "euclidean"},
                {"n_byzantine": 2, "n_selected": 3, "distance": "euclidean"}]


@pytest.mark.parametrize("params", KRUM_CONFIGS,
                         ids=["default", "f1-m2", "f1-euclidean", "f2-m3-euclidean"])
def test_krum_is_its_definition_at_every_scale(params):
    """The weights equal the definition's (scores from the float32 rows' distances in
    float64), and so the update J^T w, for row norms 1 to 1e6 apart and K = 3 to 8."""
    rng = np.random.default_rng(0)
    minimum = params.get("n_byzantine", 0) + 3
    for k, ratio, kind in itertools.product((3, 5, 8), RATIOS, KINDS):
        if k < max(minimum, params.get("n_selected", 1)):
            continue
        jacobian = scaled_jacobian(rng, k, ratio, kind)
        rows = jacobian.astype(np.float64)
        expected = definitions.krum(rows, **params)
        weights, direction = weights_and_direction(strategies.get("krum", **params),
                                                   jacobian)
        np.testing.assert_array_equal(weights > 0, expected > 0,
                                      err_msg=str((k, ratio, kind)))
        np.testing.assert_allclose(weights, expected, rtol=1e-7)  # 1/m in float32
        assert relative_error(direction, rows.T @ expected) < 1e-6, (k, ratio, kind)


def test_krum_matches_torchjds_example_and_rejects_the_outlier():
    """TorchJD's docstring example (Multi-Krum, f = 1, m = 4; its adversarial row left
    out), under both distances; Krum alone picks a row of the cluster."""
    j = np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [75.0, -666.0, 23.0],
                  [1.0, 2.0, 3.0], [2.0, 0.0, 1.0]])
    for distance in ("euclidean", "squared"):
        spec = {"name": "krum", "n_byzantine": 1, "n_selected": 4, "distance": distance}
        np.testing.assert_allclose(lossbalance.aggregate(spec, j).numpy(),
                                   [1.25, 0.75, 1.5])
        weights = lossbalance.task_weights(spec, j).numpy()
        np.testing.assert_allclose(weights, [0.25, 0.25, 0.0, 0.25, 0.25])
    assert lossbalance.task_weights("krum", j).numpy()[2] == 0.0


def test_krum_distances_squared_or_not_can_select_different_tasks():
    """The paper scores with squared distances, TorchJD with distances: on some inputs
    the selections differ, and each follows its own definition."""
    rng = np.random.default_rng(1)
    differ = 0
    for _ in range(200):
        rows = rng.normal(size=(5, 2)) * rng.uniform(0.1, 3.0, size=(5, 1))
        squared = definitions.krum(rows)
        euclidean = definitions.krum(rows, distance="euclidean")
        if np.any(squared != euclidean):
            differ += 1
            np.testing.assert_array_equal(lossbalance.task_weights("krum", rows).numpy(),
                                          squared)
            np.testing.assert_array_equal(lossbalance.task_weights(
                {"name": "krum", "distance": "euclidean"}, rows).numpy(), euclidean)
    assert differ > 0


def test_krum_ties_share_the_weight_whatever_the_tasks_order():
    """K = 3, f = 0: one neighbour per score, so the two closest gradients tie and Krum
    follows their mean (TorchJD picks one of them by position); equal scores straddling
    Multi-Krum's m-th place share what is left."""
    rows = np.array([[1.0, 0.0], [1.1, 0.1], [-3.0, 2.0]])
    for order in itertools.permutations(range(3)):
        weights = lossbalance.task_weights("krum", rows[list(order)]).numpy()
        np.testing.assert_allclose(weights[np.argsort(order)], [0.5, 0.5, 0.0])
    square = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [9.0, 9.0]])
    weights = lossbalance.task_weights({"name": "krum", "n_selected": 2}, square).numpy()
    np.testing.assert_allclose(weights, [0.25, 0.25, 0.25, 0.25, 0.0])  # four tied
    np.testing.assert_allclose(weights, definitions.krum(square, n_selected=2))


@pytest.mark.parametrize("params, tasks, match", [
    ({}, 2, r"at least 3 tasks.*model has 2.*not defined for fewer than 3"),
    ({"n_byzantine": 2}, 4, r"at least 5 tasks.*n_byzantine=2.*lower n_byzantine"),
    ({"n_selected": 5}, 4, r"at least 5 tasks.*n_selected=5.*Lower n_selected"),
])
def test_krum_refuses_too_few_tasks_when_bound(params, tasks, match):
    strategy = strategies.get("krum", **params)  # valid alone: K is not known yet
    with pytest.raises(ValueError, match=match):
        strategy.bind([f"t{i}" for i in range(tasks)])
    assert strategy._task_names is None  # refused before binding: nothing half-built
    assert strategies.get("krum", **params).min_tasks == max(
        params.get("n_byzantine", 0) + 3, params.get("n_selected", 1))


# -- TrimmedMean ---------------------------------------------------------------------------


def _trim_mask(rows, t):
    """Which values the trimmed mean keeps (ties in row order), from numpy's ranks."""
    ranks = np.argsort(np.argsort(rows, axis=0, kind="stable"), axis=0, kind="stable")
    return (ranks >= t) & (ranks < len(rows) - t)


def test_trimmed_mean_is_its_definition_at_every_scale():
    """Every t a K allows, K = 3 to 8, norms 1 to 1e6 apart: the update equals the
    float64 trimmed mean of the float32 rows; the logged weights are each task's kept
    share of its squared norm, over K - 2t."""
    rng = np.random.default_rng(2)
    for k, ratio, kind in itertools.product((3, 5, 8), RATIOS, KINDS):
        jacobian = scaled_jacobian(rng, k, ratio, kind)
        rows = jacobian.astype(np.float64)
        for t in range((k - 1) // 2 + 1):
            strategy = strategies.get("trimmed_mean", trim_number=t)
            weights, direction = weights_and_direction(strategy, jacobian)
            expected = definitions.trimmed_mean(rows, t)
            assert relative_error(direction, expected) < 1e-6, (k, ratio, kind, t)
            kept = _trim_mask(rows, t) * rows
            share = np.sum(kept * rows, axis=1) / np.sum(rows * rows, axis=1) / (k - 2 * t)
            np.testing.assert_allclose(weights, share, rtol=1e-6, atol=1e-12)
            if t == 0:
                np.testing.assert_allclose(weights, 1.0 / k, rtol=1e-6)


def test_trimmed_mean_by_hand_and_a_zero_row():
    j = np.array([[1.0, -5.0], [2.0, 0.0], [30.0, 1.0], [0.0, 0.0]])
    direction, weights = lossbalance.aggregate_with_weights(
        {"name": "trimmed_mean", "trim_number": 1}, j)
    np.testing.assert_allclose(direction.numpy(), [1.5, 0.0])  # (1 + 2) / 2, (0 + 0) / 2
    # Row 0 keeps 1 of 26 (1^2 of 1 + 25), row 1 all of 4, row 2 nothing; the zero row
    # keeps one of its two coordinates' values.
    np.testing.assert_allclose(weights.numpy(), [1 / 26 / 2, 1 / 2, 0.0, 0.5 / 2])


def test_trimmed_mean_refuses_too_few_tasks_when_bound():
    with pytest.raises(ValueError, match=r"at least 5 tasks.*model has 4.*at most 1"):
        strategies.get("trimmed_mean", trim_number=2).bind(list("abcd"))
    with pytest.raises(ValueError, match=r"at least 3 tasks.*model has 2.*at most 0"):
        strategies.get("trimmed_mean").bind(["a", "b"])
    strategies.get("trimmed_mean", trim_number=0).bind(["a", "b"])  # the mean


@pytest.mark.parametrize("factory, error, match", [
    (lambda: strategies.get("krum", n_byzantine=-1), ValueError, "n_byzantine"),
    (lambda: strategies.get("krum", n_byzantine=1.5), TypeError, "n_byzantine"),
    (lambda: strategies.get("krum", n_selected=0), ValueError, "n_selected"),
    (lambda: strategies.get("krum", n_selected=True), TypeError, "n_selected"),
    (lambda: strategies.get("krum", distance="manhattan"), ValueError, "distance"),
    (lambda: strategies.get("trimmed_mean", trim_number=-1), ValueError, "trim_number"),
    (lambda: strategies.get("trimmed_mean", trim_number="1"), TypeError, "trim_number"),
])
def test_invalid_hyper_parameters_fail_at_construction(factory, error, match):
    with pytest.raises(error, match=match):
        factory()


CONFIGS = [("krum", {"n_byzantine": 1, "n_selected": 2, "distance": "euclidean"}),
           ("trimmed_mean", {"trim_number": 2})]


@pytest.mark.parametrize("name, params", [(n, {}) for n in METHODS] + CONFIGS,
                         ids=list(METHODS) + [f"{c[0]}-{i}" for i, c in enumerate(CONFIGS)])
def test_config_round_trip(name, params):
    check_config_round_trip(name, params)


def test_declared_properties():
    """Only what the methods promise: neither is non-conflicting or invariant to the tasks'
    scales; neither reads the losses."""
    for name in METHODS:
        strategy = strategies.get(name)
        assert not strategy.non_conflicting and not strategy.scale_invariant, name
        assert not strategy.uses_losses, name
    assert strategies.get("krum").family == "gramian"
    assert strategies.get("trimmed_mean").family == "jacobian"


# -- through BalancedModel -----------------------------------------------------------------


TRAINED = [("krum", {}), ("krum", {"n_selected": 2}), ("trimmed_mean", {})]


@pytest.mark.parametrize("gradients", ["parameters", "representation"])
@pytest.mark.parametrize("name, params", TRAINED,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(TRAINED)])
def test_quick_start_model_trains_one_epoch(name, params, gradients):
    """With a third task: both methods need three."""
    check_quick_start_trains_one_epoch(name, params, True, gradients)


@pytest.mark.parametrize("name", ["krum", "trimmed_mean"])
def test_two_task_quick_start_is_refused_at_compile(name):
    model = quick_start_model()
    with pytest.raises(ValueError, match=rf"'{name}' needs at least 3 tasks.*"
                                         r"\['label', 'value'\]"):
        model.compile(optimizer="adam", loss=quick_start_losses(), strategy=name)


@pytest.mark.parametrize("name, params", [("krum", {}), ("trimmed_mean", {}),
                                          ("krum", {"n_selected": 2})])
def test_training_step_applies_the_definition(name, params):
    """Three tasks on scales 1 to 1e4 apart, parameter level: the trunk's update in the
    step is the definition's, on the tasks' float32 trunk gradients."""
    x, y = quick_start_data(extra_task=True)
    x, y = x[:32], {k: v[:32] for k, v in y.items()}
    y["value"] = y["value"] * 100.0
    model = quick_start_model(extra_task=True)
    losses = {"label": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              "value": keras.losses.MeanSquaredError(),
              "other": keras.losses.MeanSquaredError()}
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=losses,
                  strategy=strategies.get(name, **params))
    records = record_applied_gradients(model)
    model.train_on_batch(x, y)
    trunk = model.get_layer("trunk")
    with tf.GradientTape(persistent=True) as tape:
        outputs = model(x, training=True)
        task_losses = [losses[t](y[t], outputs[t]) for t in model.output_names]
    variables = [v.value for v in trunk.trainable_variables]
    rows = np.stack([np.concatenate([g.numpy().ravel()
                                     for g in tape.gradient(loss, variables)])
                     for loss in task_losses]).astype(np.float64)
    assert list(model.output_names) == list(model.strategy.task_names)
    expected = (rows.T @ definitions.krum(rows, **params) if name == "krum"
                else definitions.trimmed_mean(rows, **params))
    positions = [i for i, v in enumerate(model.trainable_variables)
                 if any(v is t for t in trunk.trainable_variables)]
    got = np.concatenate([records[i].numpy().ravel() for i in positions])
    assert relative_error(got, expected) < 1e-5
