"""Run strategies x seeds on a benchmark, resumable, with model selection on validation."""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path

import keras
import numpy as np

from experiments.benchmarks import get_benchmark


def parse_strategy(spec: str):
    """`"cagrad:c=0.5;rescale=False"`-style specs -> (label, strategy identifier).

    Hyper-parameters are separated by `;` because strategies are separated by `,`
    (`--strategies fixed,cagrad:c=0.5;rescale=False`)."""
    name, _, params = spec.partition(":")
    if not params:
        return name, name
    config = {"name": name}
    for item in params.split(";"):
        key, _, raw = item.partition("=")
        if not _:
            raise ValueError(f"Bad hyper-parameter {item!r} in {spec!r}; use key=value.")
        try:
            config[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            config[key.strip()] = raw.strip()
    return spec, config


class _StepTimer(keras.callbacks.Callback):
    """Median wall time of a training step, excluding the first epoch (tracing)."""

    def __init__(self):
        super().__init__()
        self.times, self._start, self._epoch = [], None, 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if self._epoch > 0:
            self.times.append(time.perf_counter() - self._start)


def run_one(benchmark_name: str, strategy_spec: str, seed: int, *, epochs=None,
            batch_size=None, verbose=0) -> dict:
    """Train one model; return its history and its test metrics at the best epoch by
    validation loss (the plain Keras total, comparable across strategies)."""
    benchmark = get_benchmark(benchmark_name, seed=0)  # the same split for every seed
    label, strategy = parse_strategy(strategy_spec)
    model = benchmark.build_model(seed)
    model.compile(optimizer=keras.optimizers.Adam(benchmark.learning_rate),
                  loss=benchmark.loss, metrics=benchmark.metrics, strategy=strategy)
    timer = _StepTimer()
    best = keras.callbacks.EarlyStopping(monitor="val_loss", patience=10 ** 9,
                                         restore_best_weights=True)
    history = model.fit(
        benchmark.train.x, benchmark.train.y,
        validation_data=(benchmark.validation.x, benchmark.validation.y),
        epochs=epochs or benchmark.epochs, batch_size=batch_size or benchmark.batch_size,
        callbacks=[timer, best], verbose=verbose)
    test = model.evaluate(benchmark.test.x, benchmark.test.y, verbose=0, return_dict=True)
    return {
        "benchmark": benchmark_name,
        "strategy": label,
        "seed": seed,
        "history": {k: [float(v) for v in values] for k, values in history.history.items()},
        "best_epoch": int(np.argmin(history.history["val_loss"])),
        "test": {k: float(v) for k, v in test.items()},
        "step_time_s": float(np.median(timer.times)) if timer.times else float("nan"),
    }


def run_path(out: Path, strategy_label: str, seed: int) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_=." else "_" for c in strategy_label)
    return out / "runs" / f"{safe}-seed{seed}.json"


def compare(benchmark: str, strategies: list[str], seeds: int, out: Path, *, epochs=None,
            batch_size=None, keras_verbose=0, progress=True) -> list[dict]:
    """Run every strategy with every seed, skipping runs already saved in `out`."""
    from tqdm import tqdm

    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    jobs = [(spec, seed) for seed in range(seeds) for spec in strategies]
    results = []
    bar = tqdm(jobs, desc=f"{benchmark}", unit="run", disable=not progress)
    for spec, seed in bar:
        label, _ = parse_strategy(spec)
        path = run_path(out, label, seed)
        bar.set_postfix_str(f"{label} seed {seed}")
        if path.exists():
            results.append(json.loads(path.read_text()))
            continue
        result = run_one(benchmark, spec, seed, epochs=epochs, batch_size=batch_size,
                         verbose=keras_verbose)
        path.write_text(json.dumps(result, indent=1))
        results.append(result)
    return results
