"""Per-task gradients on the shared parameters, and how they are combined.

Every gradient-level strategy needs each task's gradient g_k on the parameters the tasks
share; parameters that only one task reaches (its head) simply receive that task's gradient.
`TaskGradients` holds the per-task gradients of one step, found with a persistent tape,
split into shared and task-specific variables by which task losses reach them, and offers
the two operations strategies build on: the K x K Gramian G = J J^T, and the combination
J^T w (or a direction given in the flattened parameter space).
"""

from __future__ import annotations

import math

import tensorflow as tf

from lossbalance import replicas


def task_gradients(tape, losses, variables):
    """K lists of gradients (None where a task does not reach a variable)."""
    values = [v.value if hasattr(v, "value") else v for v in variables]
    return [tape.gradient(loss, values) for loss in losses]


def shared_variables(task_losses, variables, *inputs) -> list:
    """The variables that two or more tasks reach (the columns of J).

    Found by tracing, never running, one step's per-task gradients in a throwaway graph, so
    no random draw, moving statistic or other state advances. `task_losses(*inputs)`
    returns the K task losses (`inputs` are tensors or None, e.g. x, y, sample weights);
    `variables()` returns the candidate variables, read after the forward pass (which
    builds a subclassed model).
    """
    found = []

    def trace(*args):
        with tf.GradientTape(persistent=True) as tape:
            losses = task_losses(*args)
        candidates = variables()
        shared = TaskGradients(task_gradients(tape, losses, candidates), candidates).shared
        found.append([candidates[i] for i in shared])
        return tf.constant(0)

    specs = tf.nest.map_structure(
        lambda t: None if t is None else tf.type_spec_from_value(t), inputs)
    tf.function(trace, autograph=False).get_concrete_function(*specs)
    return found[0]


#: Up to this many tasks, the Gramian and the combination J^T w are computed from the task
#: gradients one by one (K (K + 1) / 2 dot products, K scaled adds per variable) instead of
#: from a stacked (K, *shape) copy, whose allocation and copy cost more than they save for
#: few tasks (bench_gradient_strategies.py, MLP K = 2).
DIRECT_MAX_TASKS = 4


