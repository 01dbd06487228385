"""The README's code runs as written."""

import re
from pathlib import Path

import numpy as np
import tensorflow as tf

import lossbalance

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_quick_start_runs(capsys):
    quick_start = _python_blocks()[0]
    assert 'strategy in ["fixed", "uncertainty", "gradnorm", "pcgrad"]' in quick_start
    exec(compile(quick_start, "README quick start", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["fixed", "uncertainty", "gradnorm",
                                                  "pcgrad"]


def test_custom_strategy_example_registers_and_weights():
    namespace = {}
    exec(compile(_python_blocks()[1], "README custom strategy", "exec"), namespace)
    strategy = lossbalance.strategies.get("IL")
    assert type(strategy) is namespace["InverseLoss"]
    strategy.bind(["a", "b"])
    weights = strategy.loss_weights(tf.constant([1.0, 3.0])).numpy()
    np.testing.assert_allclose(weights, [1.5, 0.5])


def test_readme_strategy_table_lists_registered_core_strategies():
    for name in ("fixed", "uncertainty", "gradnorm", "pcgrad"):
        assert f"| `{name}`" in README
        assert name in lossbalance.strategies.available()
