"""Preference-based scalarisations of the loss vector: PBI (MOEA/D) and COSMOS.

Both map the K task losses to one number S(L_1..L_K) given a preference direction, and are
minimised, as GLS and STCH are, with one backward pass of sum_k w_k L_k where
w_k = dS/dL_k is held constant (stop_gradient): the gradients agree, and a constant offset
(`_loss_utils.surrogate_offset`) makes the logged `loss` equal S itself.

Unlike a linear scalarisation, both penalise the *angle* between the loss vector and the
preference ray, so their weights move a task's loss toward the ray: a task that is ahead
of the others (relative to the preference) can get a small or even negative weight, its
loss then allowed to rise while the others catch up.

The losses each method sees. A direction in loss space only means something when the
losses share units, so PBI by default divides every loss by its value at the first
training step (as STCH divides by a nadir and GradNorm by L(0)): l_k = (L_k - z_k) / n_k,
n_k = L_k(0) - z_k, with z_k a reference (ideal) point, 0 by default. Under that
normalisation multiplying one task's loss by a constant changes nothing (the strategies
then declare `scale_invariant`). COSMOS uses the raw losses by default, as its paper does,
and takes the same normalisation with `normalize=True`.

Everything is computed in float64 from the (float32) global losses: the K-vector costs
nothing, and the weights equal the float64 formula for losses from 1e-8 to 1e8 side by
side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf

from lossbalance.strategies._loss_utils import global_losses, surrogate_offset
from lossbalance.strategies.arguments import check_number, resolve_per_task
from lossbalance.strategies.base import LossWeighting
from lossbalance.strategies.registry import register

#: A loss vector within this angle (in radians, times K) of the preference ray is on it:
#: float32 losses fix each entry only to ~eps32 relative, so a smaller distance to the ray
#: is below the losses' own precision (PBI's d2 has no gradient there; see `PBI`).
_ON_RAY = float(np.finfo(np.float32).eps)
#: Below this norm of the loss vector COSMOS' cosine is undefined (every loss ~0).
_TINY_NORM = 1e-20


def _check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False; got {value!r}.")
    return value


def _per_task_setting(name, value, validate):
    """Validate a per-task setting at construction: None, a number, a list in task order or
    a dict by task name. Returns it in a form `get_config` can store."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {str(task): validate(f"{name}[{task!r}]", v) for task, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [validate(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return validate(name, value)


def _check_preference_entry(name, value):
    return check_number(name, value, minimum=0.0)


def _check_reference_entry(name, value):
    return check_number(name, value)


