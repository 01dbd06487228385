"""Property-based tests over random multi-task models and data, and bad inputs."""

import keras
import numpy as np
import pytest
from conftest import TWO_HEAD_LOSS, make_trunk_model, strategy_spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lossbalance

REGRESSION_LOSSES = ["mse", "mae", "huber"]


@st.composite
def multitask_problems(draw):
    num_tasks = draw(st.integers(2, 4))
    tasks = []
    for k in range(num_tasks):
        if draw(st.booleans()):
            tasks.append((f"c{k}", "classification", draw(st.integers(2, 4))))
        else:
            tasks.append((f"r{k}", draw(st.sampled_from(REGRESSION_LOSSES)),
                          draw(st.integers(1, 3))))
    return {
        "tasks": tasks,
        "features": draw(st.integers(2, 6)),
        "hidden": draw(st.integers(2, 8)),
        "depth": draw(st.integers(1, 2)),
        "scale": draw(st.sampled_from([1e-3, 1.0, 1e3])),
        "strategy": strategy_spec(  # with hyper-parameters that have no default
            draw(st.sampled_from(lossbalance.strategies.available()))),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(multitask_problems())
def test_training_from_finite_inputs_stays_finite(problem):
    rng = np.random.default_rng(problem["seed"])
    n = 32
    x = rng.normal(size=(n, problem["features"])).astype("float32")
    keras.utils.set_random_seed(problem["seed"])
    inputs = keras.Input((problem["features"],))
    h = inputs
    for i in range(problem["depth"]):
        h = keras.layers.Dense(problem["hidden"], activation="tanh", name=f"trunk_{i}")(h)
    outputs, losses, y = {}, {}, {}
    for name, kind, size in problem["tasks"]:
        outputs[name] = keras.layers.Dense(size, name=name)(h)
        if kind == "classification":
            losses[name] = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            y[name] = rng.integers(0, size, size=n)
        else:
            losses[name] = kind
            y[name] = (problem["scale"] * rng.normal(size=(n, size))).astype("float32")
    model = lossbalance.BalancedModel(inputs, outputs)
    needed = lossbalance.strategies.get(problem["strategy"]).min_tasks
    if len(problem["tasks"]) < needed:  # refused at compile, naming the count
        with pytest.raises(ValueError, match=f"needs at least {needed} tasks"):
            model.compile(loss=losses, strategy=problem["strategy"])
        return
    levels = lossbalance.strategies.get(problem["strategy"]).gradient_levels
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=losses,
                  strategy=problem["strategy"],
                  gradients="parameters" if "parameters" in levels else "representation")
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights()), problem
    assert np.all(np.isfinite(history.history["loss"])), problem


def test_task_without_shared_variables_is_named():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    trunk = keras.layers.Dense(4, name="trunk")(inputs)
    model = lossbalance.BalancedModel(inputs, {
        "a": keras.layers.Dense(1, name="a")(trunk),
        "b": keras.layers.Dense(1, name="b")(trunk),
        "alone": keras.layers.Dense(1, name="alone")(inputs),  # bypasses the trunk
    })
    model.compile(optimizer="sgd", loss="mse", strategy="pcgrad")
    x = np.ones((8, 4), "float32")
    y = {k: np.ones((8, 1), "float32") for k in ("a", "b", "alone")}
    with pytest.raises(ValueError, match=r"\['alone'\] do not depend on any variable shared"):
        model.fit(x, y, verbose=0)


def test_heads_sharing_no_trunk_are_refused_by_gradient_strategies():
    inputs = keras.Input((4,))
    model = lossbalance.BalancedModel(inputs, {
        "a": keras.layers.Dense(1, name="a")(inputs),
        "b": keras.layers.Dense(1, name="b")(inputs)})
    model.compile(optimizer="sgd", loss="mse", strategy="pcgrad")
    x = np.ones((8, 4), "float32")
    with pytest.raises(ValueError, match="share no trunk"):
        model.fit(x, {"a": x[:, :1], "b": x[:, :1]}, verbose=0)


def test_wrong_number_of_targets_is_named(two_head_data):
    x, y = two_head_data
    model = make_trunk_model(dict_outputs=False)
    model.compile(optimizer="sgd", loss=[TWO_HEAD_LOSS["cls"], "mse"])
    with pytest.raises(ValueError, match="1 entries but the model has 2 outputs"):
        model.fit(x, [y["cls"]], verbose=0)


def test_targets_of_the_wrong_shape_are_refused(two_head_data):
    x, y = two_head_data
    model = make_trunk_model()
    model.compile(optimizer="sgd", loss=TWO_HEAD_LOSS)
    wide = dict(y, reg=np.repeat(y["reg"], 3, axis=1))  # (B, 3) for a (B, 1) output
    with pytest.raises(ValueError, match=r"Task 'reg': targets of shape \(.*3\) do not match"):
        model.fit(x, wide, batch_size=16, epochs=1, verbose=0)
    # Keras' accepted forms still work: sparse labels of shape (B,) or (B, 1), (B,) targets.
    ok = dict(cls=y["cls"][:, None], reg=y["reg"][:, 0])
    model.fit(x, ok, batch_size=16, epochs=1, verbose=0)


def test_target_shapes_are_checked_in_eager_mode_too(two_head_data):
    x, y = two_head_data
    model = make_trunk_model()
    model.compile(optimizer="sgd", loss=TWO_HEAD_LOSS, run_eagerly=True)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="do not match its output"):
        model.fit(x, dict(y, reg=np.repeat(y["reg"], 2, axis=1)), batch_size=16, verbose=0)
