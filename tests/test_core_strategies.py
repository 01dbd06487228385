"""The four foundation strategies: known answers and the properties the papers claim."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import TWO_HEAD_LOSS, make_trunk_model

import lossbalance
from lossbalance import strategies
from lossbalance.gradients import TaskGradients, task_gradients


def _pcgrad_direction(jacobian, seed=0):
    strategy = strategies.PCGrad(seed=seed)
    strategy.bind([f"t{i}" for i in range(len(jacobian))])
    jacobian = tf.constant(jacobian, tf.float64)
    gramian = tf.matmul(jacobian, jacobian, transpose_b=True)
    weights = strategy.gramian_weights(gramian, tf.zeros(len(jacobian), tf.float64))
    return tf.linalg.matvec(jacobian, weights, transpose_a=True).numpy(), weights.numpy()


def _pcgrad_reference(jacobian, orders):
    """PCGrad as the paper writes it, on explicit vectors, for given task orders."""
    jacobian = np.asarray(jacobian, float)
    total = np.zeros(jacobian.shape[1])
    for i, order in enumerate(orders):
        g = jacobian[i].copy()
        for j in order:
            dot = g @ jacobian[j]
            if dot < 0 and jacobian[j] @ jacobian[j] > 0:
                g -= dot / (jacobian[j] @ jacobian[j]) * jacobian[j]
        total += g
    return total


def test_pcgrad_known_answer():
    direction, _ = _pcgrad_direction([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    np.testing.assert_allclose(direction, [0.5848, 3.8012, 3.8012], atol=5e-5)


def test_pcgrad_matches_explicit_projection_for_random_orders():
    rng = np.random.default_rng(3)
    jacobian = rng.normal(size=(5, 12))
    strategy = strategies.PCGrad(seed=11)
    strategy.bind(list("abcde"))
    orders = strategy.projection_orders().numpy()
    strategy = strategies.PCGrad(seed=11)  # same seed: the same orders on the first draw
    strategy.bind(list("abcde"))
    j = tf.constant(jacobian)
    weights = strategy.gramian_weights(tf.matmul(j, j, transpose_b=True), tf.zeros(5, j.dtype))
    np.testing.assert_allclose(jacobian.T @ weights.numpy(),
                               _pcgrad_reference(jacobian, orders), rtol=1e-10)
    assert all(sorted(order) == sorted(set(range(5)) - {i}) for i, order in enumerate(orders))


def test_pcgrad_leaves_non_conflicting_gradients_summed():
    jacobian = np.abs(np.random.default_rng(0).normal(size=(4, 6)))  # all dots >= 0
    direction, weights = _pcgrad_direction(jacobian)
    np.testing.assert_allclose(weights, np.ones(4))
    np.testing.assert_allclose(direction, jacobian.sum(axis=0), rtol=1e-12)


def test_pcgrad_zero_gradient_stays_finite():
    direction, weights = _pcgrad_direction([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [-1.0, 1.0, 0.0]])
    assert np.all(np.isfinite(direction)) and np.all(np.isfinite(weights))
    direction, _ = _pcgrad_direction(np.zeros((3, 4)))
    np.testing.assert_array_equal(direction, np.zeros(4))


def test_pcgrad_orders_repeat_under_a_seed_and_change_between_steps():
    def draws(seed=None):
        if seed is None:
            keras.utils.set_random_seed(42)
        strategy = strategies.PCGrad(seed=seed)
        strategy.bind([f"t{i}" for i in range(6)])
        return [strategy.projection_orders().numpy() for _ in range(4)]

    for seed in (7, None):  # an explicit seed, or keras.utils.set_random_seed
        first, second = draws(seed), draws(seed)
        for a, b in zip(first, second):
            np.testing.assert_array_equal(a, b)
        assert any(not np.array_equal(first[0], later) for later in first[1:])


@pytest.mark.parametrize("direct_max_tasks", [0, 4])
def test_task_gradients_gramian_and_combination(monkeypatch, direct_max_tasks):
    """G = J J^T and J^T w, from stacked copies (limit 0) or from the task gradients one
    by one (few tasks), equal numpy's on J, with a task that misses a shared variable, a
    head reached by one task, and a sparse (embedding-style) gradient."""
    monkeypatch.setattr(lossbalance.gradients, "DIRECT_MAX_TASKS", direct_max_tasks)
    rng = np.random.default_rng(3)
    variables = [tf.Variable(tf.zeros((3, 4))), tf.Variable(tf.zeros((4,))),
                 tf.Variable(tf.zeros((2,)))]
    dense = [[rng.normal(size=v.shape).astype("float32") for v in variables]
             for _ in range(3)]
    dense[2][1] = np.zeros(4, "float32")  # task 2 misses variable 1
    per_task = [[tf.constant(g) for g in row] for row in dense]
    per_task[2][1] = None
    per_task[1][2] = per_task[2][2] = None  # variable 2: task 0's head
    rows = tf.constant(dense[1][0][[0, 2]])  # task 1's gradient of variable 0, sparse
    per_task[1][0] = tf.IndexedSlices(rows, tf.constant([0, 2]), tf.constant([3, 4]))
    dense[1][0][1] = 0.0
    grads = TaskGradients(per_task, variables)
    assert grads.shared == [0, 1] and grads.owner == {2: 0}
    jacobian = np.stack([np.concatenate([row[0].ravel(), row[1]]) for row in dense])
    np.testing.assert_allclose(grads.gramian(tf.float64).numpy(), jacobian @ jacobian.T,
                               rtol=1e-6)
    weights = np.array([0.5, -1.0, 2.0], "float32")
    combined = grads.combine(tf.constant(weights))
    expected = weights @ jacobian
    np.testing.assert_allclose(np.concatenate([combined[0].numpy().ravel(),
                                               combined[1].numpy()]), expected, rtol=1e-5)
    np.testing.assert_allclose(grads.jacobian().numpy(), jacobian)


def test_pcgrad_update_in_the_model(two_head_data):
    """One SGD step with lr 1: shared variables move by -PCGrad(J), heads by -own gradient."""
    x, y = two_head_data
    model = make_trunk_model()
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=TWO_HEAD_LOSS, strategy="pcgrad")
    before = [v.numpy() for v in model.trainable_variables]
    with tf.GradientTape(persistent=True) as tape:
        out = model(x, training=True)
        losses = model._task_losses(y, out)
    grads = TaskGradients(task_gradients(tape, losses, model.trainable_variables),
                          model.trainable_variables)
    paths = [v.path for v in model.trainable_variables]
    assert [paths[i] for i in grads.shared] == ["trunk/kernel", "trunk/bias"]
    assert {paths[i]: k for i, k in grads.owner.items()} == {
        "cls/kernel": 0, "cls/bias": 0, "reg/kernel": 1, "reg/bias": 1}
    jacobian = grads.jacobian().numpy()
    expected_shared = _pcgrad_reference(jacobian, [[1], [0]])  # K = 2: the order is fixed

    model.train_on_batch(x, y)
    deltas = [b - v.numpy() for b, v in zip(before, model.trainable_variables)]
    np.testing.assert_allclose(np.concatenate([deltas[0].ravel(), deltas[1].ravel()]),
                               expected_shared, rtol=2e-4, atol=1e-6)
    for i, k in grads.owner.items():
        np.testing.assert_allclose(deltas[i], grads.per_task[k][i].numpy(), rtol=2e-4,
                                   atol=1e-6)


def test_uncertainty_learns_the_residual_variances():
    """Two regressions with known noise variances: at the optimum sigma_k^2 = L_k, and a
    model that can fit the means leaves L_k = the noise variance."""
    rng = np.random.default_rng(0)
    n, variances = 2048, np.array([0.25, 4.0])
    x = rng.normal(size=(n, 4)).astype("float32")
    y = {
        "a": (x @ [[1.0], [0.5], [-1.0], [0.0]] + np.sqrt(variances[0])
              * rng.normal(size=(n, 1))).astype("float32"),
        "b": (x @ [[0.0], [-1.0], [2.0], [1.0]] + np.sqrt(variances[1])
              * rng.normal(size=(n, 1))).astype("float32"),
    }
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    trunk = keras.layers.Dense(8, name="trunk")(inputs)
    model = lossbalance.BalancedModel(
        inputs, {"a": keras.layers.Dense(1, name="a")(trunk),
                 "b": keras.layers.Dense(1, name="b")(trunk)})
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse", strategy="uw")
    history = model.fit(x, y, batch_size=256, epochs=40, verbose=0)
    learned = model.strategy.variances
    final_losses = np.array([history.history["a_loss"][-1], history.history["b_loss"][-1]])
    np.testing.assert_allclose(final_losses, variances, rtol=0.1)
    np.testing.assert_allclose(learned, variances, rtol=0.15)
    # The logged weight is the regression form's 1 / (2 sigma^2).
    np.testing.assert_allclose(history.history["b_weight"][-1], 0.5 / learned[1], rtol=0.1)


def test_uncertainty_classification_form_optimum():
    """For a fixed loss L the classification form's optimum is sigma^2 = 2 L."""
    strategy = strategies.UncertaintyWeighting(forms=["regression", "classification"])
    strategy.bind(["r", "c"])
    losses = tf.constant([3.0, 3.0])
    optimizer = keras.optimizers.Adam(0.05)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            objective = tf.reduce_sum(strategy.loss_weights(losses) * losses) + \
                strategy.extra_loss(losses)
        optimizer.apply(tape.gradient(objective, strategy.trainable_variables),
                        strategy.trainable_variables)

    for _ in range(600):
        step()
    np.testing.assert_allclose(strategy.variances, [3.0, 6.0], rtol=1e-2)


