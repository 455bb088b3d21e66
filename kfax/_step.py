"""One preconditioner step over the K-FAC state: statistics, refreshes, preconditioning.

Given a :class:`kfax._plan.Plan` and a state, a step (on its cadences) takes a batch's statistics
and merges them into every block, refreshes the blocks' inverses or bases, and applies the blocks
to the gradient; parameters outside the blocks go through the plan's ``unmatched`` transform.
Each layer is validated on its own: a layer whose statistics or refresh are not finite keeps its
previous state and counts the failure, and no other layer is affected. Nothing that is not finite
enters the state. The step is compiled once per plan (``jax.jit`` with the plan as a static
argument), so eager calls do not re-trace the model.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kfax import statistics
from kfax._plan import Plan
from kfax._trees import keep_if_finite
from kfax.blocks import LayerGradient


class LayerHealth(NamedTuple):
    """Per-layer counters (cumulative since ``init``).

    Attributes:
      batches: statistics batches merged into the layer's moving averages.
      skipped: statistics batches rejected because they were not finite.
      failed_refreshes: refreshes rejected because the new inverse or basis was not finite (the
        layer keeps its last good one).
    """

    batches: jax.Array
    skipped: jax.Array
    failed_refreshes: jax.Array


class KFACState(NamedTuple):
    """State of :func:`kfax.scale_by_kfac`. Its structure is fixed by ``init``; every leaf is
    finite.

    Attributes:
      count: updates so far.
      key: raw PRNG key (``uint32[2]``) for sampling targets.
      statistics: per layer, the block's moving averages (e.g. ``KroneckerStatistics``).
      curvature: per layer, the block's inverse or eigenbasis from its last refresh.
      health: per layer, :class:`LayerHealth`.
      unmatched: the state of the ``unmatched`` transform, over ``{path: leaf}`` of the
        parameters that no block preconditions.
      damping: the damping used by the last update (the initial damping before any).
    """

    count: jax.Array
    key: jax.Array
    statistics: dict[str, Any]
    curvature: dict[str, Any]
    health: dict[str, LayerHealth]
    unmatched: Any
    damping: jax.Array


def _refresh(plan: Plan, stats, curvature, health, damping):
    """Every block's new curvature; a layer without data or with a non-finite result keeps its
    old one (and a non-finite result counts as a failed refresh)."""
    new_curvature, new_health = {}, {}
    for name, block in plan.blocks_in_order:
        fresh, ok = keep_if_finite(block.refresh(stats[name], damping), curvature[name])
        has_data = health[name].batches > 0
        new_curvature[name] = jax.tree.map(
            lambda f, o, d=has_data: jnp.where(d, f, o), fresh, curvature[name]
        )
        failed = health[name].failed_refreshes + (has_data & ~ok).astype(jnp.int32)
        new_health[name] = health[name]._replace(failed_refreshes=failed)
    return new_curvature, new_health


def _observe(plan: Plan, state, params, inputs, targets, where, key, decay):
    """Merge one batch's statistics into every block (each layer validated on its own)."""
    batch = statistics.statistics_pass(
        plan.apply_fn,
        plan.loss,
        params,
        inputs,
        kind=plan.kind,
        samples=plan.samples,
        targets=targets,
        where=where,
        key=key,
        traced=plan.traced,
        axis_name=plan.axis_name,
    )
    stats, health = {}, {}
    for name, block in plan.blocks_in_order:
        merged = block.observe(state.statistics[name], batch.layers[name], decay)
        stats[name], ok = keep_if_finite(merged, state.statistics[name])
        old = state.health[name]
        health[name] = old._replace(
            batches=old.batches + ok.astype(jnp.int32),
            skipped=old.skipped + (~ok).astype(jnp.int32),
        )
    return stats, health, batch


def _observe_in_bases(plan: Plan, curvature, batch, decay):
    out = {}
    for name, block in plan.blocks_in_order:
        fresh = block.observe_in_basis(curvature[name], batch.layers[name], decay)
        out[name], _ = keep_if_finite(fresh, curvature[name])
    return out


def _update_curvature(
    plan: Plan, state, params, inputs, targets, where, key, lam, decay, do_stats, do_refresh
):
    def refresh_if(stats, curvature, health):
        return jax.lax.cond(
            do_refresh,
            lambda: _refresh(plan, stats, curvature, health, lam),
            lambda: (curvature, health),
        )

    def with_statistics():
        stats, health, batch = _observe(plan, state, params, inputs, targets, where, key, decay)
        curvature, health = refresh_if(stats, state.curvature, health)
        return stats, _observe_in_bases(plan, curvature, batch, decay), health

    def without_statistics():
        curvature, health = refresh_if(state.statistics, state.curvature, state.health)
        return state.statistics, curvature, health

    return jax.lax.cond(do_stats, with_statistics, without_statistics)


def _precondition(plan: Plan, stats, curvature, updates, lam):
    leaves, treedef = jax.tree.flatten(updates)
    out = list(leaves)
    for name, block in plan.blocks_in_order:
        site = block.site
        geometry = site.geometry
        weight = leaves[site.weight_leaf]
        bias = None if site.bias_leaf is None else leaves[site.bias_leaf]
        grad = LayerGradient(geometry.weight_matrix(weight), bias)
        delta = block.precondition(stats[name], curvature[name], grad, lam)
        out[site.weight_leaf] = geometry.weight_from_matrix(delta.weight).astype(weight.dtype)
        if bias is not None:
            out[site.bias_leaf] = delta.bias.astype(bias.dtype)
    return out, treedef


@functools.partial(jax.jit, static_argnums=0)
def preconditioner_step(
    plan: Plan,
    updates,
    state: KFACState,
    params,
    inputs,
    targets,
    where,
    lam,
    decay,
    stats_every,
    inverse_every,
):
    """``(preconditioned updates, new state)`` for one step (see the module docstring)."""
    key, stats_key = jax.random.split(state.key)
    do_stats = state.count % stats_every == 0
    do_refresh = state.count % inverse_every == 0
    stats, curvature, health = _update_curvature(
        plan, state, params, inputs, targets, where, stats_key, lam, decay, do_stats, do_refresh
    )
    out, treedef = _precondition(plan, stats, curvature, updates, lam)
    rest, unmatched_state = plan.others.update(
        plan.unmatched_leaves(updates), state.unmatched, plan.unmatched_leaves(params)
    )
    unmatched_state, _ = keep_if_finite(unmatched_state, state.unmatched)
    index = {path: i for i, path in enumerate(plan.traced.leaf_paths)}
    for path, value in rest.items():
        out[index[path]] = value
    new_state = KFACState(
        count=state.count + 1,
        key=key,
        statistics=stats,
        curvature=curvature,
        health=health,
        unmatched=unmatched_state,
        damping=jnp.asarray(lam, state.damping.dtype),
    )
    return jax.tree.unflatten(treedef, out), new_state
