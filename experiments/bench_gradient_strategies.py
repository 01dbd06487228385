"""Cost of gradient-level balancing against plain Keras, and of the Gramian solvers.

    python experiments/bench_gradient_strategies.py [--trunks mlp conv] [--tasks 2 8 32]
        [--strategy mgda] [--xla off on] [--vectorize] [--float32] [--grouping layer]
        [--memory] [--quick]

Part 1 trains the same multi-head network with plain Keras (`keras.Model`, the per-head
losses summed, one backward pass) and with `BalancedModel` under one gradient strategy at
both gradient levels (`compile(gradients="parameters")`: exact per-task gradients of the
shared parameters; `gradients="representation"`: per-task gradients of the shared
representation, one backward pass through the trunk), with XLA off and on, on the same data
and batches. Steps are timed interleaved (see `experiments/timing.py`); the table gives each
configuration's median step time as a ratio to plain Keras with the same XLA setting.
`--vectorize` adds the parameter level with `compile(vectorize=True)` (the trunk's K
per-task backward passes as one vectorised pass) as a further configuration, and
`--grouping layer` (or `variable`) the parameter level balancing each group of shared
parameters separately (`compile(grouping=...)`: a Gramian and a solve per group).
`--memory` adds each configuration's peak memory during its steps, measured in a fresh
process per configuration (the rise of the resident-set high-water mark above the resident
size before the timed steps, with glibc's malloc returning large blocks to the system).

Networks: "mlp", 64 inputs, three Dense(256, relu) layers, K heads Dense(32, relu) ->
Dense(4), batch 256; "conv", 32x32x3 inputs, Conv(16) -> Conv(32, stride 2) -> Conv(32,
stride 2) -> global average pooling -> Dense(128), the same heads, batch 64. Heads alternate
between 4-class cross-entropy and MSE.

Part 2 times the strategies' weight solvers alone on a K x K Gramian (`--solver-tasks`, 40 by
default; the compiled `gramian_weights` as a graph and with XLA, median of many calls).

Targets: representation level <= 1.3x plain Keras for K <= 8 and <= 2x at K = 32; parameter
level, on the MLP, <= 1.5x at K = 2 and <= 2.8x at K = 8; each solver under 2 ms. A cell is
marked "over" when the 95% bootstrap interval of its ratio lies above its target,
"unresolved" when the interval straddles it (more `--rounds` narrow it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import lossbalance  # noqa: E402
from experiments import timing  # noqa: E402

LEVELS = ("parameters", "representation")
SOLVERS = ["mgda", "cagrad", "nash_mtl", "upgrad", "imtl_g", "dualproj", "aligned_mtl",
           "fairgrad"]
SOLVER_TARGET_MS = 2.0
TARGETS = {  # (trunk, level, K) -> upper bound on the ratio to plain Keras
    **{(trunk, "representation", k): 1.3 for trunk in ("mlp", "conv") for k in (2, 4, 8)},
    **{(trunk, "representation", 32): 2.0 for trunk in ("mlp", "conv")},
    ("mlp", "parameters", 2): 1.5,  # the reference MLP
    ("mlp", "parameters", 8): 2.8,
}
CLASSES = 4
TRUNKS = {"mlp": {"batch": 256, "input": (64,)}, "conv": {"batch": 64, "input": (32, 32, 3)}}


def _trunk(name, x):
    layers = keras.layers
    if name == "mlp":
        for i in range(3):
            x = layers.Dense(256, activation="relu", name=f"trunk_{i}")(x)
        return x
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="conv_0")(x)
    x = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="conv_1")(x)
    x = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="conv_2")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return layers.Dense(128, activation="relu", name="trunk_dense")(x)


def build(cls, trunk, num_tasks, seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input(TRUNKS[trunk]["input"], name="x")
    z = _trunk(trunk, x)
    outputs = {}
    for k in range(num_tasks):
        h = keras.layers.Dense(32, activation="relu", name=f"head_{k}")(z)
        outputs[f"task_{k}"] = keras.layers.Dense(CLASSES if k % 2 == 0 else 1,
                                                  name=f"task_{k}")(h)
    return cls(x, outputs)


def losses_for(num_tasks):
    return {f"task_{k}": (keras.losses.SparseCategoricalCrossentropy(from_logits=True)
                          if k % 2 == 0 else keras.losses.MeanSquaredError())
            for k in range(num_tasks)}


def make_dataset(trunk, num_tasks, seed=0):
    rng = np.random.default_rng(seed)
    batch = TRUNKS[trunk]["batch"]
    x = rng.normal(size=(batch * 4, *TRUNKS[trunk]["input"])).astype("float32")
    flat = x.reshape(len(x), -1)
    y = {}
    for k in range(num_tasks):
        signal = flat @ (rng.normal(size=flat.shape[1]) / np.sqrt(flat.shape[1]))
        y[f"task_{k}"] = (np.digitize(signal, np.quantile(signal, [0.25, 0.5, 0.75]))
                          .astype("int32") if k % 2 == 0 else signal[:, None].astype("float32"))
    return (tf.data.Dataset.from_tensor_slices((x, y)).repeat()
            .batch(batch, drop_remainder=True).prefetch(4))


def configs(args):
    """The configurations timed: plain Keras, both levels, and maybe the vectorised one, the
    parameter level with `precision="float32"` and the grouped parameter level."""
    return ("keras", *LEVELS, *(("vectorized",) if args.vectorize else ()),
            *(("float32",) if args.float32 else ()),
            *((f"grouped:{args.grouping}",) if args.grouping else ()))


def make_model(config, trunk, num_tasks, strategy, xla):
    """`config`: "keras", a gradient level, "vectorized" (the parameter level with
    `vectorize=True`), "float32" (the parameter level with `precision="float32"`) or
    "grouped:<grouping>" (the parameter level with `grouping=<grouping>`)."""
    optimizer = keras.optimizers.Adam(1e-3)
    if config == "keras":
        model = build(keras.Model, trunk, num_tasks)
        model.compile(optimizer=optimizer, loss=losses_for(num_tasks), jit_compile=xla)
    else:
        model = build(lossbalance.BalancedModel, trunk, num_tasks)
        vectorize = config == "vectorized"
        model.compile(optimizer=optimizer, loss=losses_for(num_tasks), strategy=strategy,
                      gradients=config if config in LEVELS else "parameters",
                      vectorize=vectorize, jit_compile=xla,
                      precision="float32" if config == "float32" else "float64",
                      grouping=config.split(":")[1] if config.startswith("grouped:")
                      else None)
    return model


def time_group(args, trunk, num_tasks, xla):
    """Median step ms and ratio to plain Keras of every configuration of one group."""
    dataset = make_dataset(trunk, num_tasks)
    models = {config: make_model(config, trunk, num_tasks, args.strategy, xla)
              for config in configs(args)}
    iterators = timing.warm_up(models, dataset, args.warmup)
    per_step, per_round = timing.interleaved(models, iterators, args.rounds, args.steps,
                                             args.clock)
    timing.check_finite(models, dataset)
    return timing.summarise(per_step, per_round)


def _resident_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory_mib(args, trunk, num_tasks, xla, config):
    """Peak memory of one configuration's steps, measured in this (fresh) process."""
    dataset = make_dataset(trunk, num_tasks)
    model = make_model(config, trunk, num_tasks, args.strategy, xla)
    iterator = timing.warm_up({config: model}, dataset, args.warmup)[config]
    before = _resident_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:  # resets VmHWM to the current RSS
        clear.write("5")
    timing.time_steps(model, iterator, args.steps)
    return (_resident_kib("VmHWM") - before) / 1024


