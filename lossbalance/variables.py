"""Variable updates as single graph operations."""

import tensorflow as tf


def assign_add(variable, value) -> None:
    """`variable += value` as one `AssignAddVariableOp`.

    Keras' `Variable.assign_add` reads the variable, adds and assigns (three ops, and the
    assign's value is read back by TensorFlow): in a training step of small ops each one
    costs executor time. The result is the same; under `tf.distribute` the underlying
    variable applies its aggregation as Keras' `assign` does. In a Keras stateless scope
    (where `variable.value` is not a `tf.Variable`) it falls back to Keras' method.
    """
    target = variable.value
    if isinstance(target, tf.Variable):
        target.assign_add(tf.cast(value, target.dtype), read_value=False)
    else:
        variable.assign_add(value)
