"""The gradient-combination catalogue: reference values, properties over random Jacobians,
the low-level API, and training inside `fit` with XLA."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import lossbalance
from lossbalance import strategies
from conftest import (REQUIRED_ARGUMENTS, TWO_HEAD_LOSS, check_config_round_trip,
                      make_trunk_model, strategy_spec)

#: Every registered gradient-level strategy (a new one is covered by registering it).
GRADIENT_METHODS = [name for name in strategies.available()
                    if strategies.registry.lookup(name).family != "loss"]

J = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])

TORCHJD_CONDITIONING = {"regularization": "trace", "reg_eps": 1e-4, "norm_eps": 1e-4}

REFERENCES = [
    ("upgrad", {}, [0.2924, 1.9006, 1.9006]),  # the exact projections (tests/definitions.py)
    ("dualproj", {}, [0.5556, 1.1111, 1.1111]),
    ("upgrad", TORCHJD_CONDITIONING, [0.2929, 1.9004, 1.9004]),  # TorchJD's values
    ("dualproj", TORCHJD_CONDITIONING, [0.5563, 1.1109, 1.1109]),
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
                         ids=[r[0] + ("-torchjd" if r[1] == TORCHJD_CONDITIONING else "")
                              for r in REFERENCES])
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
    ("random", {"seed": 1.5}), ("pcd", {"primary": "cls", "tau": 1.5}),
    ("pcd", {"primary": "cls", "beta": 1.0}), ("pcd", {"tau": 0.5}),
]


@pytest.mark.parametrize("name, params", INVALID,
                         ids=[f"{n}-{sorted(p)[0]}" for n, p in INVALID])
def test_invalid_hyper_parameters_raise_at_construction(name, params):
    with pytest.raises((ValueError, TypeError)):
        strategies.get(name, **params)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_config_round_trip(name):
    check_config_round_trip(name, REQUIRED_ARGUMENTS.get(name, {}))


# Properties over random Jacobians (finite on degenerate ones, non-conflict, permutation
# invariance, scale invariance, exactness at every scale) are checked for every registered
# strategy in tests/test_scales.py.


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
    spec = strategy_spec(name)  # with the hyper-parameters it has no default for
    needed = lossbalance.strategies.get(spec).min_tasks
    if needed > 2:  # defined for more tasks than the model has: refused, with the count
        with pytest.raises(ValueError, match=f"needs at least {needed} tasks"):
            make_trunk_model().compile(loss=TWO_HEAD_LOSS, strategy=spec)
        return
    if gradients not in lossbalance.strategies.get(spec).gradient_levels:
        with pytest.raises(ValueError, match="only defined at the parameter level|"
                                             "defined at the representation level only"):
            make_trunk_model().compile(loss=TWO_HEAD_LOSS, strategy=spec,
                                       gradients=gradients)
        return
    model = make_trunk_model()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=TWO_HEAD_LOSS,
                  strategy=spec, jit_compile=True, gradients=gradients)
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
