"""Scalarisations: the model minimises one function S(L_1..L_K) of the task losses, through
weights w_k = dS/dL_k held constant. Along a preference: PBI and COSMOS; of the log losses:
GLS (their geometric mean), SI (the sum of their logs) and STCH (a smooth maximum).

PBI's and COSMOS' weights against float64 formulas written here in NumPy from the papers
(and those formulas' gradients against finite differences of the objective), on float32
losses from 1e-8 to 1e8; GLS', SI's and STCH's gradients against their closed forms; the
logged objective equals the scalarisation; the properties each method promises; training
(the README's quick start model, the two-head model), state saved and compiled with XLA;
errors and configs.
"""

import itertools
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import check_config_round_trip
from loss_helpers import (bound, check_quick_start_trains_one_epoch,
                          check_save_load_keeps_the_state,
                          check_scale_dependence_is_declared, check_trains_a_two_head_model,
                          direction, loss_vectors, objective, step)
from quick_start import quick_start_data, quick_start_losses, quick_start_model

from lossbalance import strategies

EPS32 = np.finfo(np.float32).eps


# -- float64 definitions -------------------------------------------------------------------


def pbi_value(losses, normalizer, preference, theta=5.0, reference=0.0):
    scaled = (losses - reference) / normalizer
    u = preference / np.linalg.norm(preference)
    d1 = u @ scaled
    return d1 + theta * np.linalg.norm(scaled - d1 * u)


def pbi_weights(losses, normalizer, preference, theta=5.0, reference=0.0):
    scaled = (losses - reference) / normalizer
    u = preference / np.linalg.norm(preference)
    d1 = u @ scaled
    across = scaled - d1 * u
    d2 = np.linalg.norm(across)
    on_ray = d2 <= len(losses) * EPS32 * np.linalg.norm(scaled)
    slope = u if on_ray else u + theta * across / d2
    return slope / normalizer


def cosmos_value(losses, normalizer, preference, lamda=2.0):
    scaled = losses / normalizer
    r = preference / preference.sum()
    cosine = r @ scaled / (np.linalg.norm(r) * np.linalg.norm(scaled))
    return r @ scaled - lamda * cosine


def cosmos_weights(losses, normalizer, preference, lamda=2.0):
    scaled = losses / normalizer
    r = preference / preference.sum()
    size, ray = np.linalg.norm(scaled), np.linalg.norm(r)
    cosine = r @ scaled / (ray * size)
    slope = r - lamda * (r / (ray * size) - cosine * scaled / size**2)
    return slope / normalizer


def numerical_gradient(function, point, relative=1e-6):
    gradient = np.zeros_like(point)
    for k in range(len(point)):
        h = relative * abs(point[k])
        up, down = point.copy(), point.copy()
        up[k] += h
        down[k] -= h
        gradient[k] = (function(up) - function(down)) / (2 * h)
    return gradient


