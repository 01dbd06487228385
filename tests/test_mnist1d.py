"""The mnist1d benchmark: the `mnist1d` package's signals, where the digit lies in each, and
the two tasks on different scales."""

import numpy as np
import pytest

from experiments import benchmarks


# -- mnist1d -------------------------------------------------------------------------------------


def test_mnist1d_signals_are_the_packages_dataset():
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()
    x, digit, centre = benchmarks.mnist1d_signals(200, seed=5)
    assert np.array_equal(np.random.get_state()[1], state[1])  # global state restored
    args = get_dataset_args()
    args.num_samples, args.seed = 200, 5
    package = make_dataset(args)
    expected = np.concatenate([package["x"], package["x_test"]])
    np.testing.assert_allclose((x - x.mean()) / x.std(), expected, atol=1e-5)
    np.testing.assert_array_equal(digit, np.concatenate([package["y"], package["y_test"]]))
    assert x.shape == (200, 40) and np.bincount(digit).tolist() == [20] * 10
    assert 0 < centre.min() and centre.max() < 39


def test_mnist1d_centre_is_where_the_digit_lies():
    """Without noise and shear the signal is zero outside the (stretched, shifted) template:
    the middle of its support is the centre the generator's replayed draws give."""
    x, _, centre = benchmarks.mnist1d_signals(100, seed=1, corr_noise_scale=0.0,
                                              iid_noise_scale=0.0, shear_scale=0.0)
    for signal, c in zip(x, centre):
        support = np.flatnonzero(signal != 0)
        assert abs((support[0] + support[-1]) / 2 - c) <= 1.0
    with pytest.raises(ValueError, match="Unknown MNIST-1D arguments"):
        benchmarks.mnist1d_signals(10, noise=0.0)


def test_mnist1d_benchmark_tasks_on_different_scales():
    bench = benchmarks.mnist1d(num_samples=200)
    assert bench.task_names == ["digit", "time"]
    assert (len(bench.train), len(bench.validation), len(bench.test)) == (120, 40, 40)
    times = np.concatenate([bench.train.y["time"], bench.test.y["time"]])
    assert times.shape[1] == 1 and 0 < times.min() and times.max() < 400  # ms in 400 ms
    # the regression's MSE at a zero prediction is ~10^4 times a uniform classifier's loss
    assert 3e3 < np.mean(times ** 2) / np.log(10) < 3e4
    model = bench.build_model(0)
    out = model.predict(bench.test.x[:4], verbose=0)
    assert out["digit"].shape == (4, 10) and out["time"].shape == (4, 1)
