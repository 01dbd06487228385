"""Benchmarks: data, a model builder and task metrics, registered by name.

A benchmark provides train / validation / test splits (generated, or shipped by a pip
package: nothing is downloaded), a function that builds an uncompiled `BalancedModel`, the
per-task losses, and the task metrics the comparison reports. Built in:

* `clfreg`: a classifier and a regressor on scikit-learn's 8x8 digits (losses ~1000x apart);
* `multidigits`: two overlapping 8x8 digits on one canvas; tasks: left digit, right digit;
* `synthetic`: the GradNorm paper's regression, tasks whose scales span orders of magnitude;
* `mnist1d`: MNIST-1D signals from the `mnist1d` package's generator; tasks: the digit
  (cross-entropy) and when it occurs, in milliseconds (MSE, ~10^4 times the cross-entropy);
* `toy`: the two-objective toy problem of the CAGrad / Nash-MTL / FAMO papers
  (`experiments.toy`; its runs follow points, not networks).

Register your own with `@register_benchmark("name")` on a function `(seed) -> Benchmark`;
importing the module that defines it makes it available to `experiments.runner.compare`, to
`experiments.__main__.main` and to `python -m experiments compare --benchmark name
--import my_module`:

    import keras, lossbalance
    from experiments.benchmarks import Benchmark, TaskMetric, register_benchmark, split

    @register_benchmark("mine")
    def mine(seed=0):
        x, y = ...                                   # arrays; y a dict by task name
        def build_model(model_seed):                 # an uncompiled BalancedModel
            keras.utils.set_random_seed(model_seed)
            ...
        train, validation, test = split(x, y, seed)
        return Benchmark("mine", "what it is", train, validation, test, build_model,
                         loss={"a": "mse", "b": "mse"}, metrics={"a": ["mae"], "b": ["mae"]},
                         task_metrics=[TaskMetric("a", "a_mae", higher_is_better=False),
                                       TaskMetric("b", "b_mae", higher_is_better=False)])

`TaskMetric.name` is a key of the Keras logs (`<output>_<metric>`, or `<output>_loss` for a
task's own loss). Benchmarks are built once per (name, seed) and cached.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import keras
import numpy as np

import lossbalance


@dataclass(frozen=True)
class TaskMetric:
    task: str
    name: str  # a key of the Keras logs without prefix, e.g. "cls_accuracy"
    higher_is_better: bool


@dataclass
class Split:
    x: np.ndarray
    y: dict

    def __len__(self):
        return len(self.x)

    def head(self, n: int) -> "Split":
        return Split(self.x[:n], {task: values[:n] for task, values in self.y.items()})


@dataclass
class Benchmark:
    """A supervised multi-task benchmark.

    Attributes:
        build_model: `model_seed -> uncompiled BalancedModel` (seed the initialisation).
        loss, metrics: as for `BalancedModel.compile` (dicts by task name).
        task_metrics: what the tables report and delta-m% averages over.
        select_on: model selection on validation: "val_loss" (the plain Keras total) or
            "val_loss_ratio" (sum_k L_k / L_k(0), for tasks on very different scales).
        quick_sizes: train / validation / test samples kept by `--quick`.
        ls_ratios: the linear-scalarisation sweep (two-task benchmarks): fixed weights
            w_k proportional to c_k / L_k(0) with c = (1, ratio).
    """

    name: str
    description: str
    train: Split
    validation: Split
    test: Split
    build_model: Callable[[int], lossbalance.BalancedModel]  # seed -> uncompiled model
    loss: dict
    metrics: dict = field(default_factory=dict)
    task_metrics: list = field(default_factory=list)
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 1e-3
    select_on: str = "val_loss"
    quick_sizes: tuple = (64, 32, 32)
    ls_ratios: tuple = (0.01, 0.1, 1.0, 10.0, 100.0)
    quick_ls_ratios: tuple = (0.1, 10.0)
    default_seeds: int = 3
    show_loss_ratio: bool = False  # a sum_k L_k / L_k(0) column in the tables
    custom = False  # trained by the standard runner (fit), not by a benchmark's own `run`

    @property
    def task_names(self) -> list[str]:
        return [task for task, loss in self.loss.items() if loss is not None]

    def quick(self) -> "Benchmark":
        """The same benchmark on small subsets (for `--quick`)."""
        from dataclasses import replace

        n_train, n_val, n_test = self.quick_sizes
        return replace(self, train=self.train.head(n_train),
                       validation=self.validation.head(n_val), test=self.test.head(n_test))


_BENCHMARKS: dict[str, Callable] = {}
_CACHE: dict = {}


def register_benchmark(name: str):
    """Decorator: make a `(seed) -> Benchmark` factory available by name.

    Registering a name again replaces the earlier factory (and forgets its cached builds).
    """

    def decorator(factory):
        _BENCHMARKS[name] = factory
        for key in [k for k in _CACHE if k[0] == name]:
            del _CACHE[key]
        return factory

    return decorator


def available_benchmarks() -> list[str]:
    return sorted(_BENCHMARKS)


def get_benchmark(name: str, seed: int = 0):
    """The benchmark `name` built with data seed `seed` (cached)."""
    if name not in _BENCHMARKS:
        raise ValueError(
            f"Unknown benchmark {name!r}; available: {', '.join(available_benchmarks())}.")
    key = (name, seed)
    if key not in _CACHE:
        factory = _BENCHMARKS[name]
        params = inspect.signature(factory).parameters
        _CACHE[key] = factory(seed) if params else factory()
    return _CACHE[key]


def split_indices(n: int, seed: int, fractions=(0.6, 0.2)):
    """Shuffled train / validation / test index arrays."""
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_val = int(fractions[0] * n), int(fractions[1] * n)
    return order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]


def _take(x, y, index):
    return Split(x[index], {task: values[index] for task, values in y.items()})


def split(x, y: dict, seed: int = 0, fractions=(0.6, 0.2)):
    """Shuffled train / validation / test `Split`s of arrays x and targets y (by task)."""
    return tuple(_take(x, y, index) for index in split_indices(len(x), seed, fractions))


def trunk_and_heads(input_name, input_size, widths, heads):
    """A builder `(seed) -> BalancedModel`: a ReLU MLP trunk of the given widths
    (`trunk_1`, `trunk_2`, ...) with one linear head per task, {name: output units}."""

    def build_model(model_seed: int) -> lossbalance.BalancedModel:
        keras.utils.set_random_seed(model_seed)
        inputs = keras.Input((input_size,), name=input_name)
        h = inputs
        for i, width in enumerate(widths):
            h = keras.layers.Dense(width, activation="relu", name=f"trunk_{i + 1}")(h)
        return lossbalance.BalancedModel(
            inputs, {task: keras.layers.Dense(units, name=task)(h)
                     for task, units in heads.items()})

    return build_model


@register_benchmark("clfreg")
def clfreg(seed: int = 0) -> Benchmark:
    """A shared trunk with a classifier and a regressor, on scikit-learn's 8x8 digits.

    Tasks: `digit` (10-way softmax, cross-entropy) and `ink` (MSE regression of the total
    ink of the image, in raw pixel units, so its loss is ~1000x the classifier's: the
    classic case where a plain sum lets one task drown the other).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = {
        "digit": digits.target.astype("int64"),
        "ink": digits.data.sum(axis=1, keepdims=True).astype("float32"),
    }
    train, val, test = split_indices(len(x), seed)

    build_model = trunk_and_heads("pixels", 64, (64, 64), {"digit": 10, "ink": 1})

    return Benchmark(
        name="clfreg",
        description=clfreg.__doc__.strip().splitlines()[0],
        train=_take(x, y, train),
        validation=_take(x, y, val),
        test=_take(x, y, test),
        build_model=build_model,
        loss={"digit": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              "ink": "mse"},
        metrics={"digit": ["accuracy"], "ink": ["mae"]},
        task_metrics=[TaskMetric("digit", "digit_accuracy", True),
                      TaskMetric("ink", "ink_mae", False)],
        epochs=20,
        batch_size=64,
        # once the regression has fallen ~10^4-fold, weights balanced at initialisation
        # starve it: the useful part of the front lies at large ratios
        ls_ratios=(1.0, 10.0, 100.0, 1e3, 1e4),
    )


