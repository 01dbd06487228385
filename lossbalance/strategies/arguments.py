"""What strategies share beyond their contracts: hyper-parameter checks (an invalid value
fails at construction, naming the argument), per-task settings, and random task orders."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import keras
import tensorflow as tf


def random_orders(seed_generator, num_tasks):
    """(K, K - 1) int tensor: row i is a uniformly random order of the tasks other than i
    (PCGrad's and GradVac's visiting orders), drawn from a Keras `SeedGenerator`."""
    scores = keras.random.uniform((num_tasks, num_tasks), seed=seed_generator)
    scores = scores + 2.0 * tf.eye(num_tasks)  # a task comes after all others: drop it
    return tf.argsort(scores, axis=1)[:, : num_tasks - 1]


def check_number(name: str, value, *, minimum=None, maximum=None, strict=False,
                 integer=False):
    """Validate a scalar hyper-parameter and return it as float (or int)."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        integer and not float(value).is_integer()
    ):
        raise TypeError(f"`{name}` must be {kind}; got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite; got {value!r}.")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        bound = ">" if strict else ">="
        raise ValueError(f"`{name}` must be {bound} {minimum}; got {value!r}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be <= {maximum}; got {value!r}.")
    return int(value) if integer else float(value)


def check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {', '.join(map(repr, choices))}; got {value!r}."
        )
    return value


def resolve_per_task(name: str, value, task_names, *, default, validate, kind="task"):
    """Expand a per-task setting (scalar, list in task order, or dict by task name).

    Returns a list in task order. Unknown names and wrong lengths raise errors that list
    the model's tasks (or outputs, with `kind="output"`).
    """
    task_names = list(task_names)
    if value is None:
        return [default] * len(task_names)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(task_names))
        if unknown:
            raise ValueError(
                f"`{name}` names unknown {kind}(s) {unknown}; the model's {kind}s are "
                f"{task_names}."
            )
        values = [value.get(task, default) for task in task_names]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != len(task_names):
            raise ValueError(
                f"`{name}` has {len(value)} entries but the model has "
                f"{len(task_names)} {kind}s {task_names}; give one per {kind} or a dict "
                f"by {kind} name."
            )
        values = list(value)
    else:
        values = [value] * len(task_names)
    return [validate(f"{name}[{task!r}]", v) for task, v in zip(task_names, values)]
