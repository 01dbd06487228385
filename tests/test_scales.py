"""Exact where users live: tasks whose gradients and losses differ by orders of magnitude.

Every registered gradient-level strategy is held to its definition, evaluated in float64 on
the same float32-rounded gradients (`tests/definitions.py`), for float32 Jacobians whose rows'
norms span ratios of 1 to 1e6, with K from 2 to 8 tasks, nearly parallel and nearly
opposite rows included; to its declared properties (`non_conflicting`, `scale_invariant`)
at those scales and near Pareto stationarity; and to finite answers on degenerate Jacobians.
A strategy registered later is covered by registering it. The same definitions are checked
through `BalancedModel` training steps at both gradient levels, and the loss-level
strategies on float32 losses from 1e-8 to 1e8.
"""

import itertools

import definitions
import keras
import numpy as np
import pytest
import tensorflow as tf

import lossbalance
from lossbalance import strategies
from conftest import REQUIRED_ARGUMENTS, record_applied_gradients

RATIOS = (1.0, 1e2, 1e4, 1e6)
SIZES = (2, 3, 5, 8)
KINDS = ("random", "near_parallel", "near_opposite")
P = 16


def _family(name):
    return strategies.registry.lookup(name).family


GRADIENT_STRATEGIES = [n for n in strategies.available() if _family(n) in ("gramian",
                                                                           "jacobian")]
LOSS_STRATEGIES = [n for n in strategies.available() if _family(n) == "loss"]
#: Strategies with a float64 definition in tests/definitions.py.
DEFINED = sorted(set(definitions.WEIGHTS) | set(definitions.UPDATES))
#: Configurations beyond the defaults whose declared properties are worth checking too.
VARIANTS = [("cagrad", {"c": 1.0}), ("cagrad", {"c": 2.0}), ("fairgrad", {"alpha": 2.0}),
            ("mgda", {"normalization": "l2", "weights_on": "normalized"}),
            ("upgrad", {"reg_eps": 1e-9})]
CONFIGURATIONS = [(name, REQUIRED_ARGUMENTS.get(name, {})) for name in GRADIENT_STRATEGIES
                  ] + VARIANTS


def _ids(configurations):
    return [name + "".join(f"-{k}={v}" for k, v in params.items())
            for name, params in configurations]


def _draws_random_numbers(strategy):
    return hasattr(strategy, "seed_generator")


def scaled_jacobian(rng, k, ratio, kind="random", p=P):
    """(K, P) float32 task gradients whose norms span `ratio` (shuffled among the tasks).

    "near_parallel": rows within ~1e-2 of a common direction; "near_opposite": the first two
    rows nearly opposite (the cosine of their unit vectors ~ -1 + 5e-5)."""
    j = rng.normal(size=(k, p))
    if kind == "near_parallel":
        j = j[:1] + 1e-2 * j
    elif kind == "near_opposite":
        j[1] = -j[0] + 1e-2 * j[1]
    scales = ratio ** (np.arange(k) / max(k - 1, 1))
    rng.shuffle(scales)
    return (j * scales[:, None]).astype(np.float32)


def near_stationary_jacobian(rng, k, epsilon, ratio, p=P):
    """Rows with sum_k w_k g_k = epsilon n for some w in the simplex (Pareto stationary
    for epsilon = 0), then scaled apart by up to `ratio`."""
    j = rng.normal(size=(k, p))
    w = rng.dirichlet(np.ones(k))
    j = j - (j.T @ w)[None, :] + epsilon * rng.normal(size=(1, p))
    return (j * ratio ** rng.uniform(0, 1, size=(k, 1))).astype(np.float32)


def _direction(strategy, jacobian):
    return lossbalance.aggregate(strategy, jacobian).numpy().astype(np.float64)


class _PerSize:
    """One strategy instance per task count (a strategy is bound to its K tasks), kept
    so that each compiles once per shape."""

    def __init__(self, name, **params):
        self.name, self.params, self.made = name, params, {}

    def direction(self, jacobian):
        k = len(jacobian)
        if k not in self.made:
            self.made[k] = strategies.get(self.name, **self.params)
        return _direction(self.made[k], jacobian)


