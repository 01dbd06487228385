"""Summaries of a comparison: delta-m%, mean and 95% confidence interval over seeds, the
tuned linear-scalarisation baseline, the verdict (which strategies beat the tuned LS, paired
by seed), tables and plots."""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from experiments.benchmarks import get_benchmark


def mean_and_ci(values, confidence=0.95):
    """Mean and the half-width of its Student-t confidence interval (nan for one value)."""
    values = np.asarray(values, float)
    if len(values) == 0:
        return float("nan"), float("nan")
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * stats.sem(values)
    return mean, float(half)


def delta_m(method, single, higher_is_better) -> float:
    """delta-m% = (1/M) sum_m (-1)^{h_m} (M_method,m - M_single,m) / M_single,m x 100.

    `method`, `single`: the M metric values of the method and of the single-task baselines;
    `higher_is_better`: h_m per metric. Lower is better: a method that improves every
    metric over its single-task baseline has a negative delta-m%.
    """
    method, single = np.asarray(method, float), np.asarray(single, float)
    sign = np.where(np.asarray(higher_is_better, bool), -1.0, 1.0)
    return float(np.mean(sign * (method - single) / single) * 100.0)


def _group(results):
    groups = defaultdict(list)
    for result in results:
        groups[result["strategy"]].append(result)
    return groups


def _single_reference(benchmark, groups, split):
    """Each task metric's single-task value (mean over seeds), or None if missing."""
    reference = {}
    for metric in benchmark.task_metrics:
        runs = groups.get(f"single:{metric.task}")
        if not runs:
            return None
        reference[metric.name] = float(np.mean([run[split].get(metric.name, np.nan)
                                                for run in runs]))
    return reference


def _run_delta_m(benchmark, run, reference, split):
    if reference is None:
        return float("nan")
    metrics = benchmark.task_metrics
    return delta_m([run[split].get(m.name, np.nan) for m in metrics],
                   [reference[m.name] for m in metrics],
                   [m.higher_is_better for m in metrics])


def summarize(results: list[dict]) -> list[dict]:
    """One row per strategy, LS point and single-task baseline: each task metric's mean and
    CI over seeds on the test split, delta-m% (test and validation), sum_k L_k/L_k(0), step
    time. The LS point with the best validation delta-m% is repeated as kind "tuned_ls"."""
    benchmark = get_benchmark(results[0]["benchmark"])
    groups = _group(results)
    reference = {split: _single_reference(benchmark, groups, split)
                 for split in ("test", "validation")}
    rows = []
    for label, runs in groups.items():
        kind = runs[0].get("kind", "method")
        row = {"strategy": label, "kind": kind, "seeds": len(runs)}
        for metric in benchmark.task_metrics:
            # a single-task run has no loss for the other tasks: nan there
            mean, ci = mean_and_ci([run["test"].get(metric.name, np.nan) for run in runs])
            row[metric.name], row[f"{metric.name}_ci95"] = mean, ci
        if kind == "single":
            row["delta_m"] = row["delta_m_ci95"] = row["val_delta_m"] = float("nan")
        else:
            row["delta_m"], row["delta_m_ci95"] = mean_and_ci(
                [_run_delta_m(benchmark, run, reference["test"], "test") for run in runs])
            row["val_delta_m"] = mean_and_ci(
                [_run_delta_m(benchmark, run, reference["validation"], "validation")
                 for run in runs])[0]
        row["loss_ratio"], row["loss_ratio_ci95"] = mean_and_ci(
            [run.get("loss_ratio", np.nan) for run in runs])
        row["step_ms"] = 1000 * float(np.nanmedian([run["step_time_s"] for run in runs])) \
            if any(np.isfinite(run["step_time_s"]) for run in runs) else float("nan")
        rows.append(row)
    sweep = [row for row in rows if row["kind"] == "ls" and np.isfinite(row["val_delta_m"])]
    if sweep:
        best = min(sweep, key=lambda row: row["val_delta_m"])
        rows.append({**best, "kind": "tuned_ls",
                     "strategy": f"tuned LS ({best['strategy']})", "source": best["strategy"]})
    order = {"method": 0, "tuned_ls": 1, "single": 2, "ls": 3}
    rows.sort(key=lambda row: order.get(row["kind"], 0))
    return rows


