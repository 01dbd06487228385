"""A strategy's state changes in a step are staged: nothing is assigned until they are
committed, and committing them gives exactly the state a direct run gives
(`lossbalance.strategies.staging`). Checked for every registered strategy, so a new one
that assigns its variables directly fails here."""

import numpy as np
import pytest
import tensorflow as tf

import lossbalance
from lossbalance.combination import gramian_of, weights_and_direction
from lossbalance.strategies.staging import staged
from conftest import strategy_spec

TASKS = ("a", "b", "c")
NUM_PARAMETERS = 6


def _strategy(name):
    strategy = lossbalance.strategies.get(strategy_spec(name))  # PCD: with its primary
    strategy.bind(TASKS)
    if strategy.needs_parameter_state:
        strategy.build_parameter_state(NUM_PARAMETERS)
    return strategy


def _step(strategy, jacobian, losses):
    """What a training step asks of the strategy: its weights (or direction), and the
    updates its hooks take."""
    weights, direction = weights_and_direction(
        strategy, losses, gramian=lambda: gramian_of(jacobian), jacobian=lambda: jacobian)
    if strategy.uses_layer_gradients:
        strategy.update_with_gradient_norms(tf.norm(jacobian, axis=1), losses)
    if strategy.uses_post_step_losses:
        strategy.update_after_step(losses, 0.9 * losses)
    return np.asarray(weights, float), None if direction is None else np.asarray(direction)


def _state(strategy):
    return [np.array(v.numpy()) for v in strategy.state_variables()]


@pytest.mark.parametrize("name", lossbalance.strategies.available())
def test_staged_changes_assign_nothing_until_committed_then_match_a_direct_run(name):
    rng = np.random.default_rng(0)
    direct, staged_one = _strategy(name), _strategy(name)
    for target, source in zip(staged_one.state_variables(), direct.state_variables()):
        target.assign(source)  # the same start, RNG states included
    for step in range(3):
        jacobian = tf.constant(rng.normal(size=(3, NUM_PARAMETERS)) * [[1.0], [10.0], [0.1]],
                               tf.float32)
        losses = tf.constant(rng.uniform(0.5, 2.0, 3), tf.float32)
        expected = _step(direct, jacobian, losses)
        before = _state(staged_one)
        with staged(staged_one) as changes:
            got = _step(staged_one, jacobian, losses)
        for a, b in zip(before, _state(staged_one)):
            np.testing.assert_array_equal(a, b, err_msg=f"{name}: assigned while staged")
        changes.commit()
        for a, b in zip(_state(direct), _state(staged_one)):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7,
                                       err_msg=f"{name}: committed state, step {step}")
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-6, atol=1e-7)
        if expected[1] is not None:
            np.testing.assert_allclose(got[1], expected[1], rtol=1e-6, atol=1e-7)


def test_a_dropped_commit_and_a_false_condition_change_nothing():
    strategy = _strategy("nash_mtl")
    jacobian = tf.constant(np.eye(3, NUM_PARAMETERS), tf.float32)
    before = _state(strategy)
    with staged(strategy) as changes:
        _step(strategy, jacobian, tf.ones(3))
    changes.commit(tf.constant(False))
    for a, b in zip(before, _state(strategy)):
        np.testing.assert_array_equal(a, b)
    changes.commit(tf.constant(True))
    assert int(strategy.step.numpy()) == 1
