"""BalancedModel: equivalence with stock Keras, logs, subclassing, save and load."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import TWO_HEAD_LOSS, make_trunk_model

import lossbalance


def _sgd():
    return keras.optimizers.SGD(learning_rate=0.05, momentum=0.5)


def _max_weight_difference(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a.get_weights(), b.get_weights()))


@pytest.mark.parametrize("dict_outputs", [True, False])
def test_fixed_reproduces_stock_keras_loss_weights(two_head_data, dict_outputs):
    """20 optimizer steps of `fixed` == keras.Model with loss_weights, with sample weights."""
    x, y = two_head_data
    rng = np.random.default_rng(1)
    sample_weight = {"cls": rng.uniform(0.5, 2.0, 64), "reg": rng.uniform(0.5, 2.0, 64)}
    if dict_outputs:
        loss, weights, y_in, sw = TWO_HEAD_LOSS, {"cls": 0.3, "reg": 2.0}, y, sample_weight
    else:
        loss = [TWO_HEAD_LOSS["cls"], TWO_HEAD_LOSS["reg"]]
        weights, y_in = [0.3, 2.0], [y["cls"], y["reg"]]
        sw = [sample_weight["cls"], sample_weight["reg"]]

    stock = make_trunk_model(keras.Model, dict_outputs=dict_outputs)
    stock.compile(optimizer=_sgd(), loss=loss, loss_weights=weights)
    balanced = make_trunk_model(dict_outputs=dict_outputs)
    balanced.compile(optimizer=_sgd(), loss=loss, strategy={"name": "fixed", "weights": weights})
    assert _max_weight_difference(stock, balanced) == 0.0  # same initial weights

    fit_args = dict(batch_size=16, epochs=5, shuffle=False, verbose=0, sample_weight=sw)
    history_stock = stock.fit(x, y_in, **fit_args)  # 4 batches x 5 epochs = 20 steps
    history_balanced = balanced.fit(x, y_in, **fit_args)
    assert int(balanced.optimizer.iterations) == 20
    assert _max_weight_difference(stock, balanced) < 1e-5
    np.testing.assert_allclose(history_balanced.history["loss"],
                               history_stock.history["loss"], rtol=1e-5)


def test_compile_loss_weights_match_strategy_weights(two_head_data):
    x, y = two_head_data
    by_compile = make_trunk_model()
    by_compile.compile(optimizer=_sgd(), loss=TWO_HEAD_LOSS, loss_weights=[0.3, 2.0])
    by_strategy = make_trunk_model()
    by_strategy.compile(optimizer=_sgd(), loss=TWO_HEAD_LOSS,
                        strategy=lossbalance.strategies.get("fixed", weights=[0.3, 2.0]))
    for model in (by_compile, by_strategy):
        model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    assert _max_weight_difference(by_compile, by_strategy) < 1e-6


def test_sum_of_task_gradients_is_gradient_of_summed_loss(two_head_data):
    """The seed question: Keras' single gradient of the summed loss is the sum of the
    per-head gradients, so every head's gradient reaches the trunk added up."""
    x, y = two_head_data
    model = make_trunk_model()
    cls_loss = TWO_HEAD_LOSS["cls"]
    reg_loss = keras.losses.get("mse")
    with tf.GradientTape(persistent=True) as tape:
        out = model(x, training=True)
        l_cls = cls_loss(y["cls"], out["cls"])
        l_reg = tf.reduce_mean(reg_loss(y["reg"], out["reg"]))
        total = l_cls + l_reg
    variables = [v.value for v in model.trainable_variables]
    g_total = tape.gradient(total, variables)
    g_cls = tape.gradient(l_cls, variables)
    g_reg = tape.gradient(l_reg, variables)
    for name, gt, gc, gr in zip([v.path for v in model.trainable_variables],
                                g_total, g_cls, g_reg):
        parts = [g for g in (gc, gr) if g is not None]
        np.testing.assert_allclose(gt.numpy(), sum(parts).numpy(), atol=1e-6, err_msg=name)
    # The trunk is reached by both heads, each head only by its own task.
    trunk = [i for i, v in enumerate(model.trainable_variables) if v.path.startswith("trunk")]
    assert all(g_cls[i] is not None and g_reg[i] is not None for i in trunk)


def test_history_logs_per_task_losses_and_weights(two_head_data):
    x, y = two_head_data
    model = make_trunk_model()
    model.compile(optimizer=_sgd(), loss=TWO_HEAD_LOSS, loss_weights={"reg": 2.0},
                  metrics={"cls": ["accuracy"]}, strategy="pcgrad")
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0, validation_data=(x, y))
    logs = history.history
    for key in ("loss", "cls_loss", "reg_loss", "cls_weight", "reg_weight", "cls_accuracy",
                "val_loss", "val_cls_loss", "val_reg_loss", "val_cls_accuracy"):
        assert key in logs and len(logs[key]) == 2, key
    assert "val_cls_weight" not in logs
    # lossbalance's own `loss` tracker takes Keras' place: listed once, first.
    assert [m.name for m in model.metrics].count("loss") == 1
    assert model.metrics[0] is model._loss_tracker and model.metrics_names[0] == "loss"
    # <task>_loss is the unweighted loss: evaluate's per-task values agree with Keras' own.
    results = model.evaluate(x, y, verbose=0, return_dict=True)
    out = model.predict(x, verbose=0)
    expected_reg = float(np.mean((out["reg"] - y["reg"]) ** 2))
    assert results["reg_loss"] == pytest.approx(expected_reg, rel=1e-5)
    assert results["loss"] == pytest.approx(results["cls_loss"] + 2.0 * expected_reg, rel=1e-5)


