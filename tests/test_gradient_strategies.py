"""The gradient-combination catalogue: reference values, properties over random Jacobians,
the low-level API, and training inside `fit` with XLA."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import lossbalance
from lossbalance import strategies
from conftest import TWO_HEAD_LOSS, make_trunk_model

GRADIENT_METHODS = [
    "mgda", "cagrad", "imtl_g", "imtl", "gradvac", "graddrop", "nash_mtl", "aligned_mtl",
    "upgrad", "dualproj", "config", "fairgrad", "moco", "db_mtl", "excess_mtl", "mean",
    "sum", "random",
]

J = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])

REFERENCES = [
    ("upgrad", {}, [0.2929, 1.9004, 1.9004]),
    ("dualproj", {}, [0.5563, 1.1109, 1.1109]),
    ("mgda", {}, [0.0, 1.0, 1.0]),
    ("imtl_g", {}, [0.0767, 1.0, 1.0]),
    ("aligned_mtl", {"preference": "mean", "scale_mode": "min"}, [0.2133, 0.9673, 0.9673]),
    ("config", {}, [0.1588, 2.0706, 2.0706]),
    ("cagrad", {"c": 0.5, "rescale": False}, [0.1835, 1.2041, 1.2041]),
    ("nash_mtl", {}, [0.0542, 0.7061, 0.7061]),
    ("fairgrad", {"alpha": 1.0}, [0.0766, 0.9985, 0.9985]),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name, params, expected", REFERENCES,
                         ids=[r[0] for r in REFERENCES])
def test_reference_values(name, params, expected, dtype):
    direction = lossbalance.aggregate({"name": name, **params}, J.astype(dtype))
    assert direction.dtype == dtype
    np.testing.assert_allclose(direction.numpy(), expected, atol=5e-5)


def test_registry_lists_every_method():
    available = strategies.available()
    for name in GRADIENT_METHODS:
        assert name in available
    assert strategies.registry.lookup("Nash-MTL") is strategies.NashMTL
    assert strategies.registry.lookup("IMTL-G") is strategies.IMTLG
    assert strategies.registry.lookup("ConFIG") is strategies.ConFIG


INVALID = [
    ("mgda", {"normalization": "l1"}), ("mgda", {"max_iterations": 0}),
    ("cagrad", {"c": -0.1}), ("cagrad", {"rescale": 1}),
    ("gradvac", {"beta": 1.5}), ("gradvac", {"seed": "x"}),
    ("graddrop", {"leak": 2.0}), ("nash_mtl", {"update_weights_every": 0}),
    ("nash_mtl", {"max_norm": -1.0}), ("aligned_mtl", {"scale_mode": "max"}),
    ("aligned_mtl", {"preference": "median"}), ("upgrad", {"reg_eps": -1.0}),
    ("dualproj", {"preference": "min"}), ("fairgrad", {"alpha": 0.0}),
    ("fairgrad", {"alpha": float("nan")}), ("moco", {"beta": 2.0}),
    ("moco", {"projection": "l2"}), ("db_mtl", {"beta": 1.0}), ("db_mtl", {"eps": 0.0}),
    ("excess_mtl", {"robust_step_size": -1.0}), ("imtl", {"initial_log_scale": "a"}),
    ("random", {"seed": 1.5}),
]


@pytest.mark.parametrize("name, params", INVALID,
                         ids=[f"{n}-{sorted(p)[0]}" for n, p in INVALID])
def test_invalid_hyper_parameters_raise_at_construction(name, params):
    with pytest.raises((ValueError, TypeError)):
        strategies.get(name, **params)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_config_round_trip_and_docstring(name):
    strategy = strategies.get(name)
    config = strategy.get_config()
    clone = strategies.get({**{k: v for k, v in config.items() if k != "name"},
                            "name": name})
    assert clone.get_config() == config
    doc = type(strategy).__doc__
    assert doc and len(doc) > 200 or name in ("sum", "mean")


# -- properties over random Jacobians -------------------------------------------------

K, P = 3, 6


def special_jacobians(rng):
    """Degenerate cases every method must survive with a finite output."""
    base = rng.normal(size=(K, P))
    rank1 = rng.normal(size=(K, 1)) @ rng.normal(size=(1, P))
    cases = {
        "zero": np.zeros((K, P)),
        "rank_deficient": rng.normal(size=(K, 2)) @ rng.normal(size=(2, P)),
        "duplicated": np.stack([base[0], base[0], base[1]]),
        "colinear": rank1,
        "opposite": np.stack([base[0], -base[0], 2 * base[0]]),
        "one_zero_row": np.stack([base[0], np.zeros(P), base[2]]),
    }
    for scale in (0.0, 1e-15, 1e-6, 1.0, 1e6, 1e15):
        cases[f"scale_{scale:g}"] = scale * base
    cases["mixed_scales"] = base * np.array([[1e-6], [1.0], [1e6]])
    return cases


@pytest.fixture(scope="module")
def instances():
    """One bound instance per method and dtype, so each compiles once per shape."""
    made = {}

    def get(name, dtype, **params):
        key = (name, dtype, tuple(sorted(params.items())))
        if key not in made:
            made[key] = strategies.get(name, **params)
        return made[key]

    return get


UNREGULARISED = ["upgrad-no-ridge", "dualproj-no-ridge"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", GRADIENT_METHODS + UNREGULARISED)
def test_finite_on_degenerate_jacobians(name, dtype, instances):
    if name.endswith("-no-ridge"):
        strategy = instances(name.split("-")[0], dtype, reg_eps=0.0)
    else:
        strategy = instances(name, dtype)
    rng = np.random.default_rng(0)
    for case, jacobian in special_jacobians(rng).items():
        direction, weights = lossbalance.aggregate_with_weights(
            strategy, jacobian.astype(dtype), losses=np.ones(K))
        assert direction.shape == (P,)
        assert np.all(np.isfinite(direction.numpy())), case
        assert np.all(np.isfinite(weights.numpy())), case


# UPGrad and DualProj are exactly non-conflicting without the ridge; TorchJD's default ridge
# (reg_eps=1e-4 on the trace-normalised Gramian) makes them so only up to a term of order
# reg_eps * lambda_max / lambda_min (documented in their docstrings).
NON_CONFLICTING = [("mgda", {}), ("upgrad", {"reg_eps": 0.0}), ("dualproj", {"reg_eps": 0.0}),
                   ("fairgrad", {}), ("fairgrad", {"alpha": 2.0}), ("cagrad", {"c": 1.0}),
                   ("cagrad", {"c": 2.0})]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name, params", NON_CONFLICTING,
                         ids=[f"{n}-{p}" for n, p in NON_CONFLICTING])
def test_non_conflicting(name, params, dtype, instances):
    strategy = instances(name, dtype, **params)
    rng = np.random.default_rng(1)
    tolerance = 1e-4 if dtype == "float32" else 1e-8
    for trial in range(25):
        if trial % 5 == 0:  # rank deficient, rows in a half-space (0 not in their hull)
            jacobian = np.abs(rng.normal(size=(K, 2))) @ rng.normal(size=(2, P))
        else:  # scales spanning two orders of magnitude
            jacobian = rng.normal(size=(K, P)) * 10.0 ** rng.uniform(-1, 1, size=(K, 1))
        jacobian = jacobian.astype(dtype)
        direction = lossbalance.aggregate(strategy, jacobian).numpy().astype(np.float64)
        assert np.linalg.norm(direction) > 0
        rows = jacobian.astype(np.float64)
        cosines = rows @ direction / (np.linalg.norm(rows, axis=1) * np.linalg.norm(direction))
        assert np.all(cosines >= -tolerance), (trial, cosines)


ORDER_FREE = ["mgda", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "upgrad", "dualproj",
              "config", "fairgrad", "mean", "sum", "moco", "db_mtl"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ORDER_FREE)
def test_permutation_invariance(name, dtype, instances):
    rng = np.random.default_rng(2)
    stateful = name in ("moco", "db_mtl")
    rtol = 1e-4 if dtype == "float32" else 1e-7
    for _ in range(2 if stateful else 5):
        jacobian = (rng.normal(size=(K, P)) * 10.0 ** rng.uniform(-1, 1, size=(K, 1)))
        jacobian = jacobian.astype(dtype)
        permutation = rng.permutation(K)
        if stateful:  # a fresh state for both calls
            first, second = strategies.get(name), strategies.get(name)
        else:
            first = second = instances(name, dtype)
        a = lossbalance.aggregate(first, jacobian).numpy()
        b = lossbalance.aggregate(second, jacobian[permutation]).numpy()
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(a).max())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_upgrad_linear_under_positive_row_scaling(dtype, instances):
    # Exact without the ridge (with it, the linearity holds to about reg_eps).
    strategy = instances("upgrad", dtype, reg_eps=0.0)
    rng = np.random.default_rng(3)
    rtol = 1e-3 if dtype == "float32" else 1e-7
    for _ in range(5):
        jacobian = rng.normal(size=(K, P))
        a, b = rng.uniform(0.1, 10, size=K), rng.uniform(0.1, 10, size=K)

        def upgrad(scale):
            return lossbalance.aggregate(strategy, (scale[:, None] * jacobian).astype(dtype))

        left = upgrad(a + b).numpy()
        right = (upgrad(a) + upgrad(b)).numpy()
        np.testing.assert_allclose(left, right, rtol=rtol, atol=rtol * np.abs(left).max())
        np.testing.assert_allclose(upgrad(3.0 * a).numpy(), 3.0 * upgrad(a).numpy(),
                                   rtol=rtol, atol=rtol * np.abs(left).max())


# -- the low-level API ------------------------------------------------------------------


def test_aggregate_accepts_names_instances_configs_and_tensors():
    expected = J.mean(axis=0)
    for spec in ("mean", strategies.get("mean"), {"name": "mean"}):
        np.testing.assert_allclose(lossbalance.aggregate(spec, J).numpy(), expected)
    np.testing.assert_allclose(lossbalance.aggregate("sum", tf.constant(J)).numpy(),
                               J.sum(axis=0))
    weights = lossbalance.task_weights("mgda", gramian=J @ J.T)
    np.testing.assert_allclose(weights.numpy(), [0.6, 0.4], atol=1e-6)
    np.testing.assert_allclose(lossbalance.task_weights("mgda", J).numpy(), [0.6, 0.4],
                               atol=1e-6)


def test_aggregate_errors():
    bound = strategies.get("upgrad")
    lossbalance.aggregate(bound, J)
    with pytest.raises(ValueError, match="bound to 2 tasks"):
        lossbalance.aggregate(bound, np.ones((3, 3)))
    with pytest.raises(ValueError, match="Jacobian itself"):
        lossbalance.task_weights("graddrop", gramian=J @ J.T)
    with pytest.raises(ValueError, match="needs the task losses"):
        lossbalance.aggregate({"name": "mgda", "normalization": "loss"}, J)
    np.testing.assert_allclose(
        lossbalance.aggregate({"name": "mgda", "normalization": "loss"}, J,
                              losses=[1.0, 2.0]).numpy().shape, (3,))


def test_stateful_strategies_keep_state_in_variables():
    gradvac = strategies.get("gradvac", seed=1)
    lossbalance.aggregate(gradvac, J)
    assert np.any(gradvac.targets.numpy() != 0)  # the EMA moved toward phi < 0
    nash = strategies.get("nash_mtl", update_weights_every=3)
    first = lossbalance.aggregate(nash, J).numpy()
    second = lossbalance.aggregate(nash, 2 * J).numpy()  # cached weights reused
    np.testing.assert_allclose(second, 2 * first * min(1, 1 / np.linalg.norm(2 * first)),
                               rtol=1e-5)
    assert int(nash.step.numpy()) == 2
    moco = strategies.get("moco")
    lossbalance.aggregate(moco, J)
    assert moco.tracked.shape == (2, 3) and np.any(moco.tracked.numpy() != 0)
    for strategy in (gradvac, nash, moco):
        assert strategy.non_trainable_variables


# -- training inside fit, compiled with XLA ---------------------------------------------


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8)).astype("float32")
    y = {"cls": rng.integers(0, 3, size=32),
         "reg": (x[:, :1] * 2.0 + 0.1 * rng.normal(size=(32, 1))).astype("float32")}
    return x, y


@pytest.mark.parametrize("gradients", ["parameters", "representation"])
@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_trains_in_fit_with_xla(name, gradients, data):
    x, y = data
    if gradients not in lossbalance.strategies.get(name).gradient_levels:
        pytest.skip(f"{name} is defined at the parameter level only")
    model = make_trunk_model()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=TWO_HEAD_LOSS,
                  strategy=name, jit_compile=True, gradients=gradients)
    assert model.gradient_level == gradients
    history = model.fit(x, y, batch_size=32, epochs=3, verbose=0).history
    total = np.array(history["cls_loss"]) + np.array(history["reg_loss"])
    assert np.all(np.isfinite(total)) and np.all(np.isfinite(history["loss"]))
    assert total[-1] < total[0], history
    for task in ("cls", "reg"):
        assert np.all(np.isfinite(history[f"{task}_weight"]))
    if name == "imtl":
        assert np.any(model.strategy.log_scale.numpy() != 0)  # IMTL-L's scales learn


def test_per_parameter_state_is_built_on_first_use_and_saved(data, tmp_path):
    x, y = data
    model = make_trunk_model()
    model.compile(optimizer="sgd", loss=TWO_HEAD_LOSS, strategy="moco")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    strategy = model.strategy
    shared = model.get_layer("trunk").count_params()
    assert strategy.num_parameters == shared and strategy.tracked.shape == (2, shared)
    assert strategy.get_config()["num_parameters"] == shared
    model.save(tmp_path / "moco.keras")
    loaded = keras.models.load_model(tmp_path / "moco.keras")
    for a, b in zip(strategy.variables, loaded.strategy.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(ValueError, match="holds state for"):
        lossbalance.aggregate(loaded.strategy, np.ones((2, shared + 1)))