def test_the_closed_form_gradients_are_those_of_the_objectives():
    """The NumPy weights used as references below are the derivatives of the papers'
    objectives (finite differences in float64), off the preference ray."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        losses = np.exp(rng.uniform(-3, 3, size=4))
        normalizer = np.exp(rng.uniform(-3, 3, size=4))
        preference = rng.uniform(0.1, 2.0, size=4)
        theta, lamda, reference = rng.uniform(0, 10), rng.uniform(0, 10), 0.1 * losses.min()
        np.testing.assert_allclose(
            pbi_weights(losses, normalizer, preference, theta, reference),
            numerical_gradient(lambda L: pbi_value(L, normalizer, preference, theta,
                                                   reference), losses), rtol=1e-5)
        np.testing.assert_allclose(
            cosmos_weights(losses, normalizer, preference, lamda),
            numerical_gradient(lambda L: cosmos_value(L, normalizer, preference, lamda),
                               losses), rtol=1e-5, atol=1e-9)


# -- PBI and COSMOS against the definitions, float32 losses from 1e-8 to 1e8 ---------------


PREFERENCE_CASES = [None, [1.0, 2.0, 0.5], [0.0, 1.0, 3.0]]

#: name: (seed, the penalty's hyper-parameter and the values tried, weights, objective)
DEFINITIONS = {"pbi": (1, "theta", (0.0, 5.0), pbi_weights, pbi_value),
               "cosmos": (2, "lamda", (0.0, 2.0, 10.0), cosmos_weights, cosmos_value)}


@pytest.mark.parametrize("preference", PREFERENCE_CASES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("name", list(DEFINITIONS))
def test_weights_and_objective_equal_the_definition(name, normalize, preference):
    seed, penalty, values, weights_of, value_of = DEFINITIONS[name]
    rng = np.random.default_rng(seed)
    pref = np.ones(3) if preference is None else np.array(preference)
    for first, later in itertools.product(loss_vectors(rng, 3, 4), loss_vectors(rng, 3, 4)):
        for size in values:
            strategy = bound(name, preference=preference, normalize=normalize,
                             **{penalty: size})
            normalizer = first.astype(np.float64) if normalize else np.ones(3)
            for losses in (first, later):
                weights, objective = step(strategy, losses)
                want = weights_of(losses.astype(np.float64), normalizer, pref, size)
                assert np.all(np.isfinite(weights))
                np.testing.assert_allclose(weights, want, rtol=1e-6,
                                           atol=1e-6 * np.abs(want).max())
                value = value_of(losses.astype(np.float64), normalizer, pref, size)
                scale = np.abs(weights * losses).max()
                if name == "cosmos":  # its cosine term is up to lamda
                    scale = max(scale, size)
                assert objective == pytest.approx(value, rel=1e-6, abs=1e-6 * scale)


def test_extreme_losses_through_the_first_step_state():
    """The normaliser is the first step's float32 losses from 1e-8 to 1e8; later steps
    with other extreme losses keep every weight finite and equal to the definition."""
    first = np.array([1e8, 1e-8, 3.0], np.float32)
    later = np.array([2e-8, 5e7, 1e-3], np.float32)
    for name, weights_of in (("pbi", pbi_weights), ("cosmos", cosmos_weights)):
        strategy = bound(name, normalize=True)
        step(strategy, first)
        np.testing.assert_array_equal(strategy.normalizer.numpy(), first)
        weights, _ = step(strategy, later)
        want = weights_of(later.astype(np.float64), first.astype(np.float64), np.ones(3))
        np.testing.assert_allclose(weights, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
        np.testing.assert_array_equal(strategy.normalizer.numpy(), first)  # not moved


# -- what PBI and COSMOS promise -----------------------------------------------------------


def test_pbi_on_the_ray_weighs_each_normalised_loss_by_the_preference():
    """At the first step every normalised loss is 1: on the uniform ray, where d2 has no
    gradient, w_k = u_k / L_k(0), so each task's share w_k L_k is the same; with a
    preference, a point on its ray gets the preference's direction alone."""
    losses = np.array([2.3, 4e4, 1e-3], np.float32)
    weights, objective = step(bound("pbi"), losses)
    np.testing.assert_allclose(weights * losses, 3 ** -0.5, rtol=1e-6)
    assert objective == pytest.approx(3 ** 0.5, rel=1e-6)  # d1 = ||1||, d2 = 0
    preference = np.array([1.0, 2.0, 4.0])
    strategy = bound("pbi", preference=list(preference), normalize=False)
    weights, objective = step(strategy, 0.25 * preference)
    np.testing.assert_allclose(weights, preference / np.linalg.norm(preference), rtol=1e-6)
    assert objective == pytest.approx(0.25 * np.linalg.norm(preference), rel=1e-6)


