"""Argument checks shared by the losses: model outputs, per-position weights, targets.

An argument that does not fit raises ``ValueError`` naming the loss and the argument.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _concrete(x: Any) -> np.ndarray | None:
    """The values of ``x`` when they are known (not traced under ``jit``/``vmap``), else None."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def _is_real(dtype: Any) -> bool:
    return any(jnp.issubdtype(dtype, kind) for kind in (jnp.bool_, jnp.integer, jnp.floating))


def _check_outputs(outputs: Any, name: str) -> jax.Array:
    outputs = jnp.asarray(outputs)
    if outputs.ndim < 2:
        raise ValueError(
            f"{name} expects model outputs with a batch axis and an event axis, i.e. shape "
            f"(batch, ..., features); got shape {outputs.shape}."
        )
    return outputs


def _per_position(outputs: jax.Array, value: Any, arg: str, name: str) -> jax.Array:
    """``where`` or ``weights`` as an array of the outputs' dtype, shape ``outputs.shape[:-1]``."""
    if value is None:
        return jnp.ones(outputs.shape[:-1], outputs.dtype)
    array = jnp.asarray(value)
    if array.shape != outputs.shape[:-1]:
        raise ValueError(
            f"{name}: {arg} must have shape outputs.shape[:-1] = {outputs.shape[:-1]} (one entry "
            f"per position of outputs of shape {outputs.shape}); got shape {array.shape}."
        )
    if not _is_real(array.dtype):
        raise ValueError(f"{name}: {arg} must be a bool mask or real weights, got {array.dtype}.")
    return array.astype(outputs.dtype)


def _where_weights(outputs: jax.Array, where: Any, name: str) -> jax.Array:
    weights = _per_position(outputs, where, "where", name)
    values = None if where is None else _concrete(where)
    if values is not None and not np.all(np.isfinite(values) & (values >= 0)):
        raise ValueError(f"{name}: where must hold finite non-negative weights (or bools).")
    return weights


def _check_dense_targets(outputs: jax.Array, targets: Any, name: str) -> None:
    targets = jnp.asarray(targets)
    if targets.shape != outputs.shape:
        raise ValueError(
            f"{name}: targets of shape {targets.shape} do not match model outputs of shape "
            f"{outputs.shape}; expected targets of the outputs' shape."
        )
    if not _is_real(targets.dtype):
        raise ValueError(f"{name}: targets must be real (float, int or bool), got {targets.dtype}.")
