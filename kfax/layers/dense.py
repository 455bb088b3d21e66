"""Dense layers: a ``dot_general`` between an activation and a weight (any number of axes).

Covers ``x @ W``, ``einsum``, the PyTorch layout ``x @ W.T`` and Flax's ``DenseGeneral`` with
several contracted or output axes (attention projections, kernels ``(d, heads, head_dim)`` and
``(heads, head_dim, d)``). The weight matrix flattens the contracted axes into ``d_in`` rows and
the output axes into ``d_out`` columns, row-major, so that ``vec`` of it orders coordinates as
``h (x) g``. The capture delivers inputs and cotangents in the canonical rows layout
(:mod:`kfax.layers.layout`): ``(..., d_in)`` and ``(..., d_out)``, rows example-major.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kfax.layers.layout import inverse_permutation


@dataclasses.dataclass(frozen=True)
class Dense:
    """A dense layer's widths and the map between its weight leaf and ``(d_in, d_out)``.

    Attributes:
      d_in, d_out: products of the contracted and of the output axes of the weight.
      weight_in_axes: the weight leaf's contracted axes, in the order the rows flatten them.
      weight_out_axes: the weight leaf's output axes, in the order of the output features.
      weight_shape: the weight leaf's shape (one layer's, for a stack of layers).
    """

    d_in: int
    d_out: int
    weight_in_axes: tuple[int, ...]
    weight_out_axes: tuple[int, ...]
    weight_shape: tuple[int, ...]

    kind = "dense"
    output_axis = -1  # canonical layout: features last

    def input_rows(self, x: jax.Array) -> jax.Array:
        return x.reshape(-1, self.d_in)

    def output_rows(self, g: jax.Array) -> jax.Array:
        return g.reshape(-1, self.d_out)

    @property
    def _order(self) -> tuple[int, ...]:
        return self.weight_in_axes + self.weight_out_axes

    def weight_matrix(self, w: jax.Array) -> jax.Array:
        return jnp.transpose(w, self._order).reshape(self.d_in, self.d_out)

    def weight_from_matrix(self, m: jax.Array) -> jax.Array:
        blocked = m.reshape(tuple(self.weight_shape[a] for a in self._order))
        return jnp.transpose(blocked, inverse_permutation(self._order))

    def describe(self) -> str:
        return f"{self.d_in} -> {self.d_out}"


def dense_from_axes(
    weight_shape: tuple[int, ...], in_axes: tuple[int, ...], out_axes: tuple[int, ...]
) -> Dense:
    return Dense(
        d_in=math.prod(weight_shape[a] for a in in_axes),
        d_out=math.prod(weight_shape[a] for a in out_axes),
        weight_in_axes=tuple(in_axes),
        weight_out_axes=tuple(out_axes),
        weight_shape=tuple(weight_shape),
    )
