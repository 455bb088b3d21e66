"""Independent Bernoulli distributions: :class:`SigmoidCrossEntropy`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kfax.losses._base import _Base, _diagonal_columns


@dataclasses.dataclass(frozen=True)
class SigmoidCrossEntropy(_Base):
    """Independent Bernoulli distributions with logits ``f`` (targets in ``[0, 1]``, same shape).

    Per position ``l = sum_i softplus(f_i) - y_i f_i`` (the sum over the event axis), gradient
    ``s - y`` with ``s = sigmoid(f)``, Hessian ``H = diag(s (1 - s))``, square root
    ``S = diag(sqrt(s (1 - s)))``: one column per output entry. Soft targets (pixel
    intensities) are accepted; ``sample`` draws 0/1 in the outputs' dtype.

    Raises:
        ValueError: naming ``targets`` if they are not real or not of the outputs' shape.

    Example:
        >>> import jax.numpy as jnp, kfax
        >>> loss = kfax.losses.SigmoidCrossEntropy()
        >>> float(loss(jnp.zeros((2, 3)), jnp.ones((2, 3))))  # 3 log 2
        2.079...
        >>> float(loss(jnp.zeros((2, 3)), jnp.ones((2, 3)), where=jnp.array([True, False])))
        1.039...
    """

    name = "SigmoidCrossEntropy"

    def _position_loss(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        return jnp.sum(jax.nn.softplus(outputs) - targets.astype(outputs.dtype) * outputs, axis=-1)

    def _position_gradient(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(outputs) - targets.astype(outputs.dtype)

    def sample(self, key: jax.Array, outputs: jax.Array) -> jax.Array:
        """0/1 targets of the outputs' shape and dtype drawn from ``sigmoid(outputs)``."""
        probs = jax.nn.sigmoid(jax.lax.stop_gradient(outputs))
        return jax.random.bernoulli(key, probs).astype(outputs.dtype)

    def _unit_sqrt(self, outputs: jax.Array) -> jax.Array:
        s = jax.nn.sigmoid(outputs)
        return _diagonal_columns(jnp.sqrt(s * (1 - s)))

    def _unit_product(self, outputs: jax.Array, tangent: jax.Array) -> jax.Array:
        s = jax.nn.sigmoid(outputs)
        return s * (1 - s) * tangent
