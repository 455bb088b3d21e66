"""Elementwise scale and shift: ``scale * x + shift`` with parameters broadcast over rows.

LayerNorm, RMSNorm and BatchNorm scales and biases, a learned gate, a bias added to anything
that is not a dense layer's output, a positional table added to every example: one parameter
entry per feature (the parameter's shape; a scalar is one feature), shared by every row of an
example. The scale is tapped at its multiplication (input: the other operand, broadcast;
cotangent: that of the product) and the shift at its addition, so each example's gradient is
exact: ``sum_rows x * g_scale`` and ``sum_rows g_shift``. The capture delivers the scale's
input (``None`` without a scale) and the cotangents: one array, or ``(scale, shift)`` when both
are present, in the canonical rows layout ``(batch, ..., d)``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kfax._moments import statistics_dtype


@dataclasses.dataclass(frozen=True)
class ScaleShift:
    """A scale, a shift, or both, over ``d_out`` features.

    Attributes:
      param_shape: the shape of the scale and of the shift (one layer's, in a stack).
      has_scale, has_shift: which are present. The layer's weight is the scale when there is
        one (the shift is then its bias), else the shift.
    """

    param_shape: tuple[int, ...]
    has_scale: bool
    has_shift: bool

    kind = "scale_shift"
    output_axis = -1

    @property
    def d_out(self) -> int:
        return math.prod(self.param_shape)

    @property
    def d_in(self) -> int:
        """Parameters per feature (1 or 2)."""
        return int(self.has_scale) + int(self.has_shift)

    def weight_matrix(self, w: jax.Array) -> jax.Array:
        return w.reshape(-1)

    def weight_from_matrix(self, m: jax.Array) -> jax.Array:
        return m.reshape(self.param_shape)

    def per_example_gradients(self, inputs, cotangents, batch: int) -> jax.Array:
        """Each example's gradient of every parameter entry, per cotangent column:
        ``(columns, batch, d, k)`` with ``k`` = (scale, shift) as present."""
        columns = cotangents if isinstance(cotangents, tuple) else (cotangents,)
        parts = []
        if self.has_scale:
            g = columns[0]
            g = g.astype(statistics_dtype(g.dtype))
            x = inputs.astype(g.dtype)
            product = (g * x[None]).reshape(g.shape[0], batch, -1, self.d_out)
            parts.append(jnp.sum(product, axis=2))
        if self.has_shift:
            g = columns[-1]
            g = g.astype(statistics_dtype(g.dtype))
            parts.append(jnp.sum(g.reshape(g.shape[0], batch, -1, self.d_out), axis=2))
        return jnp.stack(parts, axis=-1)

    def describe(self) -> str:
        parts = [p for p, on in (("scale", self.has_scale), ("shift", self.has_shift)) if on]
        return f"{' and '.join(parts)} over {self.d_out}"
