"""A stack of identical layers (``lax.scan`` over layers with stacked parameters).

The weight leaf holds one layer per entry of its stack axes; the layer kind's own geometry
describes one layer (with the stack axes removed from the leaf). The capture delivers inputs
``(*stack, ...)`` and cotangents ``(columns, *stack, ...)``; the matrix of the whole leaf is
``(prod(stack), d_in, d_out)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Stacked:
    """``inner`` repeated over ``stack_shape``; the stack sits on ``weight_stack_axes`` of the
    weight leaf (in the order of the scans, outermost first)."""

    inner: Any
    stack_shape: tuple[int, ...]
    weight_stack_axes: tuple[int, ...]

    @property
    def kind(self) -> str:
        return self.inner.kind

    @property
    def d_in(self) -> int:
        return self.inner.d_in

    @property
    def d_out(self) -> int:
        return self.inner.d_out

    @property
    def output_axis(self) -> int:
        return self.inner.output_axis

    @property
    def size(self) -> int:
        return math.prod(self.stack_shape)

    def weight_matrix(self, w: jax.Array) -> jax.Array:
        lead = tuple(range(len(self.stack_shape)))
        w = jnp.moveaxis(w, self.weight_stack_axes, lead)
        w = w.reshape((self.size,) + w.shape[len(lead) :])
        return jax.vmap(self.inner.weight_matrix)(w)

    def weight_from_matrix(self, m: jax.Array) -> jax.Array:
        inner = jax.vmap(self.inner.weight_from_matrix)(m)
        inner = inner.reshape(self.stack_shape + inner.shape[1:])
        lead = tuple(range(len(self.stack_shape)))
        return jnp.moveaxis(inner, lead, self.weight_stack_axes)

    def describe(self) -> str:
        return f"{self.size} x ({self.inner.describe()})"
