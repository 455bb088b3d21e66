"""Layers run one by one or, with ``batch_layers=True``, in groups of equal layers.

:func:`map_layers` applies a per-layer function to every block of a plan. Layers whose blocks
have the same class, options and geometry and whose arguments have the same shapes form a group,
which runs as one ``jax.vmap``-ed computation when the plan's ``batch_layers`` is on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kfax._plan import Plan


def _configuration(block: Any) -> tuple:
    """A block's class and options, and of its site only the geometry and whether it has a bias
    (not where the layer is), recursing into blocks it wraps (a stack's per-layer block carries
    a site of its own)."""
    fields = []
    for field in dataclasses.fields(block):
        value = getattr(block, field.name)
        if field.name == "site":
            fields.append(("site", (value.geometry, value.bias_path is None)))
            continue
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = _configuration(value)
        fields.append((field.name, value))
    return (type(block), tuple(fields))


def _signature(block: Any, args: tuple) -> tuple:
    """Blocks of one class and configuration, on arguments of the same shapes, can run as one
    vmapped computation: everything but the layer's position in the model must agree."""
    shapes = tuple((jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(args))
    return (_configuration(block), jax.tree.structure(args), shapes)


def map_layers(plan: Plan, fn: Callable, *per_layer: dict, batched: bool | None = None) -> dict:
    """``{name: fn(block, *args)}`` for every layer, where ``args`` are each layer's entries of
    ``per_layer``. Layers with the same block configuration and argument shapes (the mirrored
    layers of an autoencoder, every block of a transformer) are stacked and run as one
    ``jax.vmap``-ed computation: one batched Cholesky, eigendecomposition or product instead of
    one per layer, and a compiled program that grows with the number of distinct layer shapes,
    not with depth. ``batched=False`` runs every layer on its own; ``None``: the plan's
    ``batch_layers``."""
    if batched is None:
        batched = plan.batch_layers
    if not batched:
        return {
            name: fn(block, *(tree[name] for tree in per_layer))
            for name, block in plan.blocks_in_order
        }
    groups: dict[tuple, list[tuple[str, Any]]] = {}
    for name, block in plan.blocks_in_order:
        args = tuple(tree[name] for tree in per_layer)
        groups.setdefault(_signature(block, args), []).append((name, block))
    out = {}
    for members in groups.values():
        names, block = [n for n, _ in members], members[0][1]
        if len(names) == 1:
            out[names[0]] = fn(block, *(tree[names[0]] for tree in per_layer))
            continue
        stacked = [
            jax.tree.map(lambda *xs: jnp.stack(xs), *(tree[n] for n in names)) for tree in per_layer
        ]
        result = jax.vmap(lambda *args, b=block: fn(b, *args))(*stacked)
        for i, name in enumerate(names):
            out[name] = jax.tree.map(lambda x, i=i: x[i], result)
    return out