class _FromStart(_PerSize):
    """As `_PerSize`, but every call starts from the strategy's initial state (its
    variables restored), as a new instance would, without compiling again."""

    def direction(self, jacobian):
        k = len(jacobian)
        if k not in self.made:
            strategy = strategies.get(self.name, **self.params)
            strategy.bind([f"task_{i}" for i in range(k)])
            if strategy.needs_parameter_state:
                strategy.build_parameter_state(jacobian.shape[1])
            self.made[k] = strategy, [v.numpy() for v in strategy.variables]
        strategy, initial = self.made[k]
        for variable, value in zip(strategy.variables, initial, strict=True):
            variable.assign(value)
        return _direction(strategy, jacobian)


def _cosines(jacobian, direction):
    rows = jacobian.astype(np.float64)
    return rows @ direction / (np.linalg.norm(rows, axis=1) * np.linalg.norm(direction))


# -- definitions --------------------------------------------------------------------------


@pytest.mark.parametrize("name", DEFINED)
def test_definition_at_every_scale(name):
    """The update equals the definition in float64 to float32's rounding, whatever the
    tasks' scale ratio (up to 1e6), K and the rows' angles."""
    strategy = _PerSize(name)
    rng = np.random.default_rng(0)
    for k, ratio, kind in itertools.product(SIZES, RATIOS, KINDS):
        jacobian = scaled_jacobian(rng, k, ratio, kind)
        expected = definitions.update(name, jacobian.astype(np.float64))
        got = strategy.direction(jacobian)
        error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        assert error < 1e-6, (k, ratio, kind, error)


def test_pcgrad_and_db_mtl_definitions_at_every_scale():
    rng = np.random.default_rng(1)
    for ratio, kind in itertools.product(RATIOS, KINDS):
        jacobian = scaled_jacobian(rng, 2, ratio, kind)  # two tasks: one order only
        rows = jacobian.astype(np.float64)
        got = _direction(strategies.get("pcgrad"), jacobian)
        expected = definitions.pcgrad(rows, [[1], [0]])
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(
            expected).max())
        got = _direction(strategies.get("db_mtl"), jacobian)  # a fresh state: first step
        expected = definitions.db_mtl_first_step(rows)
        # DB-MTL keeps its moving averages in float32 (0.1 g_k rounded), which the
        # reference does not round: up to float32's epsilon of each rescaled row.
        rounding = 8 * np.finfo(np.float32).eps * 2 * np.abs(0.1 * rows).max() * np.max(
            np.linalg.norm(rows, axis=1)) / np.min(np.linalg.norm(rows, axis=1))
        assert np.linalg.norm(got - expected) <= 1e-6 * np.linalg.norm(expected) + rounding


def _residual_bound(gramian, w):
    """1e-7, plus what float64 allows when (G w)_k cancels: 1e-13 (|G| |w|)_k / |(G w)_k|
    (nearly opposite gradients on scales 1e6 apart reach 1e8 there)."""
    return 1e-7 + 1e-13 * (np.abs(gramian) @ np.abs(w)) / np.abs(gramian @ w)


def test_nash_mtl_and_fairgrad_solve_their_equations_on_the_jacobian():
    """Residuals of (G a)_k a_k = 1 (Nash-MTL's condition, before its normalisation) and
    (G w)_k w_k^(1/alpha) = 1, evaluated on J itself in float64."""
    rng = np.random.default_rng(2)
    made = {}  # one instance per configuration and K: each compiles its solver once

    def weights(gramian, name, **params):
        key = (name, tuple(params.items()), len(gramian))
        if key not in made:
            made[key] = strategies.get(name, **params)
        return lossbalance.task_weights(made[key], gramian=gramian).numpy()

    for k, ratio, kind in itertools.product(SIZES, RATIOS, KINDS):
        rows = scaled_jacobian(rng, k, ratio, kind).astype(np.float64)
        gramian = rows @ rows.T
        nash = weights(gramian, "nash_mtl", max_norm=0.0)
        # a = sqrt(|G|_F) a*, so (G a) a = |G|_F for the exact a*.
        products = (rows @ (rows.T @ nash)) * nash / np.linalg.norm(gramian)
        assert np.all(np.abs(products - 1) <= _residual_bound(gramian, nash)), (k, ratio, kind)
        for alpha in (0.5, 1.0, 2.0):
            w = weights(gramian, "fairgrad", alpha=alpha)
            residual = (rows @ (rows.T @ w)) * w ** (1 / alpha) - 1
            assert np.all(np.abs(residual) <= _residual_bound(gramian, w)), (
                k, ratio, kind, alpha, residual)