def _gradnorm_synthetic(n=1024, d=50, outputs=10, sigmas=(1.0, 3.0, 10.0), seed=0):
    """The GradNorm paper's regression: f_i(x) = sigma_i tanh((B + eps_i) x)."""
    rng = np.random.default_rng(seed)
    b = rng.normal(0.0, np.sqrt(10.0), size=(d, outputs))
    x = rng.uniform(-1.0, 1.0, size=(n, d)).astype("float32")
    y = {f"t{i}": (s * np.tanh(x @ (b + rng.normal(0.0, np.sqrt(3.5), size=(d, outputs)))
                               / np.sqrt(d))).astype("float32")
         for i, s in enumerate(sigmas)}
    return x, y


def _train_synthetic(strategy, x, y, epochs):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((x.shape[1],))
    h = keras.layers.Dense(32, activation="relu", name="trunk_1")(inputs)
    h = keras.layers.Dense(32, activation="relu", name="trunk_2")(h)
    model = lossbalance.BalancedModel(
        inputs, {name: keras.layers.Dense(10, name=name)(h) for name in y})
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", strategy=strategy)
    history = model.fit(x, y, batch_size=128, epochs=epochs, verbose=0)
    losses = np.array([history.history[f"{name}_loss"] for name in y])
    return model, history, losses[:, -1] / losses[:, 0]


