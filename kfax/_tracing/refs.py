"""What a jaxpr variable holds, as far as layer finding is concerned.

A :class:`WeightRef` is a parameter leaf seen whole (possibly transposed or cast), a
:class:`BiasRef` a parameter broadcast over other axes (a bias, a norm scale). Both remember the
scans they entered (:data:`Level`): a scan that slices the parameter (``xs``) makes a ``"stack"``
level, a scan that closes over it (a constant) a ``"shared"`` level.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from kfax.layers import SHARED, STACK

# One per enclosing scan, outermost first: (STACK, the leaf axis it slices) or (SHARED, None).
Level = tuple[str, int | None]


def stack_axes(levels: Sequence[Level]) -> tuple[int, ...]:
    return tuple(axis for kind, axis in levels if kind == STACK)


def reduced_axis(axis: int, levels: Sequence[Level]) -> int:
    """A leaf axis's index once the stack axes are removed."""
    return axis - sum(1 for s in stack_axes(levels) if s < axis)


@dataclasses.dataclass(frozen=True)
class WeightRef:
    """A parameter leaf, its axes permuted: variable axis ``i`` holds leaf axis ``axes[i]``."""

    leaf: int
    axes: tuple[int, ...]
    levels: tuple[Level, ...] = ()

    def permuted(self, permutation: Sequence[int]) -> WeightRef:
        return dataclasses.replace(self, axes=tuple(self.axes[p] for p in permutation))

    def entered(self, sliced: bool) -> WeightRef:
        """Inside a scan body: sliced along variable axis 0 (``xs``) or whole (a constant)."""
        if not sliced:
            return dataclasses.replace(self, levels=self.levels + ((SHARED, None),))
        return WeightRef(self.leaf, self.axes[1:], self.levels + ((STACK, self.axes[0]),))

    def as_bias(self) -> BiasRef:
        leaf_axes = tuple(sorted(self.axes))
        return BiasRef(
            self.leaf, leaf_axes, tuple(self.axes.index(a) for a in leaf_axes), self.levels
        )


@dataclasses.dataclass(frozen=True)
class BiasRef:
    """A parameter broadcast to a larger variable.

    Attributes:
      leaf_axes: the leaf axes still present (the stack axes removed), in leaf order.
      axes: for each of them, the variable axis that carries it (``None``: unknown).
    """

    leaf: int
    leaf_axes: tuple[int, ...]
    axes: tuple[int | None, ...]
    levels: tuple[Level, ...] = ()

    def shape(self, leaf_shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(int(leaf_shape[a]) for a in self.leaf_axes)

    def entered(self, sliced: bool) -> BiasRef:
        """Inside a scan body; a slice along an axis the parameter is broadcast over is the
        same at every step (shared)."""
        on_zero = [i for i, v in enumerate(self.axes) if v == 0]
        shift = tuple(None if v is None else v - 1 for v in self.axes)
        if not sliced or not on_zero:
            return BiasRef(self.leaf, self.leaf_axes, shift, self.levels + ((SHARED, None),))
        k = on_zero[0]
        return BiasRef(
            self.leaf,
            self.leaf_axes[:k] + self.leaf_axes[k + 1 :],
            shift[:k] + shift[k + 1 :],
            self.levels + ((STACK, self.leaf_axes[k]),),
        )

    def moved(self, prim: str, params: Mapping[str, Any], in_shape, out_shape) -> BiasRef:
        """The same parameter after a broadcast, reshape, transpose or cast."""
        if prim == "broadcast_in_dim":
            dims = params["broadcast_dimensions"]
            axes = tuple(None if v is None else dims[v] for v in self.axes)
        elif prim in ("reshape", "expand_dims"):
            axes = _reshape_axes(self.axes, tuple(in_shape), tuple(out_shape))
        elif prim == "transpose":
            perm = tuple(params["permutation"])
            axes = tuple(None if v is None else perm.index(v) for v in self.axes)
        else:
            axes = self.axes
        return dataclasses.replace(self, axes=axes)

    def feature_axes(self, leaf_shape: Sequence[int]) -> tuple[int, ...] | None:
        """The variable axes carrying the parameter's entries, in its own order, size-1 axes
        left out (``None``: an axis of size > 1 could not be followed)."""
        out = []
        for v, size in zip(self.axes, self.shape(leaf_shape), strict=True):
            if size == 1:
                continue
            if v is None:
                return None
            out.append(v)
        return tuple(out)


def _reshape_axes(axes, in_shape, out_shape) -> tuple[int | None, ...]:
    """Map axes through a reshape that only inserts or removes size-1 axes."""
    big_in = [i for i, s in enumerate(in_shape) if s != 1]
    big_out = [i for i, s in enumerate(out_shape) if s != 1]
    if [in_shape[i] for i in big_in] != [out_shape[i] for i in big_out]:
        return tuple(None for _ in axes)
    where = dict(zip(big_in, big_out, strict=True))
    return tuple(where.get(v) if v is not None else None for v in axes)
