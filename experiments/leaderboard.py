"""Every registered strategy on every built-in benchmark, in one table.

    python -m experiments leaderboard                  # hours on a CPU; resumable
    python -m experiments leaderboard --benchmarks clfreg,toy --strategies fixed,pcgrad --quick

Each benchmark is a `runner.compare` (the strategies, the single-task baselines and the
linear-scalarisation sweep, same seeds) into `<out>/<benchmark>/` (default
`runs/leaderboard/`), so an interrupted leaderboard resumes where it stopped: finished runs
are read back, failed ones are retried, and a strategy that fails is reported without
stopping the others. Each benchmark's folder also gets the comparison's own report
(`results.md` with its verdict, plots).

The leaderboard (default folder `docs/results/`): `leaderboard.md`, `leaderboard.csv` and
one figure per benchmark, `leaderboard-<benchmark>.png`. Supervised benchmarks: per
strategy, the task metrics and Δm% (mean ± 95% interval over seeds), the difference from the
tuned LS paired by seed with its 95% interval and the verdict (`report.verdict`), and the
median step time, with the tuned-LS and single-task rows. The toy benchmarks have no Δm%:
how many of the starts reach the Pareto set (mean over seeds), per start, and the step time.
"""

from __future__ import annotations

import csv
import sys
import traceback
from datetime import date
from pathlib import Path

import numpy as np

from experiments import report, runner
from experiments.benchmarks import get_benchmark

BUILT_IN = ("clfreg", "multidigits", "synthetic", "mnist1d", "toy", "toy_shifted")
RUNS = Path("runs") / "leaderboard"
RESULTS = Path("docs") / "results"


