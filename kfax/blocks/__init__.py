"""Curvature blocks: one module per kind, and the registry that picks one per layer.

| block | module | what it inverts |
| --- | --- | --- |
| ``"factored"`` | :mod:`kfax.blocks.factored` | ``(A + pi sqrt(lam) I) (x) (B + sqrt(lam)/pi I)`` |
| ``"eigen"`` | :mod:`kfax.blocks.eigen` | ``A (x) B + lam I`` (exact Tikhonov) |
| ``"ekfac"`` | :mod:`kfax.blocks.ekfac` | K-FAC's eigenbasis with re-estimated scalings |
| ``"one_sided"`` | :mod:`kfax.blocks.one_sided` | ``A (x) B`` with a diagonal side (automatic) |
| ``"embedding"`` | :mod:`kfax.blocks.embedding` | ``diag(a) (x) B + lam I`` (frequencies) |
| ``"scale_shift"`` | :mod:`kfax.blocks.scale_shift` | per feature, ``F_j + lam I`` (``k x k``) |
| ``"diagonal"`` | :mod:`kfax.blocks.diagonal` | ``diag + lam`` per parameter entry |

Adding a block kind is one new module implementing :class:`kfax.blocks.base.Block` and one
line in ``BLOCKS``. A Kronecker block asked for a layer wider than ``max_factor_size`` on a side
becomes the one-sided block (its ``build``); a stacked layer (a scan over layers) gets its block
once per layer of the stack (:mod:`kfax.blocks.stacked`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Mapping
from typing import Any

from kfax import _tracing
from kfax.blocks.base import Block, LayerGradient
from kfax.blocks.diagonal import DiagonalBlock
from kfax.blocks.eigen import EigenBasis, EigenBlock
from kfax.blocks.ekfac import EKFACBasis, EKFACBlock
from kfax.blocks.embedding import EmbeddingBlock
from kfax.blocks.factored import FactoredBlock, FactoredInverse
from kfax.blocks.kronecker import CENTERINGS, KroneckerCurvature
from kfax.blocks.kronecker_statistics import WEIGHT_SHARINGS, KroneckerStatistics
from kfax.blocks.one_sided import OneSidedBlock
from kfax.blocks.scale_shift import ScaleShiftBlock
from kfax.blocks.stacked import StackedBlock

BLOCKS: dict[str, type] = {
    "factored": FactoredBlock,
    "eigen": EigenBlock,
    "ekfac": EKFACBlock,
    "one_sided": OneSidedBlock,
    "embedding": EmbeddingBlock,
    "scale_shift": ScaleShiftBlock,
    "diagonal": DiagonalBlock,
}
# The block a layer kind gets unless the user chooses another.
DEFAULT_BLOCKS: dict[str, str] = {
    "dense": "factored",
    "conv": "factored",
    "embedding": "embedding",
    "scale_shift": "scale_shift",
    "parameter": "diagonal",
}
# Default of ``max_factor_size``: a 4096^2 float32 factor is 64 MiB.
DEFAULT_MAX_FACTOR_SIZE = 4096

BlockChoice = str | Mapping[str, str | None] | Callable[[Any], str | None]

__all__ = [
    "BLOCKS",
    "CENTERINGS",
    "DEFAULT_BLOCKS",
    "DEFAULT_MAX_FACTOR_SIZE",
    "WEIGHT_SHARINGS",
    "DiagonalBlock",
    "EmbeddingBlock",
    "OneSidedBlock",
    "ScaleShiftBlock",
    "StackedBlock",
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

    ``choice`` is a block name for every layer (a layer whose kind that block does not apply to
    gets its kind's default: ``block="eigen"`` on a transformer gives every dense layer the eigen
    block and the embeddings, norms and tied parameters their own), a mapping from ``fnmatch``
    patterns of layer names to block names (the first pattern that matches wins; unmatched layers
    get their kind's default; a block that does not apply to the layer is an error), or a
    function of the public :class:`kfax.Layer` (the same).
    """
    if isinstance(choice, str) or choice is None:
        name = choice
        if name not in (None, "default") and site.geometry.kind not in BLOCKS[name].kinds:
            name = "default"
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


def make_block(site: _tracing.LayerSite, name: str, centering: str, **options: Any) -> Block:
    """The block ``name`` for ``site``: built for one layer and mapped over a stack of layers.

    ``options`` (``weight_sharing``, ``max_factor_size``) reach the blocks that declare them;
    a block class's ``build`` may return another block for the layer (the one-sided block).
    """
    cls = BLOCKS[name]
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    accepted = {k: v for k, v in options.items() if k in fields}
    layer = site.unstacked()
    build = getattr(cls, "build", None)
    block = build(layer, centering, **accepted) if build else cls(layer, centering, **accepted)
    return StackedBlock(site, block) if site.stack_shape else block
