"""The comparison runner: benchmarks, statistics, resumable runs, tables and plots.

The slow part -- every benchmark through the runner with every registered strategy in
`--quick` mode -- runs once per session, in two worker processes (two benchmarks each, many
strategies per process), while the in-process tests run; the tests then read its outputs.
"""

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from scipy import optimize, stats

import lossbalance
from experiments import benchmarks, report, runner, toy
from experiments.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK_GROUPS = (("toy", "clfreg"), ("synthetic", "multidigits"))


# The quick comparisons below start once per worker process; keep this module on one.
pytestmark = pytest.mark.xdist_group("experiments")


# -- every benchmark x every strategy, in --quick mode -------------------------------------


@pytest.fixture(scope="module", autouse=True)
def quick_runs(tmp_path_factory):
    """Start the quick comparisons of every benchmark with every strategy (two processes)
    when the module starts, so they run while the in-process tests do; `get(benchmark)`
    waits for its process and returns (output folder, process log)."""
    root = tmp_path_factory.mktemp("quick")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    processes = {}
    for group in BENCHMARK_GROUPS:
        calls = "; ".join(
            f"codes.append(main(['compare', '--quick', '--strategies', 'all', "
            f"'--benchmark', '{name}', '--out', r'{root / name}']))" for name in group)
        code = (f"import sys; from experiments.__main__ import main; codes = []; {calls}; "
                "sys.exit(max(codes))")
        log = open(root / f"{'-'.join(group)}.log", "w")
        process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        for name in group:
            processes[name] = (process, log, root / f"{'-'.join(group)}.log")

    def get(name):
        process, log, log_path = processes[name]
        code = process.wait(timeout=900)
        log.close()
        text = log_path.read_text()
        assert code == 0, text[-5000:]
        return root / name, text

    yield get
    for process, log, _ in processes.values():
        if process.poll() is None:
            process.kill()
        log.close()


# -- statistics ------------------------------------------------------------------------


def test_parse_strategy_specs():
    assert runner.parse_strategy("pcgrad") == ("pcgrad", "pcgrad")
    label, config = runner.parse_strategy("gradnorm:alpha=0.5;layer=trunk_2")
    assert label == "gradnorm:alpha=0.5;layer=trunk_2"
    assert config == {"name": "gradnorm", "alpha": 0.5, "layer": "trunk_2"}
    with pytest.raises(ValueError, match="key=value"):
        runner.parse_strategy("gradnorm:alpha")
    assert [runner.run_kind(s) for s in ("single:a", "ls:ratio=0.1", "cagrad:c=0.5")] == [
        "single", "ls", "method"]
    # a compile option is not a hyper-parameter
    assert runner.parse_strategy("mgda:grouping=layer") == ("mgda:grouping=layer", "mgda")
    assert runner.parse_strategy("nash_mtl:grouping=variable;max_norm=1.0")[1] == {
        "name": "nash_mtl", "max_norm": 1.0}
    assert runner.compile_options("nash_mtl:grouping=variable;max_norm=1.0") == {
        "grouping": "variable"}
    assert runner.compile_options("ls:ratio=1") == runner.compile_options("mgda") == {}


def test_mean_and_confidence_interval():
    values = [1.0, 2.0, 4.0, 5.0]
    mean, half = report.mean_and_ci(values)
    low, high = stats.t.interval(0.95, 3, loc=3.0, scale=stats.sem(values))
    assert mean == 3.0
    assert half == pytest.approx((high - low) / 2)
    assert np.isnan(report.mean_and_ci([2.0])[1])


def test_delta_m_known_answer():
    # accuracy 0.9 vs 0.8 (higher is better): -(0.9 - 0.8) / 0.8 = -0.125
    # error 2.0 vs 2.5 (lower is better):     +(2.0 - 2.5) / 2.5 = -0.2
    assert report.delta_m([0.9, 2.0], [0.8, 2.5], [True, False]) == pytest.approx(-16.25)
    # worse on both: accuracy 0.6 vs 0.8 -> +0.25, error 3.0 vs 2.0 -> +0.5
    assert report.delta_m([0.6, 3.0], [0.8, 2.0], [True, False]) == pytest.approx(37.5)
    assert report.delta_m([1.0, 1.0], [1.0, 1.0], [True, False]) == 0.0


