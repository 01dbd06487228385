"""CR-MOGM: a moving average of any Gramian weighting's weights. Against MGDA's float64
definition (`tests/definitions.py`) on each step, for every averaging weight; wrapping a
base strategy given by name, config or instance, and passing its needs (losses, levels,
floors, item norms) through; hyper-parameter checks, configs, the README's quick start
model trained one epoch at each gradient level, and the average's state saved with the
model."""

import definitions
import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import check_config_round_trip
from gradient_helpers import (check_quick_start_trains_one_epoch, relative_error,
                              weights_and_direction)
from quick_start import quick_start_data, quick_start_losses, quick_start_model
from test_scales import scaled_jacobian

import lossbalance
from lossbalance import strategies


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
        weights, direction = weights_and_direction(strategy, jacobian)
        np.testing.assert_allclose(weights, average, rtol=1e-6, atol=1e-9, err_msg=step)
        assert relative_error(direction, rows.T @ average) < 1e-6, step
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
    strategy = strategies.get("crmogm")
    assert not strategy.non_conflicting and not strategy.scale_invariant
    balancer = strategies.get("crmogm", base={"name": "output_balancer",
                                              "per_batch_item": True})
    assert balancer.uses_item_norms and not strategy.uses_item_norms
    balancer.bind(["a", "b"])
    balancer.update_with_item_norms(tf.constant([2.0, 5.0], tf.float64))
    np.testing.assert_allclose(balancer.base.norm_sums.numpy(), [2.0, 5.0])


@pytest.mark.parametrize("factory, error, match", [
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


@pytest.mark.parametrize("params", [{},
                                    {"base": {"name": "cagrad", "c": 0.5}, "alpha": 0.5},
                                    {"base": {"name": "crmogm", "base": "upgrad"}}],
                         ids=["default", "cagrad", "nested"])
def test_config_round_trip(params):
    check_config_round_trip("crmogm", params)


# -- through BalancedModel -----------------------------------------------------------------


@pytest.mark.parametrize("gradients", ["parameters", "representation"])
@pytest.mark.parametrize("params", [{}, {"base": "nash_mtl"}], ids=["mgda", "nash_mtl"])
def test_quick_start_model_trains_one_epoch(params, gradients):
    check_quick_start_trains_one_epoch("crmogm", params, False, gradients)


def test_crmogm_state_is_saved_with_the_model(tmp_path):
    """The average, its step and the base strategy's own state (Nash-MTL's cache) come
    back with a saved model, which continues the average."""
    x, y = quick_start_data()
    model = quick_start_model()
    model.compile(optimizer="adam", loss=quick_start_losses(),
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
