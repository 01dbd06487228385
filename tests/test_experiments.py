"""The comparison runner: parsing, statistics, resumable runs, tables and plots."""

import json

import numpy as np
import pytest
from scipy import stats

from experiments import report, runner
from experiments.__main__ import main


def test_parse_strategy_specs():
    assert runner.parse_strategy("pcgrad") == ("pcgrad", "pcgrad")
    label, config = runner.parse_strategy("gradnorm:alpha=0.5;layer=trunk_2")
    assert label == "gradnorm:alpha=0.5;layer=trunk_2"
    assert config == {"name": "gradnorm", "alpha": 0.5, "layer": "trunk_2"}
    with pytest.raises(ValueError, match="key=value"):
        runner.parse_strategy("gradnorm:alpha")


def test_mean_and_confidence_interval():
    values = [1.0, 2.0, 4.0, 5.0]
    mean, half = report.mean_and_ci(values)
    low, high = stats.t.interval(0.95, 3, loc=3.0, scale=stats.sem(values))
    assert mean == 3.0
    assert half == pytest.approx((high - low) / 2)
    assert np.isnan(report.mean_and_ci([2.0])[1])


def test_compare_writes_results_and_resumes(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--strategies", "fixed,gradnorm:alpha=0.5", "--seeds", "2",
            "--epochs", "2", "--out", str(out)]
    assert main(argv) == 0
    runs = sorted((out / "runs").glob("*.json"))
    assert [p.name for p in runs] == ["fixed-seed0.json", "fixed-seed1.json",
                                      "gradnorm_alpha=0.5-seed0.json",
                                      "gradnorm_alpha=0.5-seed1.json"]
    result = json.loads(runs[0].read_text())
    assert set(result["test"]) >= {"loss", "digit_loss", "ink_loss", "digit_accuracy",
                                   "ink_mae"}
    assert len(result["history"]["val_digit_loss"]) == 2
    table = (out / "results.md").read_text()
    assert "`gradnorm:alpha=0.5`" in table and "±" in table
    assert (out / "metrics.png").stat().st_size > 0 and (out / "curves.png").exists()

    stamps = {p.name: p.stat().st_mtime_ns for p in runs}
    assert main(argv) == 0  # everything found in DIR: nothing is rerun
    assert {p.name: p.stat().st_mtime_ns for p in runs} == stamps
    assert "digit_accuracy" in capsys.readouterr().out
