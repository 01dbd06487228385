"""The in-graph solvers against scipy reference solutions, on random and ill-conditioned
problems of K in {2, 3, 5, 10, 40} tasks."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import optimize

from lossbalance import solvers
from lossbalance.solvers.box import _box_active_set

SIZES = [2, 3, 5, 10, 40]
KINDS = ["random", "ill"]


def random_gramian(k, kind, seed):
    """G = J J^T for a random J: well spread ("random"), or rank deficient with rows whose
    norms span eight orders of magnitude ("ill")."""
    rng = np.random.default_rng(1000 * k + seed)
    if kind == "random":
        j = rng.normal(size=(k, k + 3))
    else:
        rank = max(1, k // 2)
        j = rng.normal(size=(k, rank)) @ rng.normal(size=(rank, k + 3))
        j *= 10.0 ** rng.uniform(-4, 4, size=(k, 1))
    return j @ j.T


def _function(fn):
    """One traced graph per solver and size (the solvers' loops are slow op by op)."""
    return tf.function(fn, reduce_retracing=True, autograph=False)


min_norm = _function(lambda g: solvers.min_norm_simplex(g))
box = _function(lambda g, u: solvers.box_qp(g, u))
barrier_1 = _function(lambda g: solvers.power_barrier_solve(g, alpha=1.0))
barrier_2 = _function(lambda g: solvers.power_barrier_solve(g, alpha=2.0))
barrier_half = _function(lambda g: solvers.power_barrier_solve(g, alpha=0.5))
penalty = _function(lambda g, b, c: solvers.simplex_norm_penalty_min(g, b, c))


def scipy_simplex_min(objective, k, gradient=None, starts=2):
    constraint = {"type": "eq", "fun": lambda w: np.sum(w) - 1.0,
                  "jac": lambda w: np.ones_like(w)}
    best = None
    for start in (np.ones(k) / k, np.eye(k)[0])[:starts]:
        result = optimize.minimize(objective, start, jac=gradient, method="SLSQP",
                                   bounds=[(0.0, 1.0)] * k, constraints=[constraint],
                                   options={"ftol": 1e-15, "maxiter": 2000})
        if best is None or result.fun < best.fun:
            best = result
    return best.x, best.fun


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", SIZES)
def test_min_norm_simplex_matches_scipy(k, kind):
    g = random_gramian(k, kind, 0)
    g = g / (np.trace(g) / k)
    w = min_norm(tf.constant(g)).numpy()
    assert np.all(w >= -1e-12) and abs(w.sum() - 1) < 1e-9
    _, reference = scipy_simplex_min(lambda x: x @ g @ x, k, lambda x: 2 * g @ x)
    ours = w @ g @ w
    assert ours <= reference + 1e-7 * max(1.0, np.trace(g) / k)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", SIZES)
def test_box_qp_matches_scipy(k, kind):
    rng = np.random.default_rng(k)
    g = random_gramian(k, kind, 1)
    g = g / np.trace(g) + 1e-4 * np.eye(k)  # as UPGrad/DualProj condition it
    lower = np.concatenate([np.eye(k)[:2] / k, rng.uniform(0, 1, size=(1, k))])
    w = box(tf.constant(g), tf.constant(lower)).numpy()
    assert np.all(w >= lower - 1e-12)
    for row, u in zip(w, lower):
        result = optimize.minimize(
            lambda x: 0.5 * x @ g @ x, u + 0.1, jac=lambda x: g @ x, method="L-BFGS-B",
            bounds=[(b, None) for b in u],
            options={"ftol": 1e-16, "gtol": 1e-13, "maxiter": 20000})
        ours, reference = 0.5 * row @ g @ row, result.fun
        assert ours <= reference + 1e-9 * max(1.0, abs(reference))
        np.testing.assert_allclose(row, result.x, atol=1e-4 * max(1.0, np.abs(row).max()))


def _assert_box_kkt(w, g, lower):
    """Optimality of min_{w >= u} w^T G w / 2: w >= u, G w >= 0, (G w)_i = 0 where w_i > u_i."""
    multipliers = w @ g
    tolerance = 1e-9 * np.abs(g).max() * np.abs(w).max(axis=1, keepdims=True)
    assert np.all(w >= lower - 1e-12)
    assert np.all(multipliers >= -tolerance)
    assert np.all(np.where(w > lower + 1e-12, np.abs(multipliers) <= tolerance, True))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [10, 40])
def test_box_qp_many_rows_meets_kkt(k, kind):
    """UPGrad's K problems (lower = I / K) and K random ones at once: with many rows, the
    active-set method's last steps re-solve only the rows not yet settled."""
    rng = np.random.default_rng(k)
    g = random_gramian(k, kind, 5)
    g = g / np.trace(g) + 1e-4 * np.eye(k)
    lower = np.concatenate([np.eye(k) / k, rng.uniform(0, 1, size=(k, k))])
    _assert_box_kkt(box(tf.constant(g), tf.constant(lower)).numpy(), g, lower)
    # the active-set method alone (box_qp's first attempt), without the fallback
    first = _box_active_set(tf.constant(g), tf.constant(lower),
                                    tf.constant(lower @ g > 0), 8)
    _assert_box_kkt(first.numpy(), g, lower)