# -- the toy problem -------------------------------------------------------------------


def _by_hand(x1, x2):
    f1 = math.log(max(abs(0.5 * (-x1 - 7) - math.tanh(-x2)), 5e-6)) + 6
    f2 = math.log(max(abs(0.5 * (-x1 + 3) + math.tanh(-x2) + 2), 5e-6)) + 6
    g1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    g2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c1, c2 = max(math.tanh(x2 / 2), 0.0), max(math.tanh(-x2 / 2), 0.0)
    return 0.1 * (c1 * f1 + c2 * g1), c1 * f2 + c2 * g2


def test_toy_losses_match_the_formulas():
    # x = (1, -2): upper gate closed (c1 = 0), c2 = tanh(1);
    # g1 = (36 + 3.6)/10 - 20 = -16.04, g2 = (64 + 3.6)/10 - 20 = -13.24
    l1, l2 = (float(v) for v in toy.toy_losses([1.0, -2.0]))
    assert l1 == pytest.approx(0.1 * math.tanh(1) * -16.04, rel=1e-5)
    assert l2 == pytest.approx(math.tanh(1) * -13.24, rel=1e-5)
    # x = (1, 2): lower gate closed, c1 = tanh(1); f1 = log|-4 + tanh 2| + 6
    l1, l2 = (float(v) for v in toy.toy_losses([1.0, 2.0]))
    assert l1 == pytest.approx(0.1 * math.tanh(1) * (math.log(4 - math.tanh(2)) + 6), rel=1e-5)
    assert l2 == pytest.approx(math.tanh(1) * (math.log(3 - math.tanh(2)) + 6), rel=1e-5)
    # the clamp at 5e-6: f1's argument vanishes where 0.5(-x1 - 7) = tanh(-x2)
    x2 = 1.0
    x1 = -7 - 2 * math.tanh(-x2)
    l1, _ = (float(v) for v in toy.toy_losses([x1, x2]))
    assert l1 == pytest.approx(0.1 * math.tanh(0.5) * (math.log(5e-6) + 6), rel=1e-3)
    for point in [(-8.5, 7.5), (9.0, 9.0), (-7.5, -0.5), (3.0, -8.4)]:
        assert [float(v) for v in toy.toy_losses(point)] == pytest.approx(_by_hand(*point),
                                                                          rel=1e-5)


def _valley_floor_at_zero():
    """x2* where d/dx2 [c2(x2) (4.9 + 0.01 (x2 + 8)^2 - 20)] = 0: at x1 = 0 the two task
    gradients are then (-1.4 c2 * 0.1, 0) and (1.4 c2, 0), opposite: Pareto stationary."""
    def slope(x2):
        c2, dc2 = math.tanh(-x2 / 2), -0.5 / math.cosh(-x2 / 2) ** 2
        return dc2 * (4.9 + 0.01 * (x2 + 8) ** 2 - 20) + c2 * 0.02 * (x2 + 8)
    return optimize.brentq(slope, -9.0, -8.0)


def test_pareto_stationarity_judgement():
    x2 = _valley_floor_at_zero()
    assert -8.45 < x2 < -8.3
    assert toy.pareto_stationarity((0.0, x2)) < 1e-4
    assert toy.reached_pareto_set((0.0, x2))
    # the measure is scale-free: opposite gradients of any lengths give 0
    g = toy.task_gradients((0.0, x2))
    assert g[0] @ g[1] < 0 and np.linalg.norm(g[1]) > 5 * np.linalg.norm(g[0])
    # not stationary: on the valley's slope, or beyond a task's optimum (x1 > 7), where
    # both tasks pull x1 the same way
    assert toy.pareto_stationarity((0.0, -6.0)) > 10 * toy.STATIONARITY_TOL
    assert not toy.reached_pareto_set((0.0, -6.0))
    assert toy.pareto_stationarity((9.0, x2)) == pytest.approx(1.0, abs=1e-3)
    assert not toy.reached_pareto_set((9.0, x2))
    # where Adam on the plain sum gets stuck from (9, 9) (the end of a 20k-step `fixed`
    # run), on the upper plateau: not the Pareto set
    assert not toy.reached_pareto_set((4.988123, 4.0137005))


