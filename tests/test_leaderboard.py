"""`python -m experiments leaderboard` on a tiny --quick configuration: tables, CSV, figures,
failures reported, resuming."""

import csv
import json

import numpy as np
import pytest

from experiments.__main__ import main


# -- the leaderboard -------------------------------------------------------------------------------


def test_leaderboard_on_a_tiny_configuration(tmp_path, capsys):
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    argv = ["leaderboard", "--benchmarks", "mnist1d,toy", "--strategies",
            "fixed,famo,krum,output_balancer,not_a_strategy", "--quick", "--seeds", "2", "--out", str(runs),
            "--results", str(docs)]
    with pytest.warns(UserWarning, match="'not_a_strategy' seed . failed"):
        assert main(argv) == 1  # the unknown strategy fails, the others go on
    captured = capsys.readouterr()
    assert "FAILED: mnist1d: not_a_strategy seed 0" in captured.err
    assert "| benchmark | best" in captured.out  # the overview is printed
    text = (docs / "leaderboard.md").read_text()
    assert "--benchmarks mnist1d,toy" in text  # the command that made it
    assert "## mnist1d" in text and "## toy" in text and "**Verdict:**" in text
    assert "tuned LS (`ls:ratio=" in text and "single-task `time`" in text
    assert "`not_a_strategy` seed 1" in text  # reported under its benchmark
    assert "reached (of 5)" in text
    # not run where they are not defined, said under the benchmark
    assert "Not run, defined for more than this benchmark's 2 tasks: `krum`" in text
    assert ("Not run, defined at the representation level only, which this benchmark's "
            "model does not have: `output_balancer`") in text
    with open(docs / "leaderboard.csv") as handle:
        rows = list(csv.DictReader(handle))
    mnist = {row["strategy"]: row for row in rows if row["benchmark"] == "mnist1d"}
    assert {"fixed", "famo", "output_balancer@representation", "single:digit",
            "single:time"} <= set(mnist)
    assert mnist["fixed"]["verdict"] in ("better", "indistinguishable", "worse")
    fixed = json.loads((runs / "mnist1d" / "runs" / "fixed-seed1.json").read_text())
    single = {t: np.mean([json.loads((runs / "mnist1d" / "runs" /
                                      f"single_{t}-seed{s}.json").read_text())["test"][m]
                          for s in (0, 1)])
              for t, m in (("digit", "digit_accuracy"), ("time", "time_mae"))}
    assert fixed["quick"] and float(mnist["fixed"]["seeds"]) == 2
    assert np.isfinite(float(mnist["fixed"]["delta_m"])) and single["time"] > 0
    toy_rows = [row for row in rows if row["benchmark"] == "toy"]
    assert {row["strategy"] for row in toy_rows} == {"fixed", "famo"}
    assert all(row["reached_of"] == "5" for row in toy_rows)
    for name in ("mnist1d", "toy"):
        assert (docs / f"leaderboard-{name}.png").stat().st_size > 0
        assert (runs / name / "results.md").exists()  # each benchmark's own report

    # resumable: the finished runs are read back, not rerun
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("*.json")}
    with pytest.warns(UserWarning, match="not_a_strategy"):  # retried, fails again
        assert main(argv) == 1
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*.json")} == stamps