def test_pbi_pulls_the_losses_back_to_the_ray():
    """Off the ray, the penalty's part of dS/dl is theta times the unit vector from the ray
    to l: the task ahead of the preference (here 'b', whose normalised loss fell most) gets
    the smallest, negative, weight and the one behind the largest."""
    strategy = bound("pbi", theta=5.0)
    step(strategy, [1.0, 1.0, 1.0])
    weights, _ = step(strategy, [0.9, 0.5, 0.8])
    scaled = np.array([0.9, 0.5, 0.8])
    u = np.ones(3) / 3 ** 0.5
    across = scaled - (u @ scaled) * u
    np.testing.assert_allclose(weights - u, 5.0 * across / np.linalg.norm(across),
                               rtol=1e-6)
    assert weights[1] < 0 < weights[2] < weights[0]


def test_pbi_without_penalty_is_the_linear_scalarisation_along_the_preference():
    losses = np.array([0.7, 30.0, 5e3], np.float32)
    strategy = bound("pbi", theta=0.0, preference=[1.0, 3.0, 1.0], normalize=False)
    weights, objective = step(strategy, losses)
    u = np.array([1.0, 3.0, 1.0]) / 11 ** 0.5
    np.testing.assert_allclose(weights, u, rtol=1e-6)
    assert objective == pytest.approx(float(u @ losses), rel=1e-6)


def test_pbi_reference_point_shifts_the_losses_and_is_their_floor():
    strategy = bound("pbi", reference={"b": 0.5}, normalize=False)
    losses = np.array([1.0, 2.5, 3.0], np.float32)
    weights, objective = step(strategy, losses)
    reference = np.array([0.0, 0.5, 0.0])
    np.testing.assert_allclose(weights, pbi_weights(losses.astype(np.float64), np.ones(3),
                                                    np.ones(3), 5.0, reference), rtol=1e-6)
    assert objective == pytest.approx(pbi_value(losses.astype(np.float64), np.ones(3),
                                                np.ones(3), 5.0, reference), rel=1e-6)
    assert strategy.loss_floors() == [0.0, 0.5, 0.0]
    assert not strategy.scale_invariant
    with pytest.raises(ValueError, match=r"'b' averaged 0.25 < 0.5\. .*`reference`"):
        strategy.check_losses({"a": 1.0, "b": 0.25, "c": 1.0}, "in epoch 1")


def test_cosmos_weighted_loss_is_the_linear_term_and_on_the_ray_the_weights_are_r():
    """cos(r, L) does not change along L (0-homogeneous), so sum_k w_k L_k = r . L: the
    cosine term only turns the step. On the ray the cosine is at its maximum, w = r."""
    r = np.array([0.2, 0.3, 0.5])
    strategy = bound("cosmos", lamda=8.0, preference=list(r * 10))
    losses = np.array([0.4, 3.0, 7.0], np.float32)
    weights, objective = step(strategy, losses)
    assert float(weights @ losses) == pytest.approx(float(r @ losses), rel=1e-6)
    cosine = r @ losses / (np.linalg.norm(r) * np.linalg.norm(losses))
    assert objective == pytest.approx(float(r @ losses - 8.0 * cosine), rel=1e-6)
    weights, objective = step(strategy, 1.7 * r)
    np.testing.assert_allclose(weights, r, rtol=1e-6, atol=1e-7)
    assert objective == pytest.approx(1.7 * r @ r - 8.0, rel=1e-6)
    weights, _ = step(bound("cosmos", lamda=0.0), losses)
    np.testing.assert_allclose(weights, 1 / 3, rtol=1e-7)  # linear scalarisation


def test_cosmos_drops_the_undefined_cosine_at_zero_losses():
    weights, objective = step(bound("cosmos"), [0.0, 0.0, 0.0])
    np.testing.assert_allclose(weights, 1 / 3, rtol=1e-7)
    assert objective == 0.0


@pytest.mark.parametrize("name, params", [("pbi", {}), ("pbi", {"theta": 2.0}),
                                          ("cosmos", {"normalize": True}),
                                          ("pbi", {"preference": [1.0, 0.0, 2.0]})])