# -- the verdict: every strategy against the tuned LS, paired by seed ------------------------

PAIRED_TEST = "paired Student t (scipy.stats.ttest_rel)"
RESULTS_HEADING = "\n\n## Results\n\n"  # separates the verdict from the tables in results.md


@dataclass(frozen=True)
class PairedComparison:
    """Mean of the paired differences a_i - b_i, its two-sided Student-t confidence interval
    [low, high] and the p-value of the paired t test of a zero mean (n - 1 degrees of
    freedom). nan where it is not defined (fewer than two pairs, a non-finite value)."""

    n: int
    mean: float
    low: float
    high: float
    p_value: float
    confidence: float = 0.95
    test: str = PAIRED_TEST

    @property
    def excludes_zero(self) -> bool:
        return bool(np.isfinite(self.low) and (self.low > 0 or self.high < 0))


def paired_comparison(a, b, confidence=0.95) -> PairedComparison:
    """Compare a with b paired element by element (a_i and b_i from the same seed): the
    mean difference d = mean(a_i - b_i), the interval d ± t_{(1+confidence)/2, n-1} s_d /
    sqrt(n) and the paired t test's two-sided p-value (scipy.stats.ttest_rel).

    Identical differences (s_d = 0) give the degenerate interval [d, d] and p = 0 (or 1
    when d = 0) without scipy's precision warning. Fewer than two pairs, or a non-finite
    value, give nan for the interval and the p-value.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_comparison needs two 1-D arrays of one length; got shapes "
                         f"{a.shape} and {b.shape}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1); got {confidence}.")
    n = len(a)
    nan = float("nan")
    differences = a - b
    if n == 0 or not np.all(np.isfinite(differences)):
        return PairedComparison(n, nan, nan, nan, nan, confidence)
    mean = float(differences.mean())
    if n < 2:
        return PairedComparison(n, mean, nan, nan, nan, confidence)
    if np.all(differences == differences[0]):
        return PairedComparison(n, mean, mean, mean, 1.0 if mean == 0 else 0.0, confidence)
    result = stats.ttest_rel(a, b)
    interval = result.confidence_interval(confidence)
    return PairedComparison(n, mean, float(interval.low), float(interval.high),
                            float(result.pvalue), confidence)


def per_seed_delta_m(results: list[dict], split="test") -> dict[str, dict[int, float]]:
    """{label: {seed: delta-m%}} for every multi-task run (methods and LS points), against
    the single-task baselines' mean over seeds (as in `summarize`); {} without baselines."""
    benchmark = get_benchmark(results[0]["benchmark"])
    groups = _group(results)
    reference = _single_reference(benchmark, groups, split)
    if reference is None:
        return {}
    return {label: {run["seed"]: _run_delta_m(benchmark, run, reference, split)
                    for run in runs}
            for label, runs in groups.items() if runs[0].get("kind", "method") != "single"}


@dataclass
class VerdictEntry:
    """One strategy against the tuned LS: its delta-m% (mean, CI half-width over seeds), the
    paired comparison of its per-seed delta-m% with the tuned LS's (method - LS: negative is
    better) and the outcome: "better", "indistinguishable", "worse" or "n/a"."""

    label: str
    delta_m: float
    delta_m_ci95: float
    comparison: PairedComparison
    outcome: str