def test_min_norm_combination_matches_a_grid_search():
    rng = np.random.default_rng(0)
    for _ in range(20):
        g1, g2 = rng.normal(size=2), rng.normal(size=2)
        d, gamma = toy.min_norm_combination(g1, g2)
        grid = np.linspace(0, 1, 20001)
        norms = np.linalg.norm(grid[:, None] * g1 + (1 - grid[:, None]) * g2, axis=1)
        assert np.linalg.norm(d) == pytest.approx(norms.min(), abs=1e-6)


@pytest.mark.parametrize("strategy", ["uncertainty", "famo"])  # strategies with state
def test_toy_trainer_reset_equals_a_fresh_model(strategy):
    """One model is reused for every start; its reset must leave no trace of the last."""
    reused = toy._Trainer(strategy, seed=0, eager=True)
    reused.train((9.0, 9.0), 2)
    again = reused.train((-7.5, -0.5), 2)
    fresh = toy._Trainer(strategy, seed=0, eager=True).train((-7.5, -0.5), 2)
    assert again["trajectory"] == fresh["trajectory"]


def test_toy_imtl_g_follows_its_float64_definition():
    """IMTL-G on the toy (float32 model, float64 Gramian) against its closed form in float64
    with the same Adam, from every start, for 6000 steps (the valleys are reached; along
    the Pareto set float32's own rounding moves the end points by ~0.1, so the full 35k
    steps are compared by `python -m experiments.toy --reference imtl_g`, in the README).
    Before its solver worked on the cosines, IMTL-G gave the small-gradient task ~0 weight
    here and four starts ended where plain summing does (x1 = -5.73)."""
    for row in toy.compare_with_reference("imtl_g", steps=6000):
        np.testing.assert_allclose(row["model"], row["reference"], atol=3e-2,
                                   err_msg=str(row["start"]))


def test_toy_graph_mode_matches_eager_and_runs_epochs():
    graph = toy._Trainer("pcgrad", seed=0, eager=False)
    eager = toy._Trainer("pcgrad", seed=0, eager=True).train((-7.5, -0.5), 20)
    np.testing.assert_allclose(graph.train((-7.5, -0.5), 20)["final"], eager["final"],
                               rtol=1e-5)
    steps = toy.STEPS_PER_EPOCH + 20  # two "epochs" (strategy.on_epoch_end in between)
    result = graph.train((-7.5, -0.5), steps)
    assert result["trajectory"][0] == [-7.5, -0.5]
    assert len(result["trajectory"]) == len(range(0, steps + 1, toy.RECORD_EVERY)) + 1
    assert result["trajectory"][-1] == result["final"]
    assert np.isfinite(result["step_time_s"]) and result["finite"]


# -- graph mode, baselines, user benchmarks and resuming ---------------------------------------------


def test_graph_mode_run_selects_on_validation():
    result = runner.run_one("clfreg", "pcgrad", 0, quick=True, eager=False, epochs=3)
    history = result["history"]
    assert result["best_epoch"] == int(np.argmin(history["val_loss"]))
    assert result["validation"]["loss"] == pytest.approx(min(history["val_loss"]))
    assert np.isfinite(result["step_time_s"]) and result["step_time_s"] > 0


