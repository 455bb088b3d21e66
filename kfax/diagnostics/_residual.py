"""The Kronecker residual: how far a layer's K-FAC block is from its exact curvature block."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kfax import _plan, _trees, exact, statistics
from kfax.losses import Loss


def _kfac_blocks(apply_fn, loss, params, inputs, *, kind, block, centering, targets, key, samples):
    """Each layer's block with this batch's statistics (no moving average) and fresh curvature."""
    plan = _plan.make_plan(
        apply_fn,
        loss,
        params,
        inputs,
        kind=kind,
        samples=samples,
        block=block,
        centering=centering,
        others=optax.identity(),
    )
    batch = statistics.statistics_pass(
        apply_fn, loss, params, inputs, kind=kind, samples=samples, targets=targets, key=key
    )
    out = {}
    for name, layer_block in plan.blocks_in_order:
        stats, _ = layer_block.init(_trees.floating_dtype(params))
        stats = layer_block.observe(stats, batch.layers[name], 0.0)
        out[name] = (layer_block, stats)
    return out


def kronecker_residual(
    apply_fn: Callable[[Any, Any], jax.Array],
    loss: Loss,
    params: Any,
    inputs: Any,
    *,
    kind: str = "exact",
    damping: float = 0.0,
    block: str = "eigen",
    centering: str = "exact",
    targets: Any = None,
    key: jax.Array | None = None,
    samples: int = 1,
) -> dict[str, jax.Array]:
    """``||K_l - (G_l + lam I)||_F / ||G_l + lam I||_F`` for every layer.

    ``G_l`` is the layer's exact curvature block (``kfax.exact.layer_block``, K-FAC order) and
    ``K_l`` the damped matrix the block inverts (``block.dense``) from this batch's statistics.
    At ``damping=0`` centred and homogeneous K-FAC give the same matrix ``A_hom (x) B``; with
    damping, centred K-FAC's ``lam (L L^T (x) I)`` (eigen block) departs from ``lam I``, which the
    residual measures. The residual is 0 where K-FAC is exact (one dense layer with squared
    error; deep linear networks with Gaussian outputs).

    Example:
      >>> import jax, jax.numpy as jnp, kfax
      >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
      >>> f = lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"]
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> r = kfax.diagnostics.kronecker_residual(f, kfax.losses.SquaredError(), params, x)
      >>> float(r["dense"]) < 1e-5
      True
    """
    blocks = _kfac_blocks(
        apply_fn,
        loss,
        params,
        inputs,
        kind=kind,
        block=block,
        centering=centering,
        targets=targets,
        key=key,
        samples=samples,
    )
    out = {}
    for name, (layer_block, stats) in blocks.items():
        exact_block = exact.layer_block(
            apply_fn,
            loss,
            params,
            inputs,
            name,
            kind=kind,
            targets=targets,
            key=key,
            samples=samples,
        )
        damped = exact_block + damping * jnp.eye(exact_block.shape[0])
        approx = layer_block.dense(layer_block.refresh(stats, damping), damping)
        out[name] = jnp.linalg.norm(approx - damped) / jnp.linalg.norm(damped)
    return out
