"""Where the trunk ends: the variables upstream of the shared representation z, found
once per model (shared by the representation and vectorised levels)."""

from __future__ import annotations


class Trunk:
    """Holds the forward pass that returns z, and the trunk's variables once found."""

    def __init__(self, forward):
        self.forward = forward  # a `RepresentationForward`
        self.ids = None

    def split(self, tape, z, variables):
        """(indices of the variables upstream of z, indices of the others)."""
        if self.ids is None:  # structure only: unused ops are pruned from graphs
            reached = tape.gradient(z, [v.value for v in variables])
            self.ids = {id(v) for v, g in zip(variables, reached) if g is not None}
        upstream = [id(v) in self.ids for v in variables]
        return ([i for i, up in enumerate(upstream) if up],
                [i for i, up in enumerate(upstream) if not up])
