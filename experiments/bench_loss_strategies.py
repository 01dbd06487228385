"""Step time of the loss-level strategies against plain Keras.

    python experiments/bench_loss_strategies.py [--tasks 2 16] [--rounds 7] [--steps 40]

Trains the same multi-head model (a shared Dense trunk; heads alternate between a 4-class
classifier with cross-entropy and a regressor with MSE) with plain Keras (`keras.Model`,
the per-head losses summed) and with `BalancedModel` under every loss-level strategy, on the
same data and batches. Every model is first built, traced and warmed up with `fit`; then
the compiled `model.train_function` is called directly on each model's own iterator over
the dataset, one step a call, and timed. Runs are interleaved: each round times `--steps`
steps of every configuration, in a rotated order, so that drifts and bursts of load on a
shared machine hit all configurations alike. The table gives each configuration's median
step time over all rounds, its ratio to plain Keras's median with a 95% bootstrap interval
(resampling rounds), and the ratio to `BalancedModel` with the `fixed` strategy, which
separates a strategy's own cost from the cost of `BalancedModel`'s training step. A target
is reported met or over only when the whole interval lies on one side of it; otherwise the
run could not tell, and more rounds (`--rounds`, with few `--steps` each) narrow the
interval. A process lays out and traces its models once, and that alone moves a ratio by
a few percent from one process to the next, more than the interval says: `--processes N`
runs the whole measurement in N fresh processes, one after another, and reports the
median ratio over them with a distribution-free 95% interval of that median (order
statistics of the processes' ratios; with fewer than six processes only their range, at
lower confidence). The order in which a process builds its models matters too (a model
built later steps a few percent slower here), so each process rotates it; with as many
processes as configurations, every model is built once in every place.

Target: every loss-level strategy within 1.05x of plain Keras, FAMO (one extra forward pass
per step) within 1.4x.

A strategy's own work (a handful of ops on K-vectors) costs tens of microseconds, well below
the step-to-step noise of a shared machine. Two options measure it directly:
`--own-cost` times each strategy's `extra_loss` + `loss_weights` (+ `update_after_step`) alone,
unrolled many times in one graph so that the function call's overhead is shared (microseconds
per step, beyond an unrolled identity; the median and quartiles over interleaved rounds), and
`--kernels` counts the kernels the compiled step really runs (TensorFlow's profiler, after
Grappler's rewrites), against `fixed`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import lossbalance  # noqa: E402
from experiments import timing  # noqa: E402

LOSS_STRATEGIES = ["fixed", "uncertainty", "dwa", "rlw", "gls", "scale_invariant", "famo",
                   "stch", "imtl_l"]
TARGETS = {"famo": 1.4}
DEFAULT_TARGET = 1.05
CLASSES = 4


def make_data(num_tasks, samples, inputs, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, inputs)).astype("float32")
    y = {}
    for k in range(num_tasks):
        projection = rng.normal(size=(inputs,)) / np.sqrt(inputs)
        signal = x @ projection + 0.1 * rng.normal(size=samples)
        if k % 2 == 0:  # classifier: which quartile of the signal
            edges = np.quantile(signal, [0.25, 0.5, 0.75])
            y[f"task_{k}"] = np.digitize(signal, edges).astype("int32")
        else:
            y[f"task_{k}"] = signal[:, None].astype("float32")
    return x, y


def losses_for(num_tasks):
    return {f"task_{k}": (keras.losses.SparseCategoricalCrossentropy(from_logits=True)
                          if k % 2 == 0 else keras.losses.MeanSquaredError())
            for k in range(num_tasks)}


def build(cls, num_tasks, inputs, hidden, seed):
    keras.utils.set_random_seed(seed)
    x = keras.Input((inputs,), name="x")
    h = keras.layers.Dense(hidden, activation="relu", name="trunk_1")(x)
    h = keras.layers.Dense(hidden, activation="relu", name="trunk_2")(h)
    outputs = {f"task_{k}": keras.layers.Dense(CLASSES if k % 2 == 0 else 1,
                                               name=f"task_{k}")(h)
               for k in range(num_tasks)}
    return cls(x, outputs)


def make_models(args, num_tasks, rotation=0):
    """Plain Keras and one BalancedModel per strategy, built in the order
    ["keras", *strategies] rotated by `rotation` places: a model's place in the build order
    moves its step time by a few percent (the later, the slower here), so `--processes`
    rotates it from one process to the next."""
    names = ["keras", *args.strategies]
    shift = rotation % len(names)
    models = {}
    for name in names[shift:] + names[:shift]:
        model_class = keras.Model if name == "keras" else lossbalance.BalancedModel
        model = build(model_class, num_tasks, args.inputs, args.hidden, args.seed)
        strategy = {} if name == "keras" else {"strategy": name}
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=losses_for(num_tasks),
                      **strategy)
        models[name] = model
    return models


def own_costs(names, num_tasks, clock, unroll=50, rounds=15, calls=20):
    """name -> (median, lower, upper quartile) of microseconds per step of the strategy's
    own ops, beyond an unrolled identity on the losses."""
    losses = tf.constant([0.5 + 0.1 * k for k in range(num_tasks)])

    def unrolled(step):
        @tf.function(autograph=False)
        def function(losses):
            # Distinct losses per copy, so that Grappler cannot merge the copies.
            return tf.add_n([step(losses * (1.0 + 1e-3 * i)) for i in range(unroll)])
        return function

    def strategy_step(strategy):
        def step(losses):
            extra = strategy.extra_loss(losses)
            weights = strategy.loss_weights(losses)
            if strategy.uses_post_step_losses:
                strategy.update_after_step(losses, losses * 0.99)
            return weights if extra is None else weights + extra
        return step

    functions = {"identity": unrolled(lambda losses: losses)}
    for name in names:
        strategy = lossbalance.strategies.get(name)
        strategy.bind([f"task_{k}" for k in range(num_tasks)])
        functions[name] = unrolled(strategy_step(strategy))
    for function in functions.values():
        function(losses)
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = timing.CLOCKS[clock]()
            for _ in range(calls):
                function(losses)
            times[name].append((timing.CLOCKS[clock]() - start) / calls / unroll * 1e6)
    base = float(np.median(times.pop("identity")))
    return {name: tuple(float(q) - base for q in np.percentile(t, [50, 25, 75]))
            for name, t in times.items()}


def benchmark(args, num_tasks):
    x, y = make_data(num_tasks, args.batch_size * 8, args.inputs, args.seed)
    dataset = (tf.data.Dataset.from_tensor_slices((x, y)).repeat()
               .batch(args.batch_size, drop_remainder=True).prefetch(4))
    models = make_models(args, num_tasks, args.build_rotation)
    iterators = timing.warm_up(models, dataset, args.warmup)
    # Counted before the timed rounds: see `timing.executed_kernels`.
    kernels = ({name: timing.executed_kernels(model, iterators[name])
                for name, model in models.items()} if args.kernels else None)
    per_step, per_round = timing.interleaved(models, iterators, args.rounds, args.steps,
                                             args.clock)
    timing.check_finite(models, dataset)
    rows = timing.summarise(per_step, per_round)
    fixed = rows.get("fixed")
    # name -> (timing.Summary against keras, ratio of medians to fixed)
    table = {name: (row, None if fixed is None else row.ms / fixed.ms)
             for name, row in rows.items()}
    costs = own_costs(args.strategies, num_tasks, args.clock) if args.own_cost else None
    return table, kernels, costs


def in_processes(args):
    """The benchmark run `args.processes` times, each in a fresh process that builds its
    models in a rotated order, combined: per K, name -> (Summary over the processes, median
    ratio to `fixed`); the kernel counts and own costs, when asked for, come from the first
    process."""
    runs = []
    configurations = 1 + len(args.strategies)  # plain Keras and each strategy
    for index in range(args.processes):
        print(f"process {index + 1} of {args.processes}", file=sys.stderr, flush=True)
        command = [sys.executable, str(Path(__file__).resolve()),
                   "--tasks", *map(str, args.tasks), "--strategies", *args.strategies,
                   "--rounds", str(args.rounds), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--clock", args.clock,
                   "--threads", str(args.threads), "--batch-size", str(args.batch_size),
                   "--inputs", str(args.inputs), "--hidden", str(args.hidden),
                   "--seed", str(args.seed),
                   "--build-rotation", str(round(index * configurations / args.processes))]
        if index == 0:
            command += ["--kernels"] * args.kernels + ["--own-cost"] * args.own_cost
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "results.json")
            subprocess.run(command + ["--results-to", path], check=True,
                           stdout=subprocess.DEVNULL)
            with open(path) as handle:
                runs.append(json.load(handle))
    results, extras = {}, {}
    for k in args.tasks:
        tables = [run["results"][str(k)] for run in runs]
        results[k] = {
            name: (timing.across_processes([timing.Summary(*t[name][0]) for t in tables]),
                   None if tables[0][name][1] is None else
                   float(np.median([t[name][1] for t in tables])))
            for name in tables[0]}
        extras[k] = tuple(runs[0]["extras"][str(k)])
    return results, extras


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 16],
                        help="numbers of tasks K to benchmark (default: 2 16)")
    parser.add_argument("--strategies", nargs="+", default=LOSS_STRATEGIES)
    timing.add_timing_arguments(parser, rounds=30, steps=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--own-cost", action="store_true",
                        help="also time each strategy's own ops alone (microseconds/step)")
    parser.add_argument("--kernels", action="store_true",
                        help="also count the kernels each compiled step runs (profiler)")
    parser.add_argument("--processes", type=int, default=1,
                        help="measure in this many fresh processes, one after another, and "
                             "report the median ratio with a 95%% interval of it")
    parser.add_argument("--results-to", help=argparse.SUPPRESS)  # a child process's output
    parser.add_argument("--build-rotation", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    for name in args.strategies:
        strategy = lossbalance.strategies.get(name)
        if strategy.family != "loss":
            parser.error(f"{name!r} is not a loss-level strategy")

    if args.processes > 1:
        results, extras = in_processes(args)
    else:
        timing.apply_threads(args.threads)
        results, extras = {}, {}
        for num_tasks in args.tasks:
            print(f"K={num_tasks}: {args.rounds} rounds x {args.steps} steps per "
                  "configuration ...", file=sys.stderr, flush=True)
            table, kernels, costs = benchmark(args, num_tasks)
            results[num_tasks], extras[num_tasks] = table, (kernels, costs)
        if args.results_to:
            with open(args.results_to, "w") as handle:
                json.dump({"results": {k: {name: [list(row), to_fixed] for name, (row, to_fixed)
                                           in table.items()} for k, table in results.items()},
                           "extras": extras}, handle)
            return 0

    if args.processes == 1:
        interval, bracket = "[95% bootstrap interval]", "95%"
    else:
        _, coverage = timing.median_rank(args.processes)
        interval = (f"median over {args.processes} processes [{coverage:.0%} interval of "
                    "that median, from the order statistics of their ratios]")
        bracket = f"{coverage:.0%}"
    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    print(f"\nMedian step {args.clock} time and ratio to plain Keras ({device}, "
          f"{os.cpu_count()} cores, {args.threads or 'default'} TF threads; "
          f"batch {args.batch_size}, trunk {args.inputs}-{args.hidden}-{args.hidden}; "
          f"{args.rounds} rounds x {args.steps} steps; {interval} of the ratio; a target "
          "is met or over only when the whole interval is on one side, else unresolved: "
          "run more rounds or processes)\n")
    header = "| strategy | target |" + "".join(
        f" K={k} ms | K={k} / keras [{bracket}] | K={k} / fixed |" for k in args.tasks)
    print(header)
    print("|---|---|" + "---|---|---|" * len(args.tasks))
    verdicts = {"over": [], "unresolved": []}
    for name in ["keras", *args.strategies]:
        target = TARGETS.get(name, DEFAULT_TARGET)
        cells = []
        for k in args.tasks:
            row, to_fixed = results[k][name]
            verdict = None if name == "keras" else row.verdict(target)
            if verdict in verdicts:
                verdicts[verdict].append(f"{name} (K={k}: {row.ratio:.3f}x "
                                         f"[{row.ci_low:.3f}-{row.ci_high:.3f}])")
            mark = "" if verdict in (None, "met") else f" ({verdict})"
            fixed_cell = "-" if to_fixed is None or name == "keras" else f"{to_fixed:.3f}"
            cells.append(f" {row.ms:.2f} | {row.ratio:.3f} [{row.ci_low:.3f}-"
                         f"{row.ci_high:.3f}]{mark} | {fixed_cell} |")
        label = "plain keras.Model" if name == "keras" else f"`{name}`"
        print(f"| {label} | {'-' if name == 'keras' else f'{target:.2f}x'} |"
              + "".join(cells))
    for verdict, cells in verdicts.items():
        if cells:
            print(f"\n{verdict.capitalize()}: " + ", ".join(cells))
    if args.kernels or args.own_cost:
        print_own_work(args, extras)
    return 0


def print_own_work(args, extras):
    print(f"\nEach strategy's own work: kernels run per step (and the difference to "
          f"`fixed`), and its own ops timed alone ({args.clock} time, microseconds per step "
          "beyond an identity, median [quartiles])\n")
    print("| strategy |" + "".join(f" K={k} kernels | K={k} own us |" for k in args.tasks))
    print("|---|" + "---|---|" * len(args.tasks))
    for name in ["keras", *args.strategies]:
        cells = []
        for k in args.tasks:
            kernels, costs = extras[k]
            counts = None if kernels is None else kernels.get(name)
            if counts is None:
                cells.append(" - |")
            else:
                total = sum(counts.values())
                fixed = kernels.get("fixed")
                diff = "" if fixed is None or name == "fixed" else \
                    f" ({total - sum(fixed.values()):+.0f})"
                cells.append(f" {total:.0f}{diff} |")
            cost = None if costs is None else costs.get(name)
            cells.append(" - |" if cost is None else
                         f" {cost[0]:.1f} [{cost[1]:.1f}-{cost[2]:.1f}] |")
        label = "plain keras.Model" if name == "keras" else f"`{name}`"
        print(f"| {label} |" + "".join(cells))


if __name__ == "__main__":
    sys.exit(main())
