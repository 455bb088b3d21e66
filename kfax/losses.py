"""Output distributions: the losses K-FAC understands.

Each loss is the negative log-likelihood ``l(f, y) = -log p(y | f)`` of a distribution over
targets parametrised by the model outputs ``f``. It knows how to

* compute the mean loss over a batch: the mean over the first (batch) axis of the sum over every
  other axis (positions and the event axis), e.g. the Bernoulli autoencoder's mean over images of
  the sum over pixels;
* sample targets from the model (``sample``), for the true Fisher;
* give the gradient ``grad_f l(f, y)`` of each example's loss (``output_gradient``);
* give columns of a square root ``S`` of the output curvature ``D = d^2 l / d f^2 = S S^T``
  (``curvature_sqrt``), for the exact Gauss-Newton / Fisher, and products ``D v``
  (``curvature_product``), for curvature-vector products in the quadratic model.

For these canonical families the Gauss-Newton and Fisher matrices coincide. The module knows nothing
of layers or optimisers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp


class Loss(Protocol):
    """The interface every output distribution implements."""

    def per_example(self, outputs: jax.Array, targets: jax.Array) -> jax.Array: ...

    def __call__(self, outputs: jax.Array, targets: jax.Array) -> jax.Array: ...

    def sample(self, key: jax.Array, outputs: jax.Array) -> jax.Array: ...

    def output_gradient(self, outputs: jax.Array, targets: jax.Array) -> jax.Array: ...

    def curvature_sqrt(self, outputs: jax.Array) -> jax.Array: ...

    def curvature_product(self, outputs: jax.Array, tangent: jax.Array) -> jax.Array: ...


def _sum_but_batch(x: jax.Array) -> jax.Array:
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def _check_outputs(outputs: Any, name: str) -> jax.Array:
    outputs = jnp.asarray(outputs)
    if outputs.ndim < 2:
        raise ValueError(
            f"{name} expects model outputs with a batch axis and an event axis, i.e. shape "
            f"(batch, ..., features); got shape {outputs.shape}."
        )
    return outputs


def _diagonal_columns(diag: jax.Array) -> jax.Array:
    """Columns of ``diag(d)`` per example: shape ``(K, batch, *event)`` with ``K = prod(event)``."""
    _batch, event = diag.shape[0], diag.shape[1:]
    k = math.prod(event)
    eye = jnp.eye(k, dtype=diag.dtype).reshape((k, 1, *event))
    return eye * diag[None]


class _Base:
    name = "loss"

    def __call__(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        """The mean over the batch of each example's loss."""
        return jnp.mean(self.per_example(outputs, targets))

    def _check_targets(self, outputs: jax.Array, targets: Any, shape: tuple) -> jax.Array:
        targets = jnp.asarray(targets)
        if targets.shape != shape:
            raise ValueError(
                f"{self.name}: targets of shape {targets.shape} do not match model outputs of "
                f"shape {outputs.shape}; expected targets of shape {shape}."
            )
        return targets