@dataclass
class Verdict:
    """The strategies ranked by delta-m%, each compared with the tuned LS."""

    benchmark: str
    tuned_ls: str             # the LS sweep point's label, e.g. "ls:ratio=100"
    tuned_ls_delta_m: float
    tuned_ls_delta_m_ci95: float
    entries: list = field(default_factory=list)  # VerdictEntry, ranked by delta-m%
    confidence: float = 0.95
    seeds: int = 0

    def outcome(self, outcome: str) -> list[str]:
        return [entry.label for entry in self.entries if entry.outcome == outcome]

    @property
    def recommendation(self) -> str:
        """One line: what to use, and how sure we are."""
        level = f"{100 * self.confidence:g}%"
        ls = f"the tuned LS (`{self.tuned_ls}`, Δm% {self.tuned_ls_delta_m:+.2f})"
        better = [e for e in self.entries if e.outcome == "better"]
        if better:
            best = better[0]
            c = best.comparison
            others = "" if len(better) == 1 else (
                f"; {len(better) - 1} more beat it too: "
                + ", ".join(f"`{e.label}`" for e in better[1:]))
            return (f"Use `{best.label}`: Δm% {best.delta_m:+.2f}, "
                    f"{abs(c.mean):.2f} points better than {ls}, {level} interval of the "
                    f"difference [{c.low:+.2f}, {c.high:+.2f}] over {c.n} seeds{others}.")
        if all(e.outcome == "n/a" for e in self.entries):
            first = next((e for e in self.entries if np.isfinite(e.delta_m)), None)
            lowest = "" if first is None else (
                f" (lowest Δm%: `{first.label}`, {first.delta_m:+.2f}, against "
                f"{self.tuned_ls_delta_m:+.2f} for the tuned LS)")
            return ("No verdict: the comparison with the tuned LS needs two or more seeds "
                    f"that both ran (--seeds 3 or more){lowest}.")
        ahead = [e for e in self.entries if e.outcome == "indistinguishable"
                 and e.comparison.mean < 0]
        hint = "" if not ahead else (
            f" `{ahead[0].label}` has a lower mean Δm% ({ahead[0].delta_m:+.2f}) but its "
            f"{level} interval of the difference [{ahead[0].comparison.low:+.2f}, "
            f"{ahead[0].comparison.high:+.2f}] includes zero; more seeds (--seeds) may "
            "separate them.")
        return (f"No strategy beats {ls} with {level} confidence over {self.seeds} seeds: "
                "use the tuned linear scalarisation (fixed weights w_k ∝ c_k / L_k(0) at "
                f"that sweep point).{hint}")


def _rank_key(entry):
    return (not np.isfinite(entry.delta_m), entry.delta_m)


def verdict(results: list[dict], rows: list[dict] | None = None,
            confidence=0.95) -> Verdict | None:
    """Rank the strategies by test delta-m% and compare each with the tuned LS (the sweep
    point with the best validation delta-m%, see `summarize`), paired by seed
    (`paired_comparison` of the per-seed delta-m%, method - LS, on the seeds both ran).

    "better": the difference's interval lies below zero; "worse": above zero;
    "indistinguishable": it contains zero; "n/a": undefined (fewer than two shared seeds, a
    non-finite delta-m%). None when there is no delta-m% (no single-task baselines) or no
    LS sweep.
    """
    rows = summarize(results) if rows is None else rows
    tuned = next((row for row in rows if row["kind"] == "tuned_ls"), None)
    by_seed = per_seed_delta_m(results)
    if tuned is None or not by_seed:
        return None
    ls_label = tuned["source"]
    ls = by_seed[ls_label]
    entries = []
    for row in rows:
        if row["kind"] != "method":
            continue
        own = by_seed.get(row["strategy"], {})
        seeds = sorted(set(own) & set(ls))
        comparison = paired_comparison([own[s] for s in seeds], [ls[s] for s in seeds],
                                       confidence)
        if not np.isfinite(comparison.low):
            outcome = "n/a"
        elif comparison.high < 0:
            outcome = "better"
        elif comparison.low > 0:
            outcome = "worse"
        else:
            outcome = "indistinguishable"
        entries.append(VerdictEntry(row["strategy"], row["delta_m"], row["delta_m_ci95"],
                                    comparison, outcome))
    entries.sort(key=_rank_key)
    return Verdict(get_benchmark(results[0]["benchmark"]).name, ls_label, tuned["delta_m"],
                   tuned["delta_m_ci95"], entries, confidence, seeds=len(ls))


def _interval(c: PairedComparison) -> str:
    if not np.isfinite(c.mean):
        return "n/a"
    if not np.isfinite(c.low):
        return f"{c.mean:+.2f} (one seed: no interval)"
    return f"{c.mean:+.2f} [{c.low:+.2f}, {c.high:+.2f}]"


