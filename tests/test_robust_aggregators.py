"""TorchJD's robust and constant aggregators (Krum, TrimmedMean, Constant), LibMTL's RGW
(the `random` strategy under a second name) and CR-MOGM's moving average of weights:
against float64 evaluations of their definitions (`tests/definitions.py`), their
hyper-parameter checks, configs, saved state, and a training epoch of the README's quick
start model."""

import itertools

import definitions
import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats
from conftest import record_applied_gradients
from test_scales import KINDS, RATIOS, scaled_jacobian

import lossbalance
from lossbalance import strategies
from lossbalance.strategies.registry import lookup

METHODS = ("krum", "trimmed_mean", "constant", "crmogm")


def _weights_and_direction(strategy, jacobian, losses=None):
    direction, weights = lossbalance.aggregate_with_weights(strategy, jacobian, losses)
    return weights.numpy().astype(np.float64), direction.numpy().astype(np.float64)


def _relative_error(got, expected):
    return np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-300)


# -- RGW is `random` -----------------------------------------------------------------------


def test_rgw_is_the_random_strategy_and_draws_the_same_weights():
    """LibMTL's RGW: softmax(randn(K)) per step on the task gradients, `random`'s
    definition; one class, and from one seed one sequence of weights."""
    assert lookup("rgw") is lookup("RGW") is strategies.RandomWeights
    assert strategies.aliases()["rgw"] == "random"
    rgw, random = strategies.get("rgw", seed=7), strategies.get("random", seed=7)
    gramian = tf.eye(4, dtype=tf.float64)
    for strategy in (rgw, random):
        strategy.bind(["a", "b", "c", "d"])
    for _ in range(5):
        a = rgw.gramian_weights(gramian, tf.ones(4)).numpy()
        b = random.gramian_weights(gramian, tf.ones(4)).numpy()
        np.testing.assert_array_equal(a, b)
        assert np.all(a > 0) and abs(a.sum() - 1) < 1e-6  # a float32 softmax
    assert rgw.get_config() == {**random.get_config(), "name": rgw.name}


def test_rgw_weights_are_a_softmax_of_a_standard_normal_draw():
    """The weights' distribution is LibMTL's: w = softmax(z), z ~ N(0, I_K). The centred
    log-weights log w - mean(log w) = z - mean(z) are then normal with covariance
    I - 1 1^T / K; and each weight has the distribution of numpy's softmax(randn(K))."""
    k, n = 3, 3000
    strategy = strategies.get("rgw", seed=11)
    strategy.bind(["a", "b", "c"])
    draw = tf.function(strategy.gramian_weights, autograph=False)
    gramian, losses = tf.eye(k, dtype=tf.float64), tf.ones(k)
    w = np.stack([draw(gramian, losses).numpy() for _ in range(n)])
    centred = np.log(w) - np.log(w).mean(axis=1, keepdims=True)
    covariance = np.eye(k) - 1.0 / k
    np.testing.assert_allclose(np.cov(centred.T), covariance, atol=0.08)
    for i in range(k):
        assert stats.kstest(centred[:, i], "norm", args=(0, np.sqrt(covariance[i, i]))
                            ).pvalue > 1e-3
    z = np.random.default_rng(0).standard_normal((n, k))
    libmtl = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)  # F.softmax(torch.randn(K))
    for i in range(k):
        assert stats.ks_2samp(w[:, i], libmtl[:, i]).pvalue > 1e-3


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
        weights, direction = _weights_and_direction(strategies.get("krum", **params),
                                                    jacobian)
        np.testing.assert_array_equal(weights > 0, expected > 0,
                                      err_msg=str((k, ratio, kind)))
        np.testing.assert_allclose(weights, expected, rtol=1e-7)  # 1/m in float32
        assert _relative_error(direction, rows.T @ expected) < 1e-6, (k, ratio, kind)


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
            weights, direction = _weights_and_direction(strategy, jacobian)
            expected = definitions.trimmed_mean(rows, t)
            assert _relative_error(direction, expected) < 1e-6, (k, ratio, kind, t)
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


