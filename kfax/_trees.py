"""Small pytree helpers on top of ``optax.tree``: inner products in float32 or wider, finiteness."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def widened(tree: Any) -> Any:
    """Every floating leaf in float32 or wider (bfloat16 and float16 inner products drift)."""
    return jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), tree)


def floating_dtype(tree: Any) -> Any:
    """float32, or the widest floating dtype among the leaves if wider (other leaves ignored)."""
    floating = [
        leaf.dtype
        for leaf in jax.tree.leaves(tree)
        if jnp.issubdtype(getattr(leaf, "dtype", jnp.float32), jnp.floating)
    ]
    return jnp.promote_types(jnp.result_type(*floating, jnp.float32), jnp.float32)


def vdot(a: Any, b: Any) -> jax.Array:
    """``<a, b>`` over all leaves, accumulated in float32 or wider."""
    return optax.tree.vdot(widened(a), widened(b))


def all_finite(tree: Any) -> jax.Array:
    """``True`` when every entry of every leaf is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def keep_if_finite(new: Any, old: Any) -> tuple[Any, jax.Array]:
    """``(new, True)`` if every leaf of ``new`` is finite, else ``(old, False)``."""
    ok = all_finite(new)
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old), ok
