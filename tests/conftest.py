"""Shared fixtures: tiny two-head models and data, built once per test where possible."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# the shared checks' asserts report their compared values, as the tests' own do
pytest.register_assert_rewrite("gradient_helpers", "loss_helpers")

import lossbalance  # noqa: E402


def make_trunk_model(cls=None, *, inputs=8, hidden=16, classes=3, seed=0, dict_outputs=True):
    """The classic architecture in miniature: a shared Dense trunk, a classifier head
    ("cls", logits) and a regressor head ("reg")."""
    cls = cls or lossbalance.BalancedModel
    keras.utils.set_random_seed(seed)
    x = keras.Input((inputs,), name="x")
    h = keras.layers.Dense(hidden, activation="tanh", name="trunk")(x)
    cls_out = keras.layers.Dense(classes, name="cls")(h)
    reg_out = keras.layers.Dense(1, name="reg")(h)
    outputs = {"cls": cls_out, "reg": reg_out} if dict_outputs else [cls_out, reg_out]
    return cls(x, outputs)


#: Hyper-parameters that registered strategies have no default for
#: (`Strategy.required_arguments`), as the tests that go through every registered strategy
#: give them: PCD's primary task, the first by position (whatever the tasks' names).
REQUIRED_ARGUMENTS = {"pcd": {"primary": 0}}


def strategy_spec(name, **params):
    """What `strategies.get`, `compile(strategy=...)` and `aggregate` take for the
    registered `name` with `params`: the name itself, or a config dict that adds the
    hyper-parameters it has no default for (REQUIRED_ARGUMENTS)."""
    params = {**REQUIRED_ARGUMENTS.get(name, {}), **params}
    return {"name": name, **params} if params else name


def check_config_round_trip(name, params):
    """A registered strategy's config rebuilds the same strategy: by name
    (`strategies.get`), through `from_config`, and through Keras' serialisation (read back
    by `strategies.get` and by Keras). Returns the config."""
    strategy = lossbalance.strategies.get(name, **params)
    config = strategy.get_config()
    by_name = lossbalance.strategies.get(
        {**{k: v for k, v in config.items() if k != "name"}, "name": name})
    assert type(by_name) is type(strategy) and by_name.get_config() == config
    assert type(strategy).from_config(config).get_config() == config
    serialized = keras.saving.serialize_keras_object(strategy)
    assert lossbalance.strategies.get(serialized).get_config() == config
    assert keras.saving.deserialize_keras_object(serialized).get_config() == config
    return config


TWO_HEAD_LOSS = {
    "cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    "reg": "mse",
}


@pytest.fixture(scope="session")
def two_head_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = {
        "cls": rng.integers(0, 3, size=64),
        "reg": (x[:, :1] * 2.0 + 0.1 * rng.normal(size=(64, 1))).astype("float32"),
    }
    return x, y


def scaled_targets(two_head_data, scale=100.0):
    """The users' case in miniature: the regression's loss ~10^4 times the classifier's."""
    x, y = two_head_data
    return x, {"cls": y["cls"], "reg": y["reg"] * scale}


def fit_whole_batches(model, x, y, epochs=1, batch_size=64):
    """`fit` in order, quietly; by default the whole fixture is one batch (one step an
    epoch)."""
    return model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False,
                     verbose=0).history


def record_applied_gradients(model):
    """Make the model's optimizer keep the gradients it is given, in variables (so graph
    mode records them too); returns those variables, in `trainable_variables` order."""
    import tensorflow as tf

    records = [tf.Variable(tf.zeros_like(v)) for v in model.trainable_variables]
    apply = model.optimizer.apply

    def recording_apply(grads, variables=None):
        for record, grad in zip(records, grads):
            if grad is not None:
                record.assign(tf.convert_to_tensor(grad))
        return apply(grads, variables)

    model.optimizer.apply = recording_apply
    return records
