"""Output distributions: the losses K-FAC understands.

Each loss is the negative log-likelihood ``l(f, y) = -log p(y | f)`` of a distribution over
targets parametrised by the model outputs ``f``. It knows how to

* compute the loss of each example and the mean loss over a batch (``per_example``, ``__call__``);
* weigh positions: a user mask or per-position weights, a declared ignore label, the mass of a
  probability row (``position_weights``);
* sample targets from the model (``sample``), for the true Fisher, and give the sampled
  cotangent ``sqrt(kappa) grad_f l(f, y~)`` (``sampled_cotangent``);
* give the gradient of each example's loss (``output_gradient``);
* give columns of a square root of the weighted output curvature (``curvature_sqrt``), for the
  exact Gauss-Newton / Fisher, and its products with vectors (``curvature_product``), for
  curvature-vector products in the quadratic model;
* validate targets (``check_targets``).

Shapes and the convention
-------------------------
Outputs have shape ``(batch, *positions, event)``: the last axis is the event (classes,
features), every axis between the batch and the event is a position (tokens, pixel rows); at
least 2-D. Each position ``r`` of example ``n`` has a weight ``kappa_nr`` (``position_weights``,
shape ``outputs.shape[:-1]``, the outputs' dtype)::

    kappa = where                     the user's mask or per-position weights (default 1)
          x [label != ignore_index]   SoftmaxCrossEntropy, integer labels, declared ignore_index
          x s = sum_c y_c             SoftmaxCrossEntropy, probability targets (all-zero row: 0)

and the objective is ``per_example_n = sum_r kappa_nr l(f_nr, y_nr)``, ``loss = mean_n
per_example_n``. With ``H = d^2 l / d f^2`` at one position, every method weighs by the same
``kappa``:

* ``output_gradient`` is ``kappa grad_f l``, exactly ``jax.grad`` of ``sum_n per_example_n``;
* ``curvature_sqrt(outputs, kappa)`` gives columns ``S`` with ``sum_cols S S^T = kappa H`` per
  position, block diagonal over positions;
* ``curvature_product(outputs, v, kappa)`` is ``kappa H v``;
* ``sampled_cotangent(key, outputs, kappa)`` is ``u = sqrt(kappa) grad_f l(f, y~)`` with
  ``y~ ~ p(. | f)``, and ``E[u u^T] = kappa H`` (the Fisher equals the Gauss-Newton matrix for
  these canonical families).

A position of weight 0 gives exactly 0 in all of them, whatever its outputs hold. The module
knows nothing of layers or optimisers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np


class Loss(Protocol):
    """The interface every output distribution implements (see the module docstring).

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


def _sum_but_batch(x: jax.Array) -> jax.Array:
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def _concrete(x: Any) -> np.ndarray | None:
    """The values of ``x`` when they are known (not traced under ``jit``/``vmap``), else None."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def _weigh(weights: jax.Array, x: jax.Array) -> jax.Array:
    """``weights * x`` with exact zeros where a weight is 0, whatever ``x`` holds there."""
    return jnp.where(weights != 0, weights * x, 0)


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
        """``kappa`` of shape ``outputs.shape[:-1]`` in the outputs' dtype (module docstring).

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
