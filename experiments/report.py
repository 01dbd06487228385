"""Summaries of a comparison: mean and 95% confidence interval over seeds, tables, plots."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

from experiments.benchmarks import get_benchmark


def mean_and_ci(values, confidence=0.95):
    """Mean and the half-width of its Student-t confidence interval (nan for one value)."""
    values = np.asarray(values, float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * stats.sem(values)
    return mean, float(half)


def summarize(results: list[dict]) -> list[dict]:
    """One row per strategy: each task metric's mean and CI over seeds, and step time."""
    benchmark = get_benchmark(results[0]["benchmark"])
    by_strategy = defaultdict(list)
    for result in results:
        by_strategy[result["strategy"]].append(result)
    rows = []
    for strategy, runs in by_strategy.items():
        row = {"strategy": strategy, "seeds": len(runs)}
        for metric in benchmark.task_metrics:
            mean, ci = mean_and_ci([run["test"][metric.name] for run in runs])
            row[metric.name] = mean
            row[f"{metric.name}_ci95"] = ci
        row["step_ms"] = 1000 * float(np.nanmedian([run["step_time_s"] for run in runs]))
        rows.append(row)
    return rows


def write_tables(rows: list[dict], results: list[dict], out: Path) -> None:
    benchmark = get_benchmark(results[0]["benchmark"])
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    arrows = {m.name: "higher is better" if m.higher_is_better else "lower is better"
              for m in benchmark.task_metrics}
    header = ["strategy"] + [f"{m.name} ({arrows[m.name]})" for m in benchmark.task_metrics]
    header += ["step (ms)", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"`{row['strategy']}`"]
        for metric in benchmark.task_metrics:
            ci = row[f"{metric.name}_ci95"]
            cells.append(f"{row[metric.name]:.4g}" + ("" if np.isnan(ci) else f" ± {ci:.2g}"))
        cells += [f"{row['step_ms']:.2f}", str(row["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "results.md").write_text(
        f"Test metrics on `{benchmark.name}` at the best validation epoch: mean ± 95% "
        "confidence interval over seeds; median step time.\n\n" + "\n".join(lines) + "\n")


def plot(rows: list[dict], results: list[dict], out: Path) -> list[Path]:
    """Bar charts of the task metrics (with CIs) and per-task validation loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmark = get_benchmark(results[0]["benchmark"])
    metrics = benchmark.task_metrics
    paths = []
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6))
    axes = np.atleast_1d(axes)
    names = [row["strategy"] for row in rows]
    for ax, metric in zip(axes, metrics):
        means = [row[metric.name] for row in rows]
        cis = [0 if np.isnan(row[f"{metric.name}_ci95"]) else row[f"{metric.name}_ci95"]
               for row in rows]
        ax.bar(range(len(rows)), means, yerr=cis, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right")
        better = "higher" if metric.higher_is_better else "lower"
        ax.set_title(f"{metric.name} ({better} is better)")
        low, high = min(m - c for m, c in zip(means, cis)), max(m + c for m, c in zip(means, cis))
        pad = 0.15 * (high - low or abs(high) or 1.0)
        ax.set_ylim(low - pad, high + pad)
    fig.suptitle(f"{benchmark.name}: test metrics, mean and 95% CI over seeds")
    fig.tight_layout()
    paths.append(out / "metrics.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    tasks = [m.task for m in metrics]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6))
    axes = np.atleast_1d(axes)
    by_strategy = defaultdict(list)
    for result in results:
        by_strategy[result["strategy"]].append(result)
    for ax, task in zip(axes, tasks):
        for strategy, runs in by_strategy.items():
            curves = np.array([run["history"][f"val_{task}_loss"] for run in runs])
            ax.plot(np.arange(1, curves.shape[1] + 1), curves.mean(axis=0), label=strategy)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(f"validation {task} loss (mean over seeds)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "curves.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
