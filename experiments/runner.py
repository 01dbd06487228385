"""Run strategies x seeds on a benchmark, resumable, with model selection on validation.

Besides the strategies asked for, a comparison trains, with the same budget (epochs, batch
size, optimizer, model) and the same seeds:
* single-task baselines, one per task: the same network compiled with only that task's loss
  (`loss=None` for the other outputs), selected on that task's validation loss; they are the
  reference of delta-m%;
* a linear-scalarisation sweep: `fixed` weights w_k = K c_k / (L_k(0) sum(c)) with
  c = (1, ratio) over the benchmark's `ls_ratios` (two tasks), or c = 1 (more tasks), where
  L_k(0) is task k's validation loss at initialisation. The tables report the sweep point
  with the best validation delta-m% as "tuned LS", and the plots draw the sweep as the
  trade-off front.

`gradients` ("parameters", the default, "representation" or "auto") is passed to
`BalancedModel.compile(gradients=...)` for strategies that compute per-task gradients; their
runs at a level other than "parameters" are labelled `<spec>@<level>` (e.g.
`mgda@representation`), so one output folder can hold, and one table compare, both levels.
Loss-level strategies and the baselines compute no per-task gradients: the level does not
apply to them, and their runs (unlabelled) are shared by every level.

A spec's `grouping=layer` (or `variable`) is a compile option, not a hyper-parameter:
`mgda:grouping=layer` runs MGDA with `compile(grouping="layer")`, labelled by its spec, so
one table compares a strategy grouped and not.

Every run is saved as `runs/<label>-seed<seed>.json` in the output folder; runs found there
are not rerun.
"""

from __future__ import annotations

import ast
import json
import time
import warnings
from pathlib import Path

import keras
import numpy as np

import lossbalance
from experiments.benchmarks import get_benchmark
from lossbalance.model import GRADIENT_LEVELS

SINGLE = "single:"  # label prefix of single-task baselines
LS = "ls:ratio="  # label prefix of linear-scalarisation sweep points
#: Spec keys that are `BalancedModel.compile` arguments rather than hyper-parameters.
COMPILE_OPTIONS = ("grouping",)


def parse_strategy(spec: str):
    """`"cagrad:c=0.5;rescale=False"`-style specs -> (label, strategy identifier).

    Hyper-parameters are separated by `;` because strategies are separated by `,`
    (`--strategies fixed,cagrad:c=0.5;rescale=False`). Compile options (`COMPILE_OPTIONS`)
    are left out of the identifier: see `compile_options`."""
    config = _spec_items(spec)
    strategy = {k: v for k, v in config.items() if k not in COMPILE_OPTIONS}
    return spec, strategy["name"] if len(strategy) == 1 else strategy


def compile_options(spec: str) -> dict:
    """The `BalancedModel.compile` arguments a method spec gives (`grouping=layer`)."""
    if run_kind(spec) != "method":
        return {}
    return {k: v for k, v in _spec_items(spec).items() if k in COMPILE_OPTIONS}


