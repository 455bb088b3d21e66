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

from kfax import distributed, statistics
from kfax._groups import map_layers
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

    def one(block, layer_stats, layer_curvature, layer_health, damping=damping):
        fresh, ok = keep_if_finite(block.refresh(layer_stats, damping), layer_curvature)
        has_data = layer_health.batches > 0
        fresh = jax.tree.map(lambda f, o: jnp.where(has_data, f, o), fresh, layer_curvature)
        failed = layer_health.failed_refreshes + (has_data & ~ok).astype(jnp.int32)
        return fresh, layer_health._replace(failed_refreshes=failed)

    if plan.inverse_strategy == "distributed":
        blocks = plan.blocks
        costs = {name: distributed.refresh_cost(stats[name]) for name in blocks}

        def shared(stats, curvature, health, damping, axis_name):
            return distributed.refresh_on_owners(
                costs,
                lambda n: one(blocks[n], stats[n], curvature[n], health[n], damping),
                lambda n: (curvature[n], health[n]),
                axis_name,
            )

        if plan.axis_name is not None:  # pmap / shard_map: the axis is bound here
            both = shared(stats, curvature, health, damping, plan.axis_name)
        else:  # sharded jax.jit: over the devices of the mesh set with jax.set_mesh
            both = distributed.refresh_over_context_mesh(
                shared, stats, curvature, health, jnp.asarray(damping)
            )
    else:
        # Factorised layer by layer: batched (vmapped) Cholesky and LU factorisations inside
        # the step of a transformer deadlock XLA's CPU runtime now and then (JAX 0.10.2; the
        # test tests/test_transformer.py::test_padded_batches... hung in one run of two), while
        # the per-layer ones never did. With batch_layers=True, statistics and preconditioning
        # run batched (kfax._groups).
        both = map_layers(plan, one, stats, curvature, health, batched=False)
    return {n: v[0] for n, v in both.items()}, {n: v[1] for n, v in both.items()}


def _observe(plan: Plan, state, params, inputs, targets, where, key, decay, precomputed):
    """Merge one batch's statistics into every block (each layer validated on its own); the
    statistics are ``precomputed`` (by :func:`kfax.value_and_grad`) or taken here."""
    batch = precomputed or statistics.statistics_pass(
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

    def one(block, old, capture, health):
        merged, ok = keep_if_finite(block.observe(old, capture, decay), old)
        return merged, health._replace(
            batches=health.batches + ok.astype(jnp.int32),
            skipped=health.skipped + (~ok).astype(jnp.int32),
        )

    both = map_layers(plan, one, state.statistics, batch.layers, state.health)
    stats = {n: v[0] for n, v in both.items()}
    return stats, {n: v[1] for n, v in both.items()}, batch


def _observe_in_bases(plan: Plan, curvature, batch, decay):
    def one(block, layer_curvature, capture):
        fresh = block.observe_in_basis(layer_curvature, capture, decay)
        return keep_if_finite(fresh, layer_curvature)[0]

    return map_layers(plan, one, curvature, batch.layers)


def _update_curvature(
    plan: Plan,
    state,
    params,
    inputs,
    targets,
    where,
    key,
    lam,
    decay,
    do_stats,
    do_refresh,
    precomputed,
):
    def refresh_if(stats, curvature, health):
        return jax.lax.cond(
            do_refresh,
            lambda: _refresh(plan, stats, curvature, health, lam),
            lambda: (curvature, health),
        )

    def observe():
        return _observe(plan, state, params, inputs, targets, where, key, decay, precomputed)

    if not any(getattr(b, "observes_in_basis", True) for _, b in plan.blocks_in_order):
        # Nothing is merged in the new bases: observe, then refresh, each under its own cond,
        # so that the refresh is compiled once.
        stats, health = jax.lax.cond(
            do_stats, lambda: observe()[:2], lambda: (state.statistics, state.health)
        )
        curvature, health = refresh_if(stats, state.curvature, health)
        return stats, curvature, health

    # EKFAC: the batch's captures are merged in the bases of this step's refresh.
    def with_statistics():
        stats, health, captured = observe()
        curvature, health = refresh_if(stats, state.curvature, health)
        return stats, _observe_in_bases(plan, curvature, captured, decay), health

    def without_statistics():
        curvature, health = refresh_if(state.statistics, state.curvature, state.health)
        return state.statistics, curvature, health

    return jax.lax.cond(do_stats, with_statistics, without_statistics)


def _precondition(plan: Plan, stats, curvature, updates, lam):
    leaves, treedef = jax.tree.flatten(updates)
    grads = {}
    for name, block in plan.blocks_in_order:
        site = block.site
        bias = None if site.bias_leaf is None else leaves[site.bias_leaf]
        grads[name] = LayerGradient(site.geometry.weight_matrix(leaves[site.weight_leaf]), bias)

    def one(block, layer_stats, layer_curvature, grad):
        return block.precondition(layer_stats, layer_curvature, grad, lam)

    deltas = map_layers(plan, one, stats, curvature, grads)
    out = list(leaves)
    for name, block in plan.blocks_in_order:
        site, delta = block.site, deltas[name]
        weight = leaves[site.weight_leaf]
        out[site.weight_leaf] = site.geometry.weight_from_matrix(delta.weight).astype(weight.dtype)
        if site.bias_leaf is not None:
            out[site.bias_leaf] = delta.bias.astype(leaves[site.bias_leaf].dtype)
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
    precomputed=None,
):
    """``(preconditioned updates, new state)`` for one step (see the module docstring)."""
    key, stats_key = jax.random.split(state.key)
    do_stats = state.count % stats_every == 0
    do_refresh = state.count % inverse_every == 0
    stats, curvature, health = _update_curvature(
        plan,
        state,
        params,
        inputs,
        targets,
        where,
        stats_key,
        lam,
        decay,
        do_stats,
        do_refresh,
        precomputed,
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
