"""Command line: `python -m experiments compare [options]`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_STRATEGIES = "fixed,uncertainty,gradnorm,pcgrad"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments")
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser(
        "compare", help="train strategies x seeds on a benchmark; write tables and plots")
    compare.add_argument("--benchmark", default="clfreg")
    compare.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                         help="comma-separated; hyper-parameters as name:key=value;key=value")
    compare.add_argument("--seeds", type=int, default=3)
    compare.add_argument("--out", type=Path, default=None,
                         help="output folder (default runs/<benchmark>)")
    compare.add_argument("--epochs", type=int, default=None)
    compare.add_argument("--batch-size", type=int, default=None)
    compare.add_argument("--quick", action="store_true",
                         help="2 epochs and 1 seed: a smoke test of the whole pipeline")
    compare.add_argument("--keras-verbose", type=int, default=0,
                         help="Keras' own progress within each run (0, 1 or 2)")
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from experiments import report, runner
    from experiments.benchmarks import available_benchmarks

    if args.benchmark not in available_benchmarks():
        parser.error(f"unknown benchmark {args.benchmark!r}; available: "
                     f"{', '.join(available_benchmarks())}")
    if args.quick:
        args.epochs, args.seeds = 2, 1
    out = args.out or Path("runs") / args.benchmark
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    results = runner.compare(args.benchmark, strategies, args.seeds, out,
                             epochs=args.epochs, batch_size=args.batch_size,
                             keras_verbose=args.keras_verbose)
    rows = report.summarize(results)
    report.write_tables(rows, results, out)
    plots = report.plot(rows, results, out)
    print((out / "results.md").read_text())
    print("Wrote", out / "results.csv", out / "results.md", *plots, sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