USER_BENCHMARK = '''
import keras
import numpy as np
import lossbalance
from experiments.benchmarks import Benchmark, TaskMetric, register_benchmark, split

@register_benchmark("user_sines")
def user_sines(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, size=(300, 4)).astype("float32")
    y = {"a": np.sin(x[:, :1]).astype("float32"),
         "b": (x[:, 1:2] > 0).astype("int64")}

    def build_model(model_seed):
        keras.utils.set_random_seed(model_seed)
        inputs = keras.Input((4,))
        h = keras.layers.Dense(16, activation="tanh", name="trunk")(inputs)
        return lossbalance.BalancedModel(inputs, {"a": keras.layers.Dense(1, name="a")(h),
                                                  "b": keras.layers.Dense(2, name="b")(h)})

    train, validation, test = split(x, y, seed)
    return Benchmark(
        "user_sines", "a regression and a classification", train, validation, test,
        build_model,
        loss={"a": "mse",
              "b": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
        metrics={"a": ["mae"], "b": ["accuracy"]},
        task_metrics=[TaskMetric("a", "a_mae", False), TaskMetric("b", "b_accuracy", True)],
        epochs=3, batch_size=32)
'''


def test_user_benchmark_through_the_runner_and_resume(tmp_path, monkeypatch, capsys):
    (tmp_path / "user_bench_module.py").write_text(textwrap.dedent(USER_BENCHMARK))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "user"
    argv = ["compare", "--import", "user_bench_module", "--benchmark", "user_sines",
            "--quick", "--strategies", "gradnorm:alpha=0.5", "--seeds", "2", "--epochs", "2",
            "--out", str(out)]
    assert main(argv) == 0
    assert "user_sines" in benchmarks.available_benchmarks()
    runs = sorted((out / "runs").glob("*.json"))
    assert [p.name for p in runs] == [
        f"{label}-seed{seed}.json"
        for label in ["gradnorm_alpha=0.5", "ls_ratio=0.1", "ls_ratio=10", "single_a",
                      "single_b"] for seed in (0, 1)]
    result = json.loads(runs[0].read_text())
    assert set(result["test"]) >= {"loss", "a_loss", "b_loss", "a_mae", "b_accuracy"}
    assert len(result["history"]["val_a_loss"]) == 2
    rows = {row["strategy"]: row for row in _strategy_rows(out)}
    assert np.isfinite(float(rows["gradnorm:alpha=0.5"]["delta_m"]))
    table = (out / "results.md").read_text()
    assert "`gradnorm:alpha=0.5`" in table and "±" in table and "tuned LS" in table
    assert (out / "metrics.png").stat().st_size > 0 and (out / "tradeoff.png").exists()

    stamps = {p.name: p.stat().st_mtime_ns for p in runs}
    assert main(argv) == 0  # everything found in DIR: nothing is rerun
    assert {p.name: p.stat().st_mtime_ns for p in runs} == stamps
    assert "b_accuracy" in capsys.readouterr().out

    # registering the name again replaces the factory (and its cached builds)
    calls = []

    @benchmarks.register_benchmark("user_sines")
    def replacement(seed=0):
        calls.append(seed)
        return benchmarks.get_benchmark("clfreg")

    assert benchmarks.get_benchmark("user_sines").name == "clfreg" and calls == [0]


def test_gradient_level_labels_runs_and_resumes_per_level(tmp_path, capsys):
    out, failures = tmp_path / "levels", []
    kwargs = dict(quick=True, baselines=False, progress=False, errors="continue",
                  failures=failures)
    with pytest.warns(UserWarning, match="'moco' is defined at the parameters level only"):
        runs = runner.compare("clfreg", ["mgda", "fixed", "moco"], 1, out,
                              gradients="representation", **kwargs)
    # moco is defined at the parameter level only: it runs there, labelled so
    assert failures == []
    by_label = {run["strategy"]: run for run in runs}
    assert set(by_label) == {"mgda@representation", "fixed", "moco"}
    assert by_label["mgda@representation"]["gradient_level"] == "representation"
    assert by_label["moco"]["gradient_level"] == "parameters"
    assert runner.run_label("output_balancer") == "output_balancer@representation"
    assert by_label["fixed"]["gradients"] is None  # no level applies to a loss strategy
    fixed = out / "runs" / "fixed-seed0.json"
    stamp = fixed.stat().st_mtime_ns
    runs = runner.compare("clfreg", ["mgda", "fixed"], 1, out, **kwargs)
    assert {run["strategy"]: run["gradient_level"] for run in runs} == {
        "mgda": "parameters", "fixed": None}
    assert fixed.stat().st_mtime_ns == stamp  # shared by both levels, not rerun
    assert sorted(p.name for p in (out / "runs").glob("*.json")) == [
        "fixed-seed0.json", "mgda-seed0.json", "mgda_representation-seed0.json",
        "moco-seed0.json"]
    assert runner.run_label("cagrad:c=0.5", "auto") == "cagrad:c=0.5@auto"
    assert runner.run_label("single:digit", "auto") == "single:digit"
    with pytest.raises(SystemExit):
        main(["compare", "--benchmark", "toy", "--gradients", "auto"])
    assert "parameter level" in capsys.readouterr().err