class _PreferenceScalarisation(LossWeighting):
    """A scalarisation S(l) of the (optionally normalised) losses along a preference.

    l_k = (L_k - z_k) / n_k with z the reference point (0 unless a subclass offers one) and
    n_k = L_k(0) - z_k at the first step if `normalize`, else 1. Subclasses implement
    `scalarise(l, preference) -> (dS/dl, S)` in float64 and `_preference_vector` (the
    preference's normalisation). The step's weights are w_k = (dS/dl_k) / n_k.
    """

    loss_floor = 0.0

    #: z, the reference point in loss units (None: 0), as configured (PBI's `reference`).
    reference = None

    def __init__(self, preference=None, normalize=False, **kwargs):
        super().__init__(**kwargs)
        self.preference = _per_task_setting("preference", preference,
                                            _check_preference_entry)
        self._check_preference_not_zero(self.preference)
        self.normalize = _check_flag("normalize", normalize)

    @staticmethod
    def _check_preference_not_zero(preference):
        if preference is None or isinstance(preference, Mapping):
            return  # a dict's tasks left out get 1; checked again at bind
        values = preference if isinstance(preference, list) else [preference]
        if not any(v > 0 for v in values):
            raise ValueError(
                f"`preference` must have a positive entry (a direction among the tasks' "
                f"losses); got {preference!r}. Give each task a weight >= 0, e.g. "
                "preference=None (the default) for equal preference, or a dict by task "
                "name such as {'cls': 1.0, 'reg': 2.0}.")

    def _reference_is_zero(self) -> bool:
        reference = self.reference
        if reference is None:
            return True
        values = reference.values() if isinstance(reference, Mapping) else (
            reference if isinstance(reference, list) else [reference])
        return all(v == 0 for v in values)

    @property
    def scale_invariant(self):
        # l_k = L_k / L_k(0): scaling a task's loss scales its normaliser alike.
        return self.normalize and self._reference_is_zero()

    def build_state(self, num_tasks):
        preference = resolve_per_task("preference", self.preference, self.task_names,
                                      default=1.0, validate=_check_preference_entry)
        if not any(v > 0 for v in preference):
            raise ValueError(
                f"`preference` gives every task weight 0 ({self.preference!r} for tasks "
                f"{list(self.task_names)}); give at least one task a positive weight.")
        self._preference = tf.constant(self._preference_vector(np.array(preference)),
                                       tf.float64)
        self._reference = tf.constant(
            resolve_per_task("reference", self.reference, self.task_names, default=0.0,
                             validate=_check_reference_entry), tf.float64)
        if self.normalize:
            #: n_k = L_k(0) - z_k, the first step's global losses above the reference
            #: (1 for a task whose first loss was not above it).
            self.normalizer = self.add_state("normalizer", (num_tasks,), "ones")
            #: 1 once the first step has recorded `normalizer` (saved with the model).
            self.started = self.add_state("started")

    def _preference_vector(self, preference: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def scalarise(self, scaled, preference):
        """(K,) float64 normalised losses l and preference -> ((K,) dS/dl, S)."""
        raise NotImplementedError

    def loss_floors(self):
        return self._reference.numpy().tolist()

    def weighting(self, losses):
        """w_k = dS/dL_k and the offset that makes the logged objective S; at the first
        step (with `normalize`) records the normaliser."""
        total = tf.cast(global_losses(losses), tf.float64)
        gap = total - self._reference
        if self.normalize:
            started = self.read(self.started) > 0
            first = tf.where(gap > 0, gap, tf.ones_like(gap))
            normalizer = tf.where(started, tf.cast(self.read(self.normalizer), tf.float64),
                                  first)
            self.write(self.normalizer, normalizer)
            self.write(self.started, 1.0)
            inverse = 1.0 / normalizer
            scaled = gap * inverse
        else:
            inverse = None
            scaled = gap
        slope, value = self.scalarise(scaled, self._preference)
        weights = slope if inverse is None else slope * inverse
        return (tf.stop_gradient(tf.cast(weights, losses.dtype)),
                tf.cast(surrogate_offset(value, weights, total), losses.dtype))

    def get_config(self):
        def stored(value):
            if isinstance(value, Mapping):
                return dict(value)
            if isinstance(value, list):
                return list(value)
            return value

        return {**super().get_config(), "preference": stored(self.preference),
                "normalize": self.normalize}


@register("pbi", aliases=("penalty_boundary_intersection",))
class PBI(_PreferenceScalarisation):
    """Penalty-based boundary intersection (MOEA/D's PBI) of the normalised task losses.

    Formula. With the losses l_k = (L_k - z_k) / n_k (below), a preference lambda (K,),
    u = lambda / ||lambda||:
        d1 = u . l                   (how far along the preference ray l has come),
        d2 = || l - d1 u ||          (how far l is from the ray),
        S  = d1 + theta d2.
    Its gradient dS/dl = u + theta (l - d1 u) / d2 pulls the loss vector down the ray and
    back onto it; the strategy takes one backward pass of sum_k w_k L_k with
    w_k = stop_gradient(dS/dl_k / n_k), plus a constant so that the logged `loss` is S.
    d2 is not differentiable on the ray itself: there (d2 / ||l|| <= K eps(float32), below
    what float32 losses can resolve) the penalty contributes nothing and w_k = u_k / n_k.
    The penalty's pull has length theta wherever l is off the ray, so the weights are
    u + theta (a unit vector orthogonal to u): for theta > 1 a task ahead of the others
    gets a *negative* weight (its loss may rise while the others catch up), and the loss
    vector zig-zags about the ray rather than settling on it; that is the method. On the
    uniform ray it asks every task for the same relative progress L_k / L_k(0), so the
    slowest task sets the pace: on the README's quick start (Adam at 1e-3), the raw-unit
    regression's loss falls ~1% in 30 epochs and PBI holds the classifier at its first
    loss meanwhile (accuracy ~50%, against 73% for `fixed`); `theta` near 1 or a
    `preference` that leans toward the slow task loosen that.

    Normalisation (`normalize=True`, default): n_k = L_k(0) - z_k, the task's global loss
    at the first training step above the reference point (1 for a task whose first loss is
    not above it), stored in the strategy's variables (saved with the model); with
    `normalize=False`, n_k = 1 and the raw losses are used. With the default z = 0 the
    method then does not depend on the tasks' units (`scale_invariant`): every task starts
    at l_k = 1, on the uniform preference ray. The reference point z (`reference`, in each
    task's loss units, default 0) is MOEA/D's ideal point, a lower bound of the losses;
    losses must stay above it (`fit` stops with an error naming the task otherwise).

    Defaults: `theta=5` (the MOEA/D paper's penalty), uniform `preference`, `normalize=True`,
    `reference=0`.

    Implementations differ. MOEA/D (Zhang & Li, 2007) applies PBI to raw objective values,
    takes the ideal point z* as the best value of each objective found so far, updated
    every generation, and defines d1 with an absolute value |(F - z*) . u|; its
    normalised variants divide by (z_nadir - z*). LibMOON's gradient-based `pbi` uses raw
    losses with z = 0 (its coefficient defaults to 1 in the version read). Here: losses
    divided by their first-step values (a fixed nadir, as STCH's and GradNorm's L(0)), a
    fixed ideal point (a running minimum of mini-batch losses tracks the luckiest batch and
    makes the objective drift), and a signed d1, equal to MOEA/D's wherever the losses are
    above the reference. `normalize=False` is LibMOON's form with theta = 5. As LibMOON
    notes, PBI's minimiser need not be Pareto optimal for theta > 0; it targets the point
    where the preference ray meets the front.

    Args:
        theta: the penalty on the distance to the ray, >= 0 (0: S = d1, the linear
            scalarisation along the preference).
        preference: lambda, >= 0 per task with at least one positive entry: None (equal),
            a list in task order, or a dict by task name (tasks left out get 1). Only its
            direction matters.
        normalize: divide each loss (above the reference) by its first-step value.
        reference: z, the ideal point in loss units: a number, a list in task order or a
            dict by task name (default 0); also the lowest loss the method accepts.

    Reference: Q. Zhang, H. Li, "MOEA/D: A Multiobjective Evolutionary Algorithm Based on
    Decomposition", IEEE Transactions on Evolutionary Computation 11(6), 2007.
    """

    def __init__(self, theta=5.0, preference=None, normalize=True, reference=None,
                 **kwargs):
        super().__init__(preference=preference, normalize=normalize, **kwargs)
        self.theta = check_number("theta", theta, minimum=0.0)
        self.reference = _per_task_setting("reference", reference, _check_reference_entry)

    def _preference_vector(self, preference):
        return preference / np.linalg.norm(preference)

    def loss_floor_fix(self):
        return ("PBI measures the losses from its `reference` point (the ideal point, "
                "default 0): give `reference` a lower bound of each such task's loss (a "
                "number, a list in task order, or a dict by task name), or use a "
                "strategy defined for losses of any sign, such as 'fixed', 'rlw' or a "
                "gradient-level one.")

    def scalarise(self, scaled, preference):
        along = tf.reduce_sum(preference * scaled)
        across = scaled - along * preference
        distance = tf.norm(across)
        size = tf.norm(scaled)
        off_ray = distance > _ON_RAY * float(self.num_tasks) * size
        # On the ray the penalty has no gradient (and `across` is rounding noise).
        pull = tf.where(off_ray, across / tf.where(off_ray, distance, 1.0), 0.0)
        return preference + self.theta * pull, along + self.theta * distance

    def get_config(self):
        reference = self.reference
        if isinstance(reference, Mapping):
            reference = dict(reference)
        elif isinstance(reference, list):
            reference = list(reference)
        return {**super().get_config(), "theta": self.theta, "reference": reference}


@register("cosmos")
class COSMOS(_PreferenceScalarisation):
    """COSMOS' cosine-penalised linear scalarisation, for a fixed preference.

    Formula. For a preference r on the simplex (r_k >= 0, sum_k r_k = 1) and the losses
    l (the raw losses L by default; below):
        S = sum_k r_k l_k - lamda cos(r, l),     cos(r, l) = r . l / (||r|| ||l||),
    whose gradient is
        dS/dl = r - lamda (r / (||r|| ||l||) - cos(r, l) l / ||l||^2).
    The linear term descends every loss as the preference weighs them; the cosine term
    turns the loss vector toward the ray r, with a pull that grows as 1 / ||l|| as the
    losses fall. The strategy takes one backward pass of sum_k w_k L_k with
    w_k = stop_gradient(dS/dL_k), plus a constant so that the logged `loss` is S. The
    weights may be negative: the cosine term lets a task ahead of the ray rise. When every
    loss is ~0 (||l|| <= 1e-20) the cosine is undefined and its term is left out.

    Scope: COSMOS trains *one* network for the whole Pareto front: every step it samples a
    preference r ~ Dirichlet(alpha) and feeds r to the network as an extra input, so that
    at test time any preference can be asked for. Conditioning the network on r is a change
    of the model, out of scope for a balancing strategy: here the preference is fixed
    (uniform by default), which gives the COSMOS objective of that one preference.

    Losses: the raw losses (`normalize=False`, default), as in the paper, so the result
    depends on the tasks' units: with losses of very different sizes the larger one
    dominates both terms. `normalize=True` divides each loss by its global value at the
    first training step (stored, saved with the model; 1 for a task whose first loss is not
    positive), which makes the method independent of the units (`scale_invariant`).
    Losses must be non-negative: the cosine compares the loss vector's direction from the
    origin with the preference ray, which assumes losses whose lowest value is 0 (`fit`
    stops with an error naming a task whose mean loss is negative).

    Defaults: `lamda=2` (the authors' default, set for Multi-MNIST; their settings use 0.01
    for the fairness data sets, 2 for Multi-MNIST/Fashion, 3 for CelebA and 8 for
    Multi-Fashion+MNIST), uniform `preference`, `normalize=False`.

    Implementations differ: the authors' code takes the linear term with r on the simplex
    (Dirichlet samples, test rays divided by their sum), as here; LibMOON's `cosmos`
    divides r by its Euclidean norm instead (a linear term sqrt(K) times smaller for
    uniform r) and defaults to a coefficient of 10.

    Args:
        lamda: lambda, the weight of the cosine term, >= 0 (the authors' spelling; 0 gives
            the linear scalarisation sum_k r_k L_k).
        preference: r, >= 0 per task with at least one positive entry: None (equal), a
            list in task order, or a dict by task name (tasks left out get 1); divided by
            its sum.
        normalize: divide each loss by its first-step value.

    Reference: M. Ruchte, J. Grabocka, "Scalable Pareto Front Approximation for Deep
    Multi-Objective Learning", ICDM 2021.
    """

    def __init__(self, lamda=2.0, preference=None, normalize=False, **kwargs):
        super().__init__(preference=preference, normalize=normalize, **kwargs)
        self.lamda = check_number("lamda", lamda, minimum=0.0)

    def _preference_vector(self, preference):
        return preference / preference.sum()

    def scalarise(self, scaled, preference):
        linear = tf.reduce_sum(preference * scaled)
        size = tf.norm(scaled)
        defined = size > _TINY_NORM
        inverse_size = tf.where(defined, 1.0 / tf.where(defined, size, 1.0), 0.0)
        inverse_ray = 1.0 / tf.norm(preference)
        cosine = linear * inverse_ray * inverse_size
        slope = preference * inverse_ray * inverse_size - cosine * scaled * inverse_size**2
        return preference - self.lamda * slope, linear - self.lamda * cosine

    def get_config(self):
        return {**super().get_config(), "lamda": self.lamda}
