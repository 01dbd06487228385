"""Benchmarks: data, a model builder and task metrics, registered by name.

A benchmark provides train / validation / test splits (generated, or shipped by a pip
package: nothing is downloaded), a function that builds an uncompiled `BalancedModel`, the
per-task losses, and the task metrics the comparison reports. Register your own with
`@register_benchmark("name")` on a function returning a `Benchmark`, then run it with
`python -m experiments compare --benchmark name` (after importing your module, e.g. from a
small script that calls `experiments.runner.compare`).
"""

from __future__ import annotations

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


@dataclass
class Benchmark:
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


_BENCHMARKS: dict[str, Callable[..., Benchmark]] = {}


def register_benchmark(name: str):
    """Decorator: make a `(seed) -> Benchmark` factory available by name."""

    def decorator(factory):
        _BENCHMARKS[name] = factory
        return factory

    return decorator


def available_benchmarks() -> list[str]:
    return sorted(_BENCHMARKS)


def get_benchmark(name: str, seed: int = 0) -> Benchmark:
    if name not in _BENCHMARKS:
        raise ValueError(
            f"Unknown benchmark {name!r}; available: {', '.join(available_benchmarks())}.")
    return _BENCHMARKS[name](seed)


def split_indices(n: int, seed: int, fractions=(0.6, 0.2)):
    """Shuffled train / validation / test index arrays."""
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_val = int(fractions[0] * n), int(fractions[1] * n)
    return order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]


def _take(x, y, index):
    return Split(x[index], {task: values[index] for task, values in y.items()})


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

    def build_model(model_seed: int) -> lossbalance.BalancedModel:
        keras.utils.set_random_seed(model_seed)
        inputs = keras.Input((64,), name="pixels")
        h = keras.layers.Dense(64, activation="relu", name="trunk_1")(inputs)
        h = keras.layers.Dense(64, activation="relu", name="trunk_2")(h)
        return lossbalance.BalancedModel(inputs, {
            "digit": keras.layers.Dense(10, name="digit")(h),
            "ink": keras.layers.Dense(1, name="ink")(h),
        })

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
    )
