"""Loss-level scalarisations along a preference (PBI, COSMOS) and UW-SO.

Each strategy's weights against float64 formulas written here in NumPy from the papers
(and those formulas' gradients against finite differences of the objective), on float32
losses from 1e-8 to 1e8; the logged objective equals the scalarisation; the properties each
method promises; the README quick-start model trained one epoch; errors, configs, floors.
"""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

import lossbalance
from lossbalance import strategies

NAMES = ["pbi", "cosmos", "uw_so"]
EPS32 = np.finfo(np.float32).eps


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


# -- float64 definitions --------------------------------------------------------------------


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


def uw_so_weights(losses, temperature=1.0):
    exponents = 1.0 / (temperature * losses)
    e = np.exp(exponents - exponents.max())
    return e / e.sum()


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


# -- weights against the definitions, float32 losses from 1e-8 to 1e8 ----------------------


def loss_vectors(rng, k, count=12):
    """Float32 loss vectors whose entries span up to 1e-8 .. 1e8, some nearly equal."""
    vectors = [np.array([1e8, 1e-8, 3.0][:k] + [1.0] * max(k - 3, 0))]
    for _ in range(count):
        exponent = rng.uniform(-8, 8, size=k)
        if rng.uniform() < 0.3:
            exponent[1:] = exponent[0] + 1e-6 * rng.normal(size=k - 1)  # nearly equal
        vectors.append(10.0 ** exponent)
    return [v.astype(np.float32) for v in vectors]


PREFERENCE_CASES = [None, [1.0, 2.0, 0.5], [0.0, 1.0, 3.0]]


@pytest.mark.parametrize("preference", PREFERENCE_CASES)
@pytest.mark.parametrize("normalize", [True, False])
def test_pbi_weights_and_objective_equal_the_definition(preference, normalize):
    rng = np.random.default_rng(1)
    pref = np.ones(3) if preference is None else np.array(preference)
    for first, later in itertools.product(loss_vectors(rng, 3, 4), loss_vectors(rng, 3, 4)):
        for theta in (0.0, 5.0):
            strategy = bound("pbi", theta=theta, preference=preference, normalize=normalize)
            normalizer = first.astype(np.float64) if normalize else np.ones(3)
            for losses in (first, later):
                weights, objective = step(strategy, losses)
                want = pbi_weights(losses.astype(np.float64), normalizer, pref, theta)
                assert np.all(np.isfinite(weights))
                np.testing.assert_allclose(weights, want, rtol=1e-6,
                                           atol=1e-6 * np.abs(want).max())
                value = pbi_value(losses.astype(np.float64), normalizer, pref, theta)
                assert objective == pytest.approx(value, rel=1e-6, abs=1e-6 * abs(
                    weights * losses).max())


@pytest.mark.parametrize("preference", PREFERENCE_CASES)
@pytest.mark.parametrize("normalize", [False, True])
def test_cosmos_weights_and_objective_equal_the_definition(preference, normalize):
    rng = np.random.default_rng(2)
    pref = np.ones(3) if preference is None else np.array(preference)
    for first, later in itertools.product(loss_vectors(rng, 3, 4), loss_vectors(rng, 3, 4)):
        for lamda in (0.0, 2.0, 10.0):
            strategy = bound("cosmos", lamda=lamda, preference=preference,
                             normalize=normalize)
            normalizer = first.astype(np.float64) if normalize else np.ones(3)
            for losses in (first, later):
                weights, objective = step(strategy, losses)
                want = cosmos_weights(losses.astype(np.float64), normalizer, pref, lamda)
                assert np.all(np.isfinite(weights))
                np.testing.assert_allclose(weights, want, rtol=1e-6,
                                           atol=1e-6 * np.abs(want).max())
                value = cosmos_value(losses.astype(np.float64), normalizer, pref, lamda)
                assert objective == pytest.approx(value, rel=1e-6, abs=1e-6 * max(
                    np.abs(weights * losses).max(), lamda))


