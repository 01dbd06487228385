"""PCD, Priority-Constrained Descent: the update against scipy's solution of its primal and
the KKT definition (tests/definitions.py), its closed form for two tasks, its constraints,
the moving-average normalisation, the bounded corrections where the constraints cannot all
hold, argument checks, and training."""

import itertools
import warnings

import definitions
import keras
import numpy as np
import pytest
from scipy import optimize

import lossbalance
from lossbalance import strategies
from conftest import TWO_HEAD_LOSS, check_config_round_trip, make_trunk_model

P = 12


def random_jacobian(rng, k, p=P):
    return rng.normal(size=(k, p)) * 10.0 ** rng.uniform(-2, 2, size=(k, 1))


def normalised(j):
    return j / np.linalg.norm(j, axis=1, keepdims=True)


def scipy_primal(target, secondaries, tau):
    """argmin_d |d - target|^2 s.t. g . d >= tau |g|^2 for the rows g of `secondaries`, by
    SLSQP on the primal."""
    constraints = [{"type": "ineq", "fun": lambda d, g=g: g @ d - tau * g @ g,
                    "jac": lambda d, g=g: g} for g in secondaries]
    result = optimize.minimize(lambda d: 0.5 * np.sum((d - target) ** 2), target,
                               jac=lambda d: d - target, constraints=constraints,
                               method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
    assert result.success, result.message
    return result.x


class Fresh:
    """PCD with beta = 0: every step normalises by the current norms, as the first step
    of any beta does (bias correction), so one instance serves many Jacobians."""

    def __init__(self, primary, **params):
        self.strategy = strategies.get("pcd", primary=primary, beta=0.0, **params)

    def __call__(self, jacobian):
        direction, weights = lossbalance.aggregate_with_weights(self.strategy, jacobian)
        return direction.numpy(), weights.numpy()


# -- the definition ----------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_matches_scipy_on_the_primal_and_the_kkt_definition(k, tau):
    rng = np.random.default_rng(10 * k + int(10 * tau))
    primary = int(rng.integers(k))
    pcd = Fresh(f"task_{primary}", tau=tau)
    for _ in range(6):
        j = random_jacobian(rng, k)
        direction, weights = pcd(j)
        unit = normalised(j)
        others = [i for i in range(k) if i != primary]
        expected = scipy_primal(unit[primary], unit[others], tau)
        np.testing.assert_allclose(direction, expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(weights, definitions.pcd(j, primary, tau),
                                   rtol=1e-7, atol=1e-9 / np.linalg.norm(j, axis=1).min())
        # the corrections are below the bound: this is PCD itself, not its penalty form
        lengths = weights[others] * np.linalg.norm(j[others], axis=1)
        assert np.all(lengths < 10.0 * 2)


@pytest.mark.parametrize("tau", [0.0, 0.3, 0.5, 1.0])
def test_two_tasks_closed_form(tau):
    rng = np.random.default_rng(int(100 * tau))
    pcd = Fresh("task_0", tau=tau)
    conflicts = 0
    for trial in range(12):
        j = random_jacobian(rng, 2, p=4)
        if trial == 0:
            j[1] = 3.0 * j[0]  # parallel: the constraint holds for every tau <= 1
        g1, g2 = normalised(j)
        expected = g1 if g2 @ g1 >= tau * g2 @ g2 else g1 + (tau - g2 @ g1 / (g2 @ g2)) * g2
        conflicts += g2 @ g1 < tau * (1 - 1e-12)
        np.testing.assert_allclose(pcd(j)[0], expected, rtol=0, atol=1e-12)
    assert 0 < conflicts < 12  # both branches taken


def test_every_secondary_constraint_holds():
    rng = np.random.default_rng(1)
    for k, tau in itertools.product([2, 3, 5, 8], [0.0, 0.5, 1.0]):
        primary = int(rng.integers(k))
        pcd = Fresh(primary, tau=tau)
        for _ in range(3):
            j = random_jacobian(rng, k, p=16)
            direction, _ = pcd(j)
            unit = normalised(j)
            for i in range(k):
                if i != primary:  # g~_i . d >= tau |g~_i|^2 = tau (first step: unit rows)
                    assert unit[i] @ direction >= tau - 1e-9, (k, tau, i)


def test_tau_zero_without_conflict_follows_the_primary():
    """Gradients that pairwise agree (positive entries): the update is the primary's
    normalised gradient, at the first step and later (g_p / s_p, s_p from the average)."""
    rng = np.random.default_rng(2)
    strategy = strategies.get("pcd", primary=1, tau=0.0)
    for step in range(3):
        j = np.abs(rng.normal(size=(3, 6))) * np.array([[1e-3], [1.0], [1e3]])
        direction, weights = lossbalance.aggregate_with_weights(strategy, j)
        np.testing.assert_array_equal(weights.numpy()[[0, 2]], 0.0)
        if step == 0:
            np.testing.assert_allclose(direction.numpy(), normalised(j)[1], rtol=1e-12)
        assert np.allclose(direction.numpy() / np.linalg.norm(direction.numpy()),
                           normalised(j)[1], rtol=1e-12)


def test_definition_at_every_scale_in_float32():
    """Float32 Jacobians whose rows' norms span 1 to 1e6, nearly parallel and nearly
    opposite rows included: the first step equals the float64 definition on the same
    rounded rows."""
    rng = np.random.default_rng(3)
    for k, ratio, kind in itertools.product([2, 3, 5], [1.0, 1e2, 1e4, 1e6],
                                            ["random", "near_parallel", "near_opposite"]):
        j = rng.normal(size=(k, 16))
        if kind == "near_parallel":
            j = j[:1] + 1e-2 * j
        elif kind == "near_opposite":
            j[1] = -j[0] + 1e-2 * j[1]
        j = (j * ratio ** rng.uniform(0, 1, size=(k, 1))).astype(np.float32)
        primary = int(rng.integers(k))
        rows = j.astype(np.float64)
        expected = rows.T @ definitions.pcd(rows, primary, 0.5)
        got = lossbalance.aggregate({"name": "pcd", "primary": primary}, j).numpy()
        error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        assert error < 1e-6, (k, ratio, kind, error)


def test_permuting_the_tasks_with_the_primary_leaves_the_update():
    rng = np.random.default_rng(4)
    j = random_jacobian(rng, 5)
    order = rng.permutation(5)
    a = lossbalance.aggregate({"name": "pcd", "primary": 2}, j).numpy()
    b = lossbalance.aggregate({"name": "pcd", "primary": int(np.argmax(order == 2))},
                              j[order]).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


# -- the moving average, scale invariance --------------------------------------------------


def test_moving_average_with_bias_correction():
    rng = np.random.default_rng(5)
    strategy = strategies.get("pcd", primary="task_0", beta=0.8)
    average = np.zeros(3)
    for step in range(1, 5):
        j = random_jacobian(rng, 3)
        squared = np.sum(j ** 2, axis=1)
        average = 0.8 * average + 0.2 * squared
        scales = np.sqrt(average / (1 - 0.8 ** step))
        weights = lossbalance.task_weights(strategy, j).numpy()
        np.testing.assert_allclose(strategy.average.numpy(), average, rtol=1e-12)
        assert int(strategy.step.numpy()) == step
        np.testing.assert_allclose(weights, definitions.pcd(j, 0, 0.5, scales), rtol=1e-8,
                                   atol=1e-12)
        if step == 1:  # the first step normalises by the current norms exactly
            np.testing.assert_allclose(weights[0], 1 / np.sqrt(squared[0]), rtol=1e-12)


def test_scale_invariant_over_steps_only_with_the_moving_average():
    """Multiplying one task's loss by a constant, at every step, leaves every update of the
    default normalisation; raw gradients ("none") follow the scales."""
    assert strategies.get("pcd", primary=0).scale_invariant
    assert not strategies.get("pcd", primary=0, normalization="none").scale_invariant
    rng = np.random.default_rng(6)
    steps = [random_jacobian(rng, 3) for _ in range(4)]
    factor = np.array([[1.0], [1e4], [1e-3]])
    for normalization, same in (("ema", True), ("none", False)):
        plain = strategies.get("pcd", primary=0, normalization=normalization)
        scaled = strategies.get("pcd", primary=0, normalization=normalization)
        for j in steps:
            a = lossbalance.aggregate(plain, j).numpy()
            b = lossbalance.aggregate(scaled, factor * j).numpy()
            assert np.allclose(a, b, rtol=1e-9, atol=1e-12) == same


def test_raw_gradients_without_normalisation():
    rng = np.random.default_rng(7)
    j = random_jacobian(rng, 4)
    strategy = strategies.get("pcd", primary="task_3", tau=0.3, normalization="none")
    direction, weights = lossbalance.aggregate_with_weights(strategy, j)
    assert weights.numpy()[3] == 1.0 and not strategy.variables  # no state
    np.testing.assert_allclose(weights.numpy(), definitions.pcd(j, 3, 0.3, np.ones(4)),
                               rtol=1e-8)
    expected = scipy_primal(j[3], j[:3], 0.3)
    np.testing.assert_allclose(direction.numpy(), expected, rtol=1e-6,
                               atol=1e-7 * np.abs(expected).max())


# -- constraints that cannot all hold, degenerate gradients -------------------------------


def penalty_objective(d, target, secondaries, tau, bound):
    """The exact-penalty form PCD solves where corrections reach their bounds:
    |d - target|^2 / 2 + sum_i B_i max(0, tau |g_i| - u_i . d), B_i = bound (|target|
    + |g_i|)."""
    norms = np.linalg.norm(secondaries, axis=1)
    violations = np.maximum(tau * norms - secondaries @ d / norms, 0.0)
    weights = bound * (np.linalg.norm(target) + norms)
    return 0.5 * np.sum((d - target) ** 2) + weights @ violations


@pytest.mark.parametrize("tau", [0.3, 1.0])
def test_opposite_secondaries_give_the_bounded_penalty_solution(tau):
    """Two secondaries with opposite gradients: no direction satisfies both (the dual is
    unbounded). The update is finite, each correction within its bound, and it is the
    documented exact-penalty solution (the definition, and no worse than scipy's minimum
    of that objective); nearly opposite secondaries, feasible with corrections beyond the
    bound, get the same treatment."""
    rng = np.random.default_rng(8)
    base = rng.normal(size=(3, P))
    for gap in (0.0, 1e-6, 1e-2):
        j = np.stack([base[0], base[1], -base[1] + gap * base[2]])
        direction, weights = Fresh(0, tau=tau)(j)
        assert np.all(np.isfinite(direction)) and np.all(np.isfinite(weights))
        lengths = weights[1:] * np.linalg.norm(j[1:], axis=1)
        assert np.all(lengths <= 10.0 * 2 * (1 + 1e-12))
        assert np.any(lengths >= 10.0 * 2 * (1 - 1e-12))  # the bound binds
        np.testing.assert_allclose(weights, definitions.pcd(j, 0, tau), rtol=1e-7)
        unit = normalised(j)
        value = penalty_objective(direction, unit[0], unit[1:], tau, 10.0)
        result = optimize.minimize(penalty_objective, unit[0], args=(unit[0], unit[1:], tau,
                                                                     10.0),
                                   method="Powell", options={"xtol": 1e-10, "ftol": 1e-14,
                                                             "maxiter": 100000})
        assert value <= result.fun + 1e-9


def test_zero_gradients_are_finite():
    rng = np.random.default_rng(9)
    g = rng.normal(size=(2, P))
    cases = {"zero primary": np.stack([np.zeros(P), g[0], g[1]]),
             "zero secondary": np.stack([g[0], np.zeros(P), g[1]]),
             "all zero": np.zeros((3, P))}
    for case, j in cases.items():
        direction, weights = Fresh(0, tau=0.5)(j)
        assert np.all(np.isfinite(direction)) and np.all(np.isfinite(weights)), case
        assert np.all(weights[np.linalg.norm(j, axis=1) == 0] == 0), case
    # a zero primary: the shortest update meeting the secondaries' constraints
    direction, _ = Fresh(0, tau=0.5)(cases["zero primary"])
    expected = scipy_primal(np.zeros(P), normalised(g), 0.5)
    np.testing.assert_allclose(direction, expected, atol=1e-6)


# -- arguments, the model ------------------------------------------------------------------


@pytest.mark.parametrize("params, error, match", [
    ({}, TypeError, r"needs `primary`.*primary='cls'"),
    ({"primary": True}, TypeError, "task name"),
    ({"primary": 1.5}, TypeError, "task name"),
    ({"primary": "a", "tau": -0.1}, ValueError, "`tau` must be >= 0"),
    ({"primary": "a", "tau": 1.5}, ValueError, "`tau` must be <= 1"),
    ({"primary": "a", "beta": 1.0}, ValueError, "`beta` must be < 1"),
    ({"primary": "a", "beta": -0.5}, ValueError, "`beta` must be >= 0"),
    ({"primary": "a", "normalization": "l2"}, ValueError, "'ema', 'none'"),
    ({"primary": "a", "max_correction": 0.0}, ValueError, "`max_correction` must be > 0"),
])
def test_bad_hyper_parameters_fail_at_construction(params, error, match):
    with pytest.raises(error, match=match):
        strategies.get("pcd", **params)


def test_unknown_primary_fails_at_compile_with_the_tasks():
    with pytest.raises(ValueError, match=r"'reg_out' is not one of the model's tasks "
                                         r"\['cls', 'reg'\]\. Did you mean 'reg'\?"):
        make_trunk_model().compile(loss=TWO_HEAD_LOSS,
                                   strategy={"name": "pcd", "primary": "reg_out"})
    with pytest.raises(ValueError, match=r"positions 0 to 1"):
        make_trunk_model().compile(loss=TWO_HEAD_LOSS, strategy={"name": "pcd", "primary": 2})
    strategy = strategies.get("priority-constrained-descent", primary="b")
    with pytest.raises(ValueError, match="at least 2 tasks"):
        strategy.bind(["b"])


def test_config_round_trips():
    given = {"primary": "reg", "tau": 0.2, "beta": 0.5, "normalization": "none",
             "max_correction": 3.0}
    config = check_config_round_trip("pcd", given)
    assert {k: config[k] for k in given} == given


@pytest.mark.parametrize("gradients", ["parameters", "representation"])
def test_trains_the_two_task_model_and_saves_its_state(gradients, two_head_data, tmp_path):
    x, y = two_head_data
    model = make_trunk_model()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=TWO_HEAD_LOSS,
                  strategy={"name": "pcd", "primary": "reg", "tau": 0.5},
                  gradients=gradients)
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0).history
    for key in ("loss", "cls_loss", "reg_loss", "cls_weight", "reg_weight"):
        assert np.all(np.isfinite(history[key])), key
    assert history["reg_loss"][-1] < history["reg_loss"][0]
    strategy = model.strategy
    assert int(strategy.step.numpy()) == 8 and np.all(strategy.average.numpy() > 0)
    model.save(tmp_path / "pcd.keras")
    loaded = keras.models.load_model(tmp_path / "pcd.keras")
    assert loaded.strategy.get_config() == strategy.get_config()
    for a, b in zip(strategy.variables, loaded.strategy.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_comparison_runner_needs_the_primary_in_the_spec():
    """`--strategies all` cannot choose a primary task: it leaves PCD out, saying how to
    run it; a spec gives the primary."""
    from experiments import runner

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert runner.runnable_by_name(["mgda", "pcd"]) == ["mgda"]
    assert any("pcd:primary=..." in str(w.message) for w in caught)
    label, config = runner.parse_strategy("pcd:primary=cls;tau=0.3")
    assert config == {"name": "pcd", "primary": "cls", "tau": 0.3}
    assert strategies.get(config).tau == 0.3
