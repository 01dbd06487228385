"""The strategy contracts.

A strategy decides how K per-task losses, or their gradients, become one update. Published
methods fall into three families, and each family is one small contract:

* `LossWeighting` maps the K task losses to weights w; the model minimises
  sum_k w_k L_k (+ an optional extra term) with one backward pass, as plain Keras does.
* `GramianWeighting` maps the K x K Gramian G = J J^T of the task gradients on the shared
  parameters to weights w; the shared update is J^T w. Its solver sees a K x K matrix
  whatever the model size.
* `JacobianAggregator` needs the K x P Jacobian itself (element-wise methods).

A strategy is a `keras.layers.Layer` so that its state (learned variances, moving averages,
RNG seeds, a weight optimizer) is saved and restored with the model. `BalancedModel.compile`
calls `bind(task_names)`, which creates that state; invalid hyper-parameters raise in
`__init__`, before any training.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence

import keras
import tensorflow as tf

from lossbalance import compat
from lossbalance.strategies import staging
from lossbalance.strategies.arguments import check_number


# Keyword arguments a strategy passes on to `keras.layers.Layer` (from saved configs).
_LAYER_ARGUMENTS = frozenset({"dtype", "trainable", "autocast"})


class Strategy(staging.StagedState, keras.layers.Layer):
    """Base class of every balancing strategy. Subclass one of the three families. Its
    state changes go through `read`/`write`/`defer` (`staging.StagedState`)."""

    #: Canonical registry name, set by `@register`.
    registry_name: str | None = None
    #: "loss", "gramian" or "jacobian": which contract the strategy implements.
    family: str = ""
    #: Where a gradient-level strategy is defined: at "parameters" (per-task gradients of
    #: the shared parameters) and/or at "representation" (with respect to the shared
    #: representation; `BalancedModel.compile(gradients=...)`).
    gradient_levels: tuple[str, ...] = ("parameters", "representation")
    #: Whether a task may have `compile(loss_weights=...)` 0. Only strategies that scale
    #: each loss by a weight independent of the losses allow it; for the others a loss held
    #: at 0 breaks the balance (a zero gradient makes MGDA's update zero, a log of 0 or a
    #: loss ratio 0 / 0 makes weights infinite or NaN).
    allows_zero_loss_weights: bool = False
    #: The lowest task loss the method is defined for, or None for any. 0 for methods that
    #: take the logarithm of a loss (a negative one is clamped, which gives the task a
    #: weight of about 1 / epsilon) or whose objective is unbounded below for a negative
    #: loss (learned loss scales). See `check_losses`.
    loss_floor: float | None = None
    #: Whether the update never conflicts with a task: its cosine with every task's
    #: gradient is >= 0 (up to rounding) for any gradients, by the method's definition.
    #: `tests/test_scales.py` checks it for every registered strategy that declares it, at
    #: scale ratios up to 1e6 between tasks and near Pareto stationarity.
    non_conflicting: bool = False
    #: Whether the update's direction stays the same when one task's loss (and so its
    #: gradient) is multiplied by a positive constant: the method does not depend on the
    #: tasks' scales. Checked by `tests/test_scales.py` where declared.
    scale_invariant: bool = False

    # -- inputs a step gives only the strategies that ask for them (the hooks below) -------
    #: When True, `BalancedModel` calls `update_after_step(losses_before, losses_after)`
    #: after each optimizer update, with the same batch's task losses recomputed by one
    #: extra forward pass (FAMO).
    uses_post_step_losses: bool = False
    #: When True, `BalancedModel` calls `update_with_gradient_norms(norms, losses)` with
    #: each task's gradient norm at one shared layer, `layer` (by name; None for the last
    #: layer every task depends on) (GradNorm).
    uses_layer_gradients: bool = False
    layer: str | None = None
    #: When True (representation level), `BalancedModel` calls
    #: `update_with_item_norms(norms)` before the weights, with each task's gradient norm
    #: at z per batch item, averaged over the global batch (the output balancer).
    uses_item_norms: bool = False
    #: When True, the strategy keeps state sized by the number of shared parameters P,
    #: created by `build_parameter_state(P)` before the first step (see
    #: `lossbalance.strategies.parameter_state`); `num_parameters` is P once known.
    needs_parameter_state: bool = False
    num_parameters: int | None = None
    #: Whether a gradient-level strategy reads the task losses (MGDA's loss
    #: normalisations); `lossbalance.aggregate` then asks for them.
    uses_losses: bool = False
    #: The fewest tasks the method (with these hyper-parameters) is defined for: `bind`
    #: refuses fewer (Krum, TrimmedMean need 3 or more); the comparison runner does not run
    #: it on benchmarks with fewer tasks.
    min_tasks: int = 1
    #: Hyper-parameters the method has no default for (PCD's `primary` task): the name
    #: alone does not make the strategy (`get` raises, saying what to give), and code
    #: that makes every registered strategy by name (the comparison runner's
    #: `--strategies all`) leaves it out, saying how to give them (`pcd:primary=cls`).
    required_arguments: tuple[str, ...] = ()
    #: When True (a Gramian weighting, parameter level), `BalancedModel` splits each batch
    #: into two independent halves (even and odd rows) and `gramian_weights` receives
    #: A = J1 J2^T of their task gradients instead of G (`lossbalance.levels.halves`);
    #: the update is J^T w of the whole batch (MoDo, SDMGrad). Given one Jacobian
    #: (`lossbalance.aggregate`), A = G.
    uses_independent_halves: bool = False

    def __init__(self, name=None, groups=None, **kwargs):
        unknown = sorted(set(kwargs) - _LAYER_ARGUMENTS)
        if unknown:
            accepted = [p for p in inspect.signature(type(self).__init__).parameters
                        if p not in ("self", "kwargs", "name")]
            raise TypeError(
                f"{type(self).__name__} got unknown hyper-parameter(s) {unknown}; its "
                f"hyper-parameters are {accepted}."
            )
        super().__init__(name=name or self.registry_name or None, **kwargs)
        self._task_names: tuple[str, ...] | None = None
        # Known from a saved config: the copies are made in `bind`, so saved weights load.
        self._configured_groups = None if groups is None else check_number(
            "groups", groups, minimum=1, integer=True)
        self.group_copies = []

    # -- binding to a model's tasks ------------------------------------------------------

    @property
    def task_names(self) -> tuple[str, ...]:
        if self._task_names is None:
            raise RuntimeError(
                f"Strategy {self.name!r} is not bound to any tasks yet; it is bound by "
                "BalancedModel.compile() (or call strategy.bind(task_names))."
            )
        return self._task_names

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def bind(self, task_names: Sequence[str]) -> None:
        """Attach the strategy to a model's tasks and create its state (once).

        Re-binding to the same tasks is a no-op, so re-compiling keeps learned state.
        """
        task_names = tuple(task_names)
        if self._task_names is not None:
            if self._task_names != task_names:
                raise ValueError(
                    f"Strategy {self.name!r} is already bound to tasks "
                    f"{list(self._task_names)}; create a new strategy for tasks "
                    f"{list(task_names)}."
                )
            return
        if not task_names:
            raise ValueError("A strategy needs at least one task.")
        self._task_names = task_names
        self.build_state(len(task_names))
        self.built = True
        if self._configured_groups is not None:
            self.build_groups(self._configured_groups)

    # -- grouped balancing (`compile(grouping=...)`, `lossbalance.levels.groups`) ---------

    @property
    def num_groups(self) -> int | None:
        """The number of parameter groups balanced separately, once known (else None)."""
        return 1 + len(self.group_copies) if self._configured_groups or self.group_copies \
            else None

    def group_strategies(self) -> list:
        """One strategy per group: this one for the first, copies (the same
        hyper-parameters, each its own state) for the others. (A method: Keras' saving
        walks properties, and this list holds the strategy itself.)"""
        return [self, *self.group_copies]

    def build_groups(self, count: int) -> None:
        """Make the copies for `count` groups once (eagerly, also inside a traced step);
        the count is then part of the config, so a saved model makes them again."""
        count = int(count)
        if self.num_groups == count and len(self.group_copies) == count - 1:
            return
        if self.group_copies:
            raise ValueError(
                f"Strategy {self.name!r} already balances {self.num_groups} parameter "
                f"groups; this model has {count}. Give this model a new strategy.")
        with compat.unlocked_tracking(self), tf.init_scope():
            copies = [self.group_member(index) for index in range(1, count)]
            for copy in copies:
                copy.bind(self.task_names)
            self.group_copies = copies
        self._configured_groups = count

    def group_member(self, index: int) -> Strategy:
        """The strategy of group `index` >= 1: by default a copy with these
        hyper-parameters (`group_member_config`) and its own state."""
        return type(self)(name=f"{self.name}_group_{index}",
                          **self.group_member_config(index))

    def group_member_config(self, index: int) -> dict:
        """The config of group `index`'s copy: these hyper-parameters (a strategy whose
        state is sized by its group overrides it)."""
        return {k: v for k, v in self.get_config().items() if k not in ("name", "groups")}

    def build_state(self, num_tasks: int) -> None:
        """Create the strategy's variables. Override in stateful strategies."""

    def add_state(self, name, shape=(), initializer="zeros", dtype=None):
        """A non-trainable state variable, saved with the model; under tf.distribute every
        replica computes the same value and the first replica's is kept."""
        return self.add_weight(shape=shape, name=name, initializer=initializer, dtype=dtype,
                               trainable=False, aggregation="only_first_replica")

    def add_seed_generator(self, seed=None) -> keras.random.SeedGenerator:
        """A Keras `SeedGenerator` whose state is saved and restored with the model.

        Keras saves no `SeedGenerator` state by itself; tracking it as a non-trainable
        weight makes a resumed run draw the same random numbers as an uninterrupted one.
        `keras.utils.set_random_seed` seeds it when `seed` is None; another `seed` than an
        int or None raises.
        """
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"`seed` must be an int or None; got {seed!r}.")
        index = self.__dict__.get("_seed_generator_count", 0)
        self.__dict__["_seed_generator_count"] = index + 1
        # An explicit name keeps the state's path stable between a model and its reload.
        generator = compat.StagedSeedGenerator(self, seed, name=f"{self.name}_seed_{index}")
        compat.track_variable(self, generator.state)
        return generator

    def transform_losses(self, losses: tf.Tensor) -> tf.Tensor:
        """(K,) task losses -> the (K,) losses the strategy balances (default: unchanged).

        Must be element-wise: entry k may depend on losses[k] and the strategy's variables
        only (IMTL-L's learned scales, log losses), never on another task's loss. Called
        inside the gradient tape.
        """
        return losses

    def on_epoch_end(self, epoch: int) -> None:
        """Called eagerly by `BalancedModel.fit` after each epoch (e.g. DWA's history)."""

    def update_after_step(self, losses_before: tf.Tensor, losses_after: tf.Tensor) -> None:
        """With `uses_post_step_losses`: the same batch's (K,) losses before and after the
        optimizer's update, global values, transformed as the step's were."""
        raise NotImplementedError(f"{type(self).__name__} sets uses_post_step_losses "
                                  "and must implement update_after_step.")

    def update_with_gradient_norms(self, norms: tf.Tensor, losses: tf.Tensor) -> None:
        """With `uses_layer_gradients`: each task's gradient norm at `layer` and the (K,)
        task losses, global values."""
        raise NotImplementedError(f"{type(self).__name__} sets uses_layer_gradients "
                                  "and must implement update_with_gradient_norms.")

    def update_with_item_norms(self, norms: tf.Tensor) -> None:
        """With `uses_item_norms`: the (K,) mean per-item gradient norms at z."""
        raise NotImplementedError(f"{type(self).__name__} sets uses_item_norms "
                                  "and must implement update_with_item_norms.")

    def build_parameter_state(self, num_parameters: int) -> None:
        """With `needs_parameter_state`: create the state sized by P shared parameters."""

    def loss_floors(self):
        """The K per-task values of `loss_floor` (None if the method has none)."""
        return None if self.loss_floor is None else [self.loss_floor] * self.num_tasks

    def check_losses(self, mean_losses: Mapping[str, float], when: str) -> None:
        """Raise a ValueError naming the task and the fix if a task's mean loss (as the
        strategy sees it: after `compile(loss_weights=...)`) is below `loss_floors()`.

        `BalancedModel.fit` calls it after the first batch and after every epoch, from the
        logged means, so the check costs the training step nothing; a single negative batch
        inside an epoch with a positive mean goes unnoticed. Non-finite means are left to
        `compile(nonfinite=...)`.
        """
        floors = self.loss_floors()
        if floors is None:
            return
        below = []
        for task, floor in zip(self.task_names, floors):
            mean = mean_losses.get(task)
            if mean is not None and math.isfinite(mean) and mean < floor:
                below.append(f"{task!r} averaged {mean:.4g} < {floor:g}")
        if below:
            listed = ", ".join(below)
            raise ValueError(
                f"Task loss(es) below what strategy {self.registry_name or self.name!r} "
                f"is defined for, {when}: {listed}. {self.loss_floor_fix()}")

    def loss_floor_fix(self) -> str:
        """What the user can do about losses below `loss_floors()` (for `check_losses`)."""
        return (
            "This method needs every task's loss to be >= 0 (its docstring says why). Use a "
            "non-negative loss for that task (e.g. a negative log-likelihood plus a constant "
            "that bounds it below), or a strategy defined for losses of any sign, such as "
            "'fixed', 'rlw' or a gradient-level one ('pcgrad', 'mgda', ...).")

    def get_config(self):
        config = super().get_config()
        for key in ("trainable", "dtype"):
            config.pop(key, None)
        if self.num_groups is not None:
            config["groups"] = self.num_groups
        return config

    def __repr__(self):
        params = {k: v for k, v in self.get_config().items() if k != "name"}
        args = ", ".join(f"{k}={v!r}" for k, v in params.items())
        return f"{type(self).__name__}({args})"


