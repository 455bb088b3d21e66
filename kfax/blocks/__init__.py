"""Curvature blocks: one module per kind, and the registry that picks one per layer.

| block | module | what it inverts |
| --- | --- | --- |
| ``"factored"`` | :mod:`kfax.blocks.factored` | ``(A + pi sqrt(lam) I) (x) (B + sqrt(lam)/pi I)`` |
| ``"eigen"`` | :mod:`kfax.blocks.eigen` | ``A (x) B + lam I`` (exact Tikhonov) |
| ``"ekfac"`` | :mod:`kfax.blocks.ekfac` | K-FAC's eigenbasis with re-estimated scalings |

Adding a block kind is one new module implementing :class:`kfax.blocks.base.Block` and one
line in ``BLOCKS``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from typing import Any

from kfax import _tracing
from kfax.blocks.base import Block, LayerGradient
from kfax.blocks.eigen import EigenBasis, EigenBlock
from kfax.blocks.ekfac import EKFACBasis, EKFACBlock
from kfax.blocks.factored import FactoredBlock, FactoredInverse
from kfax.blocks.kronecker import CENTERINGS, KroneckerCurvature, KroneckerStatistics

BLOCKS: dict[str, type] = {
    "factored": FactoredBlock,
    "eigen": EigenBlock,
    "ekfac": EKFACBlock,
}
# The block a layer kind gets unless the user chooses another.
DEFAULT_BLOCKS: dict[str, str] = {"dense": "factored", "conv": "factored"}

BlockChoice = str | Mapping[str, str | None] | Callable[[Any], str | None]

__all__ = [
    "BLOCKS",
    "CENTERINGS",
    "DEFAULT_BLOCKS",
    "Block",
    "BlockChoice",
    "EKFACBasis",
    "EKFACBlock",
    "EigenBasis",
    "EigenBlock",
    "FactoredBlock",
    "FactoredInverse",
    "KroneckerCurvature",
    "KroneckerStatistics",
    "LayerGradient",
    "check_block_choice",
    "choose_block",
    "make_block",
]


def _check_name(name: Any, where: str) -> None:
    if name is not None and name != "default" and name not in BLOCKS:
        raise ValueError(
            f"block {where}must be one of {sorted(BLOCKS)}, 'default' or None (no curvature: the "
            f"parameters go to the `unmatched` transform); got {name!r}."
        )


def check_block_choice(choice: Any) -> None:
    """Validate ``block=`` when the transform is built."""
    if isinstance(choice, str) or choice is None:
        _check_name(choice, "")
    elif isinstance(choice, Mapping):
        for pattern, name in choice.items():
            if not isinstance(pattern, str):
                raise ValueError(f"block patterns must be strings, got {pattern!r}.")
            _check_name(name, f"for pattern {pattern!r} ")
    elif not callable(choice):
        raise ValueError(
            "block must be a block name, a mapping from layer-name patterns (fnmatch) to block "
            f"names, or a function of a kfax.Layer returning a block name; got {choice!r}."
        )


def choose_block(site: _tracing.LayerSite, layer: Any, choice: BlockChoice) -> str | None:
    """The block name for one layer (``None``: the layer gets no curvature).

    ``choice`` is a block name for every layer, a mapping from ``fnmatch`` patterns of layer
    names to block names (the first pattern that matches wins; unmatched layers get their kind's
    default), or a function of the public :class:`kfax.Layer`.
    """
    if isinstance(choice, str) or choice is None:
        name = choice
    elif isinstance(choice, Mapping):
        name = next(
            (n for pattern, n in choice.items() if fnmatch.fnmatchcase(site.name, pattern)),
            "default",
        )
    else:
        name = choice(layer)
        _check_name(name, f"returned for layer {site.name!r} ")
    if name == "default":
        name = DEFAULT_BLOCKS[site.geometry.kind]
    if name is not None and site.geometry.kind not in BLOCKS[name].kinds:
        raise ValueError(
            f"block {name!r} does not apply to layer {site.name!r} of kind "
            f"{site.geometry.kind!r} (it applies to {BLOCKS[name].kinds})."
        )
    return name


def make_block(site: _tracing.LayerSite, name: str, centering: str) -> Block:
    return BLOCKS[name](site, centering)