@register_benchmark("multidigits")
def multidigits(seed: int = 0, pairs=(3000, 1000, 1000)) -> Benchmark:
    """Two overlapping 8x8 digits on one canvas (Multi-MNIST-style, from scikit-learn).

    The source images are split into train / validation / test pools first, so no digit image
    appears in two splits; each example puts one image at the left of a 10 x 14 canvas and
    another at the right (random shifts of up to 2 rows and 1 column), overlapping over 3 to
    5 columns, combined by a pixel-wise maximum. Tasks: `left` and `right`, the two digits'
    classes (cross-entropy, accuracy), on a shared MLP trunk.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")
    rng = np.random.default_rng(seed)
    pools = split_indices(len(images), seed)
    splits = []
    for pool, count in zip(pools, pairs):
        left, right = rng.choice(pool, count), rng.choice(pool, count)
        canvas = np.zeros((count, 10, 14), "float32")
        for i in range(count):
            r1, c1, r2, c2 = rng.integers(0, 3), rng.integers(0, 2), rng.integers(0, 3), \
                rng.integers(0, 2)
            canvas[i, r1:r1 + 8, c1:c1 + 8] = images[left[i]]
            canvas[i, r2:r2 + 8, 5 + c2:13 + c2] = np.maximum(
                canvas[i, r2:r2 + 8, 5 + c2:13 + c2], images[right[i]])
        splits.append(Split(canvas.reshape(count, -1), {
            "left": digits.target[left].astype("int64"),
            "right": digits.target[right].astype("int64")}))

    build_model = trunk_and_heads("canvas", 140, (128, 64), {"left": 10, "right": 10})

    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return Benchmark(
        name="multidigits",
        description=multidigits.__doc__.strip().splitlines()[0],
        train=splits[0], validation=splits[1], test=splits[2],
        build_model=build_model,
        loss={"left": ce, "right": ce},
        metrics={"left": ["accuracy"], "right": ["accuracy"]},
        task_metrics=[TaskMetric("left", "left_accuracy", True),
                      TaskMetric("right", "right_accuracy", True)],
        epochs=15,
        batch_size=64,
        ls_ratios=(0.25, 0.5, 1.0, 2.0, 4.0),
        quick_ls_ratios=(0.5, 2.0),
    )


MNIST1D_RATE_HZ = 100.0  # the nominal sampling rate that puts `time` in milliseconds


def mnist1d_signals(num_samples=5000, seed=42, **overrides):
    """MNIST-1D signals made by the `mnist1d` package's own generator, with where each digit
    lies in its signal.

    Follows `mnist1d.data.make_dataset` (Greydanus 2020, arXiv:2011.14439; nothing is
    downloaded): each of the 10 one-dimensional digit templates is padded with 36-60 zeros,
    stretched to 72 points, scaled, shifted by 0-47 points (a roll), surrounded by correlated
    noise, sheared and resampled to 40 points, by `mnist1d.transform.transform`;
    `num_samples // 10` signals per class, shuffled. `overrides` replace entries of
    `mnist1d.data.get_dataset_args()` (e.g. `corr_noise_scale=0`).

    The package does not return the random shift and padding; they are read by replaying the
    first three draws of each `transform` call (padding, scale, shift, in the package's
    order) from a copy of NumPy's global generator state, which `transform` then consumes
    as usual. The template's centre, at point 5.5 of 12, lands at
    (shift + 5.5 * 71 / (11 + padding)) * 39 / 71 of the 40 final samples.

    Returns (x, digit, centre): signals (n, 40) float32, not normalised (the package's
    `make_dataset` returns the same signals, normalised and split); classes (n,) int64;
    centres in samples (n,) float32. NumPy's global random state, which the generator
    seeds and draws from, is restored afterwards.
    """
    try:
        from mnist1d.data import get_dataset_args, get_templates
        from mnist1d.transform import transform
    except ImportError as error:
        raise ImportError("The mnist1d benchmark needs the `mnist1d` package: "
                          "pip install mnist1d (or lossbalance[experiments]).") from error
    args = get_dataset_args()
    unknown = set(overrides) - set(vars(args))
    if unknown:
        raise ValueError(f"Unknown MNIST-1D arguments {sorted(unknown)}; known: "
                         f"{sorted(vars(args))}.")
    vars(args).update(overrides, num_samples=num_samples, seed=seed)
    templates = get_templates()
    stretched = args.template_len + args.padding[-1]  # 72 points before resampling
    low, high = args.padding
    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        xs, ys, centres = [], [], []
        for label in templates["y"]:
            for _ in range(num_samples // len(templates["y"])):
                state = np.random.get_state()
                padding = low + int(np.random.rand() * (high - low + 1))
                np.random.rand()  # the scale
                shift = int(np.random.choice(args.max_translation))
                np.random.set_state(state)
                signal, _ = transform(templates["x"][label], templates["t"], args)
                middle = (args.template_len - 1) / 2
                on_stretched = shift + middle * (stretched - 1) / (
                    args.template_len - 1 + padding)
                xs.append(signal)
                ys.append(label)
                centres.append(on_stretched * (args.final_seq_length - 1) / (stretched - 1))
        order = np.random.permutation(len(ys))
    finally:
        np.random.set_state(saved)
    return (np.stack(xs)[order].astype("float32"), np.asarray(ys, "int64")[order],
            np.asarray(centres, "float32")[order])


@register_benchmark("mnist1d")
def mnist1d(seed: int = 0, num_samples=5000) -> Benchmark:
    """MNIST-1D signals (generated by the `mnist1d` package): the digit and when it occurs.

    Data: 5000 signals of 40 samples from `mnist1d`'s generator with its default arguments
    and seed 42 (`mnist1d_signals`; no download), normalised to mean 0 and standard deviation
    1 over the whole set as the package does, split 60/20/20 by `seed`. Read as a sensor
    window sampled at 100 Hz (400 ms). Tasks: `digit` (10-way softmax, cross-entropy,
    accuracy) and `time`, the time of the digit's centre in the window in milliseconds
    (MSE, MAE): ~30 to ~300 ms, so its loss starts ~10^4 times the classifier's, as a
    regressor in raw units does beside a classifier. Network: two 1-D convolutions (32
    filters of 5; the second with stride 2) and a dense layer of 64 shared; linear heads.
    Model selection on sum_k L_k / L_k(0) on validation.
    """
    x, digit, centre = mnist1d_signals(num_samples)
    x = ((x - x.mean()) / x.std()).astype("float32")
    y = {"digit": digit, "time": (centre * 1000.0 / MNIST1D_RATE_HZ)[:, None]}
    train, validation, test = split(x, y, seed)
    length = x.shape[1]

    def build_model(model_seed: int) -> lossbalance.BalancedModel:
        keras.utils.set_random_seed(model_seed)
        inputs = keras.Input((length,), name="signal")
        h = keras.layers.Reshape((length, 1))(inputs)
        h = keras.layers.Conv1D(32, 5, padding="same", activation="relu", name="conv_1")(h)
        h = keras.layers.Conv1D(32, 5, strides=2, padding="same", activation="relu",
                                name="conv_2")(h)
        h = keras.layers.Flatten()(h)
        h = keras.layers.Dense(64, activation="relu", name="trunk")(h)
        return lossbalance.BalancedModel(inputs, {
            "digit": keras.layers.Dense(10, name="digit")(h),
            "time": keras.layers.Dense(1, name="time")(h)})

    return Benchmark(
        name="mnist1d",
        description=mnist1d.__doc__.strip().splitlines()[0],
        train=train, validation=validation, test=test,
        build_model=build_model,
        loss={"digit": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              "time": "mse"},
        metrics={"digit": ["accuracy"], "time": ["mae"]},
        task_metrics=[TaskMetric("digit", "digit_accuracy", True),
                      TaskMetric("time", "time_mae", False)],
        epochs=20,
        batch_size=64,
        select_on="val_loss_ratio",
        # measured (1 seed): the best validation Δm% lies between ratios 1 and 10
        ls_ratios=(0.1, 1.0, 10.0, 100.0, 1e3),
    )


SYNTHETIC_SIGMAS = (1.0, 10.0, 100.0)


@register_benchmark("synthetic")
def synthetic(seed: int = 0, sigmas=SYNTHETIC_SIGMAS, n=(2000, 500, 500), inputs=250,
              outputs=100) -> Benchmark:
    """The GradNorm paper's regression: f_i(x) = sigma_i tanh((B + eps_i) x / sqrt(250)).

    x in R^250 (uniform in [-1, 1]), outputs in R^100, B ~ N(0, 10) shared by the tasks,
    eps_i ~ N(0, 3.5) per task (variances, as in the paper), task scales sigma_i = 1, 10,
    100 (MSE losses 10^4 apart). The 1/sqrt(250) keeps the tanh out of saturation (the
    paper does not give the input's distribution). Tasks `s1`, `s10`, `s100` (MSE) on the
    paper's trunk: 4 ReLU layers of 100 units, linear heads. Model selection on
    sum_i L_i / L_i(0) on validation; the tables add that ratio on the test split.
    """
    rng = np.random.default_rng(seed)
    b = rng.normal(0.0, np.sqrt(10.0), size=(inputs, outputs))
    total = sum(n)
    x = rng.uniform(-1.0, 1.0, size=(total, inputs)).astype("float32")
    y = {}
    for sigma in sigmas:
        eps = rng.normal(0.0, np.sqrt(3.5), size=(inputs, outputs))
        y[f"s{sigma:g}"] = (sigma * np.tanh(x @ (b + eps) / np.sqrt(inputs))).astype("float32")
    fractions = (n[0] / total, n[1] / total)
    train, validation, test = split(x, y, seed, fractions)
    tasks = list(y)

    build_model = trunk_and_heads("x", inputs, (100,) * 4, dict.fromkeys(tasks, outputs))

    return Benchmark(
        name="synthetic",
        description=synthetic.__doc__.strip().splitlines()[0],
        train=train, validation=validation, test=test,
        build_model=build_model,
        loss={task: "mse" for task in tasks},
        task_metrics=[TaskMetric(task, f"{task}_loss", False) for task in tasks],
        epochs=30,
        batch_size=100,
        select_on="val_loss_ratio",
        show_loss_ratio=True,
    )


@register_benchmark("toy")
def toy(seed: int = 0):
    """The two-objective toy problem (see `experiments.toy`)."""
    from experiments.toy import ToyBenchmark

    return ToyBenchmark()


@register_benchmark("toy_shifted")
def toy_shifted(seed: int = 0):
    """The toy problem with the losses shifted to be positive (for log-based strategies)."""
    from experiments.toy import ToyBenchmark

    return ToyBenchmark(offsets=(2.5, 21.0), name="toy_shifted")