def test_gradnorm_balances_training_rates():
    x, y = _gradnorm_synthetic()
    _, _, fixed_rates = _train_synthetic("fixed", x, y, epochs=60)
    model, history, rates = _train_synthetic("gradnorm", x, y, epochs=60)
    weights = model.strategy.task_weights.numpy()
    assert np.all(weights > 0)
    assert weights.sum() == pytest.approx(3.0, rel=1e-5)
    # Every logged epoch average sums to K too, but the first: its first step (of 8) only
    # measures the gradient norms, with weights 0 (initial_weights="balanced").
    logged = np.array([history.history[f"t{i}_weight"] for i in range(3)]).sum(axis=0)
    np.testing.assert_allclose(logged[1:], 3.0, rtol=1e-5)
    assert logged[0] == pytest.approx(3.0 * 7 / 8, rel=1e-5)
    # Larger-scale tasks (larger gradients) get smaller weights...
    assert weights[0] > weights[1] > weights[2]
    # ...and the tasks' training rates L(t)/L(0) end up much closer together.
    assert np.std(np.log(rates)) < 0.5 * np.std(np.log(fixed_rates))


def test_gradnorm_uses_the_named_layer(two_head_data):
    x, y = two_head_data
    model = make_trunk_model()
    model.compile(optimizer="sgd", loss=TWO_HEAD_LOSS,
                  strategy=strategies.GradNorm(layer="trunk"))
    model.fit(x, y, epochs=1, verbose=0)
    assert int(model.strategy.weight_optimizer.iterations) == 2
    assert model.strategy.task_weights.numpy().sum() == pytest.approx(2.0, rel=1e-6)