def test_box_qp_under_xla_matches_graph():
    k = 9  # 9 rows: the last steps solve one row at a time
    g = random_gramian(k, "ill", 6)
    g = g / np.trace(g) + 1e-4 * np.eye(k)
    lower = np.eye(k) / k
    xla = tf.function(lambda g, u: solvers.box_qp(g, u), autograph=False, jit_compile=True)
    w = xla(tf.constant(g), tf.constant(lower)).numpy()
    _assert_box_kkt(w, g, lower)
    np.testing.assert_allclose(w, box(tf.constant(g), tf.constant(lower)).numpy(),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha, solve", [(1.0, barrier_1), (2.0, barrier_2),
                                          (0.5, barrier_half)])
@pytest.mark.parametrize("k", SIZES)
def test_power_barrier_solves_exactly(k, alpha, solve):
    g = random_gramian(k, "random", 2)
    w = solve(tf.constant(g)).numpy()
    assert np.all(w > 0)
    residual = g @ w - w ** (-1.0 / alpha)
    assert np.max(np.abs(residual) / (np.abs(g) @ w + w ** (-1.0 / alpha))) < 1e-9
    if k <= 10:  # scipy's least squares as the authors of FairGrad call it
        reference = optimize.least_squares(
            lambda x: g @ x - x ** (-1.0 / alpha), np.ones(k) / k, bounds=(1e-12, np.inf),
            xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=20000).x
        np.testing.assert_allclose(w, reference, rtol=1e-4)


@pytest.mark.parametrize("k", SIZES)
def test_power_barrier_ill_conditioned_and_scaled(k):
    g = random_gramian(k, "ill", 3)
    w = barrier_1(tf.constant(g)).numpy()
    assert np.all(np.isfinite(w)) and np.all(w > 0)
    # the exact rescaling w(sG) = s^(-1/2) w(G); G is rank deficient, so the answer is
    # held finite by the solver's 1e-15 relative ridge, with weights up to ~1e7 whose
    # float64 rounding shows at 1e-6
    scaled = barrier_1(tf.constant(1e6 * g)).numpy()
    np.testing.assert_allclose(scaled, w * 1e-3, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", SIZES)
def test_simplex_norm_penalty_matches_scipy(k, kind):
    g = random_gramian(k, kind, 4)
    g = g / (np.trace(g) / k)
    b = g @ (np.ones(k) / k)
    c = 0.5 * np.sqrt(np.ones(k) @ g @ np.ones(k)) / k
    w = penalty(tf.constant(g), tf.constant(b), tf.constant(c)).numpy()
    assert np.all(w >= -1e-12) and abs(w.sum() - 1) < 1e-9

    def objective(x):
        return b @ x + c * np.sqrt(max(x @ g @ x, 0.0) + 1e-30)

    def gradient(x):
        return b + c * (g @ x) / np.sqrt(max(x @ g @ x, 0.0) + 1e-30)

    _, reference = scipy_simplex_min(objective, k, gradient)
    assert objective(w) <= reference + 1e-6 * max(1.0, abs(reference))


@pytest.mark.parametrize("k", SIZES)
def test_project_simplex_matches_scipy(k):
    rng = np.random.default_rng(k)
    v = rng.normal(size=(3, k)) * np.array([[0.1], [1.0], [10.0]])
    w = solvers.project_simplex(tf.constant(v)).numpy()
    for row, target in zip(w, v):
        reference, _ = scipy_simplex_min(lambda x: np.sum((x - target) ** 2), k,
                                         lambda x: 2 * (x - target), starts=1)
        np.testing.assert_allclose(row, reference, atol=1e-6)
        assert np.all(row >= 0) and abs(row.sum() - 1) < 1e-12


def test_degenerate_inputs_give_finite_answers():
    for g in (np.zeros((3, 3)), np.ones((3, 3)), np.diag([1.0, 0.0, 0.0])):
        g = tf.constant(g)
        for result in (min_norm(g), box(g + 1e-4 * tf.eye(3, dtype=g.dtype),
                                        tf.eye(3, dtype=g.dtype)),
                       barrier_1(g), penalty(g, tf.ones(3, g.dtype), tf.constant(1.0, g.dtype))):
            assert np.all(np.isfinite(result.numpy()))


def test_solvers_keep_float32():
    rng = np.random.default_rng(0)
    j = rng.normal(size=(5, 7)).astype("float32")
    g = tf.constant(j @ j.T)
    results = [min_norm(g), box(g, tf.eye(5)), barrier_1(g),
               penalty(g, tf.ones(5), tf.constant(0.5)),
               solvers.project_simplex(g)]
    for result in results:
        assert result.dtype == tf.float32
        assert np.all(np.isfinite(result.numpy()))
    # Under XLA every solver runs inside BalancedModel's compiled step; see
    # test_gradient_strategies.py::test_trains_in_fit_with_xla.
