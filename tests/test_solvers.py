"""The in-graph solvers against scipy reference solutions, on random and ill-conditioned
problems of K in {2, 3, 5, 10, 40} tasks."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import optimize

from lossbalance import solvers
from lossbalance.solvers.box import _bounds_from, _box_active_set, _nonnegative_active_set

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
nonnegative = _function(lambda a, b: solvers.nonnegative_qp(a, b))
nonnegative_boxed = _function(lambda a, b, h: solvers.nonnegative_qp(a, b, h))


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


def _nonnegative_problems(k, kind, seed):
    """A (PSD: trace-normalised, or for "ill" the cosines of a rank-deficient Gramian,
    as PCD gives it), and linear terms: rows for which x >= 0 alone bounds the problem
    (b = A y + p, p >= 0, so b^T v >= 0 on the cone of A's null space), and random rows
    with upper bounds h."""
    rng = np.random.default_rng(seed)
    a = random_gramian(k, kind, seed)
    if kind == "ill":
        a = a / np.outer(np.sqrt(np.diag(a)), np.sqrt(np.diag(a)))
    else:
        a = a / (np.trace(a) / k)
    bounded = a @ rng.normal(size=(3, k)).T
    bounded = bounded.T + np.abs(rng.normal(size=(3, k))) * (rng.uniform(size=(3, k)) < 0.5)
    free = rng.normal(size=(3, k))
    upper = rng.uniform(0.0, 2.0, size=(3, k))
    upper[0, 0] = 0.0  # an entry fixed at 0
    return a, bounded, free, upper


def _nonnegative_kkt_gap(x, a, b, h):
    """The natural residual |x - clip(x - (A x + b) / c, 0, h)| c per row, over its
    scale (c: A's largest diagonal entry)."""
    c = np.max(np.diag(a))
    gradient = x @ a + b
    gap = np.abs(x - np.clip(x - gradient / c, 0.0, h)).max(axis=1) * c
    return gap / (c * np.abs(x).max(axis=1) + np.abs(b).max(axis=1))


def _scipy_nonnegative(a, b, h):
    k = len(b)
    result = optimize.minimize(
        lambda x: 0.5 * x @ a @ x + b @ x, np.zeros(k), jac=lambda x: a @ x + b,
        method="L-BFGS-B", bounds=list(zip(np.zeros(k), h)),
        options={"ftol": 1e-16, "gtol": 1e-13, "maxiter": 20000})
    return result.x, result.fun


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", SIZES)
def test_nonnegative_qp_matches_scipy(k, kind):
    """min (1/2) x^T A x + b^T x over 0 <= x (<= h): KKT to 1e-9 and no worse than
    L-BFGS-B, on full-rank and rank-deficient A; where A is positive definite, x is
    unique and equals bounded least squares on A's Cholesky factor."""
    a, bounded, free, upper = _nonnegative_problems(k, kind, 7)
    x = nonnegative(tf.constant(a), tf.constant(bounded)).numpy()
    boxed = nonnegative_boxed(tf.constant(a), tf.constant(free), tf.constant(upper)).numpy()
    assert np.all(x >= 0) and np.all(boxed >= 0) and np.all(boxed <= upper)
    assert np.all(_nonnegative_kkt_gap(x, a, bounded, np.inf) <= 1e-9)
    assert np.all(_nonnegative_kkt_gap(boxed, a, free, upper) <= 1e-9)
    for row, b, h in [(x[i], bounded[i], np.full(k, np.inf)) for i in range(3)] + [
            (boxed[i], free[i], upper[i]) for i in range(3)]:
        ours = 0.5 * row @ a @ row + b @ row
        _, reference = _scipy_nonnegative(a, b, np.where(np.isinf(h), None, h))
        assert ours <= reference + 1e-9 * max(1.0, abs(reference))
    if kind == "random":  # A = L L^T: the QP is min |L^T x + L^-1 b|^2 / 2 on the box
        for row, b, h in [(boxed[i], free[i], upper[i]) for i in range(3)]:
            kept = h > 0  # entries with h = 0 are fixed at 0
            factor = np.linalg.cholesky(a[kept][:, kept])
            reference = np.zeros(k)
            reference[kept] = optimize.lsq_linear(
                factor.T, -np.linalg.solve(factor, b[kept]),
                bounds=(np.zeros(kept.sum()), h[kept]), method="bvls", tol=1e-15).x
            np.testing.assert_allclose(row, reference, rtol=0, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_nonnegative_active_set_alone_on_full_rank_problems(kind):
    """The primal-dual active-set steps (the first attempt, without the fallback) solve
    positive definite problems: on "ill" ones once a ridge makes A definite."""
    a, _, free, upper = _nonnegative_problems(10, kind, 8)
    a = a + (1e-8 if kind == "ill" else 0.0) * np.eye(10)
    c = tf.constant(np.max(np.diag(a)))
    lower, at_upper = _bounds_from(tf.zeros_like(free), tf.constant(free),
                                   tf.constant(upper), c)
    x = _nonnegative_active_set(tf.constant(a), tf.constant(free), tf.constant(upper), c,
                                lower, at_upper, 20).numpy()
    assert np.all(_nonnegative_kkt_gap(x, a, free, upper) <= 1e-9)


def test_nonnegative_qp_single_batched_xla_and_float32():
    a, _, free, upper = _nonnegative_problems(5, "ill", 9)
    batched = nonnegative_boxed(tf.constant(a), tf.constant(free), tf.constant(upper))
    single = solvers.nonnegative_qp(tf.constant(a), tf.constant(free[1]),
                                    tf.constant(upper[1]))
    assert single.shape == (5,)
    np.testing.assert_allclose(single.numpy(), batched.numpy()[1], rtol=0, atol=1e-12)
    xla = tf.function(lambda a, b, h: solvers.nonnegative_qp(a, b, h), autograph=False,
                      jit_compile=True)
    np.testing.assert_allclose(
        xla(tf.constant(a), tf.constant(free), tf.constant(upper)).numpy(),
        batched.numpy(), rtol=0, atol=1e-10)
    low = solvers.nonnegative_qp(tf.constant(a, tf.float32), tf.constant(free, tf.float32))
    assert low.dtype == tf.float32 and np.all(np.isfinite(low.numpy()))
    for degenerate in (np.zeros((3, 3)), np.ones((3, 3))):  # b >= 0 keeps them bounded
        x = solvers.nonnegative_qp(tf.constant(degenerate), tf.constant([1.0, 0.0, 2.0],
                                                                        tf.float64))
        np.testing.assert_array_equal(x.numpy(), 0.0)


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