# -- Constant ------------------------------------------------------------------------------


def test_constant_weights_by_list_dict_and_default():
    rng = np.random.default_rng(3)
    j = rng.normal(size=(3, 5))
    for spec, expected in [({}, [1.0, 1.0, 1.0]),
                           ({"weights": [0.5, -2.0, 3.0]}, [0.5, -2.0, 3.0]),
                           ({"weights": {"task_1": 4.0}}, [1.0, 4.0, 1.0])]:
        weights, direction = _weights_and_direction({"name": "constant", **spec}, j)
        np.testing.assert_array_equal(weights, expected)
        np.testing.assert_allclose(direction, j.T @ np.array(expected), rtol=1e-12)


def test_constant_weights_that_do_not_fit_the_tasks_are_refused_at_bind():
    with pytest.raises(ValueError, match="3 entries but the model has 2"):
        strategies.get("constant", weights=[1.0, 2.0, 3.0]).bind(["a", "b"])
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['c'\]"):
        strategies.get("constant", weights={"c": 1.0}).bind(["a", "b"])


# -- CR-MOGM -------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.9, 0.5, 0.0, 1.0])
def test_crmogm_is_a_moving_average_of_mgdas_weights(alpha):
    """w_1 = w(G_1), w_t = alpha w_{t-1} + (1 - alpha) w(G_t), with w MGDA's float64
    definition on each step's float32 rows, scales 1 to 1e4 apart."""
    rng = np.random.default_rng(4)
    strategy = strategies.get("crmogm", alpha=alpha)
    average = None
    for step, ratio in enumerate((1.0, 1e2, 1e4, 1.0, 1e2)):
        jacobian = scaled_jacobian(rng, 3, ratio)
        rows = jacobian.astype(np.float64)
        fresh = definitions.mgda(rows)
        average = fresh if average is None else alpha * average + (1 - alpha) * fresh
        weights, direction = _weights_and_direction(strategy, jacobian)
        np.testing.assert_allclose(weights, average, rtol=1e-6, atol=1e-9, err_msg=step)
        assert _relative_error(direction, rows.T @ average) < 1e-6, step
    assert int(strategy.step.numpy()) == 5
    np.testing.assert_allclose(strategy.average.numpy(), average, rtol=1e-6, atol=1e-9)


def test_crmogm_wraps_any_gramian_weighting_by_name_config_or_instance():
    j = np.random.default_rng(5).normal(size=(4, 6))
    for base in ("imtl_g", {"name": "cagrad", "c": 0.5}, strategies.Krum(n_selected=2),
                 {"name": "krum", "n_byzantine": 1}):
        spec = {"name": "crmogm", "base": base}
        first = lossbalance.task_weights(spec, j).numpy()  # a fresh average: w(G_1)
        bare = strategies.get(base) if not isinstance(base, strategies.Strategy) else \
            strategies.Krum(n_selected=2)
        # (the wrapper compiles a stateless base's solver with XLA, as the model does)
        np.testing.assert_allclose(first, lossbalance.task_weights(bare, j).numpy(),
                                   rtol=1e-7, atol=1e-12)
    strategy = strategies.get("crmogm", base={"name": "cagrad", "c": 0.5}, alpha=0.7)
    assert strategy.base.c == 0.5 and strategy.alpha == 0.7
    with pytest.raises(ValueError, match="at least 4 tasks"):  # the base's own check
        strategies.get("crmogm", base={"name": "krum", "n_byzantine": 1}).bind(list("abc"))


def test_crmogm_passes_the_base_strategys_needs_through():
    mgda_loss = strategies.get("crmogm", base={"name": "mgda", "normalization": "loss"})
    assert mgda_loss.uses_losses and not strategies.get("crmogm").uses_losses
    assert strategies.get("crmogm").gradient_levels == \
        strategies.get("mgda").gradient_levels
    imtl = strategies.get("crmogm", base="imtl")
    imtl.bind(["a", "b"])
    assert imtl.loss_floors() == imtl.base.loss_floors() == [0.0, 0.0]
    losses = tf.constant([2.0, 3.0])
    np.testing.assert_allclose(imtl.transform_losses(losses).numpy(),
                               imtl.base.transform_losses(losses).numpy())
    for name in ("crmogm",):
        strategy = strategies.get(name)
        assert not strategy.non_conflicting and not strategy.scale_invariant