def test_imtl_g_gives_the_small_task_the_large_weight():
    """The users' case: gradient norms ~1 and ~4000 (clfreg). IMTL-G's equal projections
    give the small task a weight ~4000 times the large one's."""
    rng = np.random.default_rng(3)
    j = rng.normal(size=(2, 64))
    j *= np.array([[1.0], [4000.0]]) / np.linalg.norm(j, axis=1, keepdims=True)
    w = lossbalance.task_weights("imtl_g", j.astype(np.float32)).numpy()
    np.testing.assert_allclose(w[0] / w[1], 4000.0, rtol=1e-5)
    projections = (j / np.linalg.norm(j, axis=1, keepdims=True)) @ (j.T @ w)
    np.testing.assert_allclose(projections[0], projections[1], rtol=1e-5)


def test_trace_conditioning_and_the_authors_rank_cut_stay_reachable():
    """TorchJD's ridge on G / trace(G) and Aligned-MTL's authors' cut on G drop the small
    task at a ratio of 1e4; the defaults keep it."""
    rng = np.random.default_rng(4)
    j = rng.normal(size=(2, 32))
    j[1] -= j[1] @ j[0] / (j[0] @ j[0]) * j[0]  # orthogonal rows
    j *= np.array([[1e-2], [1e2]]) / np.linalg.norm(j, axis=1, keepdims=True)
    j = j.astype(np.float32)
    authors = _direction(strategies.get("aligned_mtl", truncation="gramian"), j)
    np.testing.assert_allclose(_cosines(j, authors), [0.0, 1.0], atol=1e-6)  # big task only
    exact = _direction(strategies.get("aligned_mtl"), j)
    np.testing.assert_allclose(_cosines(j, exact), [2 ** -0.5] * 2, atol=1e-6)
    torchjd = _direction(strategies.get("dualproj", regularization="trace", reg_eps=1e-4,
                                        norm_eps=1e-4), j)
    assert np.min(_cosines(j, torchjd)) >= -1e-6  # orthogonal rows: nothing to project
    conflicting = j.copy()
    conflicting[0] = (0.9 * -j[1] / 1e2 + 0.1 * j[0] / 1e-2) * 1e-2  # mostly opposite
    torchjd = _direction(strategies.get("dualproj", regularization="trace", reg_eps=1e-4,
                                        norm_eps=1e-4), conflicting)
    exact = _direction(strategies.get("dualproj"), conflicting)
    assert np.min(_cosines(conflicting, torchjd)) < -1e-3
    assert np.min(_cosines(conflicting, exact)) >= -1e-7


# -- declared properties -----------------------------------------------------------------


NON_CONFLICTING = [(n, p) for n, p in CONFIGURATIONS if strategies.get(n, **p).non_conflicting]


@pytest.mark.parametrize("name, params", NON_CONFLICTING, ids=_ids(NON_CONFLICTING))
def test_non_conflicting_at_every_scale_and_near_stationarity(name, params):
    strategy = _PerSize(name, **params)
    rng = np.random.default_rng(5)
    tolerance = 1e-6 if params.get("reg_eps") is None else 1e-6 + params["reg_eps"]
    cases = [scaled_jacobian(rng, k, ratio, kind)
             for k, ratio, kind in itertools.product(SIZES, RATIOS, KINDS)]
    cases += [near_stationary_jacobian(rng, k, epsilon, ratio)
              for k, epsilon, ratio in itertools.product((2, 3, 5), (1e-2, 1e-4, 1e-6),
                                                         (1.0, 1e4))]
    for jacobian in cases:
        direction = strategy.direction(jacobian)
        assert np.linalg.norm(direction) > 0
        assert np.min(_cosines(jacobian, direction)) >= -tolerance


STATIONARY_ZERO = ["mgda", "upgrad", "dualproj"]