def measure_memory(args, trunk, num_tasks, xla):
    """{config: peak MiB}, each configuration in a fresh process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # large blocks go back to the OS
    result = {}
    for config in configs(args):
        command = [sys.executable, __file__, "--memory-of",
                   json.dumps([trunk, num_tasks, xla, config]), "--strategy", args.strategy,
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
        output = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        result[config] = float(output.stdout.strip().splitlines()[-1])
    return result


def solver_times(names, num_tasks=40, repeats=30, batch=10, seed=0):
    """{strategy: (graph ms, XLA ms)}: median time of the weight solver on one K x K
    Gramian, solving `batch` different Gramians per compiled call (which amortises the
    cost of calling a tf.function)."""
    rng = np.random.default_rng(seed)
    gramians = []
    for _ in range(batch):
        jacobian = (rng.normal(size=(num_tasks, 1000))
                    * rng.uniform(0.1, 10, size=(num_tasks, 1)))
        gramians.append(tf.constant(jacobian @ jacobian.T, tf.float64))  # as the step
    losses = tf.constant(rng.uniform(0.5, 2.0, num_tasks), tf.float32)
    result = {}
    for name in names:
        times = []
        for xla in (False, True):
            strategy = lossbalance.strategies.get(name)
            strategy.bind([f"t{k}" for k in range(num_tasks)])

            def solve_all(strategy=strategy):
                return tf.add_n([strategy.gramian_weights(g, losses) for g in gramians])

            solve = tf.function(solve_all, jit_compile=xla, autograph=False)
            solve().numpy()
            calls = []
            for _ in range(repeats):
                start = time.perf_counter()
                solve().numpy()
                calls.append(time.perf_counter() - start)
            times.append(statistics.median(calls) / batch * 1e3)
        result[name] = tuple(times)
    return result


def _ratio_cell(trunk, level, num_tasks, row):
    """ratio [quartiles of the per-round ratios], and against a target the verdict of the
    ratio's 95% interval when it is not met."""
    target = TARGETS.get((trunk, level, num_tasks))
    verdict = None if target is None else row.verdict(target)
    mark = "" if verdict in (None, "met") else (
        f" ({verdict}: 95% {row.ci_low:.2f}-{row.ci_high:.2f})")
    return f"{row.ratio:.2f} [{row.quartile_low:.2f}-{row.quartile_high:.2f}]{mark}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trunks", nargs="+", choices=sorted(TRUNKS), default=["mlp", "conv"])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--strategy", default="mgda",
                        help="gradient-level strategy to time (default: mgda)")
    parser.add_argument("--xla", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--vectorize", action="store_true",
                        help="also time the parameter level with compile(vectorize=True)")
    parser.add_argument("--float32", action="store_true",
                        help="also time the parameter level with compile(precision="
                             "'float32'): the Gramian and J^T w accumulated in float32")
    parser.add_argument("--grouping", choices=["layer", "variable"],
                        help="also time the parameter level with compile(grouping=...)")
    parser.add_argument("--memory", action="store_true",
                        help="also measure peak memory (one fresh process per configuration)")
    parser.add_argument("--solvers", nargs="*", default=SOLVERS,
                        help="strategies whose solver is timed on a 40 x 40 Gramian")
    parser.add_argument("--solver-tasks", type=int, default=40,
                        help="K of the Gramians the solvers are timed on (default 40)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: mlp, K=2, XLA off, 2 rounds of 2 steps, "
                             "2 solver calls each")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    timing.add_timing_arguments(parser, rounds=15, steps=5, warmup=3)
    args = parser.parse_args(argv)
    timing.apply_threads(args.threads)
    strategy = lossbalance.strategies.get(args.strategy)
    if strategy.family == "loss" or "representation" not in strategy.gradient_levels:
        parser.error(f"{args.strategy!r} is not a gradient-level strategy defined at both "
                     "levels")
    if args.memory_of:
        trunk, num_tasks, xla, config = json.loads(args.memory_of)
        print(peak_memory_mib(args, trunk, num_tasks, xla, config))
        return 0
    if args.quick:
        args.trunks, args.tasks, args.xla = ["mlp"], [2], ["off"]
        args.rounds, args.steps, args.warmup, args.solvers = 2, 2, 1, args.solvers[:2]
    solver_calls = {"repeats": 2, "batch": 1} if args.quick else {}
    solver_calls["num_tasks"] = args.solver_tasks

    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    print(f"Step {args.clock} time of `{args.strategy}` as a ratio to plain Keras with the "
          f"same XLA setting ({device}, {os.cpu_count()} cores; {args.rounds} rounds x "
          f"{args.steps} steps; [quartiles] of per-round ratios; targets judged on the "
          "ratio's 95% interval)\n")
    names = {"keras": "keras", "vectorized": "vectorised parameters",
             "float32": "parameters (float32)", **{l: l for l in LEVELS},
             f"grouped:{args.grouping}": f"parameters (grouping={args.grouping})"}
    timed = configs(args)[1:]
    memory_header = "".join(f" {names[c]} MiB |" for c in configs(args)) if args.memory else ""
    print("| trunk | K | XLA | keras ms |" + "".join(f" {names[c]} / keras |" for c in timed)
          + memory_header)
    print("|---|---|---|---|" + "---|" * len(timed) + "---|" * len(configs(args)) * args.memory)
    for trunk in args.trunks:
        for num_tasks in args.tasks:
            for xla in args.xla:
                print(f"{trunk} K={num_tasks} XLA {xla} ...", file=sys.stderr, flush=True)
                rows = time_group(args, trunk, num_tasks, xla == "on")
                cells = [_ratio_cell(trunk, config, num_tasks, rows[config])
                         for config in timed]
                line = (f"| {trunk} | {num_tasks} | {xla} | {rows['keras'].ms:.1f} | "
                        + " | ".join(cells) + " |")
                if args.memory:
                    memory = measure_memory(args, trunk, num_tasks, xla == "on")
                    line += "".join(f" {memory[c]:.0f} |" for c in configs(args))
                print(line, flush=True)
    if args.solvers:
        times = solver_times(args.solvers, **solver_calls)
        k = args.solver_tasks
        print(f"\nWeight solver time on a {k} x {k} Gramian (median ms per Gramian; target "
              f"< {SOLVER_TARGET_MS} ms; * marks what BalancedModel runs when the step is "
              "not compiled; a compiled step runs XLA)\n")
        print("| strategy | graph ms | XLA ms |")
        print("|---|---|---|")
        for name, (graph, xla) in times.items():
            strategy = lossbalance.strategies.get(name)
            strategy.bind([f"t{k}" for k in range(args.solver_tasks)])
            compiled = strategy.compiles_solver()
            used = xla if compiled else graph
            mark = " (over)" if used > SOLVER_TARGET_MS else ""
            cells = [f"{graph:.3f}", f"{xla:.3f}"]
            cells[int(compiled)] += "*" + mark
            print(f"| `{name}` | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
