"""`BalancedModel`: a `keras.Model` whose training step balances its tasks.

Stock Keras sums the weighted per-output losses and takes one gradient, so every head's
gradient reaches the shared trunk added up with fixed weights. `BalancedModel` computes the
per-task losses itself and lets a strategy, chosen by name in `compile(strategy=...)`, decide
how they (or their gradients) are combined before the optimizer update.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass

import keras
import tensorflow as tf
from keras.src.backend.tensorflow.trainer import _collective_all_reduce_multi_worker
from keras.src.models.functional import Functional
from keras.src.models.model import Trainer, functional_init_arguments

from lossbalance import replicas, strategies
from lossbalance.gradients import TaskGradients, count_shared_parameters, task_gradients
from lossbalance.guard import MODES as NONFINITE_MODES
from lossbalance.guard import NonFiniteCallback, NonFiniteGuard, has_rows
from lossbalance.metrics import ObjectiveMean, TaskMeans
from lossbalance.representation import RepresentationError, RepresentationForward
from lossbalance.tasks import TaskLosses


def _unscale_for_distribution(value):
    """Keras losses divide by the replica count; logs report the global value."""
    count = replicas.num_replicas()
    return value * count if count > 1 and value is not None else value


def _batch_size(x):
    first = next(t for t in tf.nest.flatten(x) if t is not None)
    static = first.shape[0]
    return static if static is not None else tf.shape(first)[0]


def _add(a, b):
    if a is None:
        return b
    return a if b is None else a + b


def _loops_upstream(tensor):
    """Names of the loop operations (an RNN's, say) a graph tensor is computed from: while
    loops, or the tensor lists they iterate over (under XLA the while op itself is hidden
    in a function call)."""
    seen, stack, loops = set(), [tensor.op], []
    while stack:
        op = stack.pop()
        if op.name not in seen:
            seen.add(op.name)
            if op.type in ("While", "StatelessWhile") or op.type.startswith("TensorList"):
                loops.append(op.name)
            stack.extend(t.op for t in op.inputs)
    return loops


#: `compile(gradients=...)`: where gradient-level strategies balance the tasks.
GRADIENT_LEVELS = ("parameters", "representation", "auto")


class _GradientLevel:
    """Plain holder (kept out of Keras' tracking) of the representation-level forward
    pass, of which variables lie upstream of the representation (found once), and of the
    Gramian strategy's weight solver (compiled with XLA where it says so).

    With `vectorized`, the forward pass serves the parameter level (`vectorize=True`):
    z is where the per-task cotangents enter the trunk. `loop_reason` says why the
    trunk's per-task backward passes run as a loop instead, once that is known.
    """

    def __init__(self, forward, strategy=None, vectorized=False):
        self.forward = forward
        self.vectorized = vectorized
        self.loop_reason = None
        self.trunk_ids = None
        self.gramian_weights = getattr(strategy, "gramian_weights", None)
        if strategy is not None and strategy.family == "gramian" and \
                strategy.compiles_solver():
            self.gramian_weights = tf.function(strategy.gramian_weights, jit_compile=True,
                                               autograph=False)


@dataclass
class _ScaledObjectives:
    """What a gradient-level step differentiates, each scaled for mixed precision."""

    tasks: list  # one scalar per task
    other: object  # regularisation + strategy term, or None
    own: object  # objective of the strategy's own trainable variables


def _check_zero_loss_weights(task_losses, strategy):
    zero = [task.name for task in task_losses.tasks if task.loss_weight == 0]
    if zero and not strategy.allows_zero_loss_weights:
        raise ValueError(
            f"compile(loss_weights=...) gives task(s) {zero} the weight 0, but strategy "
            f"{strategy.registry_name or type(strategy).__name__!r} balances the tasks "
            "against each other, and a loss held at 0 breaks that (a zero gradient makes "
            "MGDA's update zero; a log of 0 or a ratio 0 / 0 makes weights infinite or NaN). "
            f"To leave a task untrained, give it no loss (compile(loss={{{zero[0]!r}: None, "
            "...}), and follow it with a metric); otherwise give it a positive weight.")


def _transformed_task_losses(strategy, losses, separate=True):
    """Each task's loss after `strategy.transform_losses`, as K tensors.

    With `separate`, for per-task gradients: which variables a task's loss reaches decides
    what is shared, and slicing one stacked vector would connect every task to every head
    (with zero gradients), so task k's transform sees the other losses only through
    `tf.stop_gradient` (K transforms). Without it (one gradient of a weighted sum), one
    transform of the stacked losses. Computed inside the tape.
    """
    if type(strategy).transform_losses is strategies.Strategy.transform_losses:
        return list(losses)
    if not separate:
        return tf.unstack(strategy.transform_losses(tf.stack(losses)))
    transformed = []
    for k in range(len(losses)):
        isolated = tf.stack([loss if j == k else tf.stop_gradient(loss)
                             for j, loss in enumerate(losses)])
        transformed.append(strategy.transform_losses(isolated)[k])
    return transformed


@keras.saving.register_keras_serializable(package="lossbalance")
class BalancedModel(keras.Model):
    """A `keras.Model` that balances its tasks with a strategy chosen at `compile`.

    Use it as a functional model, `BalancedModel(inputs=..., outputs={"a": ..., "b": ...})`,
    or as a base class whose subclass defines `call` (return a dict by task name, or a list).
    Every output with a loss is a task. `fit`, `evaluate`, `predict` and `save` work as for
    any Keras model.

    Logs: `loss` is the objective minimised (sum_k w_k L_k plus regularisation and any
    strategy term); `<task>_loss` is each task's unweighted loss; `<task>_weight` is the
    weight the task effectively received (its compile loss weight times the strategy's
    weight), averaged over the epoch. In evaluation, `loss` is the plain Keras total,
    sum_k loss_weight_k L_k plus regularisation, whatever the strategy, so that validation
    losses compare across strategies and epochs.
    """

    def __new__(cls, *args, **kwargs):
        if cls is BalancedModel and functional_init_arguments(args, kwargs):
            return super().__new__(FunctionalBalancedModel, *args, **kwargs)
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, *args, **kwargs):
        if functional_init_arguments(args, kwargs) and not isinstance(self, Functional):
            raise TypeError(
                f"{type(self).__name__} passes `inputs` and `outputs` to BalancedModel from "
                "a subclass. Either build the model directly with "
                "BalancedModel(inputs=..., outputs=...), or subclass "
                "lossbalance.FunctionalBalancedModel for a functional subclass."
            )
        super().__init__(*args, **kwargs)
        self._init_balancing()

    def _init_balancing(self):
        self._task_losses = None
        self._guard = None
        self._balancing_config = None
        self._levels = _GradientLevel(None)

    # -- compile -------------------------------------------------------------------------

    def compile(
        self,
        optimizer="rmsprop",
        loss=None,
        loss_weights=None,
        metrics=None,
        weighted_metrics=None,
        strategy="fixed",
        nonfinite=None,
        gradients="parameters",
        representation=None,
        vectorize=False,
        run_eagerly=False,
        steps_per_execution=1,
        jit_compile="auto",
        auto_scale_loss=True,
    ):
        """Configure training, as `keras.Model.compile`, plus the balancing strategy.

        Args:
            loss: one loss for every output, a list in output order, or a dict by output
                name (None for an output leaves it untrained). Required.
            loss_weights: per-output weights, as in Keras; they scale each task's loss
                before the strategy sees it (and multiply a `fixed` strategy's weights).
                A weight of 0 is refused unless the strategy allows it (`fixed`, `rlw`);
                give an output no loss to leave it untrained.
            strategy: a registered name (`lossbalance.strategies.available()`), a
                `Strategy` instance, or a config dict such as `{"name": "cagrad", "c": 0.5}`.
                Default `"fixed"`: equal weights, exactly stock Keras. An instance that
                holds state serves one model at a time.
            nonfinite: None (Keras' behaviour), `"skip"` (a step with a non-finite task
                loss or gradient changes nothing; `skipped_steps` counts them in the logs)
                or `"raise"` (that step is skipped, then a `FloatingPointError` names the
                task and the step).
            gradients: where a gradient-level strategy balances the tasks.
                `"parameters"` (default): the exact per-task gradients of every shared
                parameter. `"representation"`: the per-task gradients with respect to the
                shared representation z where the heads branch (MGDA-UB), then one backward
                pass through the trunk; much cheaper, an approximation of the parameter
                level. `"auto"`: the representation level when the model has one and the
                strategy is defined there, else the parameter level. Loss-level
                strategies compute no per-task gradients; `"representation"` is refused.
            representation: for a functional model, the name of the layer whose output
                is z (default: found where the heads branch). A subclassed model declares
                z with a `lossbalance.Representation()` layer in `call`.
            vectorize: at `gradients="parameters"`, how the per-task gradients of the
                trunk (the layers before z) are taken. False (default): one backward
                pass per task. True: the K cotangents dL_k/dz (a pass through each head)
                go through the trunk in one vectorised backward pass (`tf.vectorized_map`),
                which gives the same gradients and may be faster on accelerators (on a
                CPU it is not). Needs the representation z (as `representation` above;
                refused without one). Where an operation of the trunk's backward cannot be
                vectorised (or, under XLA, a trunk with loops such as an RNN), the trunk
                passes run as a loop, with a warning.
            The other arguments are passed to `keras.Model.compile`.
        """
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"`nonfinite` must be None, 'skip' or 'raise'; got {nonfinite!r}.")
        if gradients not in GRADIENT_LEVELS:
            raise ValueError(f"`gradients` must be one of {list(GRADIENT_LEVELS)}; got "
                             f"{gradients!r}.")
        task_losses = TaskLosses(loss, loss_weights, self._known_output_names())
        strategy = strategies.get(strategy)
        strategy.bind(task_losses.names)
        self._check_strategy_fits(strategy)
        _check_zero_loss_weights(task_losses, strategy)
        forward = self._representation_forward(strategy, task_losses, gradients,
                                                representation, vectorize)
        if len(task_losses.tasks) == 1:
            warnings.warn(
                f"BalancedModel has a single task ({task_losses.names[0]!r}): there is "
                "nothing to balance, and every strategy trains it like plain Keras up to "
                "the strategy's weight.",
                stacklevel=2,
            )
        super().compile(
            optimizer=optimizer,
            loss=None,
            metrics=metrics,
            weighted_metrics=weighted_metrics,
            run_eagerly=run_eagerly,
            steps_per_execution=steps_per_execution,
            jit_compile=jit_compile,
            auto_scale_loss=auto_scale_loss,
        )
        self._task_losses = task_losses
        guard = NonFiniteGuard(nonfinite, task_losses.names,
                               isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer))
        with self._unlocked_state():
            for old in (getattr(self, "strategy", None),
                        getattr(self, "_skipped_steps_tracker", None),
                        getattr(self, "_task_loss_tracker", None),
                        getattr(self, "_task_weight_tracker", None)):
                if old is not None and old is not strategy:
                    self._tracker.untrack(old)
            self.strategy = strategy
            strategy.__dict__["_lossbalance_model"] = weakref.ref(self)  # untracked
            self._loss_tracker = ObjectiveMean(name="loss")  # Keras lists it first, by name
            self._tracker.untrack(self._loss_tracker)  # as Keras' own: not in `_metrics`
            self._task_loss_tracker = TaskMeans(task_losses.names, "_loss")
            self._task_weight_tracker = TaskMeans(task_losses.names, "_weight")
            self._skipped_steps_tracker = guard.skipped_steps
        self._guard = guard
        # A plain attribute holder: the forward shares the model's layers, untracked.
        self._levels = _GradientLevel(forward, strategy, vectorized=vectorize)
        self._balancing_config = {"loss": loss, "loss_weights": loss_weights,
                                  "strategy": strategy, "nonfinite": nonfinite,
                                  "gradients": gradients, "representation": representation,
                                  "vectorize": vectorize}

    @property
    def gradient_level(self) -> str | None:
        """"parameters" or "representation": where the compiled strategy balances the
        per-task gradients (None for loss-level strategies or before `compile`)."""
        if self._task_losses is None or self.strategy.family == "loss" and not getattr(
                self.strategy, "uses_layer_gradients", False):
            return None
        levels = self._levels
        return ("parameters" if levels.forward is None or levels.vectorized
                else "representation")

    def _representation_forward(self, strategy, task_losses, gradients, representation,
                                vectorize=False):
        """The (z, outputs) forward pass for `gradients="representation"` or
        `vectorize=True`, or None."""
        name = strategy.registry_name or type(strategy).__name__
        if vectorize not in (True, False):
            raise ValueError(f"`vectorize` must be True or False; got {vectorize!r}.")
        if vectorize:
            return self._vectorizing_forward(name, strategy, task_losses, gradients,
                                             representation)
        if strategy.family == "loss":
            if gradients == "representation":
                raise ValueError(
                    f"Strategy {name!r} weights the task losses and computes no per-task "
                    "gradients, so gradients='representation' does not apply to it. Use a "
                    "gradient-level strategy (e.g. 'mgda'), or leave `gradients` out.")
            return None
        if gradients == "parameters":
            if representation is not None:
                raise ValueError(
                    f"representation={representation!r} is only used with "
                    "gradients='representation' or 'auto', or with vectorize=True.")
            return None
        if "representation" not in strategy.gradient_levels:
            if gradients == "auto":
                return None
            raise ValueError(
                f"Strategy {name!r} is only defined at the parameter level (it keeps state "
                "for every shared parameter); use gradients='parameters'.")
        positions = [task.position for task in task_losses.tasks]
        try:
            return RepresentationForward(self, positions, representation)
        except RepresentationError:
            if gradients == "auto" and representation is None:
                return None
            raise

    def _vectorizing_forward(self, name, strategy, task_losses, gradients, representation):
        """The (z, outputs) forward pass for `vectorize=True`, once it is known to apply."""
        if strategy.family == "loss":
            raise ValueError(
                f"vectorize=True vectorises per-task gradients, and strategy {name!r} "
                "weights the task losses and computes none. Leave `vectorize` out, or use "
                "a gradient-level strategy (e.g. 'mgda').")
        if gradients != "parameters":
            raise ValueError(
                f"vectorize=True applies to gradients='parameters' (got {gradients!r}): "
                "the representation level already takes a single backward pass through "
                "the trunk. Pass gradients='parameters', or leave `vectorize` out.")
        positions = [task.position for task in task_losses.tasks]
        try:
            return RepresentationForward(self, positions, representation)
        except RepresentationError as err:
            raise RepresentationError(
                "vectorize=True sends the K per-task gradients through the trunk together "
                "from the shared representation z where the heads branch, and this model "
                f"has none usable: {err} (With vectorize=True: mark or name z; or else "
                "compile with vectorize=False.)") from None

    def _known_output_names(self):
        names = getattr(self, "output_names", None)
        return list(names) if names else None

    def _check_strategy_fits(self, strategy):
        other = strategy.__dict__.get("_lossbalance_model", lambda: None)()  # a weakref
        if other is not None and other is not self and getattr(other, "strategy", None) \
                is strategy and strategy.state_variables():
            raise ValueError(
                f"Strategy {strategy.name!r} is already used by model {other.name!r}; its "
                "state (weights, moving averages, random seeds) would be shared by both, "
                "each model's steps changing the other's. Give each model its own strategy: "
                "pass a name or a config dict (e.g. {'name': 'pcgrad', 'seed': 0}), which "
                "makes a fresh one at every compile.")
        layer = getattr(strategy, "layer", None)
        if getattr(strategy, "uses_layer_gradients", False) and layer is not None:
            names = [l.name for l in self._flatten_layers(include_self=False)]
            if layer not in names:
                raise ValueError(
                    f"{type(strategy).__name__}(layer={layer!r}): the model has no layer "
                    f"of that name. Its layers: {names}."
                )

    @contextlib.contextmanager
    def _unlocked_state(self):
        """Allow attaching the strategy and trackers to an already built model."""
        was_locked = self._tracker.locked
        self._tracker.unlock()
        try:
            yield
        finally:
            if was_locked:
                self._tracker.lock()

    def get_compile_config(self):
        config = super().get_compile_config()
        if config and self._balancing_config is not None:
            extra = keras.saving.serialize_keras_object(self._balancing_config)
            config.update(extra.get("config", extra))
        return config

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.optimizer is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    # -- training ------------------------------------------------------------------------

    def _require_compiled(self):
        if self._task_losses is None:
            raise RuntimeError(
                "BalancedModel must be compiled before training: call "
                "model.compile(optimizer=..., loss=..., strategy=...)."
            )

    def _scales_loss(self):
        opt = self.optimizer
        return isinstance(opt, keras.optimizers.LossScaleOptimizer) or (
            getattr(opt, "loss_scale_factor", None) is not None)

    def train_step(self, data):
        self._require_compiled()
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        strategy, guard = self.strategy, self._guard
        self._build_parameter_state(x, y, sample_weight)  # before the snapshot covers it
        if guard.active:  # strategy state is restored if the step is non-finite or empty
            state = strategy.state_variables()
            snapshot = guard.snapshot(state)

        # Everything differentiated below is computed inside the tape, scaling included.
        with tf.GradientTape(persistent=self._needs_persistent_tape()) as tape:
            representation = None
            if self._levels.forward is None:
                y_pred = self(x, training=True)
            else:  # one pass that also returns the shared representation z
                representation, y_pred = self._levels.forward(x, training=True)
            variables = self.trainable_variables  # after the call: it builds subclassed models
            raw_losses = self._task_losses(y, y_pred, sample_weight, training=True)
            if strategy.family != "loss":  # global values, local gradients (tf.distribute)
                raw_losses = [replicas.with_global_value(loss) for loss in raw_losses]
            task_losses = _transformed_task_losses(
                strategy, self._task_losses.weighted(raw_losses),
                separate=self._needs_persistent_tape())
            losses = tf.stack(task_losses)
            extra = strategy.extra_loss(losses)
            other = _add(self._regularization_loss(), extra)
            scale = self.optimizer.scale_loss
            if strategy.family == "loss":
                weights = strategy.loss_weights(losses)
                objective = _add(tf.reduce_sum(weights * losses), other)
                scaled = scale(objective)
            else:
                scaled = _ScaledObjectives(
                    tasks=[scale(loss) for loss in task_losses],
                    other=None if other is None else scale(other),
                    # the strategy's own variables follow the sum of the task losses
                    own=scale(_add(tf.add_n(task_losses), extra)))
        if strategy.family == "loss":
            grads = tape.gradient(scaled, variables)
            # each replica's share of the global values (Keras divides losses by N)
            logged = _unscale_for_distribution(objective), [
                _unscale_for_distribution(loss) for loss in raw_losses]
        else:
            grads, weights = self._task_gradient_update(tape, scaled, losses, variables,
                                                        representation)
            logged = _add(tf.reduce_sum(tf.stop_gradient(weights) * losses),
                          _unscale_for_distribution(other)), raw_losses  # global values
        if getattr(strategy, "uses_layer_gradients", False):
            self._update_from_layer_gradients(tape, task_losses, variables)
        del tape

        update = (grads, x, y, sample_weight, losses)
        if guard.active:
            step = self.optimizer.iterations + 0
            apply, healthy, bad, losses_ok = guard.decide(raw_losses, grads, _batch_size(x))
            if apply is True:
                self._update(*update)
            else:
                if not self.optimizer.built:
                    self.optimizer.build(variables)
                replicas.run_if(tf.convert_to_tensor(apply), self._update, update)
            guard.finish(healthy, bad, losses_ok, state, snapshot, step)
        else:
            self._update(*update)
        self._record(x, *logged, weights, skipped=bad if guard.mode is not None else None)
        return self._for_replica_reduction(
            self.compute_metrics(x, y, y_pred, sample_weight=sample_weight))

    def _for_replica_reduction(self, logs):
        """Keras averages each log over the replicas; under MultiWorkerMirroredStrategy it
        reduces along axis 0, which fails on scalars (keras-team/keras#20585), so there
        the logs leave the step as 1-vectors (Keras' reduction makes them scalars)."""
        if not _collective_all_reduce_multi_worker(self.distribute_strategy):
            return logs
        return {name: tf.reshape(value, [1]) for name, value in logs.items()}

    def _update(self, grads, x, y, sample_weight, losses):
        """The optimizer step (and a post-step strategy update) of one training step."""
        self.optimizer.apply(grads, self.trainable_variables)
        if getattr(self.strategy, "uses_post_step_losses", False):
            # e.g. FAMO: the same batch's losses after the update (one forward pass),
            # weighted and transformed as `losses` were.
            after = self._task_losses(y, self(x, training=True), sample_weight)
            after = _transformed_task_losses(
                self.strategy, self._task_losses.weighted(after), separate=False)
            self.strategy.update_after_step(losses, tf.stack(after))

    def _needs_persistent_tape(self):
        return self.strategy.family != "loss" or getattr(
            self.strategy, "uses_layer_gradients", False)

    def _build_parameter_state(self, x, y, sample_weight):
        """Create K x P strategy state (MoCo, DB-MTL, ExcessMTL) before the first step,
        so that a skipped first step restores it; P is counted by tracing, not running,
        the per-task gradients (see `lossbalance.strategies.parameter_state`)."""
        strategy = self.strategy
        if not getattr(strategy, "needs_parameter_state", False) or \
                strategy.num_parameters is not None:
            return
        own = {id(v) for v in strategy.trainable_variables}
        strategy.build_parameter_state(count_shared_parameters(
            lambda x, y, sw: self._task_losses(y, self(x, training=True), sw),
            lambda: [v for v in self.trainable_variables if id(v) not in own],
            x, y, sample_weight))

    def _record(self, x, objective, raw_losses, weights, skipped=None):
        """Update the `loss`, `<task>_loss` and `<task>_weight` trackers with the global
        batch's values (under tf.distribute each replica adds them weighted by its rows). An
        empty batch, or a step `skipped` as non-finite, adds nothing (its losses and weights
        may be NaN)."""
        batch = _batch_size(x)
        compile_weights = tf.constant(self._task_losses.loss_weights, raw_losses[0].dtype)
        dtype = compile_weights.dtype
        losses, weights = tf.stack(raw_losses), tf.cast(weights, dtype)
        counts, counted = has_rows(batch), None
        if skipped is not None:
            counts = tf.logical_and(counts, tf.logical_not(skipped))
        if counts is not True:
            objective, losses, weights = (tf.where(counts, v, tf.zeros_like(v))
                                          for v in (objective, losses, weights))
            counted = tf.cast(counts, dtype)
            batch = tf.cast(batch, dtype) * counted
        self._loss_tracker.update_state(objective, sample_weight=batch)
        self._task_loss_tracker.update_state(losses, sample_weight=batch)
        self._task_weight_tracker.update_state(compile_weights * weights,
                                               sample_weight=counted)

    def _task_gradient_update(self, tape, scaled, losses, variables, representation):
        """Gradient-level strategies: the update for every trainable variable.

        Model variables get the strategy's combination on shared variables and each task's
        own gradient on its head; the strategy's own trainable variables (e.g. learned loss
        scales) follow the plain sum of the (transformed) task losses and its extra term.
        Their gradient depends on the global losses alone, so under tf.distribute every
        replica hands the optimizer its 1/N share.
        """
        own = self.strategy.trainable_variables
        own_ids = {id(v) for v in own}
        model_variables = [v for v in variables if id(v) not in own_ids]
        model_grads, weights = self._combine_task_gradients(
            tape, scaled.tasks, scaled.other, losses, model_variables, representation)
        by_id = dict(zip(map(id, model_variables), model_grads))
        if own:
            by_id.update(zip(map(id, own), map(replicas.replica_share,
                                               tape.gradient(scaled.own, own))))
        return [by_id[id(v)] for v in variables], weights

    def _regularization_loss(self):
        """`add_loss` and regulariser terms, aggregated as Keras does (under tf.distribute
        Keras divides them by the replica count, as it does the task losses)."""
        extra = self.losses
        if not extra:
            return None
        return tf.add_n([self._aggregate_additional_loss(loss) for loss in extra])

    def _combine_task_gradients(self, tape, scaled_losses, scaled_other, losses, variables,
                                representation=None):
        """Gradient-level strategies: per-task gradients, combined on shared variables.

        At the parameter level the per-task gradients of every variable are taken and
        combined on the shared ones (with `vectorize=True` the trunk's come stacked from
        one vectorised pass, `_vectorized_task_gradients`). At the representation level
        they are taken with respect to z and the heads' variables only, combined on z, and
        the combination goes through the trunk in one backward pass (the trunk's variables
        being those upstream of z). Gradients come from loss-scaled losses (mixed precision); the
        strategy sees them unscaled, and the combination stays scaled for
        `optimizer.apply` to unscale.
        """
        other_grads = None
        if scaled_other is not None:
            other_grads = tape.gradient(scaled_other, [v.value for v in variables])
        if representation is None or self._levels.vectorized:
            if representation is None:
                gradients = TaskGradients(task_gradients(tape, scaled_losses, variables),
                                          variables)
            else:
                gradients = self._vectorized_task_gradients(tape, scaled_losses, variables,
                                                            representation)
            self._check_task_gradients(gradients)
            shared, weights = self._strategy_update(gradients, losses)
            return gradients.gradients(shared, other_grads), weights

        trunk, heads = self._split_at_representation(tape, representation, variables)
        sources = [representation] + [variables[i] for i in heads]
        gradients = TaskGradients(task_gradients(tape, scaled_losses, sources), sources)
        self._check_task_gradients(gradients, at_representation=True)
        shared, weights = self._strategy_update(gradients, losses, local_rows=True)
        grads = [None] * len(variables)
        trunk_grads = tape.gradient(representation, [variables[i].value for i in trunk],
                                    output_gradients=shared[0])
        for i, g in zip(trunk, trunk_grads):
            grads[i] = g
        for i, g in zip(heads, gradients.gradients(shared)[1:]):
            grads[i] = g
        if other_grads is not None:
            grads = [_add(g, o) for g, o in zip(grads, other_grads)]
        return grads, weights

    def _split_at_representation(self, tape, representation, variables):
        """(indices of the variables upstream of the representation, indices of the others),
        the trunk found once."""
        levels = self._levels
        if levels.trunk_ids is None:  # structure only: unused ops are pruned from graphs
            reached = tape.gradient(representation, [v.value for v in variables])
            levels.trunk_ids = {id(v) for v, g in zip(variables, reached) if g is not None}
        upstream = [id(v) in levels.trunk_ids for v in variables]
        return ([i for i, up in enumerate(upstream) if up],
                [i for i, up in enumerate(upstream) if not up])

    def _vectorized_task_gradients(self, tape, scaled_losses, variables, representation):
        """The parameter level's per-task gradients, found through z (`vectorize=True`).

        A pass through the heads gives each task's cotangent dL_k/dz and its gradients of
        the variables after z; the trunk's, (dz/dθ)^T dL_k/dz, come stacked from the K
        cotangents' backward passes through the trunk, vectorised into one
        (`_trunk_rows`). As z is a cut, these are exactly the per-task gradients of every
        variable, and the stacked trunk rows are the only K x P copy.
        """
        trunk, after = self._split_at_representation(tape, representation, variables)
        through_heads = task_gradients(
            tape, scaled_losses, [representation] + [variables[i] for i in after])
        reaching = [k for k, g in enumerate(through_heads) if g[0] is not None]
        cotangents = [tf.zeros_like(representation) if g[0] is None else g[0]
                      for g in through_heads]
        rows = self._trunk_rows(tape, representation, [variables[i].value for i in trunk],
                                cotangents)
        per_task = [[None] * len(variables) for _ in through_heads]
        for k, g in enumerate(through_heads):
            for i, gradient in zip(after, g[1:]):
                per_task[k][i] = gradient
        return TaskGradients(per_task, variables, stacked=dict(zip(trunk, rows)),
                             stacked_tasks=reaching)

    def _trunk_rows(self, tape, z, trunk, cotangents):
        """(K, *shape) for each trunk variable: the backward passes from z with each of the
        K cotangents, vectorised into one where possible, else run one by one."""
        if not trunk:
            return []
        if self._levels.loop_reason is None:
            reason = self._xla_obstacle(z)
            if reason is None:
                try:  # no silent while-loop fallback: it may not compile under XLA
                    return tf.vectorized_map(
                        lambda dz: [tf.convert_to_tensor(g) for g in  # dense embeddings'
                                    tape.gradient(z, trunk, output_gradients=dz)],
                        tf.stack(cotangents), fallback_to_while_loop=False)
                except ValueError as err:  # an op without a pfor converter
                    first_line = str(err).splitlines()[0] if str(err) else repr(err)
                    reason = f"its backward pass cannot be vectorised ({first_line})"
            self._loop_instead(reason)
        passes = [tape.gradient(z, trunk, output_gradients=dz) for dz in cotangents]
        return [tf.stack([tf.convert_to_tensor(g) for g in rows]) for rows in zip(*passes)]

    def _xla_obstacle(self, z):
        """Why XLA cannot compile the vectorised trunk pass, when that is known before
        compiling: pfor turns a while loop of the trunk (an RNN's) into one over tensor
        lists of unknown shape, which XLA rejects only when the step first runs."""
        if not self.jit_compile or tf.executing_eagerly():
            return None
        loops = _loops_upstream(z)
        if loops:
            return (f"it computes z with a loop (operation {loops[0]!r}, e.g. an RNN's), "
                    "whose vectorised backward pass XLA cannot compile (jit_compile=True)")
        return None

    def _loop_instead(self, reason):
        """Run the trunk's per-task passes one by one from now on, saying why once."""
        if self._levels.loop_reason is None:
            warnings.warn(
                f"compile(vectorize=True): the trunk of {self.name!r} (before "
                f"{self._levels.forward.layer_name!r}) takes its K per-task backward passes "
                f"one by one instead, as {reason}. The gradients are the same; only the "
                "speed-up is lost.", stacklevel=2)
        self._levels.loop_reason = reason

    def _check_task_gradients(self, gradients, at_representation=False):
        name = self.strategy.registry_name
        if at_representation and gradients.has_shared:
            where = f"the representation {self._levels.forward.layer_name!r}"
            detached = [self._task_losses.names[k] for k in range(gradients.num_tasks)
                        if gradients.per_task[k][0] is None]
            if detached:
                raise ValueError(
                    f"Task(s) {detached} do not depend on {where}, so strategy {name!r} "
                    "cannot balance them there. Build every head on it, or use "
                    "gradients='parameters'.")
            after = [gradients.variables[i].path for i in gradients.shared if i != 0]
            if after:
                raise ValueError(
                    f"Variables {after} come after {where} and are shared by several "
                    "tasks, so it is not where the heads branch. Name a later layer with "
                    "compile(representation=...), or use gradients='parameters'.")
            return
        if not gradients.has_shared:
            raise ValueError(
                "No trainable variable is shared by two or more tasks, so there is nothing "
                f"for strategy {name!r} to balance: the heads share "
                "no trunk. Check that every head is built on the shared layers."
            )
        detached = [self._task_losses.names[k] for k in gradients.tasks_without_shared]
        if detached:
            raise ValueError(
                f"Task(s) {detached} do not depend on any variable shared with the other "
                f"tasks, so strategy {name!r} cannot balance them "
                "against the others. Build every head on the shared trunk, or train such "
                "a task separately."
            )

    def _strategy_update(self, gradients, losses, local_rows=False):
        """The strategy's combination of the shared rows: ({index: update}, weights).

        Under tf.distribute (`losses` are then global): at the parameter level the replicas'
        per-task gradients are summed first, giving the global J, and the update, the same
        on every replica, is handed to the optimizer as each replica's 1/N share. With
        `local_rows` (the representation level) each replica keeps the rows of its own
        samples, dL_k/dz, and only their Gramian is summed (Jacobian aggregators get every
        replica's columns); the update of z, each replica's own columns, stays local.
        """
        if not local_rows:
            gradients.sum_over_replicas()
        scale = (self.optimizer.scale_loss(tf.ones((), losses.dtype))
                 if self._scales_loss() else None)
        strategy = self.strategy
        if strategy.family == "gramian":
            gramian = gradients.gramian()
            if local_rows:
                gramian = replicas.sum_over_replicas(gramian)
            if scale is not None:
                gramian /= tf.cast(scale, gramian.dtype) ** 2
            weights = tf.cast(self._levels.gramian_weights(gramian, losses), losses.dtype)
            update = gradients.combine(weights)
        else:
            jacobian = gradients.jacobian()
            if local_rows:
                jacobian, own_columns = replicas.gather_columns(jacobian)
            if scale is not None:
                jacobian /= tf.cast(scale, jacobian.dtype)
            direction, weights = strategy.aggregate(jacobian, losses)
            if scale is not None:
                direction *= tf.cast(scale, direction.dtype)
            if local_rows:
                direction = own_columns(direction)
            update = gradients.unflatten(direction)
        if not local_rows:
            update = {i: replicas.replica_share(g) for i, g in update.items()}
        return update, weights

    def _update_from_layer_gradients(self, tape, task_losses, variables):
        """GradNorm-style strategies: each task's gradient norm at one shared layer."""
        layer_variables = self._balance_layer_variables(tape, task_losses, variables)
        values = [v.value for v in layer_variables]
        norms, unreached = [], []
        for task, task_loss in zip(self._task_losses.names, task_losses):
            grads = [g for g in tape.gradient(task_loss, values) if g is not None]
            # the global batch's gradient (tf.distribute), whose norm is not a sum
            grads = replicas.sum_over_replicas(grads) if grads else grads
            norms.append(tf.linalg.global_norm(grads) if grads else tf.zeros(()))
            if not grads:
                unreached.append(task)
        if unreached:  # only a named layer can miss a task
            raise ValueError(
                f"{type(self.strategy).__name__}(layer={self.strategy.layer!r}): task(s) "
                f"{unreached} do not depend on that layer, so their gradient norm there is "
                "0 and cannot be balanced. Name a layer of the trunk that every task "
                "depends on, or leave layer=None for the last layer they all share.")
        self.strategy.update_with_gradient_norms(
            tf.stack(norms), replicas.sum_over_replicas(tf.stack(task_losses)))

    def _balance_layer_variables(self, tape, task_losses, variables):
        name = self.strategy.layer
        if name is not None:  # nested layers too, as `_check_strategy_fits` accepts them
            layer = next((l for l in self._flatten_layers(include_self=False)
                          if l.name == name), None) or self.get_layer(name)
            if not layer.trainable_weights:
                raise ValueError(
                    f"Layer {name!r} has no trainable weights to balance at (frozen, or "
                    "without weights). Name a trainable layer of the shared trunk, or leave "
                    "layer=None for the last layer every task depends on.")
            return layer.trainable_weights
        gradients = TaskGradients(task_gradients(tape, task_losses, variables), variables)
        if not gradients.common:
            why = ("the heads share no trunk" if not gradients.has_shared else
                   "some heads branch off separately")
            raise ValueError(
                f"Strategy {self.strategy.registry_name!r} needs a layer that every task "
                f"depends on, but no trainable variable is shared by all tasks: {why}. "
                "Build every head on a common trunk.")
        last_common = variables[gradients.common[-1]]
        owner = self._owning_layer(last_common)
        common_ids = {id(variables[i]) for i in gradients.common}
        return [v for v in owner.trainable_weights if id(v) in common_ids]

    def _owning_layer(self, variable):
        """The innermost layer that holds `variable`."""
        holders = [layer for layer in self._flatten_layers(include_self=False)
                   if any(w is variable for w in layer.trainable_weights)]
        return min(holders, key=lambda layer: len(layer.trainable_weights))

    # -- evaluation ----------------------------------------------------------------------

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The plain Keras total: sum_k loss_weight_k L_k plus regularisation losses."""
        self._require_compiled()
        return self._plain_total(self._task_losses(y, y_pred, sample_weight))

    def _plain_total(self, raw_losses):
        return _add(tf.add_n(self._task_losses.weighted(raw_losses)),
                    self._regularization_loss())

    def test_step(self, data):
        self._require_compiled()
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=False)
        raw_losses = self._task_losses(y, y_pred, sample_weight)
        total = self._plain_total(raw_losses)
        batch = _batch_size(x)
        self._loss_tracker.update_state(_unscale_for_distribution(total), sample_weight=batch)
        self._task_loss_tracker.update_state(
            _unscale_for_distribution(tf.stack(raw_losses)), sample_weight=batch)
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        return self._for_replica_reduction(
            {k: v for k, v in logs.items() if k not in self._task_weight_tracker.keys})

    def skip_batches(self, count: int) -> None:
        """Consume the next `count` training batches without training on them (used by
        `lossbalance.callbacks.BackupAndRestore` to resume mid-epoch exactly)."""
        self._batches_to_skip = int(count)

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        super().make_train_function(force=True)
        train = self.train_function

        def train_or_skip(iterator):
            if getattr(self, "_batches_to_skip", 0) > 0:
                self._batches_to_skip -= self.steps_per_execution
                for _ in range(self.steps_per_execution):
                    next(iterator)
                return self.get_metrics_result()
            return train(iterator)

        self.train_function = train_or_skip
        return train_or_skip

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Under tf.distribute Keras builds the model from one batch, which it first reduces
        across replicas; that reduction fails under MultiWorkerMirroredStrategy (keras-team/
        keras#20585). Building needs shapes only, so take the first local replica's part."""
        if iterator is not None and self._distribute_strategy is not None:
            local = self._distribute_strategy.experimental_local_results
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(
                    lambda v: local(v)[0] if isinstance(v, tf.distribute.DistributedValues)
                    else v, next(batches))
                break
            iterator = None
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def fit(self, *args, callbacks=None, **kwargs):
        # The strategy's end-of-epoch update comes first, so that callbacks which save the
        # model at the epoch's end (BackupAndRestore, ModelCheckpoint) save its result.
        callbacks = [_StrategyEpochHook(), *(callbacks or [])]
        if self._guard is not None and self._guard.mode == "raise":
            callbacks.append(NonFiniteCallback(self._guard))
        return super().fit(*args, callbacks=callbacks, **kwargs)


class _StrategyEpochHook(keras.callbacks.Callback):
    """Tells the strategy that an epoch ended (epoch-level methods such as DWA), and has it
    check the logged task losses (`Strategy.check_losses`) after the first batch and after
    every epoch."""

    def on_train_begin(self, logs=None):
        self._first_batch = True

    def on_train_batch_end(self, batch, logs=None):
        if self._first_batch:
            self._first_batch = False
            self._check_losses(logs, "after the first batch")

    def on_epoch_end(self, epoch, logs=None):
        self._check_losses(logs, f"in epoch {epoch + 1}")
        self.model.strategy.on_epoch_end(epoch)

    def _check_losses(self, logs, when):
        """The strategy sees each task's loss times its `compile(loss_weights=...)`."""
        task_losses, logs = self.model._task_losses, logs or {}
        means = {task: float(logs[f"{task}_loss"]) * weight
                 for task, weight in zip(task_losses.names, task_losses.loss_weights)
                 if f"{task}_loss" in logs}
        self.model.strategy.check_losses(means, when)


@keras.saving.register_keras_serializable(package="lossbalance")
class FunctionalBalancedModel(BalancedModel, Functional):
    """The class of `BalancedModel(inputs=..., outputs=...)`: a functional BalancedModel.

    Keras would otherwise turn a `Model` subclass called with inputs and outputs into a
    functional model by rewriting the subclass's bases in place, which would also change
    every subclassed `BalancedModel`; this class keeps the two uses apart.
    """

    def __init__(self, inputs, outputs, name=None, **kwargs):
        Trainer.__init__(self)
        Functional.__init__(self, inputs, outputs, name=name, **kwargs)
        self._init_balancing()
