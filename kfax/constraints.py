"""The norm constraint (Ba, Grosse & Martens 2017) as a wrapper around a preconditioner.

Scales the preconditioner's direction ``Delta`` by ``min(1, sqrt(c / (lr^2 |<Delta, g>|)))`` so
that the step ``lr Delta`` moves the quadratic model by at most ``c``: ``lr^2 <Delta, g> <= c``
for the gradient ``g`` the preconditioner received. A wrapper, not a link of a chain, because it
needs both the gradient and the direction.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfax import _trees, _validation


class NormConstraintState(NamedTuple):
    """``count`` (for a scheduled learning rate), the wrapped state, and the last coefficient."""

    count: jax.Array
    inner: Any
    coefficient: jax.Array


def norm_constrained(
    inner: optax.GradientTransformation,
    max_change: float | jax.Array,
    learning_rate: optax.ScalarOrSchedule = 1.0,
) -> optax.GradientTransformationExtraArgs:
    """Scale ``inner``'s direction so that ``learning_rate^2 <Delta, grad> <= max_change``.

    Args:
      inner: a preconditioner such as :func:`kfax.scale_by_kfac`.
      max_change: ``c > 0``, the bound on the quadratic model's change.
      learning_rate: the rate (a float, array or schedule of the step count) that will scale the
        direction later in the chain; only the constraint uses it.

    Returns:
      A transform whose state is :class:`NormConstraintState`; extra arguments pass to ``inner``.

    Example:
      >>> import jax.numpy as jnp, optax, kfax
      >>> tx = kfax.norm_constrained(optax.identity(), max_change=1e-2, learning_rate=0.1)
      >>> g = {"w": jnp.full(4, 10.0)}
      >>> updates, state = tx.update(g, tx.init(g))
      >>> float(0.1**2 * jnp.vdot(updates["w"], g["w"]))  # the bound binds
      0.0099...

    References:
      Ba, Grosse & Martens, "Distributed second-order optimization using Kronecker-factored
      approximations", ICLR 2017.
    """
    _validation.positive("max_change", max_change)
    _validation.positive("learning_rate", learning_rate, schedule=True)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        dtype = _trees.floating_dtype(params)
        return NormConstraintState(
            jnp.zeros((), jnp.int32), inner.init(params), jnp.ones((), dtype)
        )

    def update_fn(updates, state, params=None, **extra):
        direction, inner_state = inner.update(updates, state.inner, params, **extra)
        rate = learning_rate(state.count) if callable(learning_rate) else learning_rate
        change = jnp.abs(_trees.vdot(direction, updates)) * jnp.square(rate)
        tiny = jnp.finfo(state.coefficient.dtype).tiny
        coefficient = jnp.minimum(1.0, jnp.sqrt(max_change / jnp.maximum(change, tiny)))
        coefficient = jnp.where(jnp.isfinite(coefficient), coefficient, state.coefficient)
        coefficient = coefficient.astype(state.coefficient.dtype)
        direction = jax.tree.map(lambda d: (coefficient * d).astype(d.dtype), direction)
        return direction, NormConstraintState(state.count + 1, inner_state, coefficient)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