def _spec_items(spec: str) -> dict:
    name, _, params = spec.partition(":")
    config = {"name": name}
    if not params:
        return config
    for item in params.split(";"):
        key, _, raw = item.partition("=")
        if not _:
            raise ValueError(f"Bad hyper-parameter {item!r} in {spec!r}; use key=value.")
        try:
            config[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            config[key.strip()] = raw.strip()
    return config


def run_kind(label: str) -> str:
    """"single", "ls" or "method"."""
    if label.startswith(SINGLE):
        return "single"
    if label.startswith(LS):
        return "ls"
    return "method"


def _check_level(gradients):
    if gradients not in GRADIENT_LEVELS:
        raise ValueError(f"`gradients` must be one of {list(GRADIENT_LEVELS)}; got "
                         f"{gradients!r}.")


def gradient_level_for(spec: str, gradients: str = "parameters") -> str | None:
    """The `compile(gradients=...)` a run of `spec` gets: `gradients` for a strategy that
    computes per-task gradients, or the one level it is defined at when that is another
    (MoCo at "parameters", the output balancer at "representation"); None (compile's
    default) for loss-level strategies and the baselines, to which no level applies."""
    _check_level(gradients)
    if run_kind(spec) != "method":
        return None
    strategy = lossbalance.strategies.get(parse_strategy(spec)[1])
    if strategy.family == "loss":
        return None
    if gradients != "auto" and gradients not in strategy.gradient_levels:
        return strategy.gradient_levels[0]
    return gradients


def run_label(spec: str, gradients: str = "parameters") -> str:
    """The label of a run (its row in the tables, its file name): the strategy spec, with
    `@<level>` when it computes per-task gradients at a level other than "parameters"."""
    _check_level(gradients)
    if run_kind(spec) != "method":
        return spec
    label = parse_strategy(spec)[0]
    level = gradient_level_for(spec, gradients)
    return label if level in (None, "parameters") else f"{label}@{level}"


def _strategy_of(label: str):
    """The strategy a method run's spec makes, or None for the baselines and for specs that
    do not resolve (their run then fails with the reason)."""
    if run_kind(label) != "method":
        return None
    try:
        return lossbalance.strategies.get(parse_strategy(label)[1])
    except Exception:  # noqa: BLE001
        return None


def unrunnable(bench, labels) -> tuple[list[str], list[str]]:
    """The labels `bench` cannot run: (those defined for more tasks than it has, those
    defined at the representation level only when its model has none: the toys')."""
    too_few, elsewhere = [], []
    for label in labels:
        strategy = _strategy_of(label)
        if strategy is None:
            continue
        if strategy.min_tasks > len(bench.task_names):
            too_few.append(label)
        elif getattr(bench, "custom", False) and strategy.family != "loss" and \
                "parameters" not in strategy.gradient_levels:
            elsewhere.append(label)
    return too_few, elsewhere


def runnable_by_name(names) -> list[str]:
    """`names` less the strategies with hyper-parameters that have no default
    (`Strategy.required_arguments`: PCD's primary task), which a run of every strategy
    cannot choose for a benchmark; a warning names them and how to run them (a spec that
    gives them, `pcd:primary=<task>`)."""
    lookup = lossbalance.strategies.registry.lookup
    left = {name: lookup(name).required_arguments for name in names
            if lookup(name).required_arguments}
    if left:
        specs = ", ".join(f"{name}:" + ";".join(f"{arg}=..." for arg in required)
                          for name, required in left.items())
        warnings.warn(f"Not run by name alone, hyper-parameters without a default: {specs} "
                      "(give them in the spec, e.g. --strategies pcd:primary=<task>).")
    return [name for name in names if name not in left]


def baseline_labels(benchmark, quick=False) -> list[str]:
    """Labels of the single-task baselines and the linear-scalarisation sweep."""
    tasks = benchmark.task_names
    ratios = (benchmark.quick_ls_ratios if quick else benchmark.ls_ratios) \
        if len(tasks) == 2 else (1.0,)
    return [f"{SINGLE}{task}" for task in tasks] + [f"{LS}{r:g}" for r in ratios]


class _StepTimer(keras.callbacks.Callback):
    """Median wall time of a training step, excluding the first epoch (tracing)."""

    def __init__(self, skip_first=True):
        super().__init__()
        self.times, self._start, self._epoch = [], None, 0
        self.skip_first = skip_first

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if self._epoch > 0 or not self.skip_first:
            self.times.append(time.perf_counter() - self._start)


def _evaluate(model, split) -> dict:
    """Metrics of a compiled model on a split."""
    logs = model.evaluate(split.x, split.y, batch_size=4096, verbose=0, return_dict=True)
    return {key: float(value) for key, value in logs.items()}


def _compile(model, benchmark, strategy, loss, eager, gradients=None, **options):
    level = {} if gradients is None else {"gradients": gradients}
    model.compile(optimizer=keras.optimizers.Adam(benchmark.learning_rate), loss=loss,
                  metrics=benchmark.metrics or None, strategy=strategy, run_eagerly=eager,
                  **level, **options)


def _check_custom_level(benchmark, gradients):
    _check_level(gradients)
    if gradients != "parameters" and getattr(benchmark, "custom", False):
        raise ValueError(f"Benchmark {benchmark.name!r} trains its own model at the "
                         f"parameter level; gradients={gradients!r} does not apply to it.")


def run_one(benchmark_name: str, strategy_spec: str, seed: int, *, epochs=None,
            batch_size=None, verbose=0, quick=False, steps=None, eager=None,
            gradients="parameters") -> dict:
    """Train one model; return its history and its test metrics at the epoch selected on
    validation. `strategy_spec` is a strategy spec, or a baseline label (`single:<task>`,
    `ls:ratio=<r>`). `quick`: small subsets, 1 epoch unless `epochs` is given, and eager
    execution unless `eager=False` (tracing a step costs more than a few eager steps).
    `gradients`: the gradient level of a strategy that computes per-task gradients (see
    `gradient_level_for`; the run's label then ends in `@<level>` unless "parameters")."""
    eager = quick if eager is None else eager
    benchmark = get_benchmark(benchmark_name, seed=0)  # the same split for every seed
    _check_custom_level(benchmark, gradients)
    options = compile_options(strategy_spec)
    if getattr(benchmark, "custom", False):
        if options:
            raise ValueError(f"Benchmark {benchmark_name!r} trains its own model: compile "
                             f"options {sorted(options)} in {strategy_spec!r} do not apply.")
        label, strategy = parse_strategy(strategy_spec)
        began = time.perf_counter()
        result = benchmark.run(strategy, seed, quick=quick, verbose=verbose, steps=steps,
                               eager=eager)
        return {"benchmark": benchmark_name, "strategy": label, "kind": "method",
                "seed": seed, "wall_s": time.perf_counter() - began, **result}
    if quick:
        benchmark = benchmark.quick()
    tasks = benchmark.task_names
    kind = run_kind(strategy_spec)
    label = strategy_spec
    level = gradient_level_for(strategy_spec, gradients)
    loss = benchmark.loss
    if kind == "single":
        task = strategy_spec[len(SINGLE):]
        if task not in tasks:
            raise ValueError(f"{strategy_spec!r}: no task {task!r}; tasks are {tasks}.")
        loss = {name: (fn if name == task else None) for name, fn in benchmark.loss.items()}
        strategy = "fixed"
    elif kind == "ls":
        strategy = "fixed"  # weights set below, from the initial losses
    else:
        strategy = parse_strategy(strategy_spec)[1]
        label = run_label(strategy_spec, gradients)

    began = time.perf_counter()
    model = benchmark.build_model(seed)
    with warnings.catch_warnings():
        # single-task runs: "a single task", "gradients do not exist" for the other heads
        warnings.simplefilter("ignore")
        _compile(model, benchmark, strategy if kind != "ls" else "fixed", loss, eager, level,
                 **options)
        initial = {"validation": _evaluate(model, benchmark.validation),
                   "test": _evaluate(model, benchmark.test)}
        weights = None
        if kind == "ls":
            ratio = float(strategy_spec[len(LS):])
            c = np.array([1.0, ratio] if len(tasks) == 2 else [1.0] * len(tasks))
            l0 = np.array([initial["validation"][f"{task}_loss"] for task in tasks])
            w = len(tasks) * c / c.sum() / np.maximum(l0, 1e-12)
            weights = {task: float(v) for task, v in zip(tasks, w)}
            strategy = {"name": "fixed", "weights": weights}
            _compile(model, benchmark, strategy, loss, eager)

        if kind == "single":
            selection = f"val_{strategy_spec[len(SINGLE):]}_loss"
        else:
            selection = "val_loss_ratio" if benchmark.select_on == "val_loss_ratio" \
                else "val_loss"
        timer = _StepTimer(skip_first=not eager)
        callbacks = [timer]
        if selection == "val_loss_ratio":  # not a metric of the model: added to the logs
            l0 = {t: initial["validation"][f"{t}_loss"] for t in tasks}
            callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=lambda _, logs: (
                logs.update(val_loss_ratio=sum(logs[f"val_{t}_loss"] / l0[t] for t in tasks)))))
        epochs = epochs or (1 if quick else benchmark.epochs)
        # Model selection: the weights of the first epoch with the lowest `selection`,
        # restored when training ends (patience = epochs: it never stops training early).
        best = keras.callbacks.EarlyStopping(selection, mode="min", patience=epochs,
                                             restore_best_weights=True)
        history = model.fit(
            benchmark.train.x, benchmark.train.y,
            validation_data=(benchmark.validation.x, benchmark.validation.y),
            epochs=epochs, batch_size=batch_size or benchmark.batch_size,
            callbacks=[*callbacks, best], verbose=verbose)
        test = _evaluate(model, benchmark.test)
    logs = {k: [float(v) for v in values] for k, values in history.history.items()}
    validation = {k[4:]: v[best.best_epoch] for k, v in logs.items() if k.startswith("val_")}
    return {
        "benchmark": benchmark_name,
        "strategy": label,
        "kind": kind,
        "seed": seed,
        "quick": quick,
        "eager": eager,
        "gradients": level,                    # what compile was given (None: not applicable)
        "gradient_level": model.gradient_level,  # the level it used (None: loss level)
        "grouping": options.get("grouping"),   # compile(grouping=...) (None: not grouped)
        "tasks": tasks,
        "weights": weights,
        "selection": selection,
        "history": logs,
        "initial": initial,
        "best_epoch": best.best_epoch,
        "validation": validation,
        "test": test,
        "loss_ratio": float(sum(test[f"{t}_loss"] / initial["test"][f"{t}_loss"]
                                for t in tasks if f"{t}_loss" in test)),
        "step_time_s": float(np.median(timer.times)) if timer.times else float("nan"),
        "wall_s": time.perf_counter() - began,
    }