@pytest.mark.parametrize("name, params", [(n, {}) for n in STATIONARY_ZERO]
                         + [("cagrad", {"c": 1.0}), ("cagrad", {"c": 2.0})],
                         ids=STATIONARY_ZERO + ["cagrad-c=1", "cagrad-c=2"])
def test_zero_update_at_a_pareto_stationary_point(name, params):
    """0 in the convex hull of the gradients: no direction improves every task, and these
    methods stand still (CAGrad for c >= 1: d = 0 is in its ball and is optimal)."""
    strategy = _PerSize(name, **params)
    rng = np.random.default_rng(6)
    for k, ratio in itertools.product((2, 3, 5), (1.0, 1e4)):
        rows = rng.normal(size=(k, P))
        w = rng.dirichlet(np.ones(k))
        rows -= (rows.T @ w)[None, :]  # sum_k w_k g_k = 0
        rows *= ratio ** rng.uniform(0, 1, size=(k, 1))
        direction = strategy.direction(rows)  # float64 rows: exactly stationary
        assert np.linalg.norm(direction) <= 1e-7 * np.linalg.norm(rows, axis=1).max()


SCALE_INVARIANT = [(n, p) for n, p in CONFIGURATIONS
                   if _family(n) != "loss" and strategies.get(n, **p).scale_invariant]


@pytest.mark.parametrize("name, params", SCALE_INVARIANT, ids=_ids(SCALE_INVARIANT))
def test_scale_invariant_direction(name, params):
    """Multiplying one task's gradient by 1e4 (or 1e-4) leaves the update's direction."""
    strategy = _FromStart(name, **params)  # both directions from the initial state
    rng = np.random.default_rng(7)
    for k, kind in itertools.product(SIZES, KINDS):
        jacobian = scaled_jacobian(rng, k, 1e2, kind)
        scaled = jacobian.copy()
        scaled[rng.integers(k)] *= 1e4 if rng.uniform() < 0.5 else 1e-4
        a, b = strategy.direction(jacobian), strategy.direction(scaled)
        cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        if name in ("imtl_g", "imtl"):
            # IMTL-G's weights sum to 1, so its direction flips with the sign of
            # sum_k (C^+ 1)_k / |g_k|, which scaling can change for K >= 3 (documented).
            cosine = abs(cosine)
        assert cosine >= 1 - 1e-6, (k, kind)


def test_aligned_mtl_depends_on_the_scales_by_definition():
    """Not declared scale-invariant, and indeed not: its aligned gradients are the polar
    factor of J, which leans toward the larger gradients (the definition agrees)."""
    assert not strategies.get("aligned_mtl").scale_invariant
    rng = np.random.default_rng(8)
    j = rng.normal(size=(3, P))
    scaled = j * np.array([[1e3], [1.0], [1.0]])
    a = definitions.update("aligned_mtl", j)
    b = definitions.update("aligned_mtl", scaled)
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) < 0.999


# -- robustness ---------------------------------------------------------------------------


def special_jacobians(rng, k=3, p=6):
    """Degenerate cases every method must survive with a finite output."""
    base = rng.normal(size=(k, p))
    cases = {
        "zero": np.zeros((k, p)),
        "rank_deficient": rng.normal(size=(k, 2)) @ rng.normal(size=(2, p)),
        "duplicated": np.stack([base[0], base[0], base[1]]),
        "colinear": rng.normal(size=(k, 1)) @ rng.normal(size=(1, p)),
        "opposite": np.stack([base[0], -base[0], 2 * base[0]]),
        "one_zero_row": np.stack([base[0], np.zeros(p), base[2]]),
        "mixed_scales": base * np.array([[1e-6], [1.0], [1e6]]),
        "stationary": base - base.mean(axis=0),
    }
    for scale in (0.0, 1e-15, 1e-6, 1.0, 1e6, 1e15):
        cases[f"scale_{scale:g}"] = scale * base
    return cases


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name, params", CONFIGURATIONS, ids=_ids(CONFIGURATIONS))
def test_finite_on_degenerate_jacobians(name, params, dtype):
    strategy = strategies.get(name, **params)
    for case, jacobian in special_jacobians(np.random.default_rng(9)).items():
        direction, weights = lossbalance.aggregate_with_weights(
            strategy, jacobian.astype(dtype), losses=np.ones(3))
        assert direction.shape == (6,)
        assert np.all(np.isfinite(direction.numpy())), case
        assert np.all(np.isfinite(weights.numpy())), case