def verdict_markdown(v: Verdict, heading="## Verdict") -> str:
    """The verdict as markdown: the ranking table, the three groups, the recommendation and
    the test used."""
    level = f"{100 * v.confidence:g}%"
    lines = [heading, "",
             f"Strategies ranked by test Δm% (lower is better), each against the tuned "
             f"linear scalarisation `{v.tuned_ls}` (Δm% "
             f"{_cell(v.tuned_ls_delta_m, v.tuned_ls_delta_m_ci95, '.2f', '.2f', True)}): "
             f"the difference Δm%(strategy) − Δm%(tuned LS), paired by seed, with its "
             f"{level} interval.", "",
             f"| rank | strategy | Δm% | − tuned LS [{level} CI] | p | verdict |",
             "|---|---|---|---|---|---|"]
    for rank, entry in enumerate(v.entries, 1):
        p = entry.comparison.p_value
        lines.append(
            f"| {rank} | `{entry.label}` | "
            f"{_cell(entry.delta_m, entry.delta_m_ci95, '.2f', '.2f', True)} | "
            f"{_interval(entry.comparison)} | {'n/a' if not np.isfinite(p) else f'{p:.3g}'} "
            f"| {entry.outcome} |")
    lines.append("")
    for outcome, title in (("better", f"Better than the tuned LS ({level} interval below 0)"),
                           ("indistinguishable", "Indistinguishable from it (interval "
                                                 "contains 0)"),
                           ("worse", f"Worse ({level} interval above 0)"),
                           ("n/a", "Not compared (fewer than two seeds, or a non-finite "
                                   "Δm%)")):
        labels = v.outcome(outcome)
        if labels or outcome != "n/a":
            names = ", ".join(f"`{label}`" for label in labels) or "none"
            lines.append(f"- **{title}:** {names}")
    test = (f"Test: {PAIRED_TEST} on the per-seed differences of test Δm% (same seed, "
            f"same single-task reference), two-sided {level} interval; one test per "
            "strategy, not corrected for multiple comparisons.")
    if v.seeds < 2:
        test += " With one seed there is no interval: run two or more (--seeds)."
    else:
        t = stats.t.ppf(0.5 + v.confidence / 2, v.seeds - 1)
        test += (f" With {v.seeds} seeds the interval is the mean difference ± {t:.2f} "
                 "standard errors" + (": wide, only large differences are resolved."
                                      if v.seeds <= 5 else "."))
    lines += ["", f"**Recommendation:** {v.recommendation}", "", test]
    return "\n".join(lines)


def _cell(mean, ci, fmt=".4g", ci_fmt=".2g", sign=False):
    if not np.isfinite(mean):
        return "n/a"
    text = f"{mean:+{fmt}}" if sign else f"{mean:{fmt}}"
    return text + ("" if not np.isfinite(ci) else f" ± {ci:{ci_fmt}}")


