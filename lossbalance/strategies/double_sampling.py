"""MoDo and SDMGrad: weights from two independent samples of the task gradients.

Both methods need A = J1 J2^T from two independent mini-batches: its expectation is the
Gramian of the expected gradients, which G = J J^T of one batch overestimates by the
gradients' variance. `BalancedModel` gives them the two halves of each batch (even and odd
rows; `lossbalance.levels.halves`), and applies J^T w of the whole batch.
"""

import tensorflow as tf

from lossbalance import solvers
from lossbalance.strategies.arguments import check_number
from lossbalance.strategies.base import GramianWeighting
from lossbalance.strategies.registry import register


def _normalized(cross, scale_free):
    """A, or A divided by (mean_k sqrt|A_kk|)^2 (the CAGrad authors' normalisation)."""
    a = solvers.finite_or_zero(tf.cast(cross, tf.float64))
    if not scale_free:
        return a
    scale = tf.reduce_mean(tf.sqrt(tf.abs(tf.linalg.diag_part(a)))) ** 2
    return tf.where(scale > 0, a / tf.where(scale > 0, scale, 1.0), a)


class _DoubleSampling(GramianWeighting):
    uses_independent_halves = True
    gradient_levels = ("parameters",)

    def build_state(self, num_tasks):
        self.task_weights = self.add_state(
            "task_weights", (num_tasks,),
            initializer=lambda shape, dtype=None: tf.fill(shape, 1.0 / num_tasks))

    def _check_scale_free(self, scale_free):
        if not isinstance(scale_free, bool):
            raise TypeError(f"`scale_free` must be True or False; got {scale_free!r}.")
        return scale_free


@register("modo")
class MoDo(_DoubleSampling):
    """Multi-objective gradient descent with double sampling: a projected gradient step on
    MGDA's weights per training step, from two independent gradient samples.

    Formula, with A = J1 J2^T from two independent halves of the batch and the weights
    lambda on the simplex (start 1/K):
        lambda <- Pi_simplex(lambda - gamma (A lambda + rho lambda)),   update J^T lambda,
    J the whole batch's task gradients. A lambda is an unbiased estimate of the gradient in
    lambda of (1/2) |E[J]^T lambda|^2, MGDA's min-norm objective, so lambda tracks the
    min-norm weights without the bias a single batch's Gramian has.

    Defaults: gamma=0.1, rho=0.1 (LibMTL's `gamma_modo`, `rho_modo`). Where this differs:
    the paper draws three batches (two for lambda, a third for the update) and LibMTL adds
    the two samples' gradients for the update; here lambda comes from the two halves and
    the update from the whole batch (the mean of the halves' gradients for mean-reduced
    losses). By default A is divided by (mean_k sqrt|A_kk|)^2, so that gamma does not
    depend on the gradients' scale (`scale_free=True`; False: A as is, as LibMTL). The
    weights are state (saved with the model); they change only in training steps.

    Args:
        gamma: step size of lambda, > 0.
        rho: ridge, >= 0.
        scale_free: normalise A (default True).

    Reference: L. Chen, H. Fernando, Y. Ying, T. Chen, "Three-Way Trade-Off in
    Multi-Objective Learning: Optimization, Generalization and Conflict-Avoidance",
    NeurIPS 2023 (JMLR 2024).
    """

    def __init__(self, gamma=0.1, rho=0.1, scale_free=True, **kwargs):
        super().__init__(**kwargs)
        self.gamma = check_number("gamma", gamma, minimum=0.0, strict=True)
        self.rho = check_number("rho", rho, minimum=0.0)
        self.scale_free = self._check_scale_free(scale_free)

    def gramian_weights(self, gramian, losses):
        a = _normalized(gramian, self.scale_free)
        lam = tf.cast(self.read(self.task_weights), tf.float64)
        lam = solvers.project_simplex(
            lam - self.gamma * (tf.linalg.matvec(a, lam) + self.rho * lam))
        self.write(self.task_weights, lam)
        return tf.cast(lam, gramian.dtype)

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma, "rho": self.rho,
                "scale_free": self.scale_free}


@register("sdmgrad")
class SDMGrad(_DoubleSampling):
    """Stochastic direction-oriented multi-objective gradient: MGDA's weights pulled toward a
    preferred direction, solved by a few SGD steps from two independent samples.

    Formula, with A = J1 J2^T from two independent halves of the batch, the preference
    w~ = 1/K (the mean gradient) and the weights w on the simplex (kept between steps,
    start 1/K): `n_iter` steps of SGD with momentum on (1/2) |J^T (w + lamda w~)|^2,
        v <- momentum v + A (w + lamda w~),   w <- Pi_simplex(w - lr v)   (v starts at 0),
    then the update is J^T (w + lamda w~) / (1 + lamda): between MGDA's min-norm direction
    (lamda = 0) and the mean gradient (lamda -> infinity).

    Defaults: lamda=0.3 (the authors' experiments, LibMTL and TorchJD; the authors' class
    default is 0.6), n_iter=20, lr=10, momentum=0.5 (TorchJD's). Where implementations
    differ: LibMTL keeps the inner optimizer's momentum across steps, TorchJD restarts it
    at every call (followed here); the authors normalise the Gramian by
    (mean_k sqrt(G_kk))^2 as in CAGrad's code, followed here by default
    (`scale_free=True`), which makes lr independent of the gradients' scale; TorchJD does
    not (`scale_free=False`). The update comes from the whole batch (the authors reuse
    one of the two batches).

    Args:
        lamda: pull toward the preference, >= 0.
        n_iter: inner SGD steps, >= 1.
        lr: inner step size, > 0.
        momentum: inner momentum, in [0, 1).
        scale_free: normalise A (default True).

    Reference: P. Xiao, H. Ban, K. Ji, "Direction-oriented Multi-objective Learning:
    Simple and Provable Stochastic Algorithms", NeurIPS 2023.
    """

    def __init__(self, lamda=0.3, n_iter=20, lr=10.0, momentum=0.5, scale_free=True,
                 **kwargs):
        super().__init__(**kwargs)
        self.lamda = check_number("lamda", lamda, minimum=0.0)
        self.n_iter = check_number("n_iter", n_iter, minimum=1, integer=True)
        self.lr = check_number("lr", lr, minimum=0.0, strict=True)
        self.momentum = check_number("momentum", momentum, minimum=0.0)
        if self.momentum >= 1.0:
            raise ValueError(f"`momentum` must be < 1; got {momentum!r}.")
        self.scale_free = self._check_scale_free(scale_free)

    def gramian_weights(self, gramian, losses):
        a = _normalized(gramian, self.scale_free)
        k = self.num_tasks
        preference = tf.fill([k], tf.constant(1.0 / k, tf.float64))
        w = tf.cast(self.read(self.task_weights), tf.float64)
        velocity = tf.zeros([k], tf.float64)
        for _ in range(self.n_iter):
            velocity = self.momentum * velocity + tf.linalg.matvec(
                a, w + self.lamda * preference)
            w = solvers.project_simplex(w - self.lr * velocity)
        self.write(self.task_weights, w)
        return tf.cast((w + self.lamda * preference) / (1.0 + self.lamda), gramian.dtype)

    def get_config(self):
        return {**super().get_config(), "lamda": self.lamda, "n_iter": self.n_iter,
                "lr": self.lr, "momentum": self.momentum, "scale_free": self.scale_free}
