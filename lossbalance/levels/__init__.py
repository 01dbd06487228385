"""Levels: where a training step finds what its strategy combines, one module each.

`BalancedModel.train_step` runs the forward pass and the losses inside its tape, then hands
them to the compiled level, which returns a gradient for every trainable variable and the
strategy's weights:

    loss.py            LossLevel: weights from the losses, one backward pass of sum_k w_k L_k
                       (layer_norms.py: per-task gradient norms at one layer, for GradNorm)
    parameters.py      ParameterLevel: each task's exact gradient on the shared parameters
    halves.py          HalfBatchLevel: the same, weights from two independent half-batches
    vectorized.py      VectorizedLevel: the same, the trunk's K passes vectorised through z
    representation.py  RepresentationLevel: per-task gradients at z, one pass through the trunk
    gradient.py        GradientLevel: what the three gradient levels share
    base.py            the interface, the step's objectives, and `make_level` (compile)

The family dispatch they share with `lossbalance.aggregate` and `inspect_batch` is
`lossbalance.combination`. docs/architecture.md shows how a step flows through them.
"""

from lossbalance.levels.base import GRADIENT_LEVELS, PRECISIONS, Level, Objectives, make_level

__all__ = ["GRADIENT_LEVELS", "PRECISIONS", "Level", "Objectives", "make_level"]
