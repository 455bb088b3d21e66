"""The interface every output distribution implements, and the check that a loss has it."""

from __future__ import annotations

from typing import Any, Protocol

import jax


class Loss(Protocol):
    """The interface every output distribution implements (see :mod:`kfax.losses`).

    ``outputs``: model outputs of shape ``(batch, *positions, event)``. ``where`` and
    ``weights``: ``None`` (all 1) or an array of shape ``outputs.shape[:-1]``; ``where`` is the
    user's bool mask or non-negative float weights, ``weights`` is ``kappa`` as returned by
    ``position_weights``. Bad shapes or values raise ``ValueError`` naming the argument.
    """

    def per_example(self, outputs: jax.Array, targets: Any, where: Any = None) -> jax.Array:
        """``sum_r kappa_r l(f_r, y_r)`` for each example: shape ``(batch,)``."""

    def __call__(self, outputs: jax.Array, targets: Any, where: Any = None) -> jax.Array:
        """The mean of ``per_example`` over the batch: a scalar."""

    def position_weights(
        self, outputs: jax.Array, targets: Any = None, where: Any = None
    ) -> jax.Array:
        """``kappa``, shape ``outputs.shape[:-1]``; with ``targets=None`` only ``where`` counts."""

    def output_gradient(self, outputs: jax.Array, targets: Any, where: Any = None) -> jax.Array:
        """``kappa grad_f l`` (the gradient of ``sum_n per_example_n``): outputs' shape."""

    def sample(self, key: jax.Array, outputs: jax.Array) -> jax.Array:
        """Targets drawn from ``p(y | f)``."""

    def sampled_cotangent(
        self, key: jax.Array, outputs: jax.Array, weights: Any = None
    ) -> jax.Array:
        """``sqrt(kappa) grad_f l(f, y~)`` for ``y~ = sample(key, outputs)``: outputs' shape."""

    def curvature_sqrt(self, outputs: jax.Array, weights: Any = None) -> jax.Array:
        """Columns ``S``, shape ``(K, *outputs.shape)``, with ``sum_cols S S^T = kappa H``."""

    def curvature_product(self, outputs: jax.Array, tangent: Any, weights: Any = None) -> jax.Array:
        """``kappa H v`` for a tangent ``v`` of the outputs' shape."""

    def check_targets(self, outputs: jax.Array, targets: Any) -> None:
        """Raise ``ValueError`` naming ``targets`` if they do not fit the outputs."""


_REQUIRED = (
    "per_example",
    "position_weights",
    "output_gradient",
    "sample",
    "sampled_cotangent",
    "curvature_sqrt",
    "curvature_product",
    "check_targets",
)


def check_loss(loss: Any) -> None:
    """Raise a clear ``TypeError`` if ``loss`` is not one of kfax's output distributions."""
    missing = [m for m in _REQUIRED if not callable(getattr(loss, m, None))]
    if missing:
        raise TypeError(
            f"loss must be an output distribution such as kfax.losses.SoftmaxCrossEntropy(), "
            f"SigmoidCrossEntropy() or SquaredError(); got {loss!r}, which lacks {missing}."
        )