@pytest.mark.parametrize("factory, error, match", [
    (lambda: strategies.get("krum", n_byzantine=-1), ValueError, "n_byzantine"),
    (lambda: strategies.get("krum", n_byzantine=1.5), TypeError, "n_byzantine"),
    (lambda: strategies.get("krum", n_selected=0), ValueError, "n_selected"),
    (lambda: strategies.get("krum", n_selected=True), TypeError, "n_selected"),
    (lambda: strategies.get("krum", distance="manhattan"), ValueError, "distance"),
    (lambda: strategies.get("trimmed_mean", trim_number=-1), ValueError, "trim_number"),
    (lambda: strategies.get("trimmed_mean", trim_number="1"), TypeError, "trim_number"),
    (lambda: strategies.get("constant", weights=[1.0, float("nan")]), ValueError, "finite"),
    (lambda: strategies.get("constant", weights="equal"), TypeError, "list"),
    (lambda: strategies.get("constant", weights={"a": "x"}), TypeError, "number"),
    (lambda: strategies.get("crmogm", alpha=1.5), ValueError, "alpha"),
    (lambda: strategies.get("crmogm", alpha=-0.1), ValueError, "alpha"),
    (lambda: strategies.get("crmogm", base="graddrop"), ValueError, "Gramian weighting"),
    (lambda: strategies.get("crmogm", base="fixed"), ValueError, "Gramian weighting"),
    (lambda: strategies.get("crmogm", base="no_such"), ValueError, "Unknown strategy"),
    (lambda: strategies.get("crmogm", base={"name": "cagrad", "c": -1}), ValueError, "c"),
    (lambda: strategies.get("crmogm", beta=0.5), TypeError, "alpha"),
])
def test_invalid_hyper_parameters_fail_at_construction(factory, error, match):
    with pytest.raises(error, match=match):
        factory()


CONFIGS = [("krum", {"n_byzantine": 1, "n_selected": 2, "distance": "euclidean"}),
           ("trimmed_mean", {"trim_number": 2}), ("constant", {"weights": [1.0, -0.5]}),
           ("constant", {"weights": {"a": 2.0}}),
           ("crmogm", {"base": {"name": "cagrad", "c": 0.5}, "alpha": 0.5}),
           ("crmogm", {"base": {"name": "crmogm", "base": "upgrad"}})]


@pytest.mark.parametrize("name, params", [(n, {}) for n in METHODS] + CONFIGS,
                         ids=list(METHODS) + [f"{c[0]}-{i}" for i, c in enumerate(CONFIGS)])
def test_config_round_trip(name, params):
    strategy = strategies.get(name, **params)
    config = strategy.get_config()
    clone = strategies.get({**{k: v for k, v in config.items() if k != "name"},
                            "name": name})
    assert type(clone) is type(strategy) and clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(strategy)
    assert strategies.get(serialized).get_config() == config


def test_declared_properties():
    """Only what the methods promise: none of them is non-conflicting or invariant to the
    tasks' scales; all read no losses by default."""
    for name in METHODS + ("rgw",):
        strategy = strategies.get(name)
        assert not strategy.non_conflicting and not strategy.scale_invariant, name
        assert not strategy.uses_losses, name
    assert strategies.get("krum").family == "gramian"
    assert strategies.get("trimmed_mean").family == "jacobian"


# -- through BalancedModel -----------------------------------------------------------------


