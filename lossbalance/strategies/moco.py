"""MoCo: multi-objective gradient correction (Fernando et al., 2023)."""

import tensorflow as tf

from lossbalance import solvers
from lossbalance.strategies.arguments import check_choice, check_number
from lossbalance.strategies.parameter_state import ParameterStateAggregator
from lossbalance.strategies.registry import register

NORMALIZATIONS = ("none", "loss")
PROJECTIONS = ("simplex", "softmax")


@register("moco")
class MoCo(ParameterStateAggregator):
    """MGDA with tracked gradients and a single-step weight update (bias-corrected MGDA).

    Formula, at step t = 1, 2, ... with task gradients h_k (optionally normalised to
    h_k = L_k g_k / |g_k|), tracked gradients y_k (rows of Y, start 0) and weights lambda
    (start 1/K):
        y_k <- y_k - beta_t (y_k - h_k),                      beta_t = beta / t^beta_sigma,
        lambda <- Pi(lambda - gamma_t (Y Y^T + rho I) lambda),  gamma_t = gamma / t^gamma_sigma,
        update = Y^T lambda.
    The tracking variable removes the stochastic bias of MGDA's min-norm weights.

    Defaults, LibMTL's port of the authors' code: beta=0.5, beta_sigma=0.5, gamma=0.1,
    gamma_sigma=0.5, rho=0. Where they differ: the paper projects lambda onto the simplex
    (`projection="simplex"`, default); LibMTL applies a softmax (`projection="softmax"`).
    LibMTL normalises each gradient to L_k g_k / |g_k| before tracking
    (`normalization="loss"`); the paper does not (`normalization="none"`, default). The
    paper also projects y_k onto a bounded set; that bound is not applied here. One
    deviation by default: lambda's step uses Y Y^T divided by its mean diagonal, so that
    gamma does not depend on the gradients' scale (`scale_free=True`); `scale_free=False`
    uses Y Y^T as is, as the paper and LibMTL do.

    State: Y (K x P), lambda (K,) and the step counter are non-trainable variables; Y is
    sized by the shared parameter count P, so it is created by `build_parameter_state(P)`:
    by `BalancedModel` before its first step, or on first use from the Jacobian's width,
    and rebuilt from the config (`num_parameters`) when a saved model loads (see
    `lossbalance.strategies.parameter_state`).

    Args:
        beta, beta_sigma, gamma, gamma_sigma: step sizes and decay exponents (>= 0).
        rho: ridge on lambda's update (>= 0).
        normalization: "none" or "loss".
        projection: "simplex" or "softmax".
        scale_free: normalise Y Y^T in lambda's step (default True).

    Reference: H. D. Fernando, H. Shen, M. Liu, S. Chaudhury, K. Murugesan, T. Chen,
    "Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent Approach",
    ICLR 2023.
    """

    def __init__(self, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0,
                 normalization="none", projection="simplex", scale_free=True, **kwargs):
        super().__init__(**kwargs)
        self.beta = check_number("beta", beta, minimum=0.0, maximum=1.0)
        self.beta_sigma = check_number("beta_sigma", beta_sigma, minimum=0.0)
        self.gamma = check_number("gamma", gamma, minimum=0.0)
        self.gamma_sigma = check_number("gamma_sigma", gamma_sigma, minimum=0.0)
        self.rho = check_number("rho", rho, minimum=0.0)
        self.normalization = check_choice("normalization", normalization, NORMALIZATIONS)
        self.projection = check_choice("projection", projection, PROJECTIONS)
        if not isinstance(scale_free, bool):
            raise TypeError(f"`scale_free` must be True or False; got {scale_free!r}.")
        self.scale_free = scale_free

    @property
    def uses_losses(self):
        return self.normalization == "loss"

    def build_state(self, num_tasks):
        self.step = self.add_state("step")
        self.task_weights = self.add_state(
            "task_weights", (num_tasks,),
            initializer=lambda shape, dtype=None: tf.fill(shape, 1.0 / num_tasks))

    def create_parameter_state(self, num_tasks, num_parameters):
        self.tracked = self.add_state("tracked", (num_tasks, num_parameters))

    def aggregate(self, jacobian, losses):
        self.check_parameter_state(jacobian)
        j = tf.convert_to_tensor(jacobian)
        dtype = j.dtype
        j = solvers.finite_or_zero(j)
        if self.normalization == "loss":
            norms = tf.norm(j, axis=1, keepdims=True)
            scale = tf.math.divide_no_nan(tf.cast(losses, dtype)[:, None], norms)
            j = j * scale
        step = self.read(self.step) + 1.0
        self.write(self.step, step)
        t = tf.cast(step, dtype)
        beta = self.beta / t ** self.beta_sigma
        gamma = self.gamma / t ** self.gamma_sigma
        y = tf.cast(self.read(self.tracked), dtype)
        y = y - beta * (y - j)
        self.write(self.tracked, y)
        lam = tf.cast(self.read(self.task_weights), dtype)
        gram = tf.matmul(y, y, transpose_b=True) + self.rho * tf.eye(self.num_tasks,
                                                                      dtype=dtype)
        if self.scale_free:
            trace = tf.linalg.trace(gram)
            gram = tf.math.divide_no_nan(gram, trace / self.num_tasks)
        raw = lam - gamma * tf.linalg.matvec(gram, lam)
        lam = tf.nn.softmax(raw) if self.projection == "softmax" else solvers.project_simplex(raw)
        self.write(self.task_weights, lam)
        return tf.linalg.matvec(y, lam, transpose_a=True), lam

    def get_config(self):
        return {**super().get_config(), "beta": self.beta, "beta_sigma": self.beta_sigma,
                "gamma": self.gamma, "gamma_sigma": self.gamma_sigma, "rho": self.rho,
                "normalization": self.normalization, "projection": self.projection,
                "scale_free": self.scale_free}