def test_declared_scale_invariance_holds_after_the_first_step(name, params):
    """Multiplying one task's loss (and gradient) by 1e4 or 1e-4 from the start leaves
    every step's combination of the task gradients (test_scales checks the first)."""
    rng = np.random.default_rng(4)
    history = [np.exp(rng.uniform(-2, 2, size=3)).astype(np.float32) for _ in range(4)]
    for factors in ([1e4, 1.0, 1.0], [1.0, 1e-4, 1.0], [1.0, 1.0, 1e4]):
        factors = np.array(factors, np.float32)
        plain, scaled = bound(name, **params), bound(name, **params)
        assert plain.scale_invariant
        for losses in history:
            np.testing.assert_allclose(direction(scaled, losses, factors),
                                       direction(plain, losses, np.ones(3, np.float32)),
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, params", [("cosmos", {}), ("pbi", {"normalize": False})])
def test_scale_dependence_is_declared(name, params):
    check_scale_dependence_is_declared(name, params)


def test_declarations_follow_the_options():
    assert strategies.get("pbi").scale_invariant
    assert not strategies.get("pbi", reference=[0.0, 1.0]).scale_invariant
    assert strategies.get("pbi", reference={"a": 0.0}).scale_invariant
    assert strategies.get("cosmos", normalize=True).scale_invariant
    for name in ("pbi", "cosmos"):
        assert not strategies.get(name).non_conflicting


# -- GLS, SI and STCH: gradients in closed form --------------------------------------------


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
        strategy = bound(name, tasks="ab")
        w = strategy.loss_weights(losses).numpy() * losses.numpy()
        w_scaled = (strategy.loss_weights(losses * [1.0, 1000.0]).numpy()
                    * losses.numpy() * [1.0, 1000.0])
        # The contribution w_k L_k of each task, hence its share of the step, is unchanged
        # up to one common factor.
        np.testing.assert_allclose(w / w.sum(), w_scaled / w_scaled.sum(), rtol=1e-6)


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
    stch = bound("stch", tasks="ab", mu=0.5, warmup_epochs=1)
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


# -- training ------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["pbi", "cosmos",
                                      {"name": "cosmos", "normalize": True},
                                      {"name": "pbi", "preference": {"value": 2.0}}],
                         ids=["pbi", "cosmos", "cosmos-normalize", "pbi-preference"])
def test_readme_quick_start_trains_one_epoch(strategy):
    check_quick_start_trains_one_epoch(strategy)


def test_logged_loss_is_the_scalarisation(tmp_path):
    """One step of `train_on_batch`: the logged `loss` is PBI's S at the batch's losses
    (normalised by themselves: S = sqrt(K)), the normaliser is recorded, and both survive
    saving and loading."""
    x, y = quick_start_data(64)
    model = quick_start_model()
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=quick_start_losses(),
                  strategy="pbi")
    logs = model.train_on_batch(x, y, return_dict=True)
    assert logs["loss"] == pytest.approx(2 ** 0.5, rel=1e-5)
    normalizer = model.strategy.normalizer.numpy()
    np.testing.assert_allclose(normalizer, [logs["label_loss"], logs["value_loss"]],
                               rtol=1e-5)
    model.save(tmp_path / "pbi.keras")
    loaded = keras.saving.load_model(tmp_path / "pbi.keras")
    assert isinstance(loaded.strategy, strategies.PBI)
    np.testing.assert_array_equal(loaded.strategy.normalizer.numpy(), normalizer)
    assert float(loaded.strategy.started.numpy()) == 1.0
    losses = tf.constant([0.3, 2e3])
    np.testing.assert_allclose(loaded.strategy.loss_weights(losses).numpy(),
                               model.strategy.loss_weights(losses).numpy(), rtol=1e-6)


def test_pbi_state_compiles_with_xla():
    x, y = quick_start_data(64)
    model = quick_start_model()
    model.compile(optimizer="adam", loss=quick_start_losses(), strategy="pbi",
                  jit_compile=True)
    logs = model.fit(x, y, epochs=2, batch_size=32, verbose=0).history
    assert np.all(np.isfinite(logs["loss"]))
    assert float(model.strategy.started.numpy()) == 1.0


FIT_CONFIGS = {"gls": "gls", "scale_invariant": "si",
               "stch": {"name": "stch", "warmup_epochs": 1}}