def _quick_start_data(extra_task=False):
    """The README quick start's data; with `extra_task`, a third task (a second
    regression) for the strategies that need three."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 16)).astype("float32")
    y = {"label": (x[:, 0] > 0).astype("int64"),
         "value": (100 * x[:, 1:2] + 50).astype("float32")}
    if extra_task:
        y["other"] = (x[:, 2:3] - x[:, 3:4]).astype("float32")
    return x, y


def _quick_start_model(extra_task=False, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16,))
    h = keras.layers.Dense(32, activation="relu", name="trunk")(inputs)
    outputs = {"label": keras.layers.Dense(2, name="label")(h),
               "value": keras.layers.Dense(1, name="value")(h)}
    if extra_task:
        outputs["other"] = keras.layers.Dense(1, name="other")(h)
    return lossbalance.BalancedModel(inputs, outputs)


def _quick_start_losses(extra_task=False):
    losses = {"label": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              "value": "mse"}
    if extra_task:
        losses["other"] = "mse"
    return losses


TRAINED = [("rgw", {}, False), ("constant", {"weights": [1.0, 0.01]}, False),
           ("crmogm", {}, False), ("crmogm", {"base": "nash_mtl"}, False),
           ("krum", {}, True), ("krum", {"n_selected": 2}, True),
           ("trimmed_mean", {}, True)]


@pytest.mark.parametrize("gradients", ["parameters", "representation"])
@pytest.mark.parametrize("name, params, extra_task", TRAINED,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(TRAINED)])
def test_quick_start_model_trains_one_epoch(name, params, extra_task, gradients):
    """The README's quick start model (with a third task for Krum and the trimmed mean,
    which need three), one epoch at each gradient level: finite losses and weights."""
    strategy = strategies.get(name, **params)
    if gradients not in strategy.gradient_levels:
        pytest.skip(f"{name} is not defined at the {gradients} level")
    x, y = _quick_start_data(extra_task)
    model = _quick_start_model(extra_task)
    model.compile(optimizer="adam", loss=_quick_start_losses(extra_task),
                  metrics={"label": ["accuracy"]}, strategy=strategy, gradients=gradients)
    assert model.gradient_level == gradients
    history = model.fit(x, y, epochs=1, batch_size=64, verbose=0).history
    for key, values in history.items():
        assert np.all(np.isfinite(values)), (key, values)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


@pytest.mark.parametrize("name", ["krum", "trimmed_mean"])
def test_two_task_quick_start_is_refused_at_compile(name):
    model = _quick_start_model()
    with pytest.raises(ValueError, match=rf"'{name}' needs at least 3 tasks.*"
                                         r"\['label', 'value'\]"):
        model.compile(optimizer="adam", loss=_quick_start_losses(), strategy=name)


@pytest.mark.parametrize("name, params", [("krum", {}), ("trimmed_mean", {}),
                                          ("krum", {"n_selected": 2})])
def test_training_step_applies_the_definition(name, params):
    """Three tasks on scales 1 to 1e4 apart, parameter level: the trunk's update in the
    step is the definition's, on the tasks' float32 trunk gradients."""
    x, y = _quick_start_data(extra_task=True)
    x, y = x[:32], {k: v[:32] for k, v in y.items()}
    y["value"] = y["value"] * 100.0
    model = _quick_start_model(extra_task=True)
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
    assert _relative_error(got, expected) < 1e-5


def test_crmogm_state_is_saved_with_the_model(tmp_path):
    """The average, its step and the base strategy's own state (Nash-MTL's cache) come
    back with a saved model, which continues the average."""
    x, y = _quick_start_data()
    model = _quick_start_model()
    model.compile(optimizer="adam", loss=_quick_start_losses(),
                  strategy={"name": "crmogm", "base": "nash_mtl", "alpha": 0.8})
    model.fit(x, y, epochs=1, batch_size=128, verbose=0)
    strategy = model.strategy
    assert int(strategy.step.numpy()) == 4 and int(strategy.base.step.numpy()) == 4
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.strategy.get_config() == strategy.get_config()
    for a, b in ((strategy.average, loaded.strategy.average),
                 (strategy.step, loaded.strategy.step),
                 (strategy.base.cached_weights, loaded.strategy.base.cached_weights),
                 (strategy.base.step, loaded.strategy.base.step)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    loaded.fit(x, y, epochs=1, batch_size=128, verbose=0)
    assert int(loaded.strategy.step.numpy()) == 8
