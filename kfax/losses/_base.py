"""The weighting by ``kappa`` that every loss shares (see :mod:`kfax.losses`).

:class:`_Base` turns a distribution's unit-weight pieces of one position into the weighted
value, gradient, sampled cotangent and curvature of every position.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from kfax.losses._checks import _check_dense_targets, _check_outputs, _per_position, _where_weights


def _sum_but_batch(x: jax.Array) -> jax.Array:
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def _weigh(weights: jax.Array, x: jax.Array) -> jax.Array:
    """``weights * x`` with exact zeros where a weight is 0, whatever ``x`` holds there."""
    return jnp.where(weights != 0, weights * x, 0)


def _diagonal_columns(diag: jax.Array) -> jax.Array:
    """Columns of ``diag(d)`` per example: shape ``(K, batch, *event)`` with ``K = prod(event)``."""
    event = diag.shape[1:]
    k = math.prod(event)
    eye = jnp.eye(k, dtype=diag.dtype).reshape((k, 1, *event))
    return eye * diag[None]


class _Base:
    """The weighting shared by every loss; subclasses give the unit-weight pieces ``_position_*``,
    ``_unit_sqrt`` and ``_unit_product`` of one position."""

    name = "loss"

    def __call__(self, outputs: jax.Array, targets: Any, where: Any = None) -> jax.Array:
        """The mean over the batch of ``per_example``: a scalar."""
        return jnp.mean(self.per_example(outputs, targets, where))

    def per_example(self, outputs: jax.Array, targets: Any, where: Any = None) -> jax.Array:
        """``sum_r kappa_r l(f_r, y_r)`` for each example: shape ``(batch,)``."""
        outputs = _check_outputs(outputs, self.name)
        kappa = self.position_weights(outputs, targets, where)
        return _sum_but_batch(_weigh(kappa, self._position_loss(outputs, jnp.asarray(targets))))

    def position_weights(
        self, outputs: jax.Array, targets: Any = None, where: Any = None
    ) -> jax.Array:
        """``kappa`` of shape ``outputs.shape[:-1]`` in the outputs' dtype (see :mod:`kfax.losses`).

        With ``targets=None`` only ``where`` counts (the caller decides whether targets are
        needed). Raises ``ValueError`` naming ``where`` or ``targets`` when they do not fit.
        """
        outputs = _check_outputs(outputs, self.name)
        kappa = _where_weights(outputs, where, self.name)
        if targets is None:
            return kappa
        self.check_targets(outputs, targets)
        return kappa * self._target_weights(outputs, jnp.asarray(targets))

    def output_gradient(self, outputs: jax.Array, targets: Any, where: Any = None) -> jax.Array:
        """``kappa grad_f l``, exactly ``jax.grad`` of ``sum_n per_example_n``: outputs' shape."""
        outputs = _check_outputs(outputs, self.name)
        kappa = self.position_weights(outputs, targets, where)
        return _weigh(kappa[..., None], self._position_gradient(outputs, jnp.asarray(targets)))

    def sampled_cotangent(
        self, key: jax.Array, outputs: jax.Array, weights: Any = None
    ) -> jax.Array:
        """``sqrt(kappa) grad_f l(f, y~)`` for ``y~ = sample(key, outputs)``: outputs' shape.

        One column of the Monte-Carlo Fisher: ``E[u u^T] = kappa H`` per position.
        """
        outputs = _check_outputs(outputs, self.name)
        return self._cotangent(outputs, self.sample(key, outputs), weights)

    def _cotangent(self, outputs: jax.Array, sampled: jax.Array, weights: Any) -> jax.Array:
        """``sqrt(kappa) grad_f l(f, y)`` for a given sample ``y`` of ``p(. | f)``."""
        root = jnp.sqrt(_per_position(outputs, weights, "weights", self.name))
        return _weigh(root[..., None], self._position_gradient(outputs, sampled))

    def curvature_sqrt(self, outputs: jax.Array, weights: Any = None) -> jax.Array:
        """Columns ``S`` of shape ``(K, *outputs.shape)`` with ``sum_cols S S^T = kappa H``.

        ``S S^T`` is block diagonal over positions: a column is non-zero at one position only.
        """
        outputs = _check_outputs(outputs, self.name)
        root = jnp.sqrt(_per_position(outputs, weights, "weights", self.name))
        return _weigh(root[None, ..., None], self._unit_sqrt(outputs))

    def curvature_product(self, outputs: jax.Array, tangent: Any, weights: Any = None) -> jax.Array:
        """``kappa H v`` per position for a tangent ``v`` of the outputs' shape."""
        outputs = _check_outputs(outputs, self.name)
        tangent = jnp.asarray(tangent)
        if tangent.shape != outputs.shape:
            raise ValueError(
                f"{self.name}: tangent of shape {tangent.shape} does not match model outputs of "
                f"shape {outputs.shape}."
            )
        kappa = _per_position(outputs, weights, "weights", self.name)
        return _weigh(kappa[..., None], self._unit_product(outputs, tangent))

    def check_targets(self, outputs: jax.Array, targets: Any) -> None:
        """Raise ``ValueError`` naming ``targets`` unless real and of the outputs' shape."""
        _check_dense_targets(_check_outputs(outputs, self.name), targets, self.name)

    def _target_weights(self, outputs: jax.Array, targets: jax.Array) -> Any:
        return 1.0
