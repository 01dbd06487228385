"""Command line: `python -m experiments compare [options]` and
`python -m experiments leaderboard [options]`."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# The classic four, then the strategies built for tasks whose losses or gradients are on
# different scales (the case the default benchmark, clfreg, poses).
CLASSIC_STRATEGIES = ("fixed", "uncertainty", "gradnorm", "pcgrad")
SCALE_STRATEGIES = ("nash_mtl", "db_mtl", "famo", "imtl_g", "upgrad", "mgda", "aligned_mtl")
DEFAULT_STRATEGIES = ",".join(CLASSIC_STRATEGIES + SCALE_STRATEGIES)


def _strategy_list(text):
    if text.strip().lower() == "all":
        import lossbalance
        from experiments import runner

        return runner.runnable_by_name(lossbalance.strategies.available())
    return [s.strip() for s in text.split(",") if s.strip()]


def _common(parser):
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test of the whole pipeline: 1 seed, 1 epoch on small "
                             "subsets (toy: 1 step per start), eager execution; not a "
                             "result (--seeds, --epochs, --steps still apply)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None,
                        help="toy only: optimisation steps per start (default 35000)")
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE",
                        help="import MODULE first (it may register benchmarks or strategies)")
    parser.add_argument("--verbose", action="store_true",
                        help="let TensorFlow print its start-up lines, CUDA probing and "
                             "retracing warnings (hidden by default)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments")
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser(
        "compare", help="train strategies x seeds on a benchmark; write tables, plots and "
                        "the verdict against the tuned linear scalarisation")
    compare.add_argument("--benchmark", default="clfreg",
                         help="clfreg (default), multidigits, synthetic, mnist1d, toy, "
                              "toy_shifted, or one you registered (see --import)")
    compare.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                         help="comma-separated, or 'all' for every registered strategy; "
                              "hyper-parameters as name:key=value;key=value, and "
                              "grouping=layer|variable for compile(grouping=...) (default: "
                              f"{DEFAULT_STRATEGIES})")
    compare.add_argument("--seeds", type=int, default=None,
                         help="number of seeds (default: the benchmark's, 3; toy 1)")
    compare.add_argument("--out", type=Path, default=None,
                         help="output folder (default runs/<benchmark>)")
    compare.add_argument("--batch-size", type=int, default=None)
    compare.add_argument("--gradients", choices=["parameters", "representation", "auto"],
                         default="parameters",
                         help="where strategies that compute per-task gradients balance the "
                              "tasks: compile(gradients=...) (default: parameters); their "
                              "runs at another level are labelled <strategy>@<level>. "
                              "Loss-level strategies and the baselines are not affected. "
                              "Standard benchmarks only (not the toy)")
    compare.add_argument("--no-baselines", action="store_true",
                         help="skip the single-task baselines and the linear-scalarisation "
                              "sweep (then no delta-m%% and no verdict)")
    compare.add_argument("--keras-verbose", type=int, default=0,
                         help="Keras' own progress within each run (0, 1 or 2)")
    _common(compare)

    board = commands.add_parser(
        "leaderboard", help="every registered strategy on every built-in benchmark "
                            "(resumable); writes leaderboard.md, .csv and figures")
    board.add_argument("--benchmarks", default=None,
                       help="comma-separated (default: "
                            "clfreg,multidigits,synthetic,mnist1d,toy,toy_shifted)")
    board.add_argument("--strategies", default="all",
                       help="comma-separated, or 'all' (default: every registered strategy)")
    board.add_argument("--seeds", type=int, default=None,
                       help="seeds per benchmark (default: each benchmark's, 3; the toys 1: "
                            "deterministic but for random strategies)")
    board.add_argument("--out", type=Path, default=None,
                       help="the runs, one folder per benchmark (default runs/leaderboard)")
    board.add_argument("--results", type=Path, default=None,
                       help="where leaderboard.md, leaderboard.csv and the figures go "
                            "(default docs/results)")
    _common(board)
    args = parser.parse_args(argv)

    if not args.verbose:
        from experiments import console

        console.quiet()  # before anything imports TensorFlow
    for module in args.imports:
        importlib.import_module(module)
    if args.command == "leaderboard":
        return _leaderboard(parser, args, argv)
    return _compare(parser, args)


def _compare(parser, args) -> int:
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
    failures = []
    results = runner.compare(args.benchmark, _strategy_list(args.strategies), args.seeds,
                             out, epochs=args.epochs, batch_size=args.batch_size,
                             keras_verbose=args.keras_verbose, quick=args.quick,
                             baselines=not args.no_baselines, steps=args.steps,
                             errors="continue", failures=failures,
                             gradients=args.gradients)
    if results:
        paths = report.write_report(results, out)
        found, tables = report.split_results_md((out / "results.md").read_text())
        print(tables)
        print("Wrote", *paths, sep="\n  ")
        if found:  # last, where the eye lands
            print("\n" + found)
    for failure in failures:
        print(f"FAILED: {failure['strategy']} seed {failure['seed']}: {failure['error']}",
              file=sys.stderr)
    return 1 if failures else 0


def _leaderboard(parser, args, argv) -> int:
    from experiments import leaderboard
    from experiments.benchmarks import available_benchmarks

    names = leaderboard.BUILT_IN if args.benchmarks is None else [
        b.strip() for b in args.benchmarks.split(",") if b.strip()]
    unknown = [name for name in names if name not in available_benchmarks()]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(map(repr, unknown))}; available: "
                     f"{', '.join(available_benchmarks())}")
    command = "python -m experiments " + " ".join(sys.argv[1:] if argv is None else argv)
    paths, failures = leaderboard.run(
        names, _strategy_list(args.strategies), args.seeds,
        args.out or leaderboard.RUNS, args.results or leaderboard.RESULTS,
        quick=args.quick, epochs=args.epochs, steps=args.steps, command=command)
    overview = paths[0].read_text().split("\n## ")[0]  # the summary above the sections
    print(overview.rstrip())
    print("Wrote", *paths, sep="\n  ")
    for failure in failures:
        print(f"FAILED: {failure['benchmark']}: {failure['strategy']} seed {failure['seed']}: "
              f"{failure['error']}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
