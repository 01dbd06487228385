"""The verdict of a comparison: every strategy against the tuned linear scalarisation,
paired by seed (`experiments.report.paired_comparison`, `verdict`), checked against scipy and
hand-computed values."""

import numpy as np
import pytest
from scipy import stats

from experiments import benchmarks, report


# -- the paired comparison -------------------------------------------------------------------


def test_paired_comparison_known_answer():
    # differences 1, 1.5, 3: mean 11/6, s = sqrt(13/12), t(0.975, 2) = 4.302653
    c = report.paired_comparison([1.0, 2.0, 4.0], [0.0, 0.5, 1.0])
    half = 4.302652729911275 * np.sqrt(13 / 12) / np.sqrt(3)
    assert c.n == 3 and c.mean == pytest.approx(11 / 6)
    assert (c.low, c.high) == pytest.approx((11 / 6 - half, 11 / 6 + half))
    t = (11 / 6) / (np.sqrt(13 / 12) / np.sqrt(3))
    assert c.p_value == pytest.approx(2 * stats.t.sf(t, 2))
    assert c.p_value == pytest.approx(0.0927353, abs=1e-6)
    assert not c.excludes_zero  # the interval [-0.75, 4.42] contains 0


def test_paired_comparison_matches_scipy():
    rng = np.random.default_rng(3)
    for n in (2, 3, 5, 10):
        a, b = rng.normal(size=n), rng.normal(size=n)
        c = report.paired_comparison(a, b, confidence=0.9)
        reference = stats.ttest_rel(a, b)
        low, high = stats.t.interval(0.9, n - 1, loc=np.mean(a - b),
                                     scale=stats.sem(a - b))
        assert (c.low, c.high, c.p_value) == pytest.approx((low, high, reference.pvalue))
        assert c.excludes_zero == (reference.pvalue < 0.1)
    # pairing matters: the same values unpaired give a much wider interval
    a, b = np.array([10.0, 20.0, 30.0]), np.array([9.0, 18.9, 29.1])
    assert report.paired_comparison(a, b).excludes_zero
    assert not stats.ttest_ind(a, b).pvalue < 0.05


