"""Batches that are not the usual full, dense batch: empty, an uneven last one, ragged."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import TWO_HEAD_LOSS, make_trunk_model

import lossbalance


def _batches(x, y, sizes):
    """A tf.data pipeline of batches of the given sizes (0: an empty batch, as a filter
    after `batch` can make), with a batch dimension unknown when the step is traced."""
    bounds = np.cumsum([0, *sizes])
    batches = [(x[a:b], {k: v[a:b] for k, v in y.items()})
               for a, b in zip(bounds[:-1], bounds[1:])]
    spec = (tf.TensorSpec((None, *x.shape[1:]), x.dtype),
            {k: tf.TensorSpec((None, *v.shape[1:]), v.dtype) for k, v in y.items()})
    dataset = tf.data.Dataset.from_generator(lambda: iter(batches), output_signature=spec)
    # A known length: Keras then makes no extra call past the end (which, for a pipeline
    # of unknown length, can advance data-independent state such as a seed generator).
    return dataset.apply(tf.data.experimental.assert_cardinality(len(sizes)))


def _everything(model):
    return ([v.numpy() for v in model.weights] + [v.numpy() for v in model.optimizer.variables]
            + [v.numpy() for v in model.strategy.state_variables()])


WITH_EMPTY = [0, 16, 0, 16, 8]


@pytest.mark.parametrize("strategy, nonfinite, mode, pipeline", [
    # gramian; a batch size unknown when the step is traced
    ("mgda", "skip", "graph", WITH_EMPTY),
    # jacobian with K x P state, built before the (empty) first step; an empty batch is not
    # a non-finite step; eager: batch sizes known, empty ones seen as such in Python
    ("moco", "raise", "eager", WITH_EMPTY),
    ("gradnorm", "skip", "xla", [16, 16, 8]),  # loss + layer gradients, under XLA
], ids=["mgda-graph", "moco-eager", "gradnorm-xla"])
def test_empty_batches_are_no_ops_and_an_uneven_last_batch_an_ordinary_step(
        two_head_data, strategy, nonfinite, mode, pipeline):
    """With `nonfinite` set, batches of 0, 16, 0, 16 and 8 rows train exactly as the
    batches of 16, 16 and 8 one by one: empty batches change no weight, optimizer slot
    (Keras would step Adam on zero gradients) or strategy state and add nothing to the
    logs, and the last, smaller batch is an ordinary step (under XLA too), weighted by its
    size in the epoch's logs."""
    x, y = two_head_data
    sizes = [16, 16, 8]

    def compiled(jit_compile, run_eagerly):
        model = make_trunk_model()
        model.compile(optimizer="adam", loss=TWO_HEAD_LOSS, strategy=strategy,
                      nonfinite=nonfinite, jit_compile=jit_compile, run_eagerly=run_eagerly)
        return model

    model = compiled(mode == "xla", mode == "eager")
    history = model.fit(_batches(x, y, pipeline), epochs=1, verbose=0).history
    reference = compiled(False, mode != "graph")  # batch by batch, without XLA
    bounds = np.cumsum([0, *sizes])
    logs = [reference.train_on_batch(x[a:b], {k: v[a:b] for k, v in y.items()},
                                     return_dict=True)
            for a, b in zip(bounds[:-1], bounds[1:])]

    assert int(model.optimizer.iterations) == int(reference.optimizer.iterations) == 3
    for a, b in zip(_everything(model), _everything(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for key in ("cls_loss", "reg_loss"):  # weighted by batch size
        expected = np.dot(sizes, [log[key] for log in logs]) / sum(sizes)
        np.testing.assert_allclose(history[key], [expected], rtol=1e-5, err_msg=key)
    for key in ("cls_weight", "reg_weight"):  # one entry per (non-empty) step
        expected = np.mean([log[key] for log in logs])
        np.testing.assert_allclose(history[key], [expected], rtol=1e-5, err_msg=key)
    assert history.get("skipped_steps", [0.0]) == [0.0]


class BagModel(lossbalance.BalancedModel):
    """Averages each sample's set of vectors (a ragged batch), then a trunk and two heads."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.trunk = keras.layers.Dense(16, activation="tanh", name="trunk")
        self.cls = keras.layers.Dense(3, name="cls")
        self.reg = keras.layers.Dense(1, name="reg")

    def call(self, x):
        if isinstance(x, tf.RaggedTensor):
            x = tf.reduce_mean(x, axis=1)
        h = self.trunk(x)
        return {"cls": self.cls(h), "reg": self.reg(h)}


def _ragged(rng, rows, width=None):
    lengths = rng.integers(1, 5, size=rows)
    shape = (lengths.sum(),) if width is None else (lengths.sum(), width)
    return tf.RaggedTensor.from_row_lengths(rng.normal(size=shape).astype("float32"), lengths)


def test_ragged_inputs_work_when_the_model_handles_them(two_head_data):
    """A model that averages ragged inputs trains exactly as on the averages themselves."""
    _, y = two_head_data
    rng = np.random.default_rng(3)
    bags = _ragged(rng, 64, width=8)
    means = tf.reduce_mean(bags, axis=1).numpy()
    models = []
    for inputs, eager in ((bags, False), (means, True)):
        keras.utils.set_random_seed(0)
        model = BagModel()
        model.compile(optimizer="adam", loss=TWO_HEAD_LOSS, nonfinite="skip",
                      run_eagerly=eager)
        model.fit(tf.data.Dataset.from_tensor_slices((inputs, y)).batch(64), epochs=1,
                  verbose=0)
        models.append(model)
    for a, b in zip(models[0].get_weights(), models[1].get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_ragged_targets_need_a_loss_that_handles_them(two_head_data):
    """Keras' losses would broadcast ragged targets against a dense output silently: refused,
    naming the task. A loss of the user's own receives them as they are."""
    x, y = two_head_data
    rng = np.random.default_rng(4)
    targets = dict(y, reg=_ragged(rng, 64))
    data = tf.data.Dataset.from_tensor_slices((x, targets)).batch(16)
    model = make_trunk_model()
    model.compile(optimizer="sgd", loss=TWO_HEAD_LOSS, strategy="pcgrad")
    with pytest.raises(ValueError, match=r"Task 'reg': the targets are a tf.RaggedTensor"
                                         r".*to_tensor\(\)"):
        model.fit(data, epochs=1, verbose=0)

    def mean_over_row(target, prediction):  # each sample: mean_j (t_j - p)^2
        return tf.reduce_mean(tf.square(target - prediction), axis=-1)

    model.compile(optimizer="sgd", loss=dict(TWO_HEAD_LOSS, reg=mean_over_row),
                  strategy="pcgrad")
    logs = model.evaluate(data, verbose=0, return_dict=True)
    prediction = model(x)["reg"].numpy()
    expected = np.mean([np.mean((row - p) ** 2)
                        for row, p in zip(targets["reg"].to_list(), prediction[:, 0])])
    np.testing.assert_allclose(logs["reg_loss"], expected, rtol=1e-5)