# PCD's tests name its primary task by position: permuting the tasks changes it
# (tests/test_pcd.py permutes the primary with them).
ORDER_FREE = [(n, p) for n, p in CONFIGURATIONS
              if not _draws_random_numbers(strategies.get(n, **p)) and "primary" not in p]


@pytest.mark.parametrize("name, params", ORDER_FREE, ids=_ids(ORDER_FREE))
def test_permutation_invariance(name, params):
    """Permuting the tasks permutes the weights and leaves the update."""
    rng = np.random.default_rng(10)
    for k, ratio in ((3, 1.0), (5, 1e4)):
        jacobian = scaled_jacobian(rng, k, ratio)
        order = rng.permutation(k)
        a = _direction(strategies.get(name, **params), jacobian)  # fresh state each
        b = _direction(strategies.get(name, **params), jacobian[order])
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_upgrad_linear_under_positive_row_scaling():
    """TorchJD's property of UPGrad: A(diag(a + b) J) = A(diag(a) J) + A(diag(b) J)."""
    strategy = strategies.get("upgrad")
    rng = np.random.default_rng(11)
    for _ in range(5):
        jacobian = rng.normal(size=(3, P))
        a, b = 10.0 ** rng.uniform(-3, 3, size=3), 10.0 ** rng.uniform(-3, 3, size=3)

        def upgrad(scale):
            return _direction(strategy, (scale[:, None] * jacobian).astype(np.float32))

        left, right = upgrad(a + b), upgrad(a) + upgrad(b)
        np.testing.assert_allclose(left, right, rtol=1e-5, atol=1e-5 * np.abs(left).max())


# -- through BalancedModel's training step --------------------------------------------------


def _two_head_model():
    keras.utils.set_random_seed(0)
    x = keras.Input((8,), name="x")
    z = keras.layers.Dense(16, activation="tanh", name="trunk")(x)
    return lossbalance.BalancedModel(x, {"cls": keras.layers.Dense(3, name="cls")(z),
                                         "reg": keras.layers.Dense(1, name="reg")(z)})


LOSSES = {"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "reg": "mse"}


def _task_rows(model, x, y, level):
    """The tasks' gradients as the step sees them (float32), rows of J, and a function
    taking a (K,) weight vector to the expected trunk gradients."""
    trunk = model.get_layer("trunk")
    sub = keras.Model(model.inputs, [trunk.output, model.get_layer("cls").output,
                                     model.get_layer("reg").output])
    with tf.GradientTape(persistent=True) as tape:
        z, cls, reg = sub(x, training=True)
        losses = [keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y["cls"], cls),
                  keras.losses.MeanSquaredError()(y["reg"], reg)]
    variables = [v.value for v in trunk.trainable_variables]
    if level == "parameters":
        grads = [tape.gradient(loss, variables) for loss in losses]
        rows = np.stack([np.concatenate([g.numpy().ravel() for g in row]) for row in grads])

        def expected(w):
            flat = rows.astype(np.float64).T @ w
            sizes = np.cumsum([0] + [int(np.prod(v.shape)) for v in variables])
            return [flat[a:b].reshape(v.shape) for a, b, v in zip(sizes, sizes[1:],
                                                                  variables)]
    else:
        cotangents = [tape.gradient(loss, z) for loss in losses]
        rows = np.stack([c.numpy().ravel() for c in cotangents])

        def expected(w):
            combined = tf.constant((rows.astype(np.float64).T @ w).reshape(z.shape),
                                   tf.float32)
            return [g.numpy() for g in tape.gradient(z, variables,
                                                     output_gradients=combined)]
    return rows, expected


# Graph mode (the default step, traced) for a few; eager steps for the rest keep it quick.
TRACED = ("mgda", "nash_mtl", "upgrad")