def test_a_grouping_spec_compiles_grouped_and_is_its_own_row(tmp_path):
    failures = []
    specs = ["imtl_g", "imtl_g:grouping=layer", "fixed:grouping=layer"]
    with pytest.warns(UserWarning, match="'fixed:grouping=layer' seed 0 failed"):
        runs = runner.compare("clfreg", specs, 1, tmp_path, quick=True, baselines=False,
                              progress=False, errors="continue", failures=failures)
    by_label = {run["strategy"]: run for run in runs}
    grouped, plain = by_label["imtl_g:grouping=layer"], by_label["imtl_g"]
    assert (grouped["grouping"], plain["grouping"]) == ("layer", None)
    # each layer's own weights: another trajectory
    assert grouped["history"]["ink_weight"] != pytest.approx(plain["history"]["ink_weight"],
                                                             rel=1e-3)
    assert [f["strategy"] for f in failures] == ["fixed:grouping=layer"]
    assert "does not apply to strategy 'fixed'" in failures[0]["error"]
    with pytest.raises(ValueError, match="trains its own model"):
        runner.run_one("toy", "mgda:grouping=layer", 0, quick=True)


def test_unknown_benchmark_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--benchmark", "nope"])
    assert "available: " in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown benchmark"):
        benchmarks.get_benchmark("nope")


def test_multidigits_canvas_overlaps_two_digits():
    bench = benchmarks.get_benchmark("multidigits")
    assert bench.train.x.shape[1] == 140 and set(bench.task_names) == {"left", "right"}
    canvas = bench.train.x.reshape(-1, 10, 14)
    assert (canvas[:, :, :5].sum(axis=(1, 2)) > 0).all()   # left-only columns hold ink
    assert (canvas[:, :, 9:].sum(axis=(1, 2)) > 0).all()   # right-only columns hold ink
    assert 0.0 <= bench.train.x.min() and bench.train.x.max() <= 1.0
    keras.backend.clear_session()


# -- every benchmark x every strategy (outputs of the session's worker processes) --------


