"""`BalancedModel`: a `keras.Model` whose training step balances its tasks.

Stock Keras sums the weighted per-output losses and takes one gradient, so every head's
gradient reaches the shared trunk added up with fixed weights. `BalancedModel` computes the
per-task losses itself and lets a strategy, chosen by name in `compile(strategy=...)`, decide
how they (or their gradients) are combined before the optimizer update.
"""

from __future__ import annotations

import warnings
import weakref

import keras
import tensorflow as tf

from lossbalance import compat, strategies
from lossbalance.callbacks import StrategyEpochHook
from lossbalance.guard import MODES as NONFINITE_MODES
from lossbalance.guard import NonFiniteCallback, NonFiniteGuard, batch_size, has_rows
from lossbalance.levels import GRADIENT_LEVELS, make_level
from lossbalance.levels.base import add, global_value, transformed_task_losses
from lossbalance.levels.layer_norms import check_layer
from lossbalance.metrics import ObjectiveMean, TaskMeans
from lossbalance.strategies.staging import staged
from lossbalance.tasks import TaskLosses

__all__ = ["BalancedModel", "FunctionalBalancedModel", "GRADIENT_LEVELS"]


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
        if cls is BalancedModel and compat.functional_init_arguments(args, kwargs):
            return super().__new__(FunctionalBalancedModel, *args, **kwargs)
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, *args, **kwargs):
        if compat.functional_init_arguments(args, kwargs) and \
                not isinstance(self, compat.Functional):
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
        self.__dict__["_level"] = None  # a `lossbalance.levels.Level`, set by compile

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
        precision="float64",
        grouping=None,
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
            precision: gradient-level strategies: the dtype the Gramian of the task
                gradients and their combination J^T w are accumulated in. "float64"
                (default): exact for float32 gradients, whatever the tasks' scales and
                near Pareto stationarity (nearly opposite gradients). "float32": faster
                on a CPU for wide shared trunks (the parameter level at K = 2 on the
                benchmark MLP: ~1.3x plain Keras instead of ~1.55x), at the cost of that
                exactness (see the README's "Tasks on very different scales").
            grouping: at the parameter level, balance groups of shared parameters
                separately, each with its own Gramian, weights and strategy state: "layer",
                "variable", or a callable mapping a variable to its group's key (not saved
                with the model). None (default): one group. `<task>_weight` logs the groups'
                mean; `lossbalance.diagnostics.inspect_batch` shows each group's.
            The other arguments are passed to `keras.Model.compile`.
        """
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"`nonfinite` must be None, 'skip' or 'raise'; got {nonfinite!r}.")
        task_losses = TaskLosses(loss, loss_weights, self._known_output_names())
        strategy = strategies.get(strategy)
        strategy.bind(task_losses.names)
        self._check_strategy_fits(strategy)
        task_losses.check_zero_weights(strategy)
        level = make_level(self, strategy, task_losses, gradients, representation, vectorize,
                           precision, grouping)
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
        with compat.unlocked_tracking(self):
            for old in (getattr(self, "strategy", None),
                        getattr(self, "_skipped_steps_tracker", None),
                        getattr(self, "_task_loss_tracker", None),
                        getattr(self, "_task_weight_tracker", None)):
                if old is not None and old is not strategy:
                    compat.untrack(self, old)
            self.strategy = strategy
            strategy.__dict__["_lossbalance_model"] = weakref.ref(self)  # untracked
            self._loss_tracker = ObjectiveMean(name="loss")  # Keras lists it first, by name
            compat.untrack(self, self._loss_tracker)  # as Keras' own: not in `_metrics`
            self._task_loss_tracker = TaskMeans(task_losses.names, "_loss")
            self._task_weight_tracker = TaskMeans(task_losses.names, "_weight")
            self._skipped_steps_tracker = guard.skipped_steps
        self._guard = guard
        # A plain attribute, untracked: its forward pass shares the model's layers.
        self.__dict__["_level"] = level
        self._balancing_config = {"loss": loss, "loss_weights": loss_weights,
                                  "strategy": strategy, "nonfinite": nonfinite,
                                  "gradients": gradients, "representation": representation,
                                  "vectorize": vectorize, "precision": precision,
                                  "grouping": grouping if isinstance(grouping, str) else None}

    @property
    def gradient_level(self) -> str | None:
        """"parameters" or "representation": where the compiled strategy balances the
        per-task gradients (None for loss-level strategies or before `compile`)."""
        return None if self._level is None else self._level.name

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
        check_layer(self, strategy)

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

    def train_step(self, data):
        self._require_compiled()
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        level = self._level
        level.prepare(x, y, sample_weight)  # state sized by the first batch
        # The strategy's state changes are staged, committed with the update (staging.py).
        with staged(self.strategy) as changes:
            # Everything differentiated below is computed inside the tape, scaling included.
            with tf.GradientTape(persistent=level.persistent_tape) as tape:
                z, y_pred = level.forward(x)
                variables = self.trainable_variables  # after the call: it builds models
                raw_losses = self._task_losses(y, y_pred, sample_weight, training=True)
                step = level.objectives(raw_losses, self._regularization_loss(),
                                        (y, y_pred, sample_weight))
            grads, weights, objective, logged_losses = level.gradients(tape, step,
                                                                       variables, z)
            del tape
        skipped = self._guard.run(
            changes, self._update, (grads, x, y, sample_weight, step.losses),
            raw_losses=raw_losses, grads=grads, rows=batch_size(x), optimizer=self.optimizer,
            variables=self.trainable_variables)
        self._record(x, objective, logged_losses, weights, skipped)
        return self._for_replica_reduction(
            self.compute_metrics(x, y, y_pred, sample_weight=sample_weight))

    def _for_replica_reduction(self, logs):
        """Keras averages each log over the replicas; under MultiWorkerMirroredStrategy it
        reduces along axis 0, which fails on scalars (keras-team/keras#20585), so there
        the logs leave the step as 1-vectors (Keras' reduction makes them scalars)."""
        if not compat.multi_worker(self.distribute_strategy):
            return logs
        return {name: tf.reshape(value, [1]) for name, value in logs.items()}

    def _update(self, grads, x, y, sample_weight, losses, healthy):
        """The optimizer step (and a post-step strategy update, kept where `healthy`: not
        after an overflow the loss-scale optimizer skipped) of one training step."""
        self.optimizer.apply(grads, self.trainable_variables)
        if self.strategy.uses_post_step_losses:
            # e.g. FAMO: the same batch's losses after the update (one forward pass),
            # weighted and transformed as `losses` were.
            after = self._task_losses(y, self(x, training=True), sample_weight)
            after = transformed_task_losses(
                self.strategy, self._task_losses.weighted(after), separate=False)
            with staged(self.strategy) as changes:
                self.strategy.update_after_step(losses, tf.stack(after))
            changes.commit(healthy)

    def _record(self, x, objective, raw_losses, weights, skipped=None):
        """Update the `loss`, `<task>_loss` and `<task>_weight` trackers with the global
        batch's values (under tf.distribute each replica adds them weighted by its rows). An
        empty batch, or a step `skipped` as non-finite, adds nothing (its losses and weights
        may be NaN)."""
        batch = batch_size(x)
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

    def _regularization_loss(self):
        """`add_loss` and regulariser terms, aggregated as Keras does (under tf.distribute
        Keras divides them by the replica count, as it does the task losses)."""
        extra = self.losses
        if not extra:
            return None
        return tf.add_n([compat.regularization_term(self, loss) for loss in extra])

    # -- evaluation ----------------------------------------------------------------------

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The plain Keras total: sum_k loss_weight_k L_k plus regularisation losses."""
        self._require_compiled()
        return self._plain_total(self._task_losses(y, y_pred, sample_weight))

    def _plain_total(self, raw_losses):
        return add(tf.add_n(self._task_losses.weighted(raw_losses)),
                   self._regularization_loss())

    def test_step(self, data):
        self._require_compiled()
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=False)
        raw_losses = self._task_losses(y, y_pred, sample_weight)
        total = self._plain_total(raw_losses)
        batch = batch_size(x)
        self._loss_tracker.update_state(global_value(total), sample_weight=batch)
        self._task_loss_tracker.update_state(global_value(tf.stack(raw_losses)),
                                             sample_weight=batch)
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
        keras#20585). Building needs shapes only, so take the first local replica's part.
        (An override of a private `Trainer` method: see `lossbalance.compat`.)"""
        local = compat.local_first_batch(self, iterator)
        if local is not None:
            data_batch, iterator = local, None
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def fit(self, *args, callbacks=None, **kwargs):
        # The strategy's end-of-epoch update comes first, so that callbacks which save the
        # model at the epoch's end (BackupAndRestore, ModelCheckpoint) save its result.
        callbacks = [StrategyEpochHook(), *(callbacks or [])]
        if self._guard is not None and self._guard.mode == "raise":
            callbacks.append(NonFiniteCallback(self._guard))
        return super().fit(*args, callbacks=callbacks, **kwargs)


@keras.saving.register_keras_serializable(package="lossbalance")
class FunctionalBalancedModel(BalancedModel, compat.Functional):
    """The class of `BalancedModel(inputs=..., outputs=...)`: a functional BalancedModel.

    Keras would otherwise turn a `Model` subclass called with inputs and outputs into a
    functional model by rewriting the subclass's bases in place, which would also change
    every subclassed `BalancedModel`; this class keeps the two uses apart.
    """

    def __init__(self, inputs, outputs, name=None, **kwargs):
        compat.Trainer.__init__(self)
        compat.Functional.__init__(self, inputs, outputs, name=name, **kwargs)
        self._init_balancing()