class TaskGradients:
    """The per-task gradients of one training step.

    Args:
        per_task: K lists, one gradient (or None) per variable, e.g. from `task_gradients`.
        variables: the variables, in the same order.
        stacked: optional {variable index: (K, *shape) tensor}, per-task gradients that
            come already stacked (e.g. from one vectorised backward pass through the
            trunk); `per_task` holds None at those indices. They are used as they are,
            so no second K x P copy is made.
        stacked_tasks: the tasks whose rows in `stacked` may be nonzero, i.e. that reach
            those variables (default: every task).

    Attributes:
        shared: indices of the variables that two or more tasks reach.
        common: indices of the variables that every task reaches.
        owner: for every variable that exactly one task reaches, that task's index.
    """

    def __init__(self, per_task, variables, stacked=None, stacked_tasks=None):
        # `variables` may also hold tensors (the shared representation z).
        self.num_tasks = len(per_task)
        self.variables = list(variables)
        self._given = dict(stacked or {})
        given_tasks = list(range(self.num_tasks) if stacked_tasks is None else stacked_tasks)
        reached_by = [
            given_tasks if i in self._given else
            [k for k in range(self.num_tasks) if per_task[k][i] is not None]
            for i in range(len(self.variables))
        ]
        self.shared = [i for i, tasks in enumerate(reached_by) if len(tasks) >= 2]
        self.owner = {i: tasks[0] for i, tasks in enumerate(reached_by) if len(tasks) == 1}
        #: Indices of the variables that every task reaches.
        self.common = [i for i, tasks in enumerate(reached_by) if len(tasks) == self.num_tasks]
        shared_reach = {k for i in self.shared for k in reached_by[i]}
        #: Tasks that reach no shared variable (their row of J is zero).
        self.tasks_without_shared = [k for k in range(self.num_tasks) if k not in shared_reach]
        # Dense per-task gradients of the shared variables (an embedding's come sparse).
        shared = set(self.shared)
        self.per_task = [[tf.convert_to_tensor(g) if i in shared and g is not None else g
                          for i, g in enumerate(row)] for row in per_task]
        self._stacked = {}  # stacked copies made so far

    @property
    def has_shared(self) -> bool:
        return bool(self.shared)

    def stacked(self, i) -> tf.Tensor:
        """(K, *shape): the per-task gradients of shared variable i, a task that does not
        reach it contributing zeros (given, or stacked when first asked for)."""
        if i in self._given:
            return self._given[i]
        if i not in self._stacked:
            self._stacked[i] = tf.stack([
                tf.zeros_like(self.variables[i]) if g[i] is None else g[i]
                for g in self.per_task])
        return self._stacked[i]

    def _direct(self, i) -> bool:
        """Whether the Gramian and J^T w of shared variable i come from the task gradients
        one by one (few tasks, not given stacked) rather than from a stacked copy."""
        return self.num_tasks <= DIRECT_MAX_TASKS and i not in self._given

    def sum_over_replicas(self) -> None:
        """Under tf.distribute: replace each replica's per-task gradients of the shared
        variables by their sum over replicas, the global J (K x P all-reduced: a Gramian
        or any non-linear combination of a sum is not the sum of the replicas' ones)."""
        slots = [(k, i) for i in self.shared if i not in self._given
                 for k in range(self.num_tasks) if self.per_task[k][i] is not None]
        given = [i for i in self.shared if i in self._given]
        if not slots and not given:
            return
        summed = replicas.sum_over_replicas(
            [self.per_task[k][i] for k, i in slots] + [self._given[i] for i in given])
        for (k, i), g in zip(slots, summed):
            self.per_task[k][i] = g
        self._given.update(zip(given, summed[len(slots):]))
        self._stacked = {}  # of the local gradients

    def gramian(self, dtype=tf.float64) -> tf.Tensor:
        """G = J J^T (K x K) over the shared variables, accumulated variable by variable:
        a matrix product of the stacked rows, or for few tasks the K (K + 1) / 2 dot
        products of the task gradients themselves (no stacked copy).

        In float64 by default: the products of float32 gradients are then exact, and the
        cosine of two nearly opposite gradients (a task pair near Pareto stationarity)
        keeps its distance from -1, which a float32 sum rounds to within ~1e-7; the
        strategies' answers there depend on that distance."""
        total = tf.zeros((self.num_tasks, self.num_tasks), dtype)
        products = {}  # (k, l), k <= l -> [g_k . g_l of each variable]
        for i in self.shared:
            if not self._direct(i):
                rows = tf.cast(tf.reshape(self.stacked(i), (self.num_tasks, -1)), dtype)
                total += tf.matmul(rows, rows, transpose_b=True)
                continue
            rows = [None if g[i] is None else tf.cast(g[i], dtype) for g in self.per_task]
            for k, a in enumerate(rows):
                for l in range(k, self.num_tasks):
                    if a is not None and rows[l] is not None:
                        products.setdefault((k, l), []).append(tf.reduce_sum(a * rows[l]))
        if not products:
            return total
        entry = {pair: tf.add_n(terms) for pair, terms in products.items()}
        zero = tf.zeros((), dtype)
        return total + tf.stack([
            tf.stack([entry.get((min(k, l), max(k, l)), zero) for l in range(self.num_tasks)])
            for k in range(self.num_tasks)])

    def cross_gramian(self, other: "TaskGradients", dtype=tf.float64) -> tf.Tensor:
        """A = J_self J_other^T (K x K, not symmetric in general) over the shared variables:
        the products of two sets of per-task gradients of the same variables (e.g. of two
        independent halves of a batch)."""
        total = tf.zeros((self.num_tasks, self.num_tasks), dtype)
        for i in self.shared:
            a = tf.cast(tf.reshape(self.stacked(i), (self.num_tasks, -1)), dtype)
            b = tf.cast(tf.reshape(other.stacked(i), (self.num_tasks, -1)), dtype)
            total += tf.matmul(a, b, transpose_b=True)
        return total

    def jacobian(self) -> tf.Tensor:
        """J (K x P): the flattened per-task gradients on the shared variables."""
        return tf.concat(
            [tf.reshape(self.stacked(i), (self.num_tasks, -1)) for i in self.shared], axis=1)

    def combine(self, weights, dtype=tf.float64) -> dict:
        """J^T w for every shared variable: {variable index: gradient}, accumulated in
        `dtype` (None: the gradients' own) and rounded once to the gradients' dtype.
        Float64 by default: near Pareto stationarity the update is much shorter than the
        weighted gradients it sums (and with tasks on different scales the weights span
        orders of magnitude), so a float32 sum would leave it conflicting with a task by
        float32's epsilon times that ratio."""
        result, each = {}, None
        for i in self.shared:
            if self._direct(i):
                rows = [(k, g[i]) for k, g in enumerate(self.per_task) if g[i] is not None]
                exact = dtype or rows[0][1].dtype
                if each is None:
                    each = tf.unstack(tf.cast(weights, exact), num=self.num_tasks)
                total = tf.add_n([each[k] * tf.cast(g, exact) for k, g in rows])
                result[i] = tf.cast(total, rows[0][1].dtype)
            else:
                stacked = self.stacked(i)
                exact = dtype or stacked.dtype
                total = tf.tensordot(tf.cast(weights, exact), tf.cast(stacked, exact), axes=1)
                result[i] = tf.cast(total, stacked.dtype)
        return result

    def unflatten(self, direction) -> dict:
        """Split a (P,) direction over the shared variables: {variable index: gradient}."""
        result, offset = {}, 0
        for i in self.shared:
            shape = tuple(self.variables[i].shape)
            if None in shape:  # a representation with a dynamic batch size
                shape, size = tf.shape(self.variables[i]), tf.size(self.variables[i])
            else:
                size = math.prod(shape)
            result[i] = tf.reshape(direction[offset: offset + size], shape)
            offset += size
        return result

    def gradients(self, shared_update: dict, extra=None) -> list:
        """The full gradient list: the combined update on shared variables, each task's own
        gradient on its head variables, plus `extra` (e.g. the regularisation gradient)."""
        grads = []
        for i in range(len(self.variables)):
            if i in shared_update:
                g = shared_update[i]
            elif i in self.owner:
                k = self.owner[i]
                g = self._given[i][k] if i in self._given else self.per_task[k][i]
            else:
                g = None
            if extra is not None and extra[i] is not None:
                g = extra[i] if g is None else g + extra[i]
            grads.append(g)
        return grads
