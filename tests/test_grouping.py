"""compile(grouping=...): the strategy applied separately to groups of shared parameters."""

import definitions
import keras
import numpy as np
import pytest
import tensorflow as tf

import lossbalance
from lossbalance.diagnostics import inspect_batch

LOSSES = {"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "reg": "mse"}


def two_layer_trunk(seed=0):
    """Two shared layers ("t1", "t2", four shared variables), a classifier and a
    regressor."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((6,), name="x")
    h = keras.layers.Dense(8, activation="tanh", name="t1")(x)
    h = keras.layers.Dense(8, activation="tanh", name="t2")(h)
    return lossbalance.BalancedModel(x, {"cls": keras.layers.Dense(3, name="cls")(h),
                                         "reg": keras.layers.Dense(1, name="reg")(h)})


def batch(seed=0, n=16, scale=0.3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    return x, {"cls": rng.integers(0, 3, size=n),
               "reg": (scale * rng.normal(size=(n, 1))).astype("float32")}


def one_step(strategy, **compile_args):
    model = two_layer_trunk()
    model.compile(keras.optimizers.SGD(0.1), loss=LOSSES, strategy=strategy, **compile_args)
    model.train_on_batch(*batch())
    return model.get_weights()


@pytest.mark.parametrize("name", ["mean", "sum"])
@pytest.mark.parametrize("vectorize", [False, True])
def test_a_linear_strategy_makes_the_same_update_whatever_the_grouping(name, vectorize):
    plain = one_step(name, vectorize=vectorize)
    for grouping in ("variable", "layer", lambda v: v.path.endswith("bias")):
        grouped = one_step(name, grouping=grouping, vectorize=vectorize)
        for a, b in zip(plain, grouped):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_mgda_per_group_weights_are_each_groups_min_norm_point():
    model = two_layer_trunk()
    model.compile("sgd", loss=LOSSES, strategy="mgda", grouping="layer")
    x, y = batch()
    report = inspect_batch(model, x, y)
    assert list(report.group_weights) == ["t1", "t2"]
    rows = _task_rows(model, x, y)
    for layer, weights in report.group_weights.items():
        expected = definitions.mgda(np.concatenate(rows[layer], axis=1))
        np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(report.weights, np.mean(list(report.group_weights.values()),
                                                       axis=0), rtol=1e-6)
    # two different problems: the groups' weights differ, and so does the update
    assert not np.allclose(report.group_weights["t1"], report.group_weights["t2"],
                           rtol=1e-3)
    ungrouped = two_layer_trunk()
    ungrouped.compile("sgd", loss=LOSSES, strategy="mgda")
    plain = inspect_batch(ungrouped, x, y)
    assert plain.group_weights is None
    assert abs(plain.cosine_keras_strategy - report.cosine_keras_strategy) > 1e-4


def _task_rows(model, x, y, transform=None):
    """{layer: [(K, size) task gradients of each of its variables]} in float64, of the
    task losses or of `transform(losses)`; with `transform`, also those (K,) losses."""
    out = {}
    variables = [v for v in model.trainable_variables if v.path.split("/")[0] in ("t1",
                                                                                  "t2")]
    with tf.GradientTape(persistent=True) as tape:
        losses = model._task_losses(y, model(x, training=False))
        if transform is not None:
            losses = tf.unstack(transform(tf.stack(losses)))
    for v in variables:
        rows = np.stack([tape.gradient(loss, v).numpy().ravel() for loss in losses])
        out.setdefault(v.path.split("/")[0], []).append(rows.astype(np.float64))
    return out if transform is None else (out, np.array([float(v) for v in losses]))


def test_the_step_applies_each_groups_update_and_logs_their_mean():
    x, y = batch()
    model = two_layer_trunk()
    model.compile(keras.optimizers.SGD(1.0), loss=LOSSES, strategy="mgda", grouping="layer")
    report = inspect_batch(model, x, y)
    rows = _task_rows(model, x, y)
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    logs = model.train_on_batch(x, y, return_dict=True)
    for v in model.trainable_variables:
        layer = v.path.split("/")[0]
        if layer not in rows:
            continue
        index = [u.path for u in model.trainable_variables
                 if u.path.split("/")[0] == layer].index(v.path)
        weights = report.group_weights[layer]
        want = before[v.path] - (rows[layer][index].T @ weights).reshape(v.shape)
        np.testing.assert_allclose(v.numpy(), want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([logs["cls_weight"], logs["reg_weight"]], report.weights,
                               rtol=1e-5)


def test_stateful_copies_train_save_and_load(tmp_path):
    x, y = batch()
    model = two_layer_trunk()
    model.compile(keras.optimizers.SGD(0.01), loss=LOSSES, strategy="nash_mtl",
                  grouping="variable")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    strategy = model.strategy
    assert strategy.num_groups == 4 and len(strategy.group_strategies()) == 4
    assert all(int(s.step.numpy()) == 4 for s in strategy.group_strategies())
    cached = [s.cached_weights.numpy() for s in strategy.group_strategies()]
    assert not np.allclose(cached[0], cached[2])  # each group its own solution
    path = tmp_path / "grouped.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    for a, b in zip(strategy.group_strategies(), loaded.strategy.group_strategies()):
        np.testing.assert_allclose(b.cached_weights.numpy(), a.cached_weights.numpy())
    np.testing.assert_allclose(loaded.predict(x, verbose=0)["reg"],
                               model.predict(x, verbose=0)["reg"], rtol=1e-6)
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)


@pytest.mark.parametrize("name", ["moco", "db_mtl", "excess_mtl"])
def test_state_sized_by_the_parameters_is_each_groups_own(name, tmp_path):
    """K x P state: each layer's copy holds K x P_g buffers, and over two steps its update
    is what the strategy alone makes of that layer's Jacobian (`lossbalance.aggregate`)."""
    x, y = batch()
    model = two_layer_trunk()
    model.compile(keras.optimizers.SGD(0.1), loss=LOSSES, strategy=name, grouping="layer")
    references = {layer: lossbalance.strategies.get(name) for layer in ("t1", "t2")}
    for _ in range(2):
        rows, losses = _task_rows(model, x, y, transform=model.strategy.transform_losses)
        before = {v.path: v.numpy().copy() for v in model.trainable_variables}
        model.train_on_batch(x, y)
        for layer, reference in references.items():
            direction = lossbalance.aggregate(
                reference, np.concatenate(rows[layer], axis=1), losses).numpy()
            variables = [v for v in model.trainable_variables if v.path.startswith(layer)]
            want = np.concatenate([before[v.path].ravel() for v in variables]) - 0.1 * direction
            got = np.concatenate([v.numpy().ravel() for v in variables])
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert model.strategy.get_config()["num_parameters"] == [6 * 8 + 8, 8 * 8 + 8]
    path = tmp_path / "grouped.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    for a, b in zip(model.strategy.group_strategies(), loaded.strategy.group_strategies()):
        assert b.num_parameters == a.num_parameters
        for u, v in zip(a.non_trainable_variables, b.non_trainable_variables):
            np.testing.assert_allclose(v.numpy(), u.numpy())
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)