def _strategy_rows(out):
    with open(out / "results.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("name", ["clfreg", "multidigits", "synthetic"])
def test_supervised_benchmark_runs_every_strategy(quick_runs, name):
    out, _ = quick_runs(name)
    bench = benchmarks.get_benchmark(name)
    # those defined for its K, and by their name alone ('all' leaves out PCD: its primary)
    expected = [s for s in runner.runnable_by_name(lossbalance.strategies.available())
                if lossbalance.strategies.get(s).min_tasks <= len(bench.task_names)]
    rows = {row["strategy"]: row for row in _strategy_rows(out)}
    labels = [runner.run_label(s) for s in expected]  # the output balancer's level too
    assert set(labels) <= set(rows)
    for label in labels:
        run = json.loads(runner.run_path(out, label, 0).read_text())
        assert run["kind"] == "method" and run["quick"]
        assert set(run["test"]) >= {m.name for m in bench.task_metrics}
        assert all(np.isfinite(run["test"][m.name]) for m in bench.task_metrics), label
        assert np.isfinite(float(rows[label]["delta_m"])), label
    # single-task baselines and the LS sweep ran beside them, and delta-m% is consistent
    for task in bench.task_names:
        assert runner.run_path(out, f"single:{task}", 0).exists()
    kinds = {row["kind"] for row in rows.values()}
    assert {"method", "single", "ls", "tuned_ls"} <= kinds
    fixed = json.loads(runner.run_path(out, "fixed", 0).read_text())
    singles = {m.name: json.loads(runner.run_path(out, f"single:{m.task}", 0).read_text())
               ["test"][m.name] for m in bench.task_metrics}
    expected_dm = report.delta_m([fixed["test"][m.name] for m in bench.task_metrics],
                                 [singles[m.name] for m in bench.task_metrics],
                                 [m.higher_is_better for m in bench.task_metrics])
    assert float(rows["fixed"]["delta_m"]) == pytest.approx(expected_dm)
    # a single-task baseline trains only its task, with weight 1
    single = json.loads(runner.run_path(out, f"single:{bench.task_names[0]}", 0).read_text())
    assert single["selection"] == f"val_{bench.task_names[0]}_loss"
    assert single["history"][f"{bench.task_names[0]}_weight"] == [1.0]
    assert f"{bench.task_names[1]}_loss" not in single["history"]  # not a task there
    # the LS sweep's weights: w_k L_k(0) = K c_k / sum(c), c = (1, ratio) or all ones
    sweep = next(json.loads(p.read_text()) for p in (out / "runs").glob("ls_*.json"))
    ratio = float(sweep["strategy"].split("=")[-1])
    c = np.array([1.0, ratio] if len(bench.task_names) == 2 else [1.0] * len(bench.task_names))
    products = [sweep["weights"][t] * sweep["initial"]["validation"][f"{t}_loss"]
                for t in bench.task_names]
    np.testing.assert_allclose(products, len(c) * c / c.sum(), rtol=1e-6)
    table = (out / "results.md").read_text()
    assert "`fixed`" in table and "Δm%" in table and "tuned LS" in table
    for plot in ["metrics.png", "curves.png"] + (
            ["tradeoff.png"] if len(bench.task_names) == 2 else ["loss_ratio.png"]):
        assert (out / plot).stat().st_size > 0, plot


def test_toy_benchmark_runs_every_strategy(quick_runs):
    out, _ = quick_runs("toy")
    table = (out / "results.md").read_text()
    for strategy in runner.runnable_by_name(lossbalance.strategies.available()):
        defined = lossbalance.strategies.get(strategy)
        if defined.min_tasks > 2 or "parameters" not in defined.gradient_levels:
            # not run on two tasks, nor at a representation the toy model does not have
            assert not runner.run_path(out, runner.run_label(strategy), 0).exists()
            continue
        run = json.loads(runner.run_path(out, strategy, 0).read_text())
        assert len(run["starts"]) == len(toy.STARTS)
        assert f"`{strategy}`" in table
        # NaN (log of a negative loss, for log-based strategies) is never "reached"
        assert all(s["finite"] or not s["reached"] for s in run["starts"]), strategy
    for strategy in ("fixed", "pcgrad", "mgda"):
        run = json.loads(runner.run_path(out, strategy, 0).read_text())
        assert all(s["finite"] for s in run["starts"]), strategy
    # (0, 0) sits where both gates are zero: with the published subgradient it moves.
    fixed = json.loads(runner.run_path(out, "fixed", 0).read_text())
    origin = fixed["starts"][toy.STARTS.index((0.0, 0.0))]
    assert origin["final"] != [0.0, 0.0]
    assert (out / "trajectories.png").stat().st_size > 0


# -- the step-time benchmarks run (their figures are for the README, not for tests) --------


def test_gradient_benchmark_prints_its_tables(capsys):
    from experiments import bench_gradient_strategies as bench

    bench.main(["--quick", "--grouping", "layer", "--solvers", "mgda", "imtl_g"])
    out = capsys.readouterr().out
    assert "parameters (grouping=layer) / keras" in out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| mlp | 2 |")]
    assert len(rows) == 1
    keras_ms, parameters, representation, grouped = rows[0][4:8]
    assert float(keras_ms) > 0
    assert all(float(cell.split()[0]) > 0 for cell in (parameters, representation, grouped))
    solver_rows = {line.split("|")[1].strip(" `") for line in out.splitlines()
                   if line.startswith("| `")}
    assert solver_rows == {"mgda", "imtl_g"}


def test_loss_benchmark_prints_its_table(capsys):
    from experiments import bench_loss_strategies as bench

    bench.main(["--tasks", "2", "--strategies", "fixed", "famo", "--rounds", "2",
                "--steps", "1", "--warmup", "1"])
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines()
            if line.startswith("| ")}
    assert {"plain keras.Model", "`fixed`", "`famo`"} <= set(rows)


