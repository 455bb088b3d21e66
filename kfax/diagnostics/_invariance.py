"""The invariance of the K-FAC step to an affine reparametrisation of a layer's inputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kfax.losses import Loss
from kfax.transform import scale_by_kfac


def affine_reparametrisation_gap(
    apply_fn: Callable[[Any, Any], jax.Array],
    loss: Loss,
    params: Any,
    inputs: jax.Array,
    targets: Any,
    transform: jax.Array,
    shift: jax.Array,
    layer: str,
    *,
    damping: float = 0.0,
    centering: str = "exact",
) -> jax.Array:
    """How much an affine reparametrisation of the first layer's inputs changes the K-FAC step.

    The inputs become ``x T + c`` and the first layer ``(K, b)`` becomes ``(T^{-1} K,
    b - c T^{-1} K)``: the same function. With exact statistics and no damping, K-FAC's step
    moves the outputs identically in both parametrisations (the natural gradient's invariance,
    which K-FAC keeps for affine maps of a layer's inputs); returns
    ``|J' step' - J step| / |J step|`` over the batch's outputs. ``params[layer]`` must hold a
    ``"kernel"`` and a ``"bias"`` applied as ``x @ kernel + bias``.
    """
    kernel, bias = params[layer]["kernel"], params[layer]["bias"]
    new_kernel = jnp.linalg.solve(transform, kernel)
    moved = {
        **params,
        layer: {**params[layer], "kernel": new_kernel, "bias": bias - shift @ new_kernel},
    }
    new_inputs = inputs @ transform + shift

    def output_move(p, x):
        grads = jax.grad(lambda q: loss(apply_fn(q, x), targets))(p)
        tx = scale_by_kfac(
            apply_fn,
            loss,
            example_inputs=x,
            kind="exact",
            ema_decay=0.0,
            inverse_every=1,
            damping=max(damping, 1e-30),
            block="eigen",
            centering=centering,
        )
        step, _ = tx.update(grads, tx.init(p), p, inputs=x)
        return jax.jvp(lambda q: apply_fn(q, x), (p,), (step,))[1].ravel()

    before = output_move(params, inputs)
    after = output_move(moved, new_inputs)
    return jnp.linalg.norm(after - before) / jnp.linalg.norm(before)