@pytest.mark.parametrize("name", list(FIT_CONFIGS))
def test_trains_a_two_head_model(name, two_head_data):
    model, _ = check_trains_a_two_head_model(name, FIT_CONFIGS[name], two_head_data)
    if name == "stch":
        assert float(model.strategy.epochs_done.numpy()) == 5
        assert np.all(model.strategy.nadir.numpy() != 1.0)


def test_stch_save_load_keeps_the_strategy_state(two_head_data, tmp_path):
    check_save_load_keeps_the_state("stch", FIT_CONFIGS["stch"], two_head_data,
                                    tmp_path / "stch.keras")


# -- construction errors and configs -------------------------------------------------------


@pytest.mark.parametrize("name, kwargs, error, match", [
    ("pbi", {"theta": -1.0}, ValueError, "`theta` must be >= 0"),
    ("pbi", {"theta": "5"}, TypeError, "`theta` must be a number"),
    ("pbi", {"preference": [0.0, 0.0]}, ValueError, "must have a positive entry"),
    ("pbi", {"preference": 0.0}, ValueError, "must have a positive entry"),
    ("pbi", {"preference": [1.0, -1.0]}, ValueError, r"`preference\[1\]` must be >= 0"),
    ("pbi", {"preference": {"a": float("nan")}}, ValueError, "must be finite"),
    ("pbi", {"normalize": "yes"}, TypeError, "`normalize` must be True or False"),
    ("pbi", {"reference": [0.0, float("inf")]}, ValueError, "must be finite"),
    ("pbi", {"reference": "zero"}, TypeError, "`reference` must be a number"),
    ("pbi", {"lamda": 1.0}, TypeError, "unknown hyper-parameter"),
    ("cosmos", {"lamda": -0.5}, ValueError, "`lamda` must be >= 0"),
    ("cosmos", {"preference": [0.0, 0.0, 0.0]}, ValueError, "positive entry"),
    ("cosmos", {"normalize": 1}, TypeError, "True or False"),
    ("cosmos", {"reference": 0.1}, TypeError, "unknown hyper-parameter"),
    ("gls", {"epsilon": 0.0}, ValueError, None),
    ("si", {"epsilon": float("nan")}, ValueError, None),
    ("stch", {"mu": 0.0}, ValueError, None),
    ("stch", {"warmup_epochs": -1}, ValueError, None),
    ("stch", {"warmup_epochs": 1.5}, TypeError, None),
    ("stch", {"normalize": "yes"}, TypeError, None),
])
def test_bad_hyper_parameters_raise_at_construction(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        strategies.get(name, **kwargs)


def test_per_task_settings_are_checked_against_the_tasks_at_bind():
    with pytest.raises(ValueError, match="unknown task"):
        bound("pbi", preference={"nope": 1.0})
    with pytest.raises(ValueError, match="has 2 entries but the model has 3 tasks"):
        bound("cosmos", preference=[1.0, 2.0])
    with pytest.raises(ValueError, match="gives every task weight 0"):
        bound("pbi", tasks=("a",), preference={"a": 0.0})
    with pytest.raises(ValueError, match="unknown task"):
        bound("pbi", reference={"z": 0.0})


@pytest.mark.parametrize("name, kwargs", [
    ("pbi", {}),
    ("pbi", {"theta": 2.5, "preference": {"a": 2.0}, "normalize": False,
             "reference": [0.0, 0.1, 0.2]}),
    ("cosmos", {"lamda": 8.0, "preference": [1.0, 2.0, 3.0], "normalize": True}),
    ("gls", {"epsilon": 1e-9}),
    ("si", {}),
    ("stch", {"mu": 0.2, "warmup_epochs": 2, "normalize": False, "log_losses": False}),
])
def test_config_round_trip(name, kwargs):
    config = check_config_round_trip(name, kwargs)
    if name in ("pbi", "cosmos"):  # and the settings given are kept under their names
        for key, value in kwargs.items():
            assert config[key] == value
