"""Gradient weightings whose weights ignore the gradients: TorchJD's Constant (J^T w with
w fixed) and `random` (J^T softmax(z), a fresh z ~ N(0, I_K) every step), which is LibMTL's
RGW under a second name. The weights by list, dict and default, and the draws'
distribution; hyper-parameter checks, configs, declared properties, and the README's quick
start model trained one epoch at each gradient level."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import check_config_round_trip
from gradient_helpers import check_quick_start_trains_one_epoch, weights_and_direction
from scipy import stats

from lossbalance import strategies
from lossbalance.strategies.registry import lookup


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


# -- Constant ------------------------------------------------------------------------------


def test_constant_weights_by_list_dict_and_default():
    rng = np.random.default_rng(3)
    j = rng.normal(size=(3, 5))
    for spec, expected in [({}, [1.0, 1.0, 1.0]),
                           ({"weights": [0.5, -2.0, 3.0]}, [0.5, -2.0, 3.0]),
                           ({"weights": {"task_1": 4.0}}, [1.0, 4.0, 1.0])]:
        weights, direction = weights_and_direction({"name": "constant", **spec}, j)
        np.testing.assert_array_equal(weights, expected)
        np.testing.assert_allclose(direction, j.T @ np.array(expected), rtol=1e-12)


def test_constant_weights_that_do_not_fit_the_tasks_are_refused_at_bind():
    with pytest.raises(ValueError, match="3 entries but the model has 2"):
        strategies.get("constant", weights=[1.0, 2.0, 3.0]).bind(["a", "b"])
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['c'\]"):
        strategies.get("constant", weights={"c": 1.0}).bind(["a", "b"])


@pytest.mark.parametrize("factory, error, match", [
    (lambda: strategies.get("constant", weights=[1.0, float("nan")]), ValueError, "finite"),
    (lambda: strategies.get("constant", weights="equal"), TypeError, "list"),
    (lambda: strategies.get("constant", weights={"a": "x"}), TypeError, "number"),
])
def test_invalid_hyper_parameters_fail_at_construction(factory, error, match):
    with pytest.raises(error, match=match):
        factory()


@pytest.mark.parametrize("params", [{}, {"weights": [1.0, -0.5]}, {"weights": {"a": 2.0}}],
                         ids=["default", "list", "dict"])
def test_constant_config_round_trip(params):
    check_config_round_trip("constant", params)


def test_declared_properties():
    """Only what the methods promise: neither is non-conflicting or invariant to the tasks'
    scales; neither reads the losses."""
    for name in ("constant", "rgw"):
        strategy = strategies.get(name)
        assert not strategy.non_conflicting and not strategy.scale_invariant, name
        assert not strategy.uses_losses, name


# -- through BalancedModel -----------------------------------------------------------------


TRAINED = [("rgw", {}), ("constant", {"weights": [1.0, 0.01]})]


@pytest.mark.parametrize("gradients", ["parameters", "representation"])
@pytest.mark.parametrize("name, params", TRAINED, ids=["rgw", "constant"])
def test_quick_start_model_trains_one_epoch(name, params, gradients):
    check_quick_start_trains_one_epoch(name, params, False, gradients)