def test_paired_comparison_edge_cases():
    same = report.paired_comparison([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])  # differences all 1
    assert (same.low, same.high, same.p_value) == (1.0, 1.0, 0.0) and same.excludes_zero
    zero = report.paired_comparison([1.0, 2.0], [1.0, 2.0])
    assert (zero.mean, zero.low, zero.high, zero.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert not zero.excludes_zero
    one = report.paired_comparison([1.0], [3.0])
    assert one.mean == -2.0 and np.isnan(one.low) and np.isnan(one.p_value)
    diverged = report.paired_comparison([1.0, np.nan, 2.0], [0.0, 0.0, 0.0])
    assert np.isnan(diverged.mean) and not diverged.excludes_zero
    with pytest.raises(ValueError, match="one length"):
        report.paired_comparison([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        report.paired_comparison([1.0, 2.0], [1.0, 2.0], confidence=95)


# -- the verdict -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def verdict_benchmark():
    """A registered two-task benchmark (a_mae: lower is better, b_accuracy: higher) for
    hand-made results; the verdict only reads its task metrics."""
    split = benchmarks.Split(np.zeros((2, 1)), {"a": np.zeros(2), "b": np.zeros(2)})

    @benchmarks.register_benchmark("verdict_check")
    def factory(seed=0):
        return benchmarks.Benchmark(
            "verdict_check", "hand-made results", split, split, split, lambda s: None,
            loss={"a": "mse", "b": "mse"},
            task_metrics=[benchmarks.TaskMetric("a", "a_mae", False),
                          benchmarks.TaskMetric("b", "b_accuracy", True)])

    return "verdict_check"


def _run(label, seed, a_mae=None, b_accuracy=None, kind=None, validation=None):
    test = {k: v for k, v in (("a_mae", a_mae), ("b_accuracy", b_accuracy)) if v is not None}
    kind = kind or ("single" if label.startswith("single:") else
                    "ls" if label.startswith("ls:") else "method")
    return {"benchmark": "verdict_check", "strategy": label, "kind": kind, "seed": seed,
            "test": test, "validation": validation or test, "step_time_s": 0.001,
            "loss_ratio": 1.0}


def _results(methods, ls_points):
    """Single-task a_mae = 2 and b_accuracy = 0.8 on every seed; `methods` and `ls_points`:
    {label: [(a_mae, b_accuracy) per seed]}; LS points' validation metrics = test."""
    runs = []
    for seed in range(3):
        runs += [_run("single:a", seed, a_mae=2.0), _run("single:b", seed, b_accuracy=0.8)]
        for label, values in {**methods, **ls_points}.items():
            runs.append(_run(label, seed, *values[seed]))
    return runs


def _dm(a_mae, b_accuracy):  # delta-m% against a_mae 2, b_accuracy 0.8
    return 50.0 * ((a_mae - 2.0) / 2.0 - (b_accuracy - 0.8) / 0.8)


def test_verdict_ranks_and_classifies_against_the_tuned_ls(verdict_benchmark, tmp_path):
    ls_points = {"ls:ratio=1": [(2.2, 0.76), (2.4, 0.72), (2.2, 0.80)],    # the tuned one
                 "ls:ratio=10": [(3.0, 0.70), (3.2, 0.70), (3.0, 0.74)]}
    methods = {"good": [(1.8, 0.82), (2.0, 0.80), (1.8, 0.84)],   # ~12 points better, each seed
               "same": [(2.3, 0.70), (2.2, 0.80), (2.5, 0.76)],   # scattered around the LS
               "bad": [(4.0, 0.60), (4.2, 0.60), (4.0, 0.64)]}
    results = _results(methods, ls_points)
    found = report.verdict(results)
    assert found.tuned_ls == "ls:ratio=1" and found.seeds == 3
    ls = [_dm(*values) for values in ls_points["ls:ratio=1"]]
    assert found.tuned_ls_delta_m == pytest.approx(np.mean(ls))
    assert [e.label for e in found.entries] == ["good", "same", "bad"]  # by delta-m%
    for entry in found.entries:
        own = [_dm(*values) for values in methods[entry.label]]
        assert entry.delta_m == pytest.approx(np.mean(own))
        expected = stats.ttest_rel(own, ls)
        assert entry.comparison.p_value == pytest.approx(expected.pvalue)
        assert entry.comparison.mean == pytest.approx(np.mean(own) - np.mean(ls))
    assert found.outcome("better") == ["good"]
    assert found.outcome("indistinguishable") == ["same"]
    assert found.outcome("worse") == ["bad"]
    assert found.recommendation.startswith("Use `good`")
    text = report.verdict_markdown(found)
    assert "paired Student t (scipy.stats.ttest_rel)" in text
    assert "± 4.30 standard errors" in text  # t(0.975, 2), said with the interval's width

    # results.md: the verdict first, then the tables
    rows = report.summarize(results)
    report.write_tables(rows, results, tmp_path)
    verdict_text, tables = report.split_results_md((tmp_path / "results.md").read_text())
    assert verdict_text.startswith("## Verdict") and "**Recommendation:** Use `good`" in \
        verdict_text
    assert tables.startswith("Test metrics on `verdict_check`") and "`bad`" in tables


def test_verdict_says_so_when_nothing_beats_the_tuned_ls(verdict_benchmark):
    ls_points = {"ls:ratio=1": [(2.2, 0.76), (2.4, 0.72), (2.2, 0.80)]}
    methods = {"close": [(2.1, 0.76), (2.5, 0.72), (2.0, 0.80)],  # lower mean, interval has 0
               "bad": [(4.0, 0.60), (4.2, 0.60), (4.0, 0.64)]}
    found = report.verdict(_results(methods, ls_points))
    assert found.outcome("better") == [] and found.outcome("indistinguishable") == ["close"]
    line = found.recommendation
    assert line.startswith("No strategy beats the tuned LS (`ls:ratio=1`")
    assert "use the tuned linear scalarisation" in line and "`close` has a lower mean" in line
    # one seed: no interval, and the recommendation says why
    one_seed = [run for run in _results(methods, ls_points) if run["seed"] == 0]
    found = report.verdict(one_seed)
    assert {e.outcome for e in found.entries} == {"n/a"}
    assert found.recommendation.startswith("No verdict")
    # without single-task baselines there is no delta-m%, hence no verdict
    no_single = [r for r in _results(methods, ls_points) if r["kind"] != "single"]
    assert report.verdict(no_single) is None