def run(benchmarks=BUILT_IN, strategies=None, seeds=None, out=RUNS, results=RESULTS, *,
        quick=False, epochs=None, steps=None, progress=True, command=None):
    """Run `strategies` (default: every registered one) on `benchmarks` with `seeds` seeds
    (default: each benchmark's, 3; the toys 1), skipping runs already in `out`; write the
    leaderboard into `results`. Returns (written paths, failures): a failure is a dict with
    "benchmark", "strategy", "seed" (None when a whole benchmark failed) and "error".
    """
    from tqdm import tqdm

    import lossbalance

    strategies = list(strategies or runner.runnable_by_name(
        lossbalance.strategies.available()))
    out, results = Path(out), Path(results)
    results.mkdir(parents=True, exist_ok=True)
    failures, sections = [], []
    bar = tqdm(list(benchmarks), desc="leaderboard", unit="benchmark", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        failed, skipped = [], {}
        try:
            runs = runner.compare(name, strategies, seeds, out / name, epochs=epochs,
                                  quick=quick, steps=steps, progress=progress,
                                  errors="continue", failures=failed, skipped=skipped)
            if runs:
                report.write_report(runs, out / name)
            section = _section(name, runs, failed, results)
            if skipped["too_few"]:
                section["markdown"] += (
                    f"\n\nNot run, defined for more than this benchmark's {skipped['tasks']} "
                    "tasks: " + ", ".join(f"`{s}`" for s in skipped["too_few"]) + ".")
            if skipped["elsewhere"]:
                section["markdown"] += (
                    "\n\nNot run, defined at the representation level only, which this "
                    "benchmark's model does not have: "
                    + ", ".join(f"`{s}`" for s in skipped["elsewhere"]) + ".")
            sections.append(section)
        except Exception as error:  # noqa: BLE001 (a benchmark that fails: report, go on)
            message = f"{type(error).__name__}: {error}"
            bar.write(f"leaderboard: benchmark {name!r} failed: {message}", file=sys.stderr)
            traceback.print_exc()
            failed.append({"strategy": "*", "seed": None, "error": message})
            sections.append({"name": name, "markdown": f"## {name}\n\nFailed: {message}",
                             "rows": [], "summary": f"| {name} | failed: {message} | | |"})
        failures += [{"benchmark": name, **failure} for failure in failed]
    paths = _write(sections, results, command=command, quick=quick)
    return paths, failures


# -- one benchmark's section ------------------------------------------------------------------


def _failed_lines(failed):
    if not failed:
        return []
    lines = ["", "Failed runs (not in the table; a rerun retries them):", ""]
    lines += [f"- `{f['strategy']}` seed {f['seed']}: {f['error'].splitlines()[0][:300]}"
              for f in failed]
    return lines


def _section(name, runs, failed, results):
    benchmark = get_benchmark(name)
    if getattr(benchmark, "custom", False):
        return _toy_section(name, benchmark, runs, failed, results)
    if not runs:
        return {"name": name, "rows": [],
                "markdown": "\n".join([f"## {name}", "", "No run finished."]
                                      + _failed_lines(failed)),
                "summary": f"| `{name}` | no run finished | | |"}
    rows = report.summarize(runs)
    found = report.verdict(runs, rows)
    entries = {} if found is None else {entry.label: entry for entry in found.entries}
    rank = {label: i for i, label in enumerate(entries, 1)}
    metrics = benchmark.task_metrics
    header = ["rank", "strategy"] + [
        f"{m.name} ({'↑' if m.higher_is_better else '↓'})" for m in metrics] + [
        "Δm% (↓)", "− tuned LS [95% CI]", "verdict", "step (ms)", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    csv_rows = []
    shown = sorted((row for row in rows if row["kind"] == "method"),
                   key=lambda row: rank.get(row["strategy"], len(rank) + 1))
    shown += [row for row in rows if row["kind"] in ("tuned_ls", "single")]
    for row in shown:
        entry = entries.get(row["strategy"])
        kind = row["kind"]
        if kind == "method":
            label = f"`{row['strategy']}`"
        elif kind == "tuned_ls":
            label = f"tuned LS (`{row['source']}`)"
        else:
            label = f"single-task `{row['strategy'][len(runner.SINGLE):]}`"
        cells = [str(rank.get(row["strategy"], "–")), label]
        for metric in metrics:
            if kind == "single" and not row["strategy"].endswith(":" + metric.task):
                cells.append("")
            else:
                cells.append(report._cell(row[metric.name], row[f"{metric.name}_ci95"]))
        cells.append("reference" if kind == "single" else report._cell(
            row["delta_m"], row["delta_m_ci95"], ".2f", ".2f", sign=True))
        if entry is not None:
            cells += [report._interval(entry.comparison), entry.outcome]
        else:
            cells += ["", "baseline"]
        cells += [f"{row['step_ms']:.2f}" if np.isfinite(row["step_ms"]) else "n/a",
                  str(row["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
        comparison = None if entry is None else entry.comparison
        csv_rows.append({
            "benchmark": name, "strategy": row["strategy"], "kind": kind,
            "rank": rank.get(row["strategy"], ""), "seeds": row["seeds"],
            **{m.name: row[m.name] for m in metrics},
            "delta_m": row["delta_m"], "delta_m_ci95": row["delta_m_ci95"],
            "vs_tuned_ls": "" if comparison is None else comparison.mean,
            "vs_tuned_ls_low": "" if comparison is None else comparison.low,
            "vs_tuned_ls_high": "" if comparison is None else comparison.high,
            "p_value": "" if comparison is None else comparison.p_value,
            "verdict": "" if entry is None else entry.outcome,
            "step_ms": row["step_ms"]})
    figure = results / f"leaderboard-{name}.png"
    if found is not None:
        _plot_delta_m(found, figure)
    quick = any(run.get("quick") for run in runs)
    text = [f"## {name}", "", f"{benchmark.description}" + (
        " (--quick: tiny data, eager; not a result)" if quick else ""), ""]
    if found is None:
        text += ["No verdict (no single-task baselines or no LS sweep).", ""]
    else:
        text += [f"**Verdict:** {found.recommendation}", "",
                 "Better than the tuned LS: "
                 + (", ".join(f"`{label}`" for label in found.outcome("better")) or "none")
                 + "; indistinguishable: "
                 + str(len(found.outcome("indistinguishable")))
                 + "; worse: " + str(len(found.outcome("worse"))) + ".", ""]
    text += lines + _failed_lines(failed)
    if found is not None:
        text += ["", f"![{name}: Δm% of every strategy]({figure.name})"]
    best = None if found is None or not found.entries else found.entries[0]
    summary = "| `{}` | {} | {} | {} |".format(
        name,
        "n/a" if best is None else f"`{best.label}` ({best.delta_m:+.2f})",
        "n/a" if found is None else f"{found.tuned_ls_delta_m:+.2f} (`{found.tuned_ls}`)",
        "n/a" if found is None else (
            ", ".join(f"`{label}`" for label in found.outcome("better")) or "none"))
    return {"name": name, "markdown": "\n".join(text), "rows": csv_rows, "summary": summary,
            "figure": figure if found is not None else None}


def _toy_section(name, benchmark, runs, failed, results):
    by_strategy = {}
    for run in runs:
        by_strategy.setdefault(run["strategy"], []).append(run)
    starts = benchmark.starts
    scored = []
    for strategy, group in by_strategy.items():
        reached = np.array([[s["reached"] for s in run["starts"]] for run in group], float)
        diverged = sum(not s["finite"] for run in group for s in run["starts"])
        step = float(np.nanmedian([run["step_time_s"] for run in group])) * 1000
        scored.append((strategy, reached, diverged, step, len(group)))
    scored.sort(key=lambda item: (-item[1].sum(axis=1).mean(), item[0]))
    header = ["rank", "strategy", f"reached (of {len(starts)})"] + [
        f"({s[0]:g}, {s[1]:g})" for s in starts] + ["diverged", "step (ms)", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    csv_rows = []
    for rank, (strategy, reached, diverged, step, seeds) in enumerate(scored, 1):
        per_start = reached.mean(axis=0)
        total = float(reached.sum(axis=1).mean())
        lines.append("| " + " | ".join(
            [str(rank), f"`{strategy}`", f"{total:.3g}"]
            + [f"{int(round(v * seeds))}/{seeds}" for v in per_start]
            + [str(diverged), f"{step:.3f}", str(seeds)]) + " |")
        csv_rows.append({"benchmark": name, "strategy": strategy, "kind": "method",
                         "rank": rank, "seeds": seeds, "reached": total,
                         "reached_of": len(starts), "step_ms": step})
    figure = results / f"leaderboard-{name}.png"
    if scored:
        _plot_reached(name, scored, len(starts), figure)
    steps = runs[0]["steps"] if runs else None
    text = [f"## {name}", "",
            f"{benchmark.description} No Δm% here: each run trains a point from "
            f"{len(starts)} starts ({steps} steps each) and the table counts the starts that "
            "reach the Pareto set (Pareto stationary in the lower valley, x1 in [-7, 7]); "
            "per start, the seeds that reached it; diverged: starts that ended non-finite."
            + (" (--quick: not a result)" if any(r.get("quick") for r in runs) else ""), ""]
    text += lines + _failed_lines(failed)
    if scored:
        text += ["", f"![{name}: starts reaching the Pareto set]({figure.name})"]
    everywhere = [s for s, reached, *_ in scored if reached.all()]
    summary = f"| `{name}` | " + (
        "n/a" if not scored else f"`{scored[0][0]}` ({scored[0][1].sum(axis=1).mean():.3g}"
                                 f"/{len(starts)} starts)") + " | – | " + (
        "all starts: " + (", ".join(f"`{s}`" for s in everywhere) or "none")) + " |"
    return {"name": name, "markdown": "\n".join(text), "rows": csv_rows, "summary": summary,
            "figure": figure if scored else None}


# -- figures ------------------------------------------------------------------------------

_COLORS = {"better": "tab:green", "indistinguishable": "tab:grey", "worse": "tab:red",
           "n/a": "tab:blue"}


def _plot_delta_m(found: report.Verdict, path: Path) -> Path:
    """Δm% of every strategy with its 95% interval over seeds, coloured by verdict, against
    the tuned LS (line and band) and the single-task networks (0)."""
    plt = report._pyplot()
    entries = [e for e in found.entries if np.isfinite(e.delta_m)]
    fig, ax = plt.subplots(figsize=(8.5, 1.4 + 0.28 * max(len(entries), 4)))
    y = np.arange(len(entries))[::-1]
    for yi, entry in zip(y, entries):
        err = entry.delta_m_ci95 if np.isfinite(entry.delta_m_ci95) else None
        ax.errorbar(entry.delta_m, yi, xerr=err, fmt="o", ms=4, capsize=2,
                    color=_COLORS[entry.outcome])
    ls, ls_ci = found.tuned_ls_delta_m, found.tuned_ls_delta_m_ci95
    ax.axvline(ls, color="tab:orange", lw=1.2, label=f"tuned LS ({found.tuned_ls})")
    if np.isfinite(ls_ci):
        ax.axvspan(ls - ls_ci, ls + ls_ci, color="tab:orange", alpha=0.15)
    ax.axvline(0.0, color="k", ls="--", lw=0.8, label="single-task networks")
    ax.set_yticks(y, [e.label for e in entries], fontsize=7)
    values = [abs(e.delta_m) for e in entries] + [abs(ls)]
    if max(values, default=0) > 200:  # a few failures at +1000s would flatten the rest
        ax.set_xscale("symlog", linthresh=50)
    for outcome, color in _COLORS.items():
        if found.outcome(outcome):
            ax.plot([], [], "o", color=color, label=outcome)
    ax.set_xlabel("Δm% against the single-task networks (lower is better)")
    ax.set_title(f"{found.benchmark}: Δm% (mean, 95% CI over {found.seeds} seeds), verdict "
                 "against the tuned LS", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the data
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_reached(name, scored, starts, path):
    plt = report._pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 1.2 + 0.25 * len(scored)))
    y = np.arange(len(scored))[::-1]
    ax.barh(y, [reached.sum(axis=1).mean() for _, reached, *_ in scored], color="tab:blue",
            alpha=0.8)
    ax.set_yticks(y, [s for s, *_ in scored], fontsize=7)
    ax.set_xlim(0, starts)
    ax.set_xlabel(f"starts reaching the Pareto set (of {starts}, mean over seeds)")
    ax.set_title(f"{name}: starts reaching the Pareto set", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the files ------------------------------------------------------------------------------


def _write(sections, results, command=None, quick=False):
    md, table = results / "leaderboard.md", results / "leaderboard.csv"
    text = ["# Leaderboard: every strategy on every benchmark", "",
            f"Made on {date.today().isoformat()} by `{command or 'python -m experiments leaderboard'}`"
            + (" with --quick: tiny data, eager, not a result." if quick else "."), "",
            "Supervised benchmarks: test metrics and Δm% against the single-task networks "
            "(mean ± 95% Student-t interval over seeds; lower is better), each strategy's "
            "Δm% minus the tuned linear scalarisation's, paired by seed, with its 95% "
            f"interval ({report.PAIRED_TEST}; one test per strategy, not corrected for "
            "multiple comparisons), the verdict (better, indistinguishable or worse than the "
            "tuned LS) and the median step time. The tuned LS is the point of the "
            "fixed-weight sweep with the best validation Δm%. Toy benchmarks: the starts "
            "that reach the Pareto set.", "",
            "| benchmark | best (Δm% or starts) | tuned LS Δm% | better than the tuned LS |",
            "|---|---|---|---|"]
    text += [section["summary"] for section in sections]
    for section in sections:
        text += ["", section["markdown"]]
    md.write_text("\n".join(text) + "\n")
    rows = [row for section in sections for row in section["rows"]]
    fields = []
    for row in rows:
        fields += [key for key in row if key not in fields]
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields or ["benchmark"], restval="")
        writer.writeheader()
        writer.writerows(rows)
    return [md, table] + [section["figure"] for section in sections
                          if section.get("figure")]
