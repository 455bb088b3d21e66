"""Per layer kind: how a layer's activations, output cotangents and weights map to K-FAC matrices.

Each geometry turns the layer input into rows ``h`` of width ``d_in``, the cotangent of the layer
output into rows ``g`` of width ``d_out``, and the weight into a ``(d_in, d_out)`` matrix whose
row-major flattening orders coordinates as ``h (x) g`` (MATH.md). Rows of ``h`` and ``g`` are in
the same order (example-major), so per-position products line up. Knows nothing of jaxprs
(:mod:`kfax._tracing` builds these objects) nor of optimisers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _inverse_permutation(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


@dataclasses.dataclass(frozen=True)
class Dense:
    """``dot_general`` between an activation and a 2-D weight, any extra leading axes shared."""

    d_in: int
    d_out: int
    input_axis: int  # axis of the activation that is contracted with the weight
    output_axis: int  # axis of the layer output that indexes output features
    weight_in_axis: int  # axis of the weight leaf that indexes inputs
    weight_out_axis: int

    kind = "dense"

    def input_rows(self, x: jax.Array) -> jax.Array:
        return jnp.moveaxis(x, self.input_axis, -1).reshape(-1, self.d_in)

    def output_rows(self, g: jax.Array) -> jax.Array:
        return jnp.moveaxis(g, self.output_axis, -1).reshape(-1, self.d_out)

    def weight_matrix(self, w: jax.Array) -> jax.Array:
        return jnp.transpose(w, (self.weight_in_axis, self.weight_out_axis))

    def weight_from_matrix(self, m: jax.Array) -> jax.Array:
        return m if self.weight_in_axis == 0 else m.T

    def describe(self) -> str:
        return f"{self.d_in} -> {self.d_out}"


@dataclasses.dataclass(frozen=True)
class Conv:
    """``conv_general_dilated`` (KFC): the input rows are the patches at each output location."""

    d_in: int
    d_out: int
    filter_shape: tuple[int, ...]
    window_strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    dimension_numbers: Any
    output_axis: int
    weight_in_axis: int
    weight_out_axis: int
    weight_spatial_axes: tuple[int, ...]

    kind = "conv"

    def input_rows(self, x: jax.Array) -> jax.Array:
        patches = jax.lax.conv_general_dilated_patches(
            x,
            filter_shape=self.filter_shape,
            window_strides=self.window_strides,
            padding=self.padding,
            lhs_dilation=self.lhs_dilation,
            rhs_dilation=self.rhs_dilation,
            dimension_numbers=self.dimension_numbers,
            precision=jax.lax.Precision.HIGHEST,
        )
        return jnp.moveaxis(patches, self.output_axis, -1).reshape(-1, self.d_in)

    def output_rows(self, g: jax.Array) -> jax.Array:
        return jnp.moveaxis(g, self.output_axis, -1).reshape(-1, self.d_out)

    @property
    def _matrix_order(self) -> tuple[int, ...]:
        # Patch features are ordered (input channel, *filter spatial axes) by
        # ``conv_general_dilated_patches``; the weight matrix rows follow the same order.
        return (self.weight_in_axis, *self.weight_spatial_axes, self.weight_out_axis)

    def weight_matrix(self, w: jax.Array) -> jax.Array:
        return jnp.transpose(w, self._matrix_order).reshape(self.d_in, self.d_out)

    def weight_from_matrix(self, m: jax.Array) -> jax.Array:
        order = self._matrix_order
        shape = [0] * len(order)
        sizes = (self.d_in // int(np.prod(self.filter_shape)), *self.filter_shape, self.d_out)
        for axis, size in zip(order, sizes, strict=True):
            shape[axis] = size
        blocked = m.reshape(tuple(shape[a] for a in order))
        return jnp.transpose(blocked, _inverse_permutation(order))

    def describe(self) -> str:
        window = "x".join(str(s) for s in self.filter_shape)
        return f"{self.d_in} -> {self.d_out} ({window} window)"


Geometry = Dense | Conv


def statistics_dtype(dtype: Any) -> Any:
    """Factors accumulate in float32 or wider, whatever the activation dtype."""
    return jnp.promote_types(dtype, jnp.float32)


def input_moments(geometry: Geometry, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``E[h h^T]`` and ``E[h]`` over all rows (examples and shared positions)."""
    rows = geometry.input_rows(x)
    rows = rows.astype(statistics_dtype(rows.dtype))
    count = rows.shape[0]
    second = jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST) / count
    return second, jnp.mean(rows, axis=0)


def output_moment(geometry: Geometry, cotangents: jax.Array, scale: float) -> jax.Array:
    """``scale * sum over columns and rows of g g^T``; ``cotangents`` has a leading column axis."""
    rows = jax.vmap(geometry.output_rows)(cotangents).reshape(-1, geometry.d_out)
    rows = rows.astype(statistics_dtype(rows.dtype))
    return jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST) * scale
