"""Convolutions (KFC, Grosse & Martens 2016): the input rows are the patches at each location.

The capture delivers the input and the output cotangent in the operation's own layout, with any
shared scan steps merged into the batch axis (:func:`kfax.layers.layout.merged_layout`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kfax.layers.layout import inverse_permutation


@dataclasses.dataclass(frozen=True)
class Conv:
    """``conv_general_dilated`` with one feature group."""

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
        return jnp.transpose(blocked, inverse_permutation(order))

    def describe(self) -> str:
        window = "x".join(str(s) for s in self.filter_shape)
        return f"{self.d_in} -> {self.d_out} ({window} window)"