def markdown_table(rows, benchmark, kinds=("method", "tuned_ls", "single")) -> str:
    metrics = benchmark.task_metrics
    show_ratio = getattr(benchmark, "show_loss_ratio", False)
    header = ["strategy"] + [
        f"{m.name} ({'higher' if m.higher_is_better else 'lower'} is better)" for m in metrics]
    header += ["Δm% (lower is better)"] + (["Σ L/L(0)"] if show_ratio else [])
    header += ["step (ms)", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row["kind"] not in kinds:
            continue
        name = row["strategy"]
        if row["kind"] == "single":
            name = f"single-task `{name[len('single:'):]}`"
        elif row["kind"] == "method":
            name = f"`{name}`"
        cells = [name]
        for metric in metrics:
            if row["kind"] == "single" and not row["strategy"].endswith(":" + metric.task):
                cells.append("")
                continue
            cells.append(_cell(row[metric.name], row[f"{metric.name}_ci95"]))
        cells.append(_cell(row["delta_m"], row["delta_m_ci95"], ".2f", ".2f", sign=True))
        if show_ratio:
            cells.append(_cell(row["loss_ratio"], row["loss_ratio_ci95"], ".3g"))
        step = row["step_ms"]
        cells += [f"{step:.2f}" if np.isfinite(step) else "n/a", str(row["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_markdown(rows: list[dict], results: list[dict]) -> tuple[str, str]:
    """(verdict, tables) of `results.md` as markdown; the verdict is "" when there is none
    (no single-task baselines or no LS sweep)."""
    benchmark = get_benchmark(results[0]["benchmark"])
    quick = any(result.get("quick") for result in results)
    text = [
        f"Test metrics on `{benchmark.name}` at the epoch selected on validation "
        f"({results[0].get('selection', 'val_loss')} for multi-task runs): mean ± 95% "
        "confidence interval over seeds (Student t); Δm% against the single-task baselines "
        "(same network, same budget, only that task's loss); median step time"
        + (" (--quick: tiny data, eager, not a result)." if quick else "."),
        "",
        markdown_table(rows, benchmark),
    ]
    sweep = [row for row in rows if row["kind"] == "ls"]
    if sweep:
        text += ["", "Linear-scalarisation sweep (`fixed` weights w_k ∝ c_k / L_k(0), "
                 "c = (1, ratio)); the tuned LS row above is the point with the best "
                 "validation Δm%:", "",
                 markdown_table(sweep, benchmark, kinds=("ls",)),
                 "", "| sweep point | validation Δm% |", "|---|---|"]
        text += [f"| {row['strategy']} | {row['val_delta_m']:+.2f} |" for row in sweep]
    found = verdict(results, rows)
    return ("" if found is None else verdict_markdown(found)), "\n".join(text)


def write_tables(rows: list[dict], results: list[dict], out: Path) -> tuple[str, str]:
    """`results.csv` (the rows) and `results.md` (the verdict first, then the tables);
    returns `results_markdown`'s (verdict, tables)."""
    fields = []
    for row in rows:
        fields += [key for key in row if key not in fields]
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    found, tables = results_markdown(rows, results)
    header = "" if not found else found + RESULTS_HEADING
    (out / "results.md").write_text(header + tables + "\n")
    return found, tables


def split_results_md(text: str) -> tuple[str, str]:
    """`results.md`'s text -> (verdict, tables); verdict "" when it has none."""
    found, heading, tables = text.partition(RESULTS_HEADING)
    return (found, tables) if heading else ("", text)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(rows: list[dict], results: list[dict], out: Path) -> list[Path]:
    """`metrics.png` (bars with CIs), `curves.png` (validation losses), `tradeoff.png`
    (two tasks: every method against the LS front) and `loss_ratio.png` (benchmarks that
    show sum_k L_k/L_k(0))."""
    plt = _pyplot()
    benchmark = get_benchmark(results[0]["benchmark"])
    metrics = benchmark.task_metrics
    paths = []
    shown = [row for row in rows if row["kind"] in ("method", "tuned_ls")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.5, 0.3 * len(shown) + 2)
                                                       * min(len(metrics), 3) / 1.5, 3.8),
                             squeeze=False)
    names = [row["strategy"] for row in shown]
    for ax, metric in zip(axes.flat, metrics):
        means = np.array([row[metric.name] for row in shown])
        cis = np.array([0 if not np.isfinite(row[f"{metric.name}_ci95"])
                        else row[f"{metric.name}_ci95"] for row in shown])
        colors = ["tab:orange" if row["kind"] == "tuned_ls" else "tab:blue" for row in shown]
        ax.bar(range(len(shown)), means, yerr=cis, capsize=3, color=colors, alpha=0.8)
        single = [row for row in rows if row["strategy"] == f"single:{metric.task}"]
        if single:
            ax.axhline(single[0][metric.name], color="k", ls="--", lw=1, label="single-task")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(shown)), names, rotation=60, ha="right", fontsize=7)
        better = "higher" if metric.higher_is_better else "lower"
        ax.set_title(f"{metric.name} ({better} is better)", fontsize=9)
        finite = np.isfinite(means)
        if finite.any():
            low = float(np.min((means - cis)[finite]))
            high = float(np.max((means + cis)[finite]))
            pad = 0.15 * (high - low or abs(high) or 1.0)
            ax.set_ylim(low - pad, high + pad)
    fig.suptitle(f"{benchmark.name}: test metrics, mean and 95% CI over seeds", fontsize=10)
    fig.tight_layout()
    paths.append(out / "metrics.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    groups = {label: runs for label, runs in _group(results).items()
              if runs[0].get("kind", "method") == "method"}
    tasks = benchmark.task_names
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for strategy, runs in groups.items():
            curves = np.array([run["history"][f"val_{task}_loss"] for run in runs])
            ax.plot(np.arange(1, curves.shape[1] + 1), curves.mean(axis=0), label=strategy)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(f"validation {task} loss (mean over seeds)", fontsize=9)
    axes.flat[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    paths.append(out / "curves.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    if len(tasks) == 2:
        path = plot_tradeoff(rows, benchmark, out / "tradeoff.png")
        if path:
            paths.append(path)
    if getattr(benchmark, "show_loss_ratio", False):
        paths.append(plot_loss_ratio(groups, tasks, benchmark, out / "loss_ratio.png"))
    return paths


def plot_tradeoff(rows, benchmark, path):
    """Two tasks: the LS sweep as the trade-off front, every method with its CIs."""
    plt = _pyplot()
    by_task = {}
    for metric in benchmark.task_metrics:
        by_task.setdefault(metric.task, metric)
    (task_a, ma), (task_b, mb) = list(by_task.items())[:2]
    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    sweep = sorted((row for row in rows if row["kind"] == "ls"),
                   key=lambda row: float(row["strategy"].split("=")[-1]))
    if sweep:
        ax.plot([r[ma.name] for r in sweep], [r[mb.name] for r in sweep], "-o", color="grey",
                lw=1.5, ms=4, label="linear scalarisation (fixed weights sweep)", zorder=1)
        for r in sweep:
            ax.annotate(r["strategy"].split("=")[-1], (r[ma.name], r[mb.name]), fontsize=6,
                        color="grey", xytext=(3, -6), textcoords="offset points")
    for row in rows:
        if row["strategy"] == f"single:{task_a}":
            ax.axvline(row[ma.name], color="k", ls="--", lw=0.8, label="single-task")
        if row["strategy"] == f"single:{task_b}":
            ax.axhline(row[mb.name], color="k", ls="--", lw=0.8)
    methods = [row for row in rows if row["kind"] == "method"]
    colors = plt.cm.tab20(np.linspace(0, 1, max(len(methods), 1)))
    for color, row in zip(colors, methods):
        xerr = row[f"{ma.name}_ci95"] if np.isfinite(row[f"{ma.name}_ci95"]) else None
        yerr = row[f"{mb.name}_ci95"] if np.isfinite(row[f"{mb.name}_ci95"]) else None
        ax.errorbar(row[ma.name], row[mb.name], xerr=xerr, yerr=yerr, fmt="o", color=color,
                    ms=5, capsize=2, label=row["strategy"], zorder=2)
    ax.set_xlabel(f"{ma.name} ({'higher' if ma.higher_is_better else 'lower'} is better)")
    ax.set_ylabel(f"{mb.name} ({'higher' if mb.higher_is_better else 'lower'} is better)")
    for metric, setter in ((ma, ax.set_xscale), (mb, ax.set_yscale)):
        values = [r[metric.name] for r in rows if np.isfinite(r[metric.name])]
        if values and min(values) > 0 and max(values) / min(values) > 30:
            setter("log")
    ax.set_title(f"{benchmark.name}: test trade-off (mean, 95% CI over seeds)", fontsize=10)
    ax.legend(fontsize=6, loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_loss_ratio(groups, tasks, benchmark, path):
    """sum_k L_k(t) / L_k(0) on validation against epochs, mean over seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for strategy, runs in groups.items():
        curves = np.array([
            sum(np.asarray(run["history"][f"val_{t}_loss"])
                / run["initial"]["validation"][f"{t}_loss"] for t in tasks)
            for run in runs])
        ax.plot(np.arange(1, curves.shape[1] + 1), curves.mean(axis=0), label=strategy)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_title(f"{benchmark.name}: validation Σ_i L_i(t) / L_i(0) (mean over seeds)",
                 fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: list[dict], out: Path) -> list[Path]:
    """Tables and plots for any benchmark; returns the written paths."""
    out = Path(out)
    benchmark = get_benchmark(results[0]["benchmark"])
    if getattr(benchmark, "custom", False):
        return benchmark.write_report(results, out)
    rows = summarize(results)
    write_tables(rows, results, out)
    return [out / "results.csv", out / "results.md", *plot(rows, results, out)]
