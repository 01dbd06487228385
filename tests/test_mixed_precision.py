"""Mixed precision (`mixed_float16`, loss-scale optimizer): strategies see unscaled
gradients, training stays close to float32, and an overflow step changes nothing."""

import keras
import numpy as np
import pytest

from conftest import TWO_HEAD_LOSS, make_trunk_model


@pytest.fixture
def policy():
    """Set a global dtype policy for the models built in a test, then restore float32."""
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy("float32")


def _trained(policy, name, data, *, scale=2.0**8, gradients="parameters", epochs=1):
    policy(name)
    model = make_trunk_model()
    optimizer = keras.optimizers.SGD(0.1)
    if name == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=scale)
    model.compile(optimizer=optimizer, loss=TWO_HEAD_LOSS, strategy=data["strategy"],
                  gradients=gradients)
    logs = model.fit(*data["xy"], batch_size=16, epochs=epochs, verbose=0,
                     shuffle=False).history
    return model, {k: v[-1] for k, v in logs.items()}


@pytest.mark.parametrize("strategy, gradients", [
    ("nash_mtl", "parameters"),  # weights scale as 1 / ||g||: scaled gradients show
    ("nash_mtl", "representation"),
    ("gradnorm", "parameters"),  # targets from gradient norms
    # norms of every row of z: scaled gradients would scale the weights by 1 / 256
    pytest.param({"name": "output_balancer", "per_batch_item": True}, "representation",
                 id="output_balancer_per_item-representation"),
])
def test_mixed_precision_trains_like_float32(policy, two_head_data, strategy, gradients):
    """The logged task weights and losses after an epoch match float32 to float16
    precision: the strategies see unscaled gradients (a loss scale of 256 left in would
    divide Nash-MTL's weights by 16 or more) and the run stays finite."""
    data = {"strategy": strategy, "xy": two_head_data}
    _, single = _trained(policy, "float32", data, gradients=gradients)
    model, mixed = _trained(policy, "mixed_float16", data, gradients=gradients)
    assert model.layers[1].compute_dtype == "float16"
    for key, value in single.items():
        assert np.isfinite(mixed[key]), key
        np.testing.assert_allclose(mixed[key], value, rtol=2e-2, atol=2e-3, err_msg=key)


@pytest.mark.parametrize("strategy", ["nash_mtl", "famo", "gradnorm"])
def test_overflow_step_changes_nothing(policy, two_head_data, strategy):
    """A loss scale so large that the float16 gradients overflow: the loss-scale optimizer
    skips the step and lowers its scale, and the strategy's state stays as it was."""
    policy("mixed_float16")
    model = make_trunk_model()
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1),
                                                    initial_scale=2.0**60)
    model.compile(optimizer=optimizer, loss=TWO_HEAD_LOSS, strategy=strategy)
    x, y = two_head_data
    batch = x[:16], {k: v[:16] for k, v in y.items()}
    model.train_on_batch(*batch)  # builds everything; overflows too
    weights = [w.copy() for w in model.get_weights()]
    state = [np.array(v.numpy()) for v in model.strategy.state_variables()]
    scale = float(optimizer.dynamic_scale.numpy())

    model.train_on_batch(*batch)
    assert float(optimizer.dynamic_scale.numpy()) == scale / 2
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)
    for before, variable in zip(state, model.strategy.state_variables()):
        np.testing.assert_array_equal(before, variable.numpy(), err_msg=variable.path)
