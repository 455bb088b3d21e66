"""What tracing reports: the layers found (:class:`LayerSite`) and where each one is tapped."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from kfax import layers


@dataclasses.dataclass(frozen=True)
class Tap:
    """One tapped value of a layer: a perturbation added to an operation's output (or to a
    parameter leaf), and the operand recorded as the layer's input.

    Attributes:
      eqn_path: indices of the equation through calls and scans; ``()`` for a parameter tap.
      input_operand: the operand recorded as the layer input, or ``None``.
      output: the layout of the perturbation (raw stacked <-> canonical); ``None`` for a
        parameter tap, whose perturbation has the leaf's shape.
      input: the layout of the recorded input, or ``None``.
      shape, dtype: the canonical perturbation's shape and dtype.
      leaf: the parameter leaf perturbed by a parameter tap, else ``None``.
    """

    eqn_path: tuple[int, ...]
    input_operand: int | None
    output: layers.Layout | None
    input: layers.Layout | None
    shape: tuple[int, ...]
    dtype: Any
    leaf: int | None = None

    def zeros(self) -> jax.Array:
        return jnp.zeros(self.shape, self.dtype)


@dataclasses.dataclass(frozen=True)
class LayerSite:
    """One layer found in a traced function: what it is and where it is tapped.

    Attributes:
      name: unique, from the weight's parameter path.
      geometry: the layer kind's geometry (:mod:`kfax.layers`); a
        :class:`~kfax.layers.Stacked` one for a stack of layers (a scan over layers).
      weight_path, bias_path, weight_leaf, bias_leaf: the parameters the layer owns (the
        weight of a scale-and-shift layer is its scale, or its shift when it has no scale).
      eqn_path, input_operand: the first tap's equation and recorded operand.
      output_shape, output_dtype: one layer's output in the canonical layout the statistics
        read (features at ``geometry.output_axis``; shared scan steps after the batch axis).
      positions: rows per example in that layout (sequence positions, locations, steps).
      taps: every tapped value, the first being the layer's main one.
      levels: ``(kind, length)`` of the scans around the layer, outermost first.
      note: why a ``"parameter"`` layer is one (the uses of a tied or reused parameter).
    """

    name: str
    geometry: Any
    weight_path: str
    bias_path: str | None
    weight_leaf: int
    bias_leaf: int | None
    eqn_path: tuple[int, ...]
    input_operand: int | None
    output_shape: tuple[int, ...]
    output_dtype: Any
    positions: int
    taps: tuple[Tap, ...] = ()
    levels: tuple[tuple[str, int], ...] = ()
    note: str = ""

    @property
    def kind(self) -> str:
        return self.geometry.kind

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return getattr(self.geometry, "stack_shape", ())

    def unstacked(self) -> LayerSite:
        """One layer of a stack (the same site when it is not stacked)."""
        if not self.stack_shape:
            return self
        return dataclasses.replace(self, geometry=self.geometry.inner)

    def zeros(self) -> Any:
        """Zero perturbations in the canonical layout: an array, or a tuple for several taps."""
        values = tuple(tap.zeros() for tap in self.taps)
        return values[0] if len(values) == 1 else values


def positions_of(output_shape: tuple[int, ...], geometry: Any, batch: int) -> int:
    if geometry.kind == "parameter":
        return 1
    rows = math.prod(output_shape) // max(geometry.d_out, 1)
    return max(rows // max(batch, 1), 1)