@pytest.mark.parametrize("n", [1, 4, 5, 6, 9, 10, 17, 40])
def test_median_interval_matches_binomial_coverage(n):
    """The interval of a median over n processes: the innermost pair of order statistics
    whose coverage, from scipy's binomial distribution, is at least 95% (else the range)."""
    from scipy import stats

    from experiments import timing

    values = np.random.default_rng(n).normal(size=n)
    low, high, coverage = timing.median_interval(values)
    ordered = np.sort(values)
    j = int(np.flatnonzero(ordered == low)[0]) + 1  # low is the j-th smallest
    assert high == ordered[n - j]
    assert coverage == pytest.approx(1 - 2 * stats.binom.cdf(j - 1, n, 0.5))
    if coverage >= 0.95:  # the next pair inwards, if any, falls short
        assert j == n // 2 or 1 - 2 * stats.binom.cdf(j, n, 0.5) < 0.95
    else:  # not even the range reaches 95%
        assert j == 1


def test_loss_benchmark_combines_fresh_processes(monkeypatch):
    """`--processes N`: each child process writes its table; the parent reports the median
    ratio over them with an interval of that median (for three processes, their range),
    and the median ratio to `fixed`."""
    from experiments import bench_loss_strategies as bench
    from experiments import timing

    ratios = iter([1.02, 1.08, 1.04])  # stch's ratio in each of three processes

    rotations = []

    def child(command, **kwargs):
        path = command[command.index("--results-to") + 1]
        rotations.append(int(command[command.index("--build-rotation") + 1]))
        stch = next(ratios)
        table = {"keras": [[5.0, 1.0, 1.0, 1.0, 1.0, 1.0], None],
                 "fixed": [[5.1, 1.02, 1.0, 1.04, 1.0, 1.04], 1.0],
                 "stch": [[5.0 * stch, stch, stch, stch, stch, stch], stch / 1.02]}
        with open(path, "w") as handle:
            json.dump({"results": {"2": table}, "extras": {"2": [None, None]}}, handle)

    monkeypatch.setattr(bench.subprocess, "run", child)
    args = bench.argparse.Namespace(
        processes=3, tasks=[2], strategies=["fixed", "stch"], rounds=1, steps=1, warmup=1,
        clock="wall", threads=0, batch_size=8, inputs=4, hidden=4, seed=0, kernels=False,
        own_cost=False)
    results, _ = bench.in_processes(args)
    row, to_fixed = results[2]["stch"]
    assert (row.ratio, row.ci_low, row.ci_high) == (1.04, 1.02, 1.08)
    assert row.ms == pytest.approx(5.2) and to_fixed == pytest.approx(1.04 / 1.02)
    assert row.verdict(1.05) == "unresolved" and row.verdict(1.1) == "met"
    assert timing.across_processes([row]).ratio == row.ratio
    assert rotations == [0, 1, 2]  # 3 configurations over 3 processes: every build place
    built = bench.make_models(bench.argparse.Namespace(
        strategies=["fixed", "stch"], inputs=4, hidden=4, seed=0), 2, rotation=2)
    assert list(built) == ["stch", "keras", "fixed"]
    assert built["stch"].strategy.registry_name == "stch"
    assert not isinstance(built["keras"], lossbalance.BalancedModel)
