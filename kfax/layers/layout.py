"""Canonical layouts of tapped values: which axes are rows, which are features, where scans go.

A layer operation inside ``jax.lax.scan`` runs once per step; its tapped values (the layer
input, the perturbation of its output) are stacked by the scans around it, outermost first:
``(*levels, *inner)``. A scan *level* is ``"stack"`` when the layer's weight is sliced by it (a
stack of layers, one block each) and ``"shared"`` when the weight is the same at every step
(weight sharing over the scan's steps, like positions). The statistics read one canonical layout,
whatever the layer's own layout:

* rows kinds (dense, embedding, scale and shift): ``(*stack, batch, *shared, *other rows,
  features)`` with the feature axes flattened into one last axis (other row axes of size 1
  dropped);
* convolutions: ``(*stack, batch x shared, *the operation's own axes)``, the shared steps merged
  into the batch axis (example-major), so that patches are taken as the operation took them.

:class:`Layout` is the permutation and reshape between the raw stacked value and the canonical
one, in both directions. Knows nothing of jaxprs or curvature.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

STACK, SHARED = "stack", "shared"


def inverse_permutation(perm: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Raw stacked value ``(*levels, *inner)`` <-> canonical value.

    Attributes:
      raw_shape: ``(*level lengths, *inner shape)``.
      perm: the transposition of the raw value that groups its axes in canonical order.
      canonical_shape: the shape after the transposition and the merging reshape.
      broadcast_shape: the inner shape the raw value is broadcast to first (an operand whose
        size-1 axes the operation broadcasts), or ``None``.
    """

    raw_shape: tuple[int, ...]
    perm: tuple[int, ...]
    canonical_shape: tuple[int, ...]
    broadcast_shape: tuple[int, ...] | None = None

    @property
    def permuted_shape(self) -> tuple[int, ...]:
        return tuple(self.raw_shape[i] for i in self.perm)

    def to_canonical(self, x: jax.Array) -> jax.Array:
        if self.broadcast_shape is not None:
            x = jnp.broadcast_to(x, self.raw_shape)
        return jnp.transpose(x, self.perm).reshape(self.canonical_shape)

    def from_canonical(self, y: jax.Array) -> jax.Array:
        permuted = y.reshape(self.permuted_shape)
        return jnp.transpose(permuted, inverse_permutation(self.perm))


def _levels_split(levels: Sequence[tuple[str, int]]) -> tuple[list[int], list[int]]:
    stack = [i for i, (kind, _) in enumerate(levels) if kind == STACK]
    shared = [i for i, (kind, _) in enumerate(levels) if kind == SHARED]
    return stack, shared


def rows_layout(
    levels: Sequence[tuple[str, int]],
    inner_shape: Sequence[int],
    feature_axes: Sequence[int],
    broadcast_from: Sequence[int] | None = None,
) -> Layout:
    """``(*stack, first row axis, *shared, *other rows, prod(features))``.

    ``feature_axes`` are axes of the inner value, in the order their flattening follows (an
    empty tuple: one feature of size 1). ``broadcast_from``: the operand's own inner shape when
    the operation broadcast its size-1 axes to ``inner_shape``.
    """
    n = len(levels)
    stack, shared = _levels_split(levels)
    raw_shape = tuple(length for _, length in levels) + tuple(inner_shape)
    rows = [n + j for j in range(len(inner_shape)) if j not in feature_axes]
    features = [n + j for j in feature_axes]
    order = stack + rows[:1] + shared + rows[1:] + features
    # Size-1 row axes after the batch axis are dropped (a vmapped gather's slice axis).
    kept = stack + rows[:1] + shared + [i for i in rows[1:] if raw_shape[i] != 1]
    leading = [raw_shape[i] for i in kept]
    canonical = tuple(leading) + (math.prod(raw_shape[i] for i in features),)
    broadcast = None
    if broadcast_from is not None and tuple(broadcast_from) != tuple(inner_shape):
        broadcast = tuple(inner_shape)
    return Layout(raw_shape, tuple(order), canonical, broadcast)


def merged_layout(
    levels: Sequence[tuple[str, int]], inner_shape: Sequence[int], batch_axis: int
) -> Layout:
    """``(*stack, *inner)`` with the shared levels merged into the inner batch axis."""
    n = len(levels)
    stack, shared = _levels_split(levels)
    raw_shape = tuple(length for _, length in levels) + tuple(inner_shape)
    inner = [n + j for j in range(len(inner_shape))]
    position = inner.index(n + batch_axis) + 1
    order = stack + inner[:position] + shared + inner[position:]
    shape = [raw_shape[i] for i in stack]
    for j in range(len(inner_shape)):
        size = raw_shape[n + j]
        if j == batch_axis:
            size *= math.prod(raw_shape[i] for i in shared)
        shape.append(size)
    return Layout(raw_shape, tuple(order), tuple(shape))


def per_layer_shape(layout: Layout, levels: Sequence[tuple[str, int]]) -> tuple[int, ...]:
    """The canonical shape of one layer of a stack (the stack axes dropped)."""
    stack, _ = _levels_split(levels)
    return layout.canonical_shape[len(stack) :]