class LossWeighting(Strategy):
    """Weights computed from the task losses; one backward pass of sum_k w_k L_k.

    Subclasses implement `loss_weights` (and `extra_loss` if they add a term), or
    `weighting` when the two share work: `loss_weights` and `extra_loss` then default to
    its two parts. The weights are used as given: a strategy whose
    weights must not receive gradient (most of them) wraps them in `tf.stop_gradient`; a
    strategy that learns its weights with the model (uncertainty weighting) leaves them
    differentiable and owns trainable variables, which the model's optimizer updates.
    """

    family = "loss"

    def loss_weights(self, losses: tf.Tensor) -> tf.Tensor:
        """(K,) task losses -> (K,) weights (by default, those `weighting` returns)."""
        if not self._overrides_weighting():
            raise NotImplementedError(f"{type(self).__name__} must implement loss_weights "
                                      "or weighting.")
        return self.weighting(losses)[0]

    def weighting(self, losses: tf.Tensor):
        """Everything a training step needs from the strategy, in one call inside the
        model's gradient tape: ((K,) weights, extra scalar term or None). By default
        `extra_loss` then `loss_weights`; a strategy whose two share work (a scalarisation's
        value and its gradient, learned scales read once) overrides this instead."""
        extra = self.extra_loss(losses)
        return self.loss_weights(losses), extra

    def extra_loss(self, losses: tf.Tensor) -> tf.Tensor | None:
        """An extra scalar term added to the objective (e.g. a log-variance penalty): by
        default the one `weighting` returns, else none."""
        return self.weighting(losses)[1] if self._overrides_weighting() else None

    def _overrides_weighting(self) -> bool:
        return type(self).weighting is not LossWeighting.weighting


