"""The Gaussian with a fixed variance: :class:`SquaredError`."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kfax.losses._base import _Base, _diagonal_columns


@dataclasses.dataclass(frozen=True)
class SquaredError(_Base):
    """Gaussian with mean ``f`` and fixed ``variance``: ``l = |f - y|^2 / (2 variance)`` (+ const).

    Per position the square is summed over the event axis; the gradient is
    ``(f - y) / variance``, the Hessian ``H = I / variance`` with square root
    ``S = I / sqrt(variance)``: one column per output entry. ``sample`` draws
    ``f + sqrt(variance) z``, ``z ~ N(0, I)``.

    Args:
        variance: the Gaussian's variance, > 0 (``ValueError`` otherwise).

    Raises:
        ValueError: naming ``targets`` if they are not real or not of the outputs' shape.

    Example:
        >>> import jax.numpy as jnp, kfax
        >>> loss = kfax.losses.SquaredError()
        >>> float(loss(jnp.ones((2, 3)), jnp.zeros((2, 3))))
        1.5
        >>> float(loss(jnp.ones((2, 3)), jnp.zeros((2, 3)), where=jnp.array([0.5, 0.0])))
        0.375
    """

    variance: float = 1.0
    name = "SquaredError"

    def __post_init__(self):
        if not self.variance > 0:
            raise ValueError(f"SquaredError: variance must be > 0, got {self.variance}.")

    def _position_loss(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        residual = outputs - targets.astype(outputs.dtype)
        return jnp.sum(jnp.square(residual), axis=-1) / (2 * self.variance)

    def _position_gradient(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        return (outputs - targets.astype(outputs.dtype)) / self.variance

    def sample(self, key: jax.Array, outputs: jax.Array) -> jax.Array:
        """Targets ``outputs + sqrt(variance) z`` with ``z ~ N(0, I)``."""
        mean = jax.lax.stop_gradient(outputs)
        noise = jax.random.normal(key, mean.shape, mean.dtype)
        return mean + math.sqrt(self.variance) * noise

    def _unit_sqrt(self, outputs: jax.Array) -> jax.Array:
        return _diagonal_columns(
            jnp.full(outputs.shape, 1 / math.sqrt(self.variance), outputs.dtype)
        )

    def _unit_product(self, outputs: jax.Array, tangent: jax.Array) -> jax.Array:
        return tangent / self.variance