def run_path(out: Path, strategy_label: str, seed: int) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_=." else "_" for c in strategy_label)
    return out / "runs" / f"{safe}-seed{seed}.json"


def compare(benchmark: str, strategies: list[str], seeds: int | None, out: Path, *,
            epochs=None, batch_size=None, keras_verbose=0, progress=True, quick=False,
            baselines=True, steps=None, eager=None, errors="raise",
            failures: list | None = None, gradients="parameters",
            skipped: dict | None = None) -> list[dict]:
    """Run every strategy (and, unless `baselines=False`, the single-task baselines and the
    linear-scalarisation sweep) with every seed, skipping runs already saved in `out`.
    `gradients`: the gradient level of the strategies that compute per-task gradients (their
    labels end in `@<level>` unless "parameters"; see `gradient_level_for`).

    Returns every run's result (dicts, as saved in `out/runs/*.json`). With
    `errors="continue"`, a run that raises is reported (a warning, and a dict with its
    "error" appended to `failures`), not saved (so a rerun retries it), and the others go on.
    Strategies the benchmark cannot run (`unrunnable`) are left out with a warning; a
    `skipped` dict receives them ("too_few", "elsewhere") and the task count ("tasks").
    """
    from tqdm import tqdm

    bench = get_benchmark(benchmark)
    if seeds is None:
        seeds = 1 if quick else getattr(bench, "default_seeds", 3)
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    _check_custom_level(bench, gradients)
    labels = [spec if run_kind(spec) != "method" else parse_strategy(spec)[0]
              for spec in strategies]  # checks the specs early
    too_few, elsewhere = unrunnable(bench, labels)
    for label in too_few:
        warnings.warn(f"{benchmark}: {label!r} is defined for "
                      f"{_strategy_of(label).min_tasks} or more tasks and the benchmark has "
                      f"{len(bench.task_names)}: not run.")
    for label in elsewhere:
        warnings.warn(f"{benchmark}: {label!r} is defined at the representation level "
                      "only, which this benchmark's model does not have: not run.")
    if skipped is not None:
        skipped.update(too_few=too_few, elsewhere=elsewhere, tasks=len(bench.task_names))
    labels = [label for label in labels if label not in too_few + elsewhere]
    if baselines and not getattr(bench, "custom", False):
        labels += [b for b in baseline_labels(bench, quick) if b not in labels]
    jobs = [(label, seed) for seed in range(seeds) for label in labels]
    results = []
    failures = [] if failures is None else failures
    bar = tqdm(jobs, desc=f"{benchmark}", unit="run", disable=not progress)
    run_labels = {}
    for label in labels:
        try:
            run_labels[label] = run_label(label, gradients)
            level = gradient_level_for(label, gradients)
        except Exception:  # noqa: BLE001 (an unknown strategy: its run fails below)
            run_labels[label], level = label, None
        if level not in (None, gradients):
            warnings.warn(f"{benchmark}: {label!r} is defined at the {level} level only: "
                          f"run there, as {run_labels[label]!r}.")
    for label, seed in bar:
        path = run_path(out, run_labels[label], seed)
        bar.set_postfix_str(f"{run_labels[label]} seed {seed}")
        if path.exists():
            results.append(json.loads(path.read_text()))
            continue
        try:
            result = run_one(benchmark, label, seed, epochs=epochs, batch_size=batch_size,
                             verbose=keras_verbose, quick=quick, steps=steps, eager=eager,
                             gradients=gradients)
        except Exception as error:  # noqa: BLE001
            if errors == "raise":
                raise
            message = f"{type(error).__name__}: {error}"
            with tqdm.external_write_mode():  # printed above the bar, not through it
                warnings.warn(f"{benchmark}: run {run_labels[label]!r} seed {seed} failed: "
                              f"{message}")
            failures.append({"strategy": run_labels[label], "seed": seed, "error": message})
            continue
        path.write_text(json.dumps(result, indent=1))
        results.append(result)
    return results