class GramianWeighting(Strategy):
    """Weights computed from the K x K Gramian of the task gradients.

    The model computes each task's gradient on the shared parameters (rows of J), passes
    G = J J^T and the task losses to `gramian_weights`, and applies J^T w to the shared
    parameters. Head-specific parameters receive their own task's gradient.
    """

    family = "gramian"
    #: Up to how many tasks `BalancedModel` compiles `gramian_weights` with XLA even in a
    #: step that is not (None: any number, 0: never). A graph pays an executor round trip
    #: per op and loop iteration, which dominates the tiny K x K problems (XLA is 2-7x
    #: faster at K <= 8); XLA's CPU kernels for decompositions and solves (eigh, SVD, LU)
    #: are slower than TensorFlow's for larger K (up to 30x at K = 40). Loop-heavy solvers
    #: whose XLA form wins at every K set None. `bench_gradient_strategies.py --solvers`.
    #: The model compiles `gramian_weights` of a strategy without state only (under
    #: tf.distribute a compiled function may not write variables); a stateful one compiles
    #: its own pure solver where it wants to (Nash-MTL).
    xla_max_tasks: int | None = 8

    def compiles_solver(self) -> bool:
        """Whether `BalancedModel` compiles this bound strategy's solver with XLA."""
        return self.xla_max_tasks is None or self.num_tasks <= self.xla_max_tasks

    def compiled_solver(self):
        """`gramian_weights` compiled with XLA on its own (once per instance, even in a step
        that is not), or None: where `compiles_solver` says no, and for a strategy with
        state, as a nested function may not write variables under tf.distribute (a
        stateful strategy compiles its pure solver itself, as Nash-MTL does)."""
        if not self.compiles_solver() or self.state_variables():
            return None
        return self.__dict__.setdefault("_compiled_solver", tf.function(
            self.gramian_weights, jit_compile=True, autograph=False))

    def gramian_weights(self, gramian: tf.Tensor, losses: tf.Tensor) -> tf.Tensor:
        """(K, K) Gramian and (K,) losses -> (K,) weights."""
        raise NotImplementedError

    def extra_loss(self, losses: tf.Tensor) -> tf.Tensor | None:
        """A scalar whose gradient trains the strategy's own trainable variables."""
        return None


class JacobianAggregator(Strategy):
    """A direction computed from the full (K, P) Jacobian of the task gradients."""

    family = "jacobian"

    def aggregate(self, jacobian: tf.Tensor, losses: tf.Tensor):
        """(K, P) Jacobian and (K,) losses -> ((P,) direction, (K,) effective weights)."""
        raise NotImplementedError

    def extra_loss(self, losses: tf.Tensor) -> tf.Tensor | None:
        return None
