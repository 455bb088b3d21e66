"""A whole parameter without layer structure: tied and reused weights, unknown primitives.

A parameter that several operations consume (a tied input embedding and output projection, a
block applied twice) or that an operation kfax does not know consumes is tapped where it enters
the program: a perturbation is added to the leaf itself, so the cotangent of the perturbation is
the gradient with respect to the whole parameter. The capture delivers, per output-cotangent
column, that gradient summed over the batch, each example's share multiplied by a random sign
(see :mod:`kfax._capture`), so that its square is unbiased for the sum of the examples' squares.
"""

from __future__ import annotations

import dataclasses
import math

import jax


@dataclasses.dataclass(frozen=True)
class Parameter:
    """The leaf's shape; its "matrix" is the leaf itself."""

    shape: tuple[int, ...]

    kind = "parameter"
    output_axis = -1
    d_in = 1

    @property
    def d_out(self) -> int:
        return math.prod(self.shape)

    def weight_matrix(self, w: jax.Array) -> jax.Array:
        return w

    def weight_from_matrix(self, m: jax.Array) -> jax.Array:
        return m

    def describe(self) -> str:
        return f"{self.d_out} entries"