@pytest.mark.parametrize("temperature", [1.0, 0.05, 20.0, 1e6, 1e-6])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_uw_so_weights_equal_the_definition(temperature, k):
    """Including exponents 1 / (T L_k) up to 1e14: the float64 softmax keeps the weights
    equal to the formula where a float32 one would not."""
    rng = np.random.default_rng(3)
    strategy = bound("uw_so", tasks=[f"t{i}" for i in range(k)], temperature=temperature)
    for losses in loss_vectors(rng, k, 16):
        weights, objective = step(strategy, losses)
        want = uw_so_weights(losses.astype(np.float64), temperature)
        assert np.all(np.isfinite(weights))
        np.testing.assert_allclose(weights, want, rtol=1e-6, atol=1e-30)
        assert weights.sum() == pytest.approx(1.0, rel=1e-6)
        assert objective == pytest.approx(float(want @ losses), rel=1e-6)


def test_uw_so_needs_float64_for_nearly_equal_small_losses():
    """Losses ~1e-8 apart by 1e-6 relative at T = 1e6: exponents ~100 whose differences
    decide the weights; the result equals the float64 formula to float32's precision."""
    losses = np.array([1e-8, 1.000001e-8, 1.000003e-8], np.float32)
    weights, _ = step(bound("uw_so", T=1e6), losses)
    want = uw_so_weights(losses.astype(np.float64), 1e6)
    np.testing.assert_allclose(weights, want, rtol=1e-6)
    assert weights[0] > weights[1] > weights[2]


def test_uw_so_weights_sum_to_k_on_request_and_follow_the_authors_formula():
    losses = np.array([0.3, 2.0, 40.0], np.float32)
    one, _ = step(bound("uw_so", temperature=2.0), losses)
    k, _ = step(bound("uw_so", temperature=2.0, weights_sum="num_tasks"), losses)
    np.testing.assert_allclose(k, 3 * one, rtol=1e-7)
    # the authors' code: softmax(1 / (L + 1e-8) / T); the same for losses far above 1e-8
    authors = np.exp(1 / (losses.astype(np.float64) + 1e-8) / 2.0)
    np.testing.assert_allclose(one, authors / authors.sum(), rtol=1e-6)
    assert one[0] > one[1] > one[2]  # the smallest loss weighs most


def test_uw_so_temperature_moves_from_one_hot_to_equal():
    losses = np.array([0.5, 1.0, 4.0], np.float32)
    hot, _ = step(bound("uw_so", temperature=1e-3), losses)
    np.testing.assert_allclose(hot, [1.0, 0.0, 0.0], atol=1e-12)
    flat, _ = step(bound("uw_so", temperature=1e6), losses)
    np.testing.assert_allclose(flat, 1 / 3, rtol=1e-5)


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


# -- what each method promises ------------------------------------------------------------


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


def direction(strategy, losses, factors):
    """The weights' direction in gradient space, sum_k w_k c_k g_k, up to the g_k: the
    vector (w_k c_k) for losses c_k L_k, normalised."""
    weights, _ = step(strategy, losses * factors)
    combined = weights * factors
    return combined / np.linalg.norm(combined)


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


@pytest.mark.parametrize("name, params", [("cosmos", {}), ("uw_so", {}),
                                          ("pbi", {"normalize": False})])
def test_scale_dependence_is_declared(name, params):
    """Not declared scale-invariant, and indeed not: scaling one loss turns the step."""
    assert not strategies.get(name, **params).scale_invariant
    losses = np.array([0.5, 2.0, 1.0], np.float32)
    factors = np.array([1.0, 1e3, 1.0], np.float32)
    a = direction(bound(name, **params), losses, np.ones(3, np.float32))
    b = direction(bound(name, **params), losses, factors)
    assert a @ b < 0.999


def test_declarations_follow_the_options():
    assert strategies.get("pbi").scale_invariant
    assert not strategies.get("pbi", reference=[0.0, 1.0]).scale_invariant
    assert strategies.get("pbi", reference={"a": 0.0}).scale_invariant
    assert strategies.get("cosmos", normalize=True).scale_invariant
    assert not strategies.get("uw_so").scale_invariant
    for name in NAMES:
        assert not strategies.get(name).non_conflicting


