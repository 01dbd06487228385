"""CR-MOGM: an exponential moving average of a Gramian weighting's weights (Zhou et al.,
NeurIPS 2022)."""

import keras
import tensorflow as tf

from lossbalance.strategies import registry
from lossbalance.strategies.arguments import check_number
from lossbalance.strategies.base import GramianWeighting
from lossbalance.strategies.registry import register


def _base_config(strategy):
    """A config dict from which `registry.get` rebuilds `strategy` (same class and
    hyper-parameters): {"name": <registered name>, **hyper-parameters}, or Keras'
    serialised form for a class not found under its registry name."""
    cls = type(strategy)
    name = cls.registry_name
    if name is not None and registry.lookup(name) is cls:
        params = {k: v for k, v in strategy.get_config().items() if k != "name"}
        return {"name": name, **params}
    return keras.saving.serialize_keras_object(strategy)


@register("crmogm", aliases=("cr_mogm",))
class CRMOGM(GramianWeighting):
    """Smooth any Gramian weighting's weights with an exponential moving average.

    Formula: with w^(G_t) the weights the wrapped strategy `base` gives the step's Gramian
    G_t, the weights used at step t are
        w_1 = w^(G_1),     w_t = alpha w_{t-1} + (1 - alpha) w^(G_t)   (t > 1),
    and the update is J_t^T w_t. Gradient manipulation methods (MGDA, PCGrad, CAGrad, ...)
    choose their weights from the step's mini-batch gradients alone, so the weights are
    correlated with the gradients they multiply: the paper gives a convex two-objective
    instance on which such stochastic methods fail to converge to Pareto optimal
    solutions for that reason, and proves convergence once the weights are an exponential
    average over past steps ("correlation-reduced" MOGM).

    Design: one wrapper of any registered Gramian weighting, by name or config
    (`{"name": "crmogm", "base": {"name": "cagrad", "c": 0.5}, "alpha": 0.9}`), rather
    than a `smooth=` option on every Gramian weighting: the moving average is the same
    for all of them and needs its own state (a variable), which a wrapper adds once instead
    of to every strategy's constructor, config and state; it composes with strategies
    registered later, plugins included; and it reads like the paper, which presents
    CR-MOGM as a modifier of a base method (TorchJD's `CRMOGMWeighting` wraps a weighting
    in the same way).

    State: the average w_t (float64) and a step counter are variables (aggregation
    "only_first_replica"), saved and restored with the model beside the base strategy's
    own state; the first step starts the average at w^(G_1). The base strategy's
    properties pass through (gradient levels, loss floors, whether it reads the losses,
    its loss transform); `non_conflicting` and `scale_invariant` do not: an average of
    past weights does not promise either for the current gradients. The weight logged per
    task is w_t.

    Defaults and where implementations differ: `base="mgda"` (the paper's leading
    example), `alpha=0.9` (TorchJD's `CRMOGMWeighting`, whose recurrence and first step are
    these). The paper's analysis lets the coefficient grow towards 1 as the learning rate
    decays (TorchJD's reading of its Corollary 1: alpha_t = 1 - lr_t / lr_0); here it is
    a constant. alpha = 0 gives the base strategy itself; alpha = 1 keeps the first step's
    weights for ever.

    Args:
        base: the Gramian weighting whose weights are averaged: a registered name, a config
            dict or a `GramianWeighting` instance (default "mgda").
        alpha: weight of the past average, in [0, 1] (default 0.9).

    Reference: S. Zhou, W. Zhang, J. Jiang, W. Zhong, J. Gu, W. Zhu, "On the Convergence
    of Stochastic Multi-Objective Gradient Manipulation and Beyond", NeurIPS 2022.
    """

    def __init__(self, base="mgda", alpha=0.9, **kwargs):
        super().__init__(**kwargs)
        self.alpha = check_number("alpha", alpha, minimum=0.0, maximum=1.0)
        strategy = registry.get(base)
        if strategy.family != "gramian":
            raise ValueError(
                f"`base` must be a Gramian weighting (a strategy that maps the tasks' "
                f"Gramian to weights); {strategy.registry_name or strategy.name!r} is a "
                f"{strategy.family!r} strategy. Gramian weightings: "
                f"{', '.join(_gramian_names())}.")
        self.base = strategy

    # -- what the base strategy decides ---------------------------------------------------

    @property
    def gradient_levels(self):
        return self.base.gradient_levels

    @property
    def uses_losses(self):
        return self.base.uses_losses

    @property
    def allows_zero_loss_weights(self):
        return self.base.allows_zero_loss_weights

    @property
    def uses_independent_halves(self):
        return self.base.uses_independent_halves

    @property
    def uses_item_norms(self):
        return self.base.uses_item_norms

    def update_with_item_norms(self, norms):
        self.base.update_with_item_norms(norms)

    def loss_floors(self):
        return self.base.loss_floors()

    def loss_floor_fix(self):
        return self.base.loss_floor_fix()

    def transform_losses(self, losses):
        return self.base.transform_losses(losses)

    def extra_loss(self, losses):
        return self.base.extra_loss(losses)

    def on_epoch_end(self, epoch):
        self.base.on_epoch_end(epoch)

    # -- state and weights -----------------------------------------------------------------

    def bind(self, task_names):
        self.base.bind(task_names)  # its own checks first (e.g. Krum's number of tasks)
        super().bind(task_names)

    def build_state(self, num_tasks):
        self.average = self.add_state("average", (num_tasks,), dtype="float64")
        self.step = self.add_state("step", dtype="int64")

    def gramian_weights(self, gramian, losses):
        # the base's solver compiled where the model would compile it: the model does not
        # compile this strategy's own `gramian_weights`, which writes the average
        solve = self.base.compiled_solver() or self.base.gramian_weights
        fresh = tf.cast(solve(gramian, losses), tf.float64)
        previous, step = self.read(self.average), self.read(self.step)
        average = tf.where(tf.equal(step, 0), fresh,
                           self.alpha * previous + (1.0 - self.alpha) * fresh)
        self.write(self.average, average)
        self.write(self.step, step + 1)
        return tf.cast(average, gramian.dtype)

    def get_config(self):
        return {**super().get_config(), "base": _base_config(self.base),
                "alpha": self.alpha}


def _gramian_names():
    return [n for n in registry.available() if registry.lookup(n).family == "gramian"]