@pytest.mark.parametrize("level", ["parameters", "representation"])
@pytest.mark.parametrize("name", DEFINED)
def test_training_step_applies_the_definition(name, level):
    """A classifier beside a regressor whose targets are scaled by 1 to 1e6 (gradient
    ratios up to ~1e6): the trunk's update in the step is the definition's J^T w."""
    model = _two_head_model()
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=LOSSES, strategy=name,
                  gradients=level, run_eagerly=name not in TRACED)
    records = record_applied_gradients(model)
    rng = np.random.default_rng(12)
    x = rng.normal(size=(16, 8)).astype("float32")
    trunk_ids = [id(v) for v in model.get_layer("trunk").trainable_variables]
    positions = [i for i, v in enumerate(model.trainable_variables) if id(v) in trunk_ids]
    for scale in RATIOS:
        y = {"cls": rng.integers(0, 3, size=16),
             "reg": (scale * rng.normal(size=(16, 1))).astype("float32")}
        model.train_on_batch(x, y)
        rows, expected = _task_rows(model, x, y, level)
        want = expected(definitions.WEIGHTS[name](rows.astype(np.float64))
                        if name in definitions.WEIGHTS else _config_weights(rows))
        for position, target in zip(positions, want):
            got = records[position].numpy()
            np.testing.assert_allclose(got, target, rtol=1e-5, atol=1e-5 * np.abs(
                target).max(), err_msg=f"{name} {level} scale {scale}")


def _config_weights(rows):
    """ConFIG's update as weights on the rows (its definition returns the update)."""
    update = definitions.config(rows.astype(np.float64))
    return np.linalg.lstsq(rows.astype(np.float64).T, update, rcond=None)[0]


def test_loss_weight_of_1e4_leaves_a_scale_invariant_step_unchanged():
    """compile(loss_weights={"reg": 1e4}) multiplies one task's loss: IMTL-G's and
    Nash-MTL's trunk updates keep their direction (through the model's step)."""
    rng = np.random.default_rng(13)
    x = rng.normal(size=(16, 8)).astype("float32")
    y = {"cls": rng.integers(0, 3, size=16), "reg": rng.normal(size=(16, 1)).astype("f4")}
    for name in ("imtl_g", "nash_mtl"):
        updates = []
        for weight in (1.0, 1e4):
            model = _two_head_model()
            model.compile(optimizer=keras.optimizers.SGD(0.0), loss=LOSSES, strategy=name,
                          loss_weights={"cls": 1.0, "reg": weight}, run_eagerly=True)
            records = record_applied_gradients(model)
            model.train_on_batch(x, y)
            trunk = model.get_layer("trunk").trainable_variables
            updates.append(np.concatenate([records[i].numpy().ravel() for i, v in enumerate(
                model.trainable_variables) if any(v is t for t in trunk)]))
        a, b = updates
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= 1 - 1e-5, name


# -- loss-level strategies at extreme losses ----------------------------------------------


EXTREME = np.array([1e8, 1e-8, 3.0], np.float32)


def _weights(name, losses, **params):
    strategy = strategies.get(name, **params)
    strategy.bind(["a", "b", "c"][:len(losses)])
    return strategy, strategy.loss_weights(tf.constant(losses)).numpy().astype(np.float64)


def test_log_based_weights_at_extreme_losses():
    """Float32 losses of 1e8 and 1e-8 beside 3: the weights equal their float64 formulas."""
    losses = EXTREME.astype(np.float64)
    k = len(losses)
    expected = {
        "scale_invariant": 1.0 / losses,
        "gls": np.exp(np.mean(np.log(losses))) / (k * losses),
        "famo": (1.0 / (losses + 1e-8)) / np.sum(1.0 / (losses + 1e-8)),  # logits 0
        "stch": 1.0 / losses,  # the warm-up: the sum of log losses
    }
    for name, want in expected.items():
        _, got = _weights(name, EXTREME)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)
    # STCH's smooth Tchebycheff phase, nadir 1: K softmax(log L)_k / L_k = K / sum(L).
    strategy, _ = _weights("stch", EXTREME, warmup_epochs=0, normalize=False)
    got = strategy.loss_weights(tf.constant(EXTREME)).numpy()
    np.testing.assert_allclose(got, k / losses.sum(), rtol=1e-6)