@dataclasses.dataclass(frozen=True)
class SoftmaxCrossEntropy(_Base):
    """Categorical distribution with logits ``f`` over the last axis.

    Targets are integer labels of shape ``outputs.shape[:-1]`` (or probabilities of the
    outputs' shape). ``D = diag(p) - p p^T`` with square root ``S = diag(sqrt p) - p sqrt(p)^T``.

    Example:
        >>> import jax.numpy as jnp, kfax
        >>> loss = kfax.losses.SoftmaxCrossEntropy()
        >>> float(loss(jnp.zeros((2, 4)), jnp.array([0, 3])))  # log(4)
        1.386...
    """

    name = "SoftmaxCrossEntropy"

    def _probabilities(self, outputs: jax.Array, targets: Any) -> jax.Array:
        targets = jnp.asarray(targets)
        if jnp.issubdtype(targets.dtype, jnp.integer):
            self._check_targets(outputs, targets, outputs.shape[:-1])
            return jax.nn.one_hot(targets, outputs.shape[-1], dtype=outputs.dtype)
        return self._check_targets(outputs, targets, outputs.shape).astype(outputs.dtype)

    def per_example(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        outputs = _check_outputs(outputs, self.name)
        probs = self._probabilities(outputs, targets)
        return _sum_but_batch(-jnp.sum(probs * jax.nn.log_softmax(outputs, axis=-1), axis=-1))

    def sample(self, key: jax.Array, outputs: jax.Array) -> jax.Array:
        return jax.random.categorical(key, jax.lax.stop_gradient(outputs), axis=-1)

    def output_gradient(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        outputs = _check_outputs(outputs, self.name)
        return jax.nn.softmax(outputs, axis=-1) - self._probabilities(outputs, targets)

    def curvature_sqrt(self, outputs: jax.Array) -> jax.Array:
        outputs = _check_outputs(outputs, self.name)
        p = jax.nn.softmax(outputs, axis=-1)
        root = jnp.sqrt(p)
        classes = outputs.shape[-1]
        lead = outputs.shape[1:-1]
        positions = math.prod(lead)
        # Column (position q, class c): at position q, sqrt(p_c) e_c - p sqrt(p_c); zero elsewhere.
        per_position = jnp.eye(classes, dtype=p.dtype) * root[..., None, :] - (
            p[..., :, None] * root[..., None, :]
        )  # (batch, *lead, K rows, K columns)
        per_position = per_position.reshape(outputs.shape[0], positions, classes, classes)
        mask = jnp.eye(positions, dtype=p.dtype)  # (column position, row position)
        cols = jnp.einsum("qr,nrkc->qcnrk", mask, per_position)
        return cols.reshape((positions * classes, *outputs.shape))

    def curvature_product(self, outputs: jax.Array, tangent: jax.Array) -> jax.Array:
        """``D v = p * v - p (p . v)`` per position."""
        p = jax.nn.softmax(outputs, axis=-1)
        return p * tangent - p * jnp.sum(p * tangent, axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class SigmoidCrossEntropy(_Base):
    """Independent Bernoulli distributions with logits ``f`` (targets in ``[0, 1]``, same shape).

    ``D = diag(s (1 - s))``, ``s = sigmoid(f)``. Soft targets (pixel intensities) are accepted.

    Example:
        >>> import jax.numpy as jnp, kfax
        >>> loss = kfax.losses.SigmoidCrossEntropy()
        >>> float(loss(jnp.zeros((2, 3)), jnp.ones((2, 3))))  # 3 log 2
        2.079...
    """

    name = "SigmoidCrossEntropy"

    def per_example(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        outputs = _check_outputs(outputs, self.name)
        targets = self._check_targets(outputs, targets, outputs.shape).astype(outputs.dtype)
        terms = jax.nn.softplus(outputs) - targets * outputs
        return _sum_but_batch(terms)

    def sample(self, key: jax.Array, outputs: jax.Array) -> jax.Array:
        probs = jax.nn.sigmoid(jax.lax.stop_gradient(outputs))
        return jax.random.bernoulli(key, probs).astype(outputs.dtype)

    def output_gradient(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        outputs = _check_outputs(outputs, self.name)
        targets = self._check_targets(outputs, targets, outputs.shape).astype(outputs.dtype)
        return jax.nn.sigmoid(outputs) - targets

    def curvature_sqrt(self, outputs: jax.Array) -> jax.Array:
        outputs = _check_outputs(outputs, self.name)
        s = jax.nn.sigmoid(outputs)
        return _diagonal_columns(jnp.sqrt(s * (1 - s)))

    def curvature_product(self, outputs: jax.Array, tangent: jax.Array) -> jax.Array:
        """``D v = s (1 - s) v``."""
        s = jax.nn.sigmoid(outputs)
        return s * (1 - s) * tangent


@dataclasses.dataclass(frozen=True)
class SquaredError(_Base):
    """Gaussian with mean ``f`` and fixed ``variance``: ``l = |f - y|^2 / (2 variance)`` (+ const).

    ``D = I / variance``, so ``S = I / sqrt(variance)``.

    Example:
        >>> import jax.numpy as jnp, kfax
        >>> loss = kfax.losses.SquaredError()
        >>> float(loss(jnp.ones((2, 3)), jnp.zeros((2, 3))))
        1.5
    """

    variance: float = 1.0
    name = "SquaredError"

    def __post_init__(self):
        if not self.variance > 0:
            raise ValueError(f"SquaredError: variance must be > 0, got {self.variance}.")

    def per_example(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        outputs = _check_outputs(outputs, self.name)
        targets = self._check_targets(outputs, targets, outputs.shape).astype(outputs.dtype)
        return _sum_but_batch(jnp.square(outputs - targets)) / (2 * self.variance)

    def sample(self, key: jax.Array, outputs: jax.Array) -> jax.Array:
        mean = jax.lax.stop_gradient(outputs)
        noise = jax.random.normal(key, mean.shape, mean.dtype)
        return mean + math.sqrt(self.variance) * noise

    def output_gradient(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        outputs = _check_outputs(outputs, self.name)
        targets = self._check_targets(outputs, targets, outputs.shape).astype(outputs.dtype)
        return (outputs - targets) / self.variance

    def curvature_sqrt(self, outputs: jax.Array) -> jax.Array:
        outputs = _check_outputs(outputs, self.name)
        scale = jnp.full(outputs.shape, 1 / math.sqrt(self.variance), outputs.dtype)
        return _diagonal_columns(scale)

    def curvature_product(self, outputs: jax.Array, tangent: jax.Array) -> jax.Array:
        """``D v = v / variance``."""
        return tangent / self.variance


def check_loss(loss: Any) -> None:
    """Raise a clear error if ``loss`` is not one of kfax's output distributions."""
    needed = ("per_example", "sample", "output_gradient", "curvature_sqrt", "curvature_product")
    missing = [m for m in needed if not callable(getattr(loss, m, None))]
    if missing:
        raise TypeError(
            f"loss must be an output distribution such as kfax.losses.SoftmaxCrossEntropy(), "
            f"SigmoidCrossEntropy() or SquaredError(); got {loss!r}, which lacks {missing}."
        )
