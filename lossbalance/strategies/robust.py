"""Byzantine-robust aggregators, as TorchJD has them: Krum (and Multi-Krum) and the
coordinate-wise trimmed mean.

Both come from distributed learning, where some of the gradients to combine may be
arbitrary ("Byzantine" workers); in multi-task learning they treat a task whose gradient
is far from the others as an outlier. Both need a minimum number of tasks, known only when
the strategy is bound to a model's tasks: `bind` (at `compile`) refuses fewer, saying why.
"""

import numpy as np
import tensorflow as tf

from lossbalance import solvers
from lossbalance.strategies.arguments import check_choice, check_number
from lossbalance.strategies.base import GramianWeighting, JacobianAggregator
from lossbalance.strategies.registry import register

DISTANCES = ("squared", "euclidean")


def _check_num_tasks(strategy, task_names, minimum, reason, fix):
    """Raise a ValueError naming the model's tasks if there are fewer than `minimum`."""
    task_names = list(task_names)
    if len(task_names) < minimum:
        raise ValueError(
            f"Strategy {strategy.registry_name!r} needs at least {minimum} tasks here "
            f"({reason}), but the model has {len(task_names)}: {task_names}. {fix}Use a "
            "strategy defined for any number of tasks otherwise (e.g. 'mean', 'upgrad').")


@register("krum")
class Krum(GramianWeighting):
    """Follow the task gradient(s) closest to their nearest neighbours: (Multi-)Krum.

    Formula, with K tasks, f = `n_byzantine` and m = `n_selected`: each task gradient g_i
    gets the score
        s(i) = sum of |g_i - g_j|^2 over the K - f - 2 gradients g_j (j != i) closest
               to g_i,
    the m tasks with the smallest scores are selected, and the update is their mean:
    w_i = 1/m for a selected task, 0 otherwise (weights sum to 1). The squared distances
    come from the Gramian alone, |g_i - g_j|^2 = G_ii + G_jj - 2 G_ij (computed in
    float64), so this is a Gramian weighting and works at both gradient levels. Krum (m = 1)
    follows one task's gradient (or the mean of tied ones, below): the one in the densest
    cluster, which an outlying gradient cannot be.

    Tasks: the score needs K - f - 2 >= 1 neighbours, so K >= f + 3, and m <= K (TorchJD's
    checks); with fewer tasks `compile` (`bind`) refuses the strategy, naming the count.
    The paper's resilience guarantee against f arbitrary gradients needs K > 2f + 2.

    Defaults: TorchJD has no default for `n_byzantine`; here f = 0 (the smallest K, 3, and
    still Krum's rule: with f = 0 each score sums the distances to the K - 2 nearest other
    gradients) and m = 1 (TorchJD's default).

    Where implementations differ: the paper scores with squared distances (default,
    `distance="squared"`); TorchJD's `Krum` sums the distances themselves
    (`distance="euclidean"` reproduces it), which weighs one far neighbour less against
    several near ones. Ties: where tasks with equal scores straddle the m-th place, they
    share the weight left equally (TorchJD's `topk` picks among them by position). Ties
    are the rule, not an accident, when each score has one neighbour (K - f - 2 = 1, e.g.
    K = 3 with f = 0): the two gradients closest to each other score the same, and Krum
    then follows their mean; the update never depends on the order of the tasks.
    Neither form promises a non-conflicting update, nor one independent of the tasks'
    scales (a task with a much larger gradient is far from all others and is never
    selected unless m is large).

    Args:
        n_byzantine: f, the number of gradients assumed arbitrary (>= 0, default 0).
        n_selected: m, how many gradients are averaged (Multi-Krum; >= 1, default 1).
        distance: "squared" (the paper) or "euclidean" (TorchJD).

    Reference: P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer, "Machine Learning
    with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017; TorchJD's
    `torchjd.aggregation.Krum` (Quinton & Rey, "Jacobian Descent for Multi-Objective
    Optimization", 2024).
    """

    def __init__(self, n_byzantine=0, n_selected=1, distance="squared", **kwargs):
        super().__init__(**kwargs)
        self.n_byzantine = check_number("n_byzantine", n_byzantine, minimum=0, integer=True)
        self.n_selected = check_number("n_selected", n_selected, minimum=1, integer=True)
        self.distance = check_choice("distance", distance, DISTANCES)

    @property
    def min_tasks(self) -> int:
        """The fewest tasks the hyper-parameters allow: max(f + 3, m)."""
        return max(self.n_byzantine + 3, self.n_selected)

    def bind(self, task_names):
        if self._task_names is None:
            _check_num_tasks(
                self, task_names, self.n_byzantine + 3,
                "each score sums the distances to the K - n_byzantine - 2 >= 1 nearest "
                f"other gradients, n_byzantine={self.n_byzantine}",
                "Krum is not defined for fewer than 3 tasks; with 3 or more, lower "
                "n_byzantine. " if self.n_byzantine else "Krum is not defined for fewer "
                "than 3 tasks. ")
            _check_num_tasks(self, task_names, self.n_selected,
                             f"n_selected={self.n_selected} tasks are averaged",
                             "Lower n_selected. ")
        super().bind(task_names)

    def scores(self, gramian):
        """(K,) float64 Krum scores of the task gradients, from their Gramian."""
        g = solvers.finite_or_zero(tf.cast(gramian, tf.float64))
        g = 0.5 * (g + tf.transpose(g))
        k = self.num_tasks
        norms = tf.linalg.diag_part(g)
        distances = tf.maximum(norms[:, None] + norms[None, :] - 2.0 * g, 0.0)
        if self.distance == "euclidean":
            distances = tf.sqrt(distances)
        distances = tf.where(tf.eye(k, dtype=tf.bool), tf.constant(np.inf, tf.float64),
                             distances)  # a gradient is not its own neighbour
        nearest = tf.sort(distances, axis=1)[:, : k - self.n_byzantine - 2]
        return tf.reduce_sum(nearest, axis=1)

    def gramian_weights(self, gramian, losses):
        scores = self.scores(gramian)
        m = self.n_selected
        cut = tf.sort(scores)[m - 1]  # the m-th smallest score
        below = tf.cast(scores < cut, tf.float64)
        at = tf.cast(scores == cut, tf.float64)  # >= 1 task; ties share what is left
        weights = below / m + at * (m - tf.reduce_sum(below)) / (m * tf.reduce_sum(at))
        return tf.cast(weights, gramian.dtype)

    def get_config(self):
        return {**super().get_config(), "n_byzantine": self.n_byzantine,
                "n_selected": self.n_selected, "distance": self.distance}


