"""Checks shared by the tests of single gradient-level strategies: one call's weights and
update, and the README's quick start model trained one epoch (config round trips:
`conftest.check_config_round_trip`)."""

import numpy as np
import pytest
from quick_start import quick_start_data, quick_start_losses, quick_start_model

import lossbalance
from lossbalance import strategies


def weights_and_direction(strategy, jacobian, losses=None):
    """(weights, update J^T w) of one call, as float64."""
    direction, weights = lossbalance.aggregate_with_weights(strategy, jacobian, losses)
    return weights.numpy().astype(np.float64), direction.numpy().astype(np.float64)


def relative_error(got, expected):
    return np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-300)


def check_quick_start_trains_one_epoch(name, params, extra_task, gradients):
    """The README's quick start model (with a third task where `extra_task`), one epoch at
    the `gradients` level: finite losses and weights. Skipped at a level the strategy is
    not defined at."""
    strategy = strategies.get(name, **params)
    if gradients not in strategy.gradient_levels:
        pytest.skip(f"{name} is not defined at the {gradients} level")
    x, y = quick_start_data(extra_task=extra_task)
    model = quick_start_model(extra_task)
    model.compile(optimizer="adam", loss=quick_start_losses(extra_task),
                  metrics={"label": ["accuracy"]}, strategy=strategy, gradients=gradients)
    assert model.gradient_level == gradients
    history = model.fit(x, y, epochs=1, batch_size=64, verbose=0).history
    for key, values in history.items():
        assert np.all(np.isfinite(values)), (key, values)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
