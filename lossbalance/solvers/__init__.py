"""Small in-graph numerical routines on K x K problems.

Every gradient-level strategy reduces to a problem on the K x K Gramian G = J J^T of the task
gradients (K tasks, rarely more than 40). Published implementations send these problems to
scipy, cvxpy or quadprog on the host at every step; here they are TensorFlow ops with bounded
loops (`tf.while_loop` with an iteration cap, or fixed unrolled counts), so they run inside a
compiled training step, under `jit_compile=True` and on any device.

Conventions shared by the routines:
* Inputs may be float32 or float64; the work is done in float64 and the result is cast back
  to the input's dtype (the problems are tiny, and Gramians of badly scaled gradients span
  many orders of magnitude).
* Tasks on different scales: G = D C D, with D = diag(|g_k|) and C the cosines of the task
  gradients (`cosine_gramian`). The condition number of G is that of C times the square of
  the gradients' scale ratio (1e4 apart: 1e8 more), while C, known to the gradients' own
  relative precision, does not depend on their scales. So nothing here decomposes, inverts,
  regularises or truncates G itself: rank decisions and ridges are made on C, systems are
  solved on C with the scales carried in vectors, and tolerances are relative to each
  task's own scale. The one eigendecomposition of G a method needs (Aligned-MTL) is the
  SVD of a graded factor of G (`graded_eigh`), accurate to each eigenvalue's own size.
* Degenerate inputs (a zero Gramian, zero rows, rank deficiency) give finite answers.

Modules: gramians.py (the cosines, rank cuts, graded eigenpairs), simplex.py (projection,
min-norm point, CAGrad), box.py (box QPs, dual cone), barrier.py (Nash-MTL, FairGrad).

Routines:
    normalize_gramian          G / (trace / K), with the scale
    cosine_gramian             G = D C D: the cosines C and the norms d
    cosine_pinv                pseudo-inverse of C, dependent directions cut on C
    graded_eigh                eigenpairs of G on the range of C, each to its own precision
    project_simplex            Euclidean projection onto the probability simplex (sort-based)
    min_norm_simplex           argmin_{w in simplex} w^T G w  (Wolfe's active-set method)
    box_qp                     argmin_{w >= u} w^T G w, batched over u (accelerated projected
                               gradient + primal-dual active-set polish)
    dual_cone_weights          box_qp on the cosines: projections onto the dual cone
    nonnegative_qp             argmin_{0 <= x <= h} x^T A x / 2 + b^T x, batched over b
                               (primal-dual active set + projected-gradient fallback; PCD)
    power_barrier_solve        w > 0 with G w = c w^(-1/alpha) (damped Newton)
    simplex_norm_penalty_min   argmin_{w in simplex} b^T w + c sqrt(w^T G w) (CAGrad's dual)
    max_min_in_ball            CAGrad: max_d min_k g_k . d near J^T m (dual, then exact KKT)
"""

from lossbalance.solvers.barrier import power_barrier_solve
from lossbalance.solvers.box import box_qp, dual_cone_weights, nonnegative_qp
from lossbalance.solvers.gramians import (
    GRADIENT_EPS, TINY, cosine_gramian, cosine_pinv, divide_by_norms, finite_or_zero,
    graded_eigh, normalize_gramian)
from lossbalance.solvers.simplex import (
    max_min_in_ball, min_norm_simplex, project_simplex, simplex_norm_penalty_min)

__all__ = ["GRADIENT_EPS", "TINY", "box_qp", "cosine_gramian", "cosine_pinv",
           "divide_by_norms", "dual_cone_weights", "finite_or_zero", "graded_eigh",
           "max_min_in_ball", "min_norm_simplex", "nonnegative_qp", "normalize_gramian",
           "power_barrier_solve", "project_simplex", "simplex_norm_penalty_min"]
