"""inspect_batch and GradientDiagnostics: the figures are the per-task gradients' own."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import TWO_HEAD_LOSS, make_trunk_model

from lossbalance.diagnostics import GradientDiagnostics, inspect_batch


@pytest.fixture
def compiled(two_head_data):
    model = make_trunk_model()
    model.compile(optimizer="adam", loss=TWO_HEAD_LOSS, strategy="pcgrad")
    return model


def _shared_jacobian(model, x, y):
    with tf.GradientTape(persistent=True) as tape:
        out = model(x, training=False)
        losses = model._task_losses(y, out)
    trunk = [v for v in model.trainable_variables if v.path.startswith("trunk")]
    rows = [tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(loss, trunk)], 0)
            for loss in losses]
    return tf.stack(rows).numpy().astype(float)


def test_fixed_strategy_is_the_keras_sum(compiled, two_head_data):
    x, y = two_head_data
    inspection = inspect_batch(compiled, x, y, strategy="fixed")
    jacobian = _shared_jacobian(compiled, x, y)
    np.testing.assert_allclose(inspection.gramian, jacobian @ jacobian.T, rtol=1e-4)
    np.testing.assert_allclose(inspection.weights, [1.0, 1.0])
    assert inspection.cosine_keras_strategy == pytest.approx(1.0)
    assert inspection.strategy_norm == pytest.approx(inspection.keras_norm)
    assert inspection.keras_norm == pytest.approx(np.linalg.norm(jacobian.sum(0)), rel=1e-4)
    np.testing.assert_allclose(np.diag(inspection.cosines), 1.0)
    np.testing.assert_allclose(inspection.alignment_keras, inspection.alignment_strategy)
    assert "| cls |" in inspection.summary()


def test_pcgrad_inspection_leaves_its_rng_untouched(compiled, two_head_data):
    x, y = two_head_data
    before = [v.numpy() for v in compiled.strategy.state_variables()]
    inspection = inspect_batch(compiled, x, y)
    after = [v.numpy() for v in compiled.strategy.state_variables()]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    g = inspection.gramian
    if g[0, 1] < 0:  # K = 2: each task is projected off the other once
        expected = [1 - g[0, 1] / g[0, 0], 1 - g[0, 1] / g[1, 1]]
    else:
        expected = [1.0, 1.0]
    np.testing.assert_allclose(inspection.weights, expected, rtol=1e-5)
    assert np.all(inspection.alignment_strategy >= -1e-6)  # two tasks: no task is hurt


def test_diagnostics_callback_logs_to_history_and_tensorboard(compiled, two_head_data, tmp_path):
    x, y = two_head_data
    callback = GradientDiagnostics(x[:16], {k: v[:16] for k, v in y.items()},
                                   every_n_steps=2, log_dir=tmp_path)
    history = compiled.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[callback])
    assert [step for step, _ in callback.records] == [2, 4, 6, 8]
    for key in ("cls_grad_norm", "reg_grad_norm", "cos_cls_reg"):
        assert len(history.history[key]) == 2
        assert history.history[key][-1] == callback.records[-1][1][key]
    assert -1.0 <= history.history["cos_cls_reg"][-1] <= 1.0
    assert list(tmp_path.glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="every_n_steps"):
        GradientDiagnostics(x, y, every_n_steps=0)


def test_inspection_plot(compiled, two_head_data, tmp_path):
    x, y = two_head_data
    inspect_batch(compiled, x, y).plot(tmp_path / "inspect.png")
    assert (tmp_path / "inspect.png").stat().st_size > 10_000