def test_imtl_shares_its_learned_scales_and_balances_each_group_with_imtl_g(tmp_path):
    x, y = batch()
    model = two_layer_trunk()
    model.compile(keras.optimizers.SGD(0.1), loss=LOSSES, strategy="imtl", grouping="layer")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    strategy = model.strategy
    assert not np.allclose(strategy.log_scale.numpy(), 0.0)  # trained
    assert [type(s).__name__ for s in strategy.group_strategies()] == ["IMTL", "IMTLG"]
    assert [v.path for v in strategy.trainable_variables] == [strategy.log_scale.path]
    report = inspect_batch(model, x, y)
    rows, _ = _task_rows(model, x, y, transform=strategy.transform_losses)
    for layer, weights in report.group_weights.items():
        expected = definitions.imtl_g(np.concatenate(rows[layer], axis=1))
        np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-8)
    path = tmp_path / "imtl.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.strategy.log_scale.numpy(), strategy.log_scale.numpy())
    assert loaded.strategy.num_groups == 2


class LearnedTemperature(lossbalance.strategies.GramianWeighting):
    """A strategy with a learned variable and no rule for sharing it between groups."""

    def build_state(self, num_tasks):
        self.temperature = self.add_weight(shape=(), name="temperature", trainable=True)

    def gramian_weights(self, gramian, losses):
        return tf.ones_like(losses)


@pytest.mark.parametrize("strategy, extra, message", [
    ("fixed", {}, "weights the task losses"),
    ("mgda", {"gradients": "representation"}, "use gradients='parameters'"),
    (LearnedTemperature(), {}, "learns variables"),
    ("mgda", {"grouping": "block"}, "must be None, one of"),
])
def test_refused_where_it_does_not_apply(strategy, extra, message):
    args = {"grouping": "layer", **extra}
    with pytest.raises(ValueError, match=message):
        two_layer_trunk().compile("sgd", loss=LOSSES, strategy=strategy, **args)


@pytest.mark.parametrize("name, params, error", [
    ("mgda", {"groups": 0}, ValueError),
    ("mgda", {"groups": "layer"}, TypeError),
    ("moco", {"num_parameters": 0}, ValueError),
    ("moco", {"num_parameters": [10, 20]}, ValueError),  # two sizes, no groups
    ("moco", {"num_parameters": [10, 20], "groups": 3}, ValueError),
    ("moco", {"num_parameters": [10, "20"], "groups": 2}, TypeError),
])
def test_group_counts_and_sizes_are_checked_at_construction(name, params, error):
    with pytest.raises(error, match="groups|num_parameters"):
        lossbalance.strategies.get(name, **params)
