"""The categorical distribution over the last axis: :class:`SoftmaxCrossEntropy`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kfax.losses._base import _Base
from kfax.losses._checks import _check_outputs, _concrete


@dataclasses.dataclass(frozen=True)
class SoftmaxCrossEntropy(_Base):
    """Categorical distribution with logits ``f`` over the last axis.

    Per position, with ``p = softmax(f)``: ``l = -log p_y`` for an integer label ``y``; for
    probability targets ``y`` with row mass ``s = sum_c y_c``, ``l = -sum_c (y_c / s) log p_c``
    and ``kappa`` includes ``s``, so ``kappa l = -where sum_c y_c log p_c`` (optax's
    ``softmax_cross_entropy``) and an all-zero row counts 0. The gradient is ``p - e_y`` (or
    ``p - y / s``), the Hessian ``H = diag(p) - p p^T`` with square root
    ``S = diag(sqrt p) - p sqrt(p)^T`` (``S S^T = H`` since ``sum_c p_c = 1``): ``classes``
    columns per position. ``sample`` draws integer labels.

    Args:
        ignore_index: a label that marks positions to leave out, declared by the user (e.g.
            ``-100``, the padding label of PyTorch and many datasets): such positions have weight
            0 in the value, the gradient and every curvature. ``None`` (default): none.

    Targets are integer labels of shape ``outputs.shape[:-1]``, each in ``[0, classes)`` or equal
    to ``ignore_index``, or non-negative floating probabilities of the outputs' shape.

    Raises:
        ValueError: naming ``targets``: integer labels of the outputs' full shape (one-hot
            targets must be floating probabilities), other shapes or dtypes, negative
            probabilities, and, when the labels are concrete, labels outside ``[0, classes)``
            that are not ``ignore_index`` (also at positions that ``where`` masks). Under
            ``jax.jit`` labels cannot be checked: a position with such a label gets weight NaN,
            so its loss, gradient and curvature are NaN (loud, never silently dropped).

    Example:
        >>> import jax.numpy as jnp, kfax
        >>> loss = kfax.losses.SoftmaxCrossEntropy(ignore_index=-100)
        >>> logits = jnp.zeros((1, 2, 4))
        >>> float(loss(logits, jnp.array([[3, -100]])))  # log(4): the padded position is left out
        1.386...
        >>> loss.output_gradient(logits, jnp.array([[3, -100]]))[0, 1].tolist()
        [0.0, 0.0, 0.0, 0.0]
    """

    ignore_index: int | None = None
    name = "SoftmaxCrossEntropy"

    def __post_init__(self):
        index = self.ignore_index
        if index is not None and (
            isinstance(index, bool) or not isinstance(index, int | np.integer)
        ):
            raise ValueError(
                f"SoftmaxCrossEntropy: ignore_index must be an int or None, got {index!r}."
            )

    def check_targets(self, outputs: jax.Array, targets: Any) -> None:
        """Raise ``ValueError`` naming ``targets`` unless they fit (see the class docstring)."""
        outputs = _check_outputs(outputs, self.name)
        array = jnp.asarray(targets)
        if jnp.issubdtype(array.dtype, jnp.integer):
            self._check_labels(outputs, array.shape, _concrete(targets))
        elif jnp.issubdtype(array.dtype, jnp.floating):
            self._check_probabilities(outputs, array.shape, _concrete(targets))
        else:
            raise ValueError(
                f"{self.name}: targets must be integer labels or floating probabilities, got "
                f"{array.dtype}."
            )

    def _check_labels(self, outputs: jax.Array, shape: tuple, values: np.ndarray | None) -> None:
        if shape != outputs.shape[:-1]:
            hint = (
                "; targets of the outputs' full shape look like one-hot labels stored as integers:"
                " one-hot targets must be floating probabilities"
                if shape == outputs.shape
                else ""
            )
            raise ValueError(
                f"{self.name}: targets of shape {shape} do not match model outputs of shape "
                f"{outputs.shape}: integer labels have shape outputs.shape[:-1] = "
                f"{outputs.shape[:-1]}{hint}."
            )
        if values is not None:
            self._check_label_range(values, outputs.shape[-1])

    def _check_label_range(self, labels: np.ndarray, classes: int) -> None:
        bad = (labels < 0) | (labels >= classes)
        if self.ignore_index is not None:
            bad &= labels != self.ignore_index
        if np.any(bad):
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{self.name}: targets hold {int(bad.sum())} label(s) outside [0, {classes}), "
                f"e.g. {labels[index]} at index {index}; ignore_index is {self.ignore_index}. "
                f"Declare a padding label with SoftmaxCrossEntropy(ignore_index=...)."
            )

    def _check_probabilities(self, outputs: jax.Array, shape: tuple, values: Any) -> None:
        if shape != outputs.shape:
            raise ValueError(
                f"{self.name}: targets of shape {shape} do not match model outputs of shape "
                f"{outputs.shape}: floating targets are probabilities of the outputs' shape; "
                f"class labels of shape {outputs.shape[:-1]} must be integers."
            )
        if values is not None and not np.all(values >= 0):
            raise ValueError(f"{self.name}: probability targets must be >= 0.")

    def _target_weights(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        if not jnp.issubdtype(targets.dtype, jnp.integer):
            return jnp.sum(targets.astype(outputs.dtype), axis=-1)
        valid = (targets >= 0) & (targets < outputs.shape[-1])
        # NaN only where a label is out of range (sqrt(-1)): no NaN exists for valid labels.
        weights = jnp.sqrt(jnp.where(valid, 1.0, -1.0)).astype(outputs.dtype)
        if self.ignore_index is None:
            return weights
        return jnp.where(targets == self.ignore_index, 0.0, weights).astype(outputs.dtype)

    def _unit_targets(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        """Each position's target distribution: the label's one-hot (clipped), or ``y / s``."""
        classes = outputs.shape[-1]
        if jnp.issubdtype(targets.dtype, jnp.integer):
            return jax.nn.one_hot(jnp.clip(targets, 0, classes - 1), classes, dtype=outputs.dtype)
        probs = targets.astype(outputs.dtype)
        mass = jnp.sum(probs, axis=-1, keepdims=True)
        return probs / jnp.where(mass == 0, 1, mass)

    def _position_loss(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        q, log_p = self._unit_targets(outputs, targets), jax.nn.log_softmax(outputs, axis=-1)
        return -jnp.sum(jnp.where(q != 0, q * log_p, 0), axis=-1)  # 0 log 0 = 0 (-inf logits)

    def _position_gradient(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        return jax.nn.softmax(outputs, axis=-1) - self._unit_targets(outputs, targets)

    def sample(self, key: jax.Array, outputs: jax.Array) -> jax.Array:
        """Integer labels of shape ``outputs.shape[:-1]`` drawn from ``softmax(outputs)``."""
        return jax.random.categorical(key, jax.lax.stop_gradient(outputs), axis=-1)

    def _unit_sqrt(self, outputs: jax.Array) -> jax.Array:
        p = jax.nn.softmax(outputs, axis=-1)
        root = jnp.sqrt(p)
        classes, positions = outputs.shape[-1], math.prod(outputs.shape[1:-1])
        # Column (position q, class c): at position q, sqrt(p_c) e_c - p sqrt(p_c); zero elsewhere.
        block = (
            jnp.eye(classes, dtype=p.dtype) * root[..., None, :]
            - p[..., :, None] * root[..., None, :]
        )
        block = block.reshape(outputs.shape[0], positions, classes, classes)
        cols = jnp.einsum("qr,nrkc->qcnrk", jnp.eye(positions, dtype=p.dtype), block)
        return cols.reshape((positions * classes, *outputs.shape))

    def _unit_product(self, outputs: jax.Array, tangent: jax.Array) -> jax.Array:
        p = jax.nn.softmax(outputs, axis=-1)
        return p * tangent - p * jnp.sum(p * tangent, axis=-1, keepdims=True)