def test_learned_scales_are_exact_at_extreme_losses():
    """IMTL-L (e^s L - s) and uncertainty weighting ((1/2) e^-s L + s/2) at their optima:
    finite, and each task's weighted loss w_k L_k the same (1 and 1/2)."""
    losses = EXTREME.astype(np.float64)
    imtl_l = strategies.get("imtl_l")
    imtl_l.bind(["a", "b", "c"])
    imtl_l.log_scale.assign(-np.log(losses).astype(np.float32))
    weights = imtl_l.loss_weights(tf.constant(EXTREME)).numpy()
    np.testing.assert_allclose(weights * losses, 1.0, rtol=1e-6)
    uncertainty = strategies.get("uncertainty", initial_log_variance=0.0)
    uncertainty.bind(["a", "b", "c"])
    uncertainty.log_variance.assign(np.log(losses).astype(np.float32))
    weights = uncertainty.loss_weights(tf.constant(EXTREME)).numpy()
    np.testing.assert_allclose(weights * losses, 0.5, rtol=1e-6)


SCALE_INVARIANT_LOSSES = [n for n in LOSS_STRATEGIES if strategies.get(n).scale_invariant]


@pytest.mark.parametrize("name", SCALE_INVARIANT_LOSSES)
def test_scale_invariant_loss_weights(name):
    """w_k(L') c_k is proportional to w_k(L) for L'_k = c_k L_k: the update's direction does
    not change when a task's loss (and gradient) is multiplied by c_k (first step)."""
    losses = np.array([1.0, 10.0, 1e2], np.float32)  # far above FAMO's epsilon, scaled
    factors = np.array([1e4, 1.0, 1e-4], np.float32)
    _, before = _weights(name, losses)
    _, after = _weights(name, losses * factors)
    ratio = after * factors / before
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)


@pytest.mark.parametrize("name", LOSS_STRATEGIES)
def test_loss_strategies_train_on_losses_from_1e8_to_1e_8(name):
    """A regression on raw targets in the tens of thousands (loss ~1e8) beside one whose
    loss is ~1e-8: every loss-level strategy keeps finite losses, weights and parameters."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(14)
    x = rng.normal(size=(64, 8)).astype("float32")
    inputs = keras.Input((8,))
    h = keras.layers.Dense(8, activation="tanh", name="trunk")(inputs)
    big = keras.layers.Dense(1, name="big")(h)
    small = keras.layers.Dense(1, name="small", kernel_initializer="zeros",
                               bias_initializer="zeros")(h)
    model = lossbalance.BalancedModel(inputs, {"big": big, "small": small})
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", strategy=name)
    y = {"big": (1e4 * (1.0 + rng.uniform(size=(64, 1)))).astype("float32"),
         "small": (1e-4 * rng.normal(size=(64, 1))).astype("float32")}
    initial = model.evaluate(x, y, verbose=0, return_dict=True)
    assert 1e8 < initial["big_loss"] < 1e9 and initial["small_loss"] < 1e-7, initial
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0).history
    for key, values in history.items():
        assert np.all(np.isfinite(values)), (key, values)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


def test_float32_precision_is_an_opt_out(tmp_path):
    """compile(precision="float32") accumulates the Gramian and J^T w in float32: on
    well-conditioned gradients the same update to float32's accuracy; it survives saving;
    another value is refused at compile."""
    rng = np.random.default_rng(15)
    x = rng.normal(size=(16, 8)).astype("float32")
    y = {"cls": rng.integers(0, 3, size=16), "reg": rng.normal(size=(16, 1)).astype("f4")}
    updates = []
    for precision in ("float64", "float32"):
        model = _two_head_model()
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss=LOSSES, strategy="mgda",
                      precision=precision)
        records = record_applied_gradients(model)
        model.train_on_batch(x, y)
        updates.append(np.concatenate([r.numpy().ravel() for r in records]))
    np.testing.assert_allclose(updates[1], updates[0], rtol=1e-4, atol=1e-6)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded._level.accumulate == tf.float32
    with pytest.raises(ValueError, match="`precision` must be one of"):
        _two_head_model().compile(loss=LOSSES, strategy="mgda", precision="float16")
