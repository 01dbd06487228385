"""The gradient methods' definitions, evaluated in float64 with numpy and scipy.

Each function takes a (K, P) Jacobian (float64 rows; in the tests the float32-rounded
gradients a training step produces) and returns the method's (P,) update, or its weights
w with update J^T w. They are written from the papers' formulas, independently of the
package's solvers, and solve every problem in a form whose accuracy does not depend on the
tasks' scales: on the unit rows U = D^-1 J (D = diag |g_k|) and their cosines C = U U^T,
on the SVD of J, or by bounded least squares on scaled columns. Where a method is defined
by an equation (Nash-MTL, FairGrad) the tests also check its residual on J itself.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import optimize

#: Directions are treated as dependent when a singular value of the unit rows U falls
#: under K times this times the largest (the rank decision made on a scale-free quantity,
#: at the gradients' float32 precision).
RANK_TOLERANCE = np.finfo(np.float32).eps


def unit_rows(jacobian):
    """(U, d): unit rows and the row norms (a zero row stays zero, d = 0)."""
    j = np.asarray(jacobian, np.float64)
    d = np.linalg.norm(j, axis=1)
    safe = np.where(d > 0, d, 1.0)
    return j / safe[:, None], d


def cosine_pinv(u, rank_tolerance=RANK_TOLERANCE):
    """The pseudo-inverse of C = U U^T, from the SVD of U (eigenvalues of C under
    `rank_tolerance` times the largest dropped)."""
    left, s, _ = np.linalg.svd(u, full_matrices=False)
    keep = s > rank_tolerance * len(u) * s.max()
    return (left[:, keep] / s[keep] ** 2) @ left[:, keep].T


def mean(j):
    return np.full(len(j), 1.0 / len(j))


def total(j):
    return np.ones(len(j))


def imtl_g(j):
    """w with sum 1 and equal projections u_k . J^T w (w = D^-1 C^+ 1, normalised)."""
    u, d = unit_rows(j)
    v = cosine_pinv(u) @ np.ones(len(j))
    v = np.where(d > 0, v / np.where(d > 0, d, 1.0), 0.0)
    return v / v.sum()


def _scaled_solve(u, d, s, rhs):
    """x with G_SS x = rhs for G = D C D on the support s, solved on the cosines; None if
    C_SS is singular."""
    c = u[s] @ u[s].T
    if np.linalg.cond(c) > 1e10:
        return None
    return np.linalg.solve(c, rhs / d[s]) / d[s]


def min_norm_weights(j):
    """MGDA: argmin_{w in simplex} |J^T w|^2, by checking the KKT conditions on every
    support (exact for the K <= 8 of the tests), each solved on the cosines."""
    u, d = unit_rows(j)
    k = len(j)
    best, best_value = None, np.inf
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            s = list(support)
            if np.any(d[s] == 0):
                w = np.zeros(k)
                w[s[0]] = 1.0
            else:
                # G_SS w_S = lambda 1 with G_SS = D C D: w_S ∝ D^-1 C_SS^-1 D^-1 1.
                x = _scaled_solve(u, d, s, np.ones(len(s)))
                if x is None or np.any(x < 0) or x.sum() <= 0:
                    continue
                w = np.zeros(k)
                w[s] = x / x.sum()
            value = np.linalg.norm(j.T @ w) ** 2
            if value < best_value * (1 - 1e-12):
                best, best_value = w, value
    return best


def mgda(j):
    return min_norm_weights(j)


def cagrad(j, c=0.4, rescale=True):
    """max_d min_k g_k . d over |d - g0| <= c |g0|, from its KKT conditions: with
    d = J^T (1/K + y), y >= 0, the binding tasks S share the value mu = (G (1/K + y))_k,
    the others exceed it, and |J^T y| = c |g0|. Every support is tried (K <= 8); the
    systems G_SS x = r are solved on the cosines."""
    k = len(j)
    u, d = unit_rows(j)
    m = np.full(k, 1.0 / k)
    g0 = j.T @ m
    radius = c * np.linalg.norm(g0)
    gm = j @ g0
    if radius == 0:
        return m / (1 + c ** 2) if rescale else m
    best, best_mu = None, -np.inf
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            s = list(support)
            a = _scaled_solve(u, d, s, np.ones(size))
            if a is None:
                continue
            b = _scaled_solve(u, d, s, gm[s])
            # |J_S^T (mu a - b)|^2 = radius^2: a quadratic in mu, the larger root
            # (J_S^T a and J_S^T b evaluated as vectors, not through G).
            ja, jb = j[s].T @ a, j[s].T @ b
            qa, qb, qc = ja @ ja, ja @ jb, jb @ jb - radius ** 2
            disc = qb * qb - qa * qc
            if qa <= 0 or disc < 0:
                continue
            mu = (qb + np.sqrt(disc)) / qa
            y = np.zeros(k)
            y[s] = mu * a - b
            if np.any(y < 0):
                continue
            values = j @ (j.T @ (m + y))
            if np.all(values >= mu - 1e-9 * np.abs(values).max()) and mu > best_mu:
                best, best_mu = m + y, mu
    if best is None:
        raise ValueError("no KKT point found")
    return best / (1 + c ** 2) if rescale else best


def nash_condition(j):
    """a > 0 with (G a)_k = 1 / a_k, by Newton on the cosines: a = D^-1 b, C b = 1 / b."""
    u, d = unit_rows(j)
    c = u @ u.T
    b = np.ones(len(j))
    for _ in range(200):
        residual = c @ b - 1.0 / b
        if np.max(np.abs(residual * b)) < 1e-15:
            break
        step = np.linalg.solve(c + np.diag(1.0 / b ** 2), residual)
        t = 1.0
        while np.any(b - t * step <= 0):
            t /= 2
        b = b - t * step
    return b / d


def nash_mtl(j, max_norm=1.0):
    """Nash-MTL as the authors use it: a* sqrt(|G|_F), the update clipped to max_norm."""
    g = j @ j.T
    a = nash_condition(j) * np.sqrt(np.linalg.norm(g))
    norm = np.linalg.norm(j.T @ a)
    if max_norm > 0 and norm > max_norm:
        a = a * max_norm / norm
    return a


def fairgrad(j, alpha=1.0):
    """w > 0 with (G w)_k = w_k^(-1/alpha): Newton on x = D w, (C x)_k = d_k^(1/alpha - 1)
    x_k^(-1/alpha) (the same equation divided through by d_k)."""
    u, d = unit_rows(j)
    c = u @ u.T
    coefficient = d ** (1.0 / alpha - 1.0)
    x = np.ones(len(j))
    for _ in range(300):
        residual = c @ x - coefficient * x ** (-1.0 / alpha)
        if np.max(np.abs(residual * x)) < 1e-15 * max(1.0, np.max(coefficient)):
            break
        jac = c + np.diag(coefficient / alpha * x ** (-1.0 / alpha - 1.0))
        step = np.linalg.solve(jac, residual)
        t = 1.0
        while np.any(x - t * step <= 0):
            t /= 2
        x = x - t * step
    return x / d


def aligned_mtl(j, scale_mode="min", preference="sum"):
    """w = sqrt(sigma) G^(-1/2) p on the rank of the rows: the rank is decided on the unit
    rows U (singular values of U under K eps32 of the largest dropped), and G^(-1/2)
    taken from the SVD of J's projection on what is kept, D U_r = V S W^T:
    G_r^(+1/2) = V S^-1 V^T."""
    k = len(j)
    u, d = unit_rows(j)
    a, s_unit, bt = np.linalg.svd(u, full_matrices=False)
    rank = int(np.sum(s_unit > RANK_TOLERANCE * k * s_unit.max()))
    kept = d[:, None] * ((a[:, :rank] * s_unit[:rank]) @ bt[:rank])
    left, s, _ = np.linalg.svd(kept, full_matrices=False)
    left, s = left[:, :rank], s[:rank]
    values = s ** 2
    if scale_mode == "min":
        sigma = values.min()
    elif scale_mode == "median":
        sigma = np.sort(values)[(rank - 1) // 2]
    else:
        sigma = values.mean()
    p = np.ones(k) / (k if preference == "mean" else 1)
    return np.sqrt(sigma) * (left / s) @ left.T @ p


def _dual_cone_weights(j, lower):
    """argmin_{v >= lower} |J^T v|^2 by bounded least squares on the unit rows
    (x = D v, J^T v = U^T x, x >= D lower)."""
    u, d = unit_rows(j)
    result = optimize.lsq_linear(u.T, np.zeros(j.shape[1]), bounds=(d * lower, np.inf),
                                 method="bvls", tol=1e-15, max_iter=10_000)
    return np.where(d > 0, result.x / np.where(d > 0, d, 1.0), lower)


def upgrad(j, preference="mean"):
    k = len(j)
    scale = 1.0 / k if preference == "mean" else 1.0
    return sum(_dual_cone_weights(j, scale * np.eye(k)[i]) for i in range(k))


def dualproj(j, preference="mean"):
    k = len(j)
    return _dual_cone_weights(j, np.full(k, 1.0 / k if preference == "mean" else 1.0))


def config(j):
    """ConFIG: x = U^+ 1 (least squares), update (sum_k g_k . x_hat) x_hat. Returns the
    update itself."""
    u, _ = unit_rows(j)
    x = u.T @ cosine_pinv(u) @ np.ones(len(j))  # the least-norm x with U x = 1
    x_hat = x / np.linalg.norm(x)
    return (j @ x_hat).sum() * x_hat


def pcgrad(j, orders):
    """PCGrad with task i visiting the others in `orders[i]`; the sum of the results."""
    out = []
    for i, order in enumerate(orders):
        g = j[i].copy()
        for other in order:
            dot = g @ j[other]
            norm = j[other] @ j[other]
            if dot < 0 and norm > 0:
                g = g - dot / norm * j[other]
        out.append(g)
    return np.sum(out, axis=0)


def db_mtl_first_step(j, beta=0.9):
    """DB-MTL's first step from zero moving averages: m_k = (1 - beta) g_k, then every
    m_k rescaled to the largest norm and summed. Returns the update."""
    m = (1 - beta) * j
    norms = np.linalg.norm(m, axis=1)
    return ((norms.max() / norms)[:, None] * m).sum(axis=0)


def krum(j, n_byzantine=0, n_selected=1, distance="squared"):
    """(Multi-)Krum's weights: each row scored by the sum of its (squared, or plain)
    distances to the K - f - 2 nearest other rows, computed on the rows themselves; the
    n_selected lowest scores share the weight equally (rows tied at the n_selected-th
    score share what is left)."""
    k = len(j)
    differences = j[:, None, :] - j[None, :, :]
    distances = np.sum(differences ** 2, axis=2)
    if distance == "euclidean":
        distances = np.sqrt(distances)
    np.fill_diagonal(distances, np.inf)
    scores = np.sort(distances, axis=1)[:, : k - n_byzantine - 2].sum(axis=1)
    cut = np.sort(scores)[n_selected - 1]
    below, at = scores < cut, scores == cut
    return np.where(below, 1.0 / n_selected, 0.0) + np.where(
        at, (n_selected - below.sum()) / (n_selected * at.sum()), 0.0)


def trimmed_mean(j, trim_number=1):
    """The coordinate-wise trimmed mean: per column, the t largest and t smallest values
    dropped and the rest averaged. Returns the update."""
    k = len(j)
    return np.sort(j, axis=0)[trim_number: k - trim_number].mean(axis=0)


def pcd(j, primary=0, tau=0.5, scales=None, max_correction=10.0):
    """PCD's weights: d = argmin |d - g~_p|^2 s.t. g~_i . d >= tau |g~_i|^2 for every
    i != p, with g~ = g / s (s: the rows' norms, PCD's first step, unless given), each
    secondary's correction x_i u_i (u_i = g_i / |g_i|, x_i = mu_i |g~_i|) bounded by
    B_i = max_correction (|g~_p| + |g~_i|) (the constraint's exact penalty when it binds).
    From the KKT conditions, every secondary either free (its constraint active), at 0
    (constraint met) or at its bound (constraint violated) (3^(K-1) cases, K <= 8): the
    free lengths solve C_FF x_F = tau n_F - U_F (g~_p + sum_U B_i u_i) on the cosines.
    Zero rows have no constraint. Returns w with J^T w = d: w_p = 1 / s_p,
    w_i = x_i / |g_i|."""
    j = np.asarray(j, np.float64)
    k = len(j)
    s = np.linalg.norm(j, axis=1) if scales is None else np.asarray(scales, np.float64)
    normalised = np.where(s[:, None] > 0, j / np.where(s > 0, s, 1.0)[:, None], 0.0)
    u, n = unit_rows(normalised)
    others = [i for i in range(k) if i != primary and n[i] > 0]
    target = normalised[primary]
    bound = max_correction * (n[primary] + n)
    best, best_value = None, np.inf
    for states in itertools.product(("free", "zero", "bound"), repeat=len(others)):
        free = [i for i, state in zip(others, states) if state == "free"]
        at_bound = [i for i, state in zip(others, states) if state == "bound"]
        x = np.zeros(k)
        x[at_bound] = bound[at_bound]
        if free:
            c = u[free] @ u[free].T
            if np.linalg.cond(c) > 1e10:
                continue
            x[free] = np.linalg.solve(c, tau * n[free] - u[free] @ (target + u.T @ x))
            if np.any(x[free] < 0) or np.any(x[free] > bound[free]):
                continue
        d = target + u.T @ x
        slack = u[others] @ d - tau * n[others]
        tolerance = 1e-9 * max(1.0, np.linalg.norm(d))
        zero = [m for m, state in enumerate(states) if state == "zero"]
        capped = [m for m, state in enumerate(states) if state == "bound"]
        if np.any(slack[zero] < -tolerance) or np.any(slack[capped] > tolerance):
            continue
        # the penalty form's value: the KKT point minimises it
        value = 0.5 * np.sum((d - target) ** 2) + bound[others] @ np.maximum(-slack, 0.0)
        if value < best_value:
            best, best_value = x, value
    if best is None:
        raise ValueError("no KKT point found")
    w = np.where(n > 0, best / np.where(n > 0, n, 1.0) / np.where(s > 0, s, 1.0), 0.0)
    w[primary] = 1.0 / s[primary] if s[primary] > 0 else 0.0
    return w


#: name -> (function returning weights, or the update when `returns_update`)
WEIGHTS = {
    "mean": mean, "sum": total, "imtl_g": imtl_g, "imtl": imtl_g, "mgda": mgda,
    "cagrad": cagrad, "nash_mtl": nash_mtl, "fairgrad": fairgrad,
    "aligned_mtl": aligned_mtl, "upgrad": upgrad, "dualproj": dualproj,
    "constant": total,  # its default weights, all 1
}
UPDATES = {"config": config}


def update(name, j, **params):
    """The (P,) update of method `name` on Jacobian `j` (float64)."""
    j = np.asarray(j, np.float64)
    if name in UPDATES:
        return UPDATES[name](j, **params)
    return j.T @ WEIGHTS[name](j, **params)
