"""The resolved plan of a preconditioner: which block each layer gets, and what is left over.

Turns a trace of ``apply_fn`` and the user's block choice into a hashable :class:`Plan`: the
blocks in layer order, the parameter leaves no block covers (they go to the ``unmatched``
transform), and the checks that a state and a set of parameters belong to it. Used by the
optimiser and by :func:`kfax.describe`, so that what is reported is what is optimised.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kfax import _capture, _tracing, _trees
from kfax.blocks import DEFAULT_MAX_FACTOR_SIZE, Block, choose_block, make_block
from kfax.losses import Loss


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one preconditioner on one model (hashable: a ``jit`` static)."""

    apply_fn: Callable[[Any, Any], jax.Array]
    loss: Loss
    kind: str
    samples: int
    blocks_in_order: tuple[tuple[str, Block], ...]
    others: optax.GradientTransformation
    axis_name: Any
    traced: _tracing.Trace = dataclasses.field(compare=False)
    inverse_strategy: str = "replicated"
    batch_layers: bool = False

    @property
    def blocks(self) -> dict[str, Block]:
        return dict(self.blocks_in_order)

    @property
    def covered_leaves(self) -> frozenset[int]:
        leaves = set()
        for _, block in self.blocks_in_order:
            leaves.add(block.site.weight_leaf)
            if block.site.bias_leaf is not None:
                leaves.add(block.site.bias_leaf)
        return frozenset(leaves)

    def unmatched_leaves(self, tree: Any) -> dict[str, Any]:
        """``{path: leaf}`` of ``tree`` (params or gradients) for leaves no block covers."""
        covered = self.covered_leaves
        leaves = jax.tree.leaves(tree)
        paths = self.traced.leaf_paths
        return {paths[i]: leaf for i, leaf in enumerate(leaves) if i not in covered}

    def statistics_dtype(self, params: Any) -> Any:
        """float32, or the widest floating dtype of the parameters if wider."""
        return _trees.floating_dtype(params)

    def warn_about_suspect_biases(self, warn: Callable[..., None]) -> None:
        """Warn about suspect biases and about parameters that unknown primitives use."""
        for bias_path, layer in getattr(self.traced, "suspect_biases", ()):
            warn(
                f"kfax: parameter {bias_path!r} looks like the bias of layer {layer!r} but is not "
                "added directly to its output, so K-FAC treats the layer as bias-free and "
                f"{bias_path!r} gets a block of its own (see kfax.describe).",
                stacklevel=3,
            )
        for message in getattr(self.traced, "warnings", ()):
            warn(message, stacklevel=3)

    def check_state(self, state: Any, params: Any) -> None:
        """The state must have been built for these layers and these parameters."""
        names = [name for name, _ in self.blocks_in_order]
        if sorted(names) != sorted(state.statistics):
            raise ValueError(
                "params do not match the K-FAC state: the state was built for layers "
                f"{sorted(state.statistics)}, but apply_fn on these params has layers "
                f"{sorted(names)}."
            )
        dtype = state.damping.dtype
        for name, block in self.blocks_in_order:
            expected = jax.eval_shape(lambda b=block: b.init(dtype))
            got = (state.statistics[name], state.curvature[name])
            if _shapes(expected) != _shapes(got):
                raise ValueError(
                    f"params do not match the K-FAC state: layer {name!r} now has "
                    f"(d_in, d_out) = ({block.site.geometry.d_in}, {block.site.geometry.d_out}), "
                    "which is not the size its state was built for."
                )
        expected = jax.eval_shape(self.others.init, self.unmatched_leaves(params))
        if _shapes(expected) != _shapes(state.unmatched):
            raise ValueError(
                "params do not match the K-FAC state: the parameters outside the layers "
                f"({sorted(self.unmatched_leaves(params))}) changed shape or structure since init."
            )


def _shapes(tree: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(jnp.shape(leaf) for leaf in leaves)


def public_layer(site: _tracing.LayerSite) -> Any:
    from kfax import report  # noqa: PLC0415  (report imports this module)

    return report.layer_of(site)


def assign_blocks(
    traced: _tracing.Trace, block: Any, centering: str, **options: Any
) -> tuple[tuple[_tracing.LayerSite, Block | None], ...]:
    """Every layer with the block the choice gives it (``None``: no curvature); ``options``
    (``weight_sharing``, ``max_factor_size``) reach the blocks that take them."""
    pairs = []
    for site in traced.layers:
        name = choose_block(site, public_layer(site) if callable(block) else None, block)
        pairs.append((site, None if name is None else make_block(site, name, centering, **options)))
    return tuple(pairs)


def make_plan(
    apply_fn: Callable[[Any, Any], jax.Array],
    loss: Loss,
    params: Any,
    inputs: Any,
    *,
    kind: str,
    samples: int,
    block: Any,
    centering: str,
    others: optax.GradientTransformation,
    axis_name: Any = None,
    weight_sharing: str = "expand",
    max_factor_size: int | None = None,
    inverse_strategy: str = "replicated",
    batch_layers: bool = False,
) -> Plan:
    """Trace ``apply_fn`` (cached) and give every layer its block."""
    traced = _capture.trace_layers(apply_fn, params, inputs)
    if max_factor_size is None:
        max_factor_size = DEFAULT_MAX_FACTOR_SIZE
    options = dict(weight_sharing=weight_sharing, max_factor_size=max_factor_size)
    pairs = assign_blocks(traced, block, centering, **options)
    blocks = tuple((site.name, b) for site, b in pairs if b is not None)
    if not blocks:
        raise _capture.NoLayersError(
            "block= leaves no layer to precondition: every layer was mapped to None."
        )
    return Plan(
        apply_fn,
        loss,
        kind,
        samples,
        blocks,
        others,
        axis_name,
        traced,
        inverse_strategy,
        batch_layers,
    )