# -- training -----------------------------------------------------------------------------


def quick_start_data(n=128):
    """The README quick start's data and model (fewer samples)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 16)).astype("float32")
    y = {"label": (x[:, 0] > 0).astype("int64"),
         "value": (100 * x[:, 1:2] + 50).astype("float32")}
    return x, y


def quick_start_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    h = keras.layers.Dense(32, activation="relu", name="trunk")(inputs)
    return lossbalance.BalancedModel(inputs, {
        "label": keras.layers.Dense(2, name="label")(h),
        "value": keras.layers.Dense(1, name="value")(h),
    })


QUICK_START_LOSS = {"label": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    "value": "mse"}


@pytest.mark.parametrize("strategy", ["pbi", "cosmos", "uw_so",
                                      {"name": "cosmos", "normalize": True},
                                      {"name": "pbi", "preference": {"value": 2.0}}],
                         ids=["pbi", "cosmos", "uw_so", "cosmos-normalize", "pbi-preference"])
def test_readme_quick_start_trains_one_epoch(strategy):
    x, y = quick_start_data()
    model = quick_start_model()
    model.compile(optimizer="adam", loss=QUICK_START_LOSS, metrics={"label": ["accuracy"]},
                  strategy=strategy)
    logs = model.fit(x, y, epochs=1, batch_size=64, verbose=0).history
    for key in ("loss", "label_loss", "value_loss", "label_weight", "value_weight"):
        assert np.all(np.isfinite(logs[key])), (key, logs[key])
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    if model.strategy.registry_name == "uw_so":
        assert logs["label_weight"][0] + logs["value_weight"][0] == pytest.approx(1.0)


def test_logged_loss_is_the_scalarisation(tmp_path):
    """One step of `train_on_batch`: the logged `loss` is PBI's S at the batch's losses
    (normalised by themselves: S = sqrt(K)), the normaliser is recorded, and both survive
    saving and loading."""
    x, y = quick_start_data(64)
    model = quick_start_model()
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=QUICK_START_LOSS,
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


# -- construction errors, configs, floors ---------------------------------------------------


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
    ("uw_so", {"temperature": 0.0}, ValueError, "`temperature` must be > 0"),
    ("uw_so", {"T": -2.0}, ValueError, "`temperature` must be > 0"),
    ("uw_so", {"temperature": None}, TypeError, "must be a number"),
    ("uw_so", {"weights_sum": "k"}, ValueError, "`weights_sum` must be one of"),
    ("uw_so", {"epsilon": 0.0}, ValueError, "`epsilon` must be > 0"),
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
    ("uw_so", {"T": 5.0, "weights_sum": "num_tasks", "epsilon": 1e-12}),
])
def test_config_round_trip(name, kwargs):
    strategy = strategies.get(name, **kwargs)
    config = strategy.get_config()
    clone = type(strategy).from_config(config)
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(strategy)
    assert keras.saving.deserialize_keras_object(serialized).get_config() == config
    for key, value in kwargs.items():
        assert config["temperature" if key == "T" else key] == value


@pytest.mark.parametrize("name", NAMES)
def test_negative_losses_are_below_the_floor(name):
    strategy = bound(name)
    assert strategy.loss_floors() == [0.0, 0.0, 0.0]
    strategy.check_losses({"a": 0.0, "b": 2.0, "c": 1e-9}, "in epoch 1")
    with pytest.raises(ValueError, match=r"'c' averaged -0.5 < 0\. "):
        strategy.check_losses({"a": 1.0, "b": 2.0, "c": -0.5}, "after the first batch")


def test_pbi_state_compiles_with_xla():
    x, y = quick_start_data(64)
    model = quick_start_model()
    model.compile(optimizer="adam", loss=QUICK_START_LOSS, strategy="pbi", jit_compile=True)
    logs = model.fit(x, y, epochs=2, batch_size=32, verbose=0).history
    assert np.all(np.isfinite(logs["loss"]))
    assert float(model.strategy.started.numpy()) == 1.0
