"""The README's code runs as written."""

import re
from pathlib import Path

import numpy as np
import tensorflow as tf

import lossbalance
from conftest import strategy_spec

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _block_after(heading):
    section = README[README.index(heading):]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_quick_start_runs(capsys):
    quick_start = _block_after("## Quick start")
    assert 'strategy in ["fixed", "uncertainty", "gradnorm", "pcgrad"]' in quick_start
    exec(compile(quick_start, "README quick start", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["fixed", "uncertainty", "gradnorm",
                                                  "pcgrad"]


def test_custom_strategy_example_registers_and_weights():
    namespace = {}
    exec(compile(_block_after("### Write your own strategy"), "README custom strategy",
                 "exec"), namespace)
    strategy = lossbalance.strategies.get("IL")
    assert type(strategy) is namespace["InverseLoss"]
    strategy.bind(["a", "b"])
    weights = strategy.loss_weights(tf.constant([1.0, 3.0])).numpy()
    np.testing.assert_allclose(weights, [1.5, 0.5])


def test_low_level_api_example_prints_what_the_readme_says(capsys):
    exec(compile(_block_after("### Low-level API"), "README low-level API", "exec"), {})
    printed = capsys.readouterr().out.strip()
    assert printed == "[0.2924 1.9006 1.9006] [0.6 0.4]"
    assert f"prints `{printed}`" in README


def test_readme_strategy_table_lists_every_registered_strategy():
    from lossbalance.strategies.registry import lookup

    table = README[README.index("## Strategies"):README.index("## How it works")]
    ours = [name for name in lossbalance.strategies.available()  # not the README's example
            if lookup(name).__module__.startswith("lossbalance.")]
    assert len(ours) >= 29
    for name in ours:
        assert f"`{name}`" in table, name
    for alias, name in lossbalance.strategies.aliases().items():
        if name in ours:
            assert f"`{alias}`" in table, (alias, name)


def test_readme_task_scales_column_matches_the_strategies():
    """The strategies table's "task scales" column says what `scale_invariant` declares
    (the property that tests/test_scales.py checks)."""
    table = README[README.index("## Strategies"):README.index("### Low-level API")]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        for name in re.findall(r"`(\w+)`", cells[0]):
            if name in lossbalance.strategies.available() and \
                    name not in lossbalance.strategies.aliases():
                declared = lossbalance.strategies.get(strategy_spec(name)).scale_invariant
                assert cells[3].startswith("invariant") == declared, (name, cells[3])
