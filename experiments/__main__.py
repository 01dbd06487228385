"""Command line: `python -m experiments compare [options]`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

DEFAULT_STRATEGIES = "fixed,uncertainty,gradnorm,pcgrad"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments")
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser(
        "compare", help="train strategies x seeds on a benchmark; write tables and plots")
    compare.add_argument("--benchmark", default="clfreg",
                         help="clfreg (default), multidigits, synthetic, toy, or one you "
                              "registered (see --import)")
    compare.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                         help="comma-separated, or 'all' for every registered strategy; "
                              "hyper-parameters as name:key=value;key=value")
    compare.add_argument("--seeds", type=int, default=None,
                         help="number of seeds (default: the benchmark's, 3; toy 1)")
    compare.add_argument("--out", type=Path, default=None,
                         help="output folder (default runs/<benchmark>)")
    compare.add_argument("--epochs", type=int, default=None)
    compare.add_argument("--batch-size", type=int, default=None)
    compare.add_argument("--steps", type=int, default=None,
                         help="toy only: optimisation steps per start (default 35000)")
    compare.add_argument("--gradients", choices=["parameters", "representation", "auto"],
                         default="parameters",
                         help="where strategies that compute per-task gradients balance the "
                              "tasks: compile(gradients=...) (default: parameters); their "
                              "runs at another level are labelled <strategy>@<level>. "
                              "Loss-level strategies and the baselines are not affected. "
                              "Standard benchmarks only (not the toy)")
    compare.add_argument("--no-baselines", action="store_true",
                         help="skip the single-task baselines and the linear-scalarisation "
                              "sweep (then no delta-m%%)")
    compare.add_argument("--quick", action="store_true",
                         help="a smoke test of the whole pipeline: 1 seed, 1 epoch on small "
                              "subsets (toy: 1 step per start), eager execution; not a "
                              "result (--seeds, --epochs, --steps still apply)")
    compare.add_argument("--import", dest="imports", action="append", default=[],
                         metavar="MODULE",
                         help="import MODULE first (it may register benchmarks or strategies)")
    compare.add_argument("--keras-verbose", type=int, default=0,
                         help="Keras' own progress within each run (0, 1 or 2)")
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for module in args.imports:
        importlib.import_module(module)
    from experiments import report, runner
    from experiments.benchmarks import available_benchmarks, get_benchmark

    if args.benchmark not in available_benchmarks():
        parser.error(f"unknown benchmark {args.benchmark!r}; available: "
                     f"{', '.join(available_benchmarks())}")
    if args.gradients != "parameters" and getattr(get_benchmark(args.benchmark), "custom",
                                                  False):
        parser.error(f"--gradients {args.gradients}: benchmark {args.benchmark!r} trains its "
                     "own model at the parameter level")
    out = args.out or Path("runs") / args.benchmark
    if args.strategies.strip().lower() == "all":
        import lossbalance

        strategies = lossbalance.strategies.available()
    else:
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    failures = []
    results = runner.compare(args.benchmark, strategies, args.seeds, out,
                             epochs=args.epochs, batch_size=args.batch_size,
                             keras_verbose=args.keras_verbose, quick=args.quick,
                             baselines=not args.no_baselines, steps=args.steps,
                             errors="continue", failures=failures,
                             gradients=args.gradients)
    if results:
        paths = report.write_report(results, out)
        print((out / "results.md").read_text())
        print("Wrote", *paths, sep="\n  ")
    for failure in failures:
        print(f"FAILED: {failure['strategy']} seed {failure['seed']}: {failure['error']}",
              file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
