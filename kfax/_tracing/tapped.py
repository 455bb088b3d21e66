"""Re-run a traced function with taps: perturbations added to layer outputs, inputs recorded.

The program is evaluated equation by equation; calls on the way to a tap are evaluated inline,
and a ``scan`` on the way to one becomes a new ``lax.scan`` whose body is the tapped body: the
perturbations of the layers inside enter as extra ``xs`` (one slice per step) and the recorded
layer inputs leave as extra ``ys`` (stacked, one per step). Values cross this module in the
canonical layout of :mod:`kfax.layers.layout`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.extend.core as jcore

from kfax._tracing import jaxprs
from kfax._tracing.sites import LayerSite, Tap

Key = tuple[str, int]  # (layer name, tap index)


def _tap_tree(layers: Sequence[LayerSite]) -> dict:
    """``{eqn index: subtree | [(key, tap), ...]}`` over the taps' equation paths."""
    tree: dict = {}
    for site in layers:
        for i, tap in enumerate(site.taps):
            if not tap.eqn_path:
                continue
            node = tree
            for index in tap.eqn_path[:-1]:
                node = node.setdefault(index, {})
            node.setdefault(tap.eqn_path[-1], []).append(((site.name, i), tap))
    return tree


def _keys(tree: dict) -> list[Key]:
    keys = []
    for node in tree.values():
        if isinstance(node, list):
            keys.extend(key for key, _ in node)
        else:
            keys.extend(_keys(node))
    return keys


def _run(jaxpr, consts, args, tree, perturbations, records) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(atom):
        return atom.val if isinstance(atom, jcore.Literal) else env[atom]

    for var, val in zip(jaxpr.constvars, consts, strict=True):
        env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
        env[var] = val
    for index, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        node = tree.get(index)
        if node is None:
            outvals = jaxprs.eval_equation(eqn, invals)
        elif isinstance(node, list):
            outvals = jaxprs.eval_equation(eqn, invals)
            for key, tap in node:
                if tap.input_operand is not None:
                    records[key] = invals[tap.input_operand]
                outvals[0] = outvals[0] + perturbations[key].astype(outvals[0].dtype)
        elif jaxprs.scan_of(eqn) is not None:
            outvals = _run_scan(jaxprs.scan_of(eqn), invals, node, perturbations, records)
        else:
            sub_jaxpr, sub_consts = jaxprs.subjaxpr(eqn)
            outvals = _run(sub_jaxpr, sub_consts, invals, node, perturbations, records)
        for var, val in zip(eqn.outvars, outvals, strict=True):
            if jaxprs.is_var(var):
                env[var] = val
    return [read(v) for v in jaxpr.outvars]


def _run_scan(scan: jaxprs.Scan, invals, tree, perturbations, records) -> list[Any]:
    """A scan whose body holds taps: the tapped body inside a new ``lax.scan``."""
    consts = invals[: scan.num_consts]
    init = invals[scan.num_consts : scan.num_consts + scan.num_carry]
    xs = invals[scan.num_consts + scan.num_carry :]
    keys = _keys(tree)

    def body(carry, step):
        x, slices = step
        inner: dict[Key, Any] = {}
        out = _run(scan.jaxpr, scan.consts, [*consts, *carry, *x], tree, slices, inner)
        return out[: scan.num_carry], (out[scan.num_carry :], inner)

    carry, (ys, stacked) = jax.lax.scan(
        body,
        list(init),
        (list(xs), {k: perturbations[k] for k in keys}),
        length=scan.length,
        reverse=scan.reverse,
        unroll=scan.unroll,
    )
    records.update(stacked)
    return [*carry, *ys]


def tapped_call(
    traced: Any,
    leaves: Sequence[Any],
    input_leaves: Sequence[Any],
    perturbations: Mapping[str, Any],
) -> tuple[list[Any], dict[str, Any]]:
    """Evaluate the traced function with each layer's perturbations added to its taps.

    ``perturbations[name]`` is in the canonical layout (:meth:`LayerSite.zeros`). Returns the
    flat outputs and each layer's input (its first tap's recorded operand, canonical; ``None``
    for a layer whose taps record none).
    """
    leaves = list(leaves)
    varying = frozenset().union(*(jaxprs.varying_axes(v) for v in [*leaves, *input_leaves]))
    if varying:
        raise ValueError(
            f"kfax runs inside jax.shard_map only with check_vma=False: the inputs vary over the "
            f"mesh axes {sorted(varying)}, and kfax replays apply_fn from a program traced "
            "outside shard_map, which carries no varying-axis types. Pass check_vma=False to "
            "jax.shard_map (with axis_name= set on the kfax transform), or use jax.pmap or jax.jit "
            "over a sharded batch (docs/guide.md, 'Several devices')."
        )
    raw: dict[Key, Any] = {}
    for site in traced.layers:
        values = perturbations[site.name]
        values = values if isinstance(values, tuple) else (values,)
        for i, (tap, value) in enumerate(zip(site.taps, values, strict=True)):
            if tap.leaf is not None:
                leaves[tap.leaf] = leaves[tap.leaf] + value.astype(leaves[tap.leaf].dtype)
            else:
                raw[(site.name, i)] = tap.output.from_canonical(value)
    records: dict[Key, Any] = {}
    closed = traced.closed_jaxpr
    outputs = _run(
        closed.jaxpr,
        closed.consts,
        leaves + list(input_leaves),
        _tap_tree(traced.layers),
        raw,
        records,
    )
    return outputs, {site.name: _recorded_input(site, records) for site in traced.layers}


def _recorded_input(site: LayerSite, records: Mapping[Key, Any]) -> Any:
    tap: Tap = site.taps[0]
    if tap.input is None:
        return None
    return tap.input.to_canonical(records[(site.name, 0)])
