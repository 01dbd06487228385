"""The per-task gradients of a step (`lossbalance.gradients.TaskGradients`): the
shared/head split, the Gramian and the combination J^T w against NumPy."""

import numpy as np
import pytest
import tensorflow as tf

import lossbalance
from lossbalance.gradients import TaskGradients


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