def test_trackers_are_row_weighted_means_updated_in_single_ops():
    """The `loss` and per-task trackers: means weighted by each step's rows, whose
    variables are updated by one AssignAddVariableOp each (no read-add-assign)."""
    from lossbalance.metrics import ObjectiveMean, TaskMeans

    values = [(2.0, [1.0, 4.0], 16.0), (5.0, [3.0, 0.0], 16.0), (1.0, [2.0, 2.0], 4.0)]
    objective, tasks = ObjectiveMean(name="loss"), TaskMeans(["a", "b"], "_loss")
    for value, per_task, rows in values:
        objective.update_state(tf.constant(value), sample_weight=tf.constant(rows))
        tasks.update_state(tf.constant(per_task), sample_weight=tf.constant(rows))
    rows = np.array([r for _, _, r in values])
    np.testing.assert_allclose(float(objective.result()),
                               np.average([v for v, _, _ in values], weights=rows), rtol=1e-6)
    expected = np.average([t for _, t, _ in values], axis=0, weights=rows)
    np.testing.assert_allclose([float(v) for v in tasks.result().values()], expected,
                               rtol=1e-6)
    assert list(tasks.result()) == ["a_loss", "b_loss"]

    for metric, value in ((objective, tf.constant(1.0)), (tasks, tf.constant([1.0, 2.0]))):
        graph = tf.function(metric.update_state).get_concrete_function(
            value, tf.constant(8.0)).graph
        kinds = [op.type for op in graph.get_operations()]
        assert kinds.count("AssignAddVariableOp") == 2 and "AssignVariableOp" not in kinds


def test_subclassed_balanced_model_trains(two_head_data):
    x, y = two_head_data

    class TwoHeads(lossbalance.BalancedModel):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.trunk = keras.layers.Dense(16, activation="tanh")
            self.cls = keras.layers.Dense(3)
            self.reg = keras.layers.Dense(1)

        def call(self, inputs):
            h = self.trunk(inputs)
            return {"cls": self.cls(h), "reg": self.reg(h)}

    keras.utils.set_random_seed(0)
    model = TwoHeads()
    model.compile(optimizer="adam", loss=TWO_HEAD_LOSS, strategy="pcgrad")
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert set(model.strategy.task_names) == {"cls", "reg"}
    # Functional use of BalancedModel did not turn the subclass into a functional model.
    make_trunk_model()
    assert not isinstance(model, keras.src.models.functional.Functional)


def test_single_task_warns_and_trains(two_head_data):
    x, y = two_head_data
    inputs = keras.Input((8,))
    model = lossbalance.BalancedModel(inputs, keras.layers.Dense(1, name="reg")(inputs))
    with pytest.warns(UserWarning, match="single task"):
        model.compile(optimizer="sgd", loss="mse", strategy="uncertainty")
    model.fit(x, y["reg"], epochs=1, verbose=0)


def test_tf_data_pipeline(two_head_data):
    x, y = two_head_data
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    model = make_trunk_model()
    model.compile(optimizer="adam", loss=TWO_HEAD_LOSS, strategy="gradnorm")
    history = model.fit(dataset, epochs=2, verbose=0, validation_data=dataset)
    assert np.isfinite(history.history["val_loss"]).all()


@pytest.mark.parametrize("strategy", ["uncertainty", "gradnorm", "pcgrad"])
def test_save_and_load_keeps_strategy_and_state(tmp_path, two_head_data, strategy):
    x, y = two_head_data
    model = make_trunk_model()
    model.compile(optimizer="adam", loss=TWO_HEAD_LOSS, strategy=strategy)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)

    assert type(loaded.strategy) is type(model.strategy)
    assert loaded.strategy.get_config() == model.strategy.get_config()
    state = [v.numpy() for v in model.strategy.weights]
    loaded_state = [v.numpy() for v in loaded.strategy.weights]
    assert len(state) == len(loaded_state) > 0
    for saved, restored in zip(state, loaded_state):
        np.testing.assert_array_equal(restored, saved)
    if strategy == "uncertainty":  # the learned variances moved and came back
        assert np.any(model.strategy.log_variance.numpy() != 0)
    if strategy == "gradnorm":
        assert int(loaded.strategy.weight_optimizer.iterations) == 8
    assert _max_weight_difference(model, loaded) == 0.0
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations)

    # Both continue identically (pcgrad's random task orders included: its RNG state is
    # part of the saved state).
    for m in (model, loaded):
        m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert _max_weight_difference(model, loaded) < 1e-6


def test_regularization_losses_are_added_once_as_in_keras():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = {"a": rng.normal(size=(32, 1)).astype("float32"),
         "b": rng.normal(size=(32, 1)).astype("float32")}

    def build(cls):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        h = keras.layers.Dense(8, kernel_regularizer="l2", name="trunk")(inputs)
        return cls(inputs, {"a": keras.layers.Dense(1, activity_regularizer="l1", name="a")(h),
                            "b": keras.layers.Dense(1, name="b")(h)})

    stock, balanced = build(keras.Model), build(lossbalance.BalancedModel)
    stock.compile(optimizer="sgd", loss="mse")
    balanced.compile(optimizer="sgd", loss="mse", strategy="pcgrad")  # reg joins J^T w + reg
    balanced_fixed = build(lossbalance.BalancedModel)
    balanced_fixed.compile(optimizer="sgd", loss="mse")
    for model in (stock, balanced, balanced_fixed):
        model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    assert _max_weight_difference(stock, balanced_fixed) < 1e-6
    np.testing.assert_allclose(balanced_fixed.evaluate(x, y, verbose=0),
                               stock.evaluate(x, y, verbose=0), rtol=1e-6)
    assert all(np.all(np.isfinite(w)) for w in balanced.get_weights())
