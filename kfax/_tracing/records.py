"""What the walk over a jaxpr records: candidate layer operations and where to tap them.

A :class:`Site` is one layer operation found by the walk (:mod:`kfax._tracing.finder`) and its
matchers (:mod:`~kfax._tracing.products`, :mod:`~kfax._tracing.elementwise`); its
:class:`TapSpec` says where to tap it, in the coordinates of one scan step. Which sites become
layers is decided afterwards (:mod:`kfax._tracing.verdict`). The types live here, apart from the
walk, so that the walk and its matchers can all build them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

KIND_WORDS = {
    "dense": "dense operation",
    "conv": "convolution",
    "embedding": "embedding gather",
    "scale_shift": "elementwise scale or shift",
}


def shape_of(atom: Any) -> tuple[int, ...]:
    """The static shape of a jaxpr variable or literal, as Python ints."""
    return tuple(int(s) for s in atom.aval.shape)


@dataclasses.dataclass(frozen=True)
class TapSpec:
    """Where to tap an operation and how its values are laid out (inner, one scan step).

    ``out_features`` / ``in_features`` are the feature axes of the output and of the recorded
    input (rows layouts); ``conv_batch`` the (input, output) batch axes of a convolution, whose
    values keep their own layout.
    """

    eqn_path: tuple[int, ...]
    input_operand: int | None
    out_shape: tuple[int, ...]
    dtype: Any
    in_shape: tuple[int, ...] | None = None
    out_features: tuple[int, ...] | None = None
    in_features: tuple[int, ...] | None = None
    conv_batch: tuple[int, int] | None = None
    broadcast_input: bool = False


@dataclasses.dataclass
class Site:
    """A layer operation found in the walk (a layer if its parameters have no other use)."""

    kind: str
    geometry: Any  # one layer's geometry, in the coordinates of the leaf without stack axes
    weight_leaf: int
    levels: tuple[tuple[str, int], ...]  # (kind, length) per enclosing scan, outermost first
    weight_stack_axes: tuple[int, ...]
    tap: TapSpec
    feature_shape: tuple[int, ...]  # the shape a bias (or a paired shift) must have
    bias_leaf: int | None = None
    bias_tap: TapSpec | None = None  # the addition of the bias, tapped as a shift of its own

    @property
    def kind_word(self) -> str:
        return KIND_WORDS.get(self.kind, self.kind)
