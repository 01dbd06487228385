"""The command line's quiet console (`experiments.console`, `--verbose`) and its default
comparison."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import console
from experiments.__main__ import DEFAULT_STRATEGIES, main

ROOT = Path(__file__).resolve().parents[1]


# -- the quiet console -------------------------------------------------------------------------


def test_stderr_silenced_hides_descriptor_two_and_restores_it(capfd):
    with console.stderr_silenced():
        os.write(2, b"start-up noise\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"
    with pytest.raises(RuntimeError):
        with console.stderr_silenced():
            raise RuntimeError("shown")
    os.write(2, b"restored\n")
    assert capfd.readouterr().err == "restored\n"


def test_quiet_sets_the_log_levels(monkeypatch):
    import tensorflow as tf
    from absl import logging as absl_logging

    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    logger, level, absl_level = tf.get_logger(), tf.get_logger().level, \
        absl_logging.get_verbosity()
    try:
        logger.setLevel(logging.WARNING)
        console.quiet()
        assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"
        assert logger.level == logging.ERROR  # the retracing warnings are WARNING
        assert absl_logging.get_verbosity() == absl_logging.ERROR
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")  # the user's own setting stays
        console.quiet()
        assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"
    finally:
        logger.setLevel(level)
        absl_logging.set_verbosity(absl_level)


def test_the_command_line_is_quiet_unless_verbose(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(console, "quiet", lambda: calls.append(True))
    for argv, expected in ((["compare"], [True]), (["compare", "--verbose"], []),
                           (["leaderboard"], [True]), (["leaderboard", "--verbose"], [])):
        calls.clear()
        with pytest.raises(SystemExit):  # stops at the unknown benchmark, after the set-up
            main(argv + ["--benchmark" if argv[0] == "compare" else "--benchmarks", "nope"])
        assert calls == expected, argv
    assert "unknown benchmark" in capsys.readouterr().err


def test_a_fresh_process_prints_no_tensorflow_start_up_lines(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run(
        [sys.executable, "-m", "experiments", "compare", "--quick", "--benchmark", "clfreg",
         "--strategies", "fixed", "--no-baselines", "--out", str(tmp_path / "out")],
        cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "`fixed`" in done.stdout
    noise = ("oneDNN", "cuda", "cuInit", "absl", "retracing", "I0000", "E0000", "W0000")
    lines = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and all(line.startswith("clfreg:") for line in lines), lines  # the bar
    assert not any(word.lower() in done.stderr.lower() for word in noise), done.stderr


# -- the defaults --------------------------------------------------------------------------------


def test_default_comparison_covers_the_scale_strategies():
    import lossbalance

    names = DEFAULT_STRATEGIES.split(",")
    assert names[:4] == ["fixed", "uncertainty", "gradnorm", "pcgrad"]
    assert {"nash_mtl", "db_mtl", "famo", "imtl_g", "upgrad", "mgda"} <= set(names)
    assert set(names) <= set(lossbalance.strategies.available())