@register("trimmed_mean", aliases=("trimmedmean",))
class TrimmedMean(JacobianAggregator):
    """The coordinate-wise trimmed mean of the task gradients.

    Formula: for every coordinate p of the shared parameters, sort the K values
    g_1[p], ..., g_K[p], discard the t = `trim_number` largest and the t smallest, and
    average the K - 2t that remain:
        update[p] = (1 / (K - 2t)) sum_{i kept at p} g_i[p].
    With t = 0 it is the mean. It needs the Jacobian itself (each coordinate keeps other
    tasks), so it is a Jacobian aggregator; it is defined at both gradient levels (at the
    representation level per coordinate of the representation). The weight logged per task
    is its effective weight: the share of its squared norm kept, over K - 2t,
    (g_i . g_i^kept) / (|g_i|^2 (K - 2t)) (1/(K - 2t) where nothing is trimmed; for a
    zero gradient, the fraction of its coordinates kept, over K - 2t).

    Tasks: K >= 2t + 1, so that a value remains at every coordinate (TorchJD's check);
    with fewer tasks `compile` (`bind`) refuses the strategy, naming the count.

    Defaults: t = 1 (TorchJD's `TrimmedMean` has no default; 1 is the least trimming that
    does something, and needs K >= 3). Not non-conflicting, and the update depends on the
    tasks' scales (a task with much larger gradients holds the extreme values at most
    coordinates, and is trimmed there). As TorchJD's: the mean of the kept values,
    summed in float64 here.

    Args:
        trim_number: t, the number of largest and of smallest values discarded at each
            coordinate (>= 0, default 1).

    Reference: D. Yin, Y. Chen, K. Ramchandran, P. Bartlett, "Byzantine-Robust
    Distributed Learning: Towards Optimal Statistical Rates", ICML 2018; TorchJD's
    `torchjd.aggregation.TrimmedMean`.
    """

    def __init__(self, trim_number=1, **kwargs):
        super().__init__(**kwargs)
        self.trim_number = check_number("trim_number", trim_number, minimum=0, integer=True)

    @property
    def min_tasks(self) -> int:
        """The fewest tasks the hyper-parameter allows: 2t + 1."""
        return 2 * self.trim_number + 1

    def bind(self, task_names):
        if self._task_names is None:
            _check_num_tasks(self, task_names, self.min_tasks,
                             f"trim_number={self.trim_number} values are discarded at each "
                             "end of every coordinate, and one must remain",
                             "Lower trim_number to at most "
                             f"{(len(tuple(task_names)) - 1) // 2} (0 is the mean). ")
        super().bind(task_names)

    def aggregate(self, jacobian, losses):
        j = solvers.finite_or_zero(tf.convert_to_tensor(jacobian))
        k, t = self.num_tasks, self.trim_number
        kept_count = k - 2 * t
        # Each value's rank in its coordinate (ties in task order); kept if
        # t <= rank < K - t.
        ranks = tf.argsort(tf.argsort(j, axis=0, stable=True), axis=0, stable=True)
        kept = tf.cast((ranks >= t) & (ranks < k - t), tf.float64)
        rows = tf.cast(j, tf.float64)
        kept_rows = kept * rows
        direction = tf.reduce_sum(kept_rows, axis=0) / kept_count
        squared = tf.reduce_sum(rows * rows, axis=1)
        share = tf.where(squared > 0,
                         tf.reduce_sum(kept_rows * rows, axis=1) / tf.where(
                             squared > 0, squared, 1.0),
                         tf.reduce_mean(kept, axis=1))
        return tf.cast(direction, j.dtype), tf.cast(share / kept_count, j.dtype)

    def get_config(self):
        return {**super().get_config(), "trim_number": self.trim_number}
