"""The quadratic-model step and Levenberg-Marquardt damping (Martens & Grosse 2015, sections 6-7).

Wraps a preconditioner: it owns the damping ``lam`` and passes it in, takes the preconditioner's
direction ``Delta``, and chooses the step ``d = alpha Delta + mu d_prev`` that minimises the
quadratic model of the loss

    q(d) = <grad_f L, J d> + 1/2 <J d, H J d> + lam/2 |d|^2

over ``alpha`` and ``mu``, where ``J`` is the model's Jacobian on the batch, ``H`` the loss's
output curvature and ``grad_f L`` the gradient of kfax's own mean loss at the outputs: the model
is that of the loss ``loss(apply_fn(params, inputs), targets, where)``, whatever the scale of the
gradient the caller passes (a sum over the batch, a per-token mean). Every ``damping_every``
steps the reduction ratio ``rho = (L(params + d) - L(params)) / q_0(d)``, with ``q_0`` the
undamped model (``lam = 0``; exactly the loss change on a quadratic objective), moves ``lam`` by
Levenberg-Marquardt's rule. A step that is not finite is not stored: the previous update and the
damping stay, and the step is counted.

With ``model_batch_size=n`` the model (``grad_f L``, ``J``, ``H``) and the reduction ratio are those
of the loss on the batch's last ``n`` examples, while the direction ``Delta`` still comes from the
whole batch: the two Jacobian-vector products and the losses of ``rho`` then cost ``n / N`` of the
batch's. The last examples, because the preconditioner's ``stats_batch_size`` takes the first: a
model on the very examples that made the Kronecker factors is blind to the directions the factors
estimate worst (those orthogonal to the sub-batch's activations, where ``Delta`` is largest). On
the MNIST autoencoder (batch 1000, statistics on the first 250, damping 1e-2) a model on those same
250 examples let the loss diverge within 7 steps.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kfax import _sub_batches, _trees, _validation
from kfax.losses import Loss, check_loss

# Levenberg-Marquardt: lower lam when rho > 3/4, raise it when rho < 1/4, by (19/20)^every.
_LOWER_ABOVE, _RAISE_BELOW, _OMEGA = 0.75, 0.25, 19.0 / 20.0
# Gradient scales further than this from 1 are reported once (see StepInfo.gradient_scale).
_SCALE_TOLERANCE = 0.1
# With the model on a sub-batch, its gradient term estimates the batch's: the scale is checked
# on the first step only, where the gradient's signal dominates its sampling noise, and only
# scales outside [1/2, 2] are reported (a sum instead of a mean is off by the batch size).
# Later in training the estimate's noise alone moved it to -24.9 and 62 (8 of 32 examples).
_SUB_BATCH_SCALE_BAND = 2.0
# ... and only from this many examples: with 8 of 64 the correct gradient's first-step estimate
# left the band on 6 of 20 seeds (up to 7.07); with 32, on none.
_SUB_BATCH_MIN_TO_WARN = 32


class StepInfo(NamedTuple):
    """Quantities of the last step worth logging; each is always defined (no NaN placeholders).

    Attributes:
      step_size: ``alpha`` (0 before the first step).
      momentum: ``mu`` (0 on the first step, when no previous update exists).
      predicted_change: ``q_0(d) = <grad_f L, J d> + 1/2 <J d, H J d>``, the undamped model's
        change for the step taken (0 before the first step).
      reduction_ratio: ``rho`` as last measured (1 before the first measurement).
      ratio_step: the step count at which ``rho`` was last measured (-1: never).
      damping: the damping ``lam`` the step used.
      gradient_scale: ``<grad, Delta> / <grad_f L, J Delta>``: 1 when the gradient passed to
        ``update`` is that of kfax's mean loss on ``inputs`` (0 before the first step); with
        ``model_batch_size``, ``grad_f L`` and ``J`` are the model's sub-batch's: an estimate.
      skipped_steps: steps whose step size, momentum or update were not finite (not stored).
    """

    step_size: jax.Array
    momentum: jax.Array
    predicted_change: jax.Array
    reduction_ratio: jax.Array
    ratio_step: jax.Array
    damping: jax.Array
    gradient_scale: jax.Array
    skipped_steps: jax.Array


class QuadraticModelState(NamedTuple):
    """State of :func:`quadratic_model_step`: wrapped state, previous update, damping, info."""

    count: jax.Array
    inner: Any
    previous_update: Any
    damping: jax.Array
    info: StepInfo


class AtMost(int):
    """A ``model_batch_size`` that is a default, not a demand (``kfax.kfac``'s 256): a batch the
    cut cannot follow (outputs that flatten positions into rows) takes the whole batch instead
    of raising."""


@dataclasses.dataclass(frozen=True, eq=False)
class _Static:
    """The options of one :func:`quadratic_model_step` (hashed by identity: one compilation)."""

    preconditioner: Any
    apply_fn: Any
    loss: Loss
    adaptive_damping: bool
    axis_name: Any
    model_batch_size: int | None
    batch_axes: Any
    model_batch_strict: bool = True


def _pmean(x, axis_name):
    return x if axis_name is None else jax.lax.pmean(x, axis_name)


def _quadratic_terms(apply_fn, loss, params, inputs, targets, where, tangents, lam, axis_name):
    """Gradient terms ``b``, the 2x2 curvature ``<J t_i, H J t_j>``, the Gram matrix
    ``<t_i, t_j>`` of the tangents, and the loss at ``params``."""
    outputs, jvps = jax.vmap(
        lambda t: jax.jvp(lambda p: apply_fn(p, inputs), (params,), (t,)), out_axes=(None, 0)
    )(tangents)
    dtype = jnp.promote_types(outputs.dtype, lam.dtype)
    outputs, jvps = outputs.astype(dtype), jvps.astype(dtype)
    weights = loss.position_weights(outputs, targets, where)
    n = outputs.shape[0]
    gradient = loss.output_gradient(outputs, targets, where) / n
    curvature = jax.vmap(lambda v: loss.curvature_product(outputs, v, weights) / n)(jvps)
    b = jnp.einsum("k...,...->k", jvps, gradient)
    m = jnp.einsum("i...,j...->ij", jvps, curvature)
    norms = jax.vmap(lambda s: jax.vmap(lambda t: _trees.vdot(s, t))(tangents))(tangents)
    b, m, value = _pmean((b, m, loss(outputs, targets, where)), axis_name)
    return b, m, norms, value


def _solve(b: jax.Array, m: jax.Array, has_previous: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(alpha, mu)`` minimising ``b . x + 1/2 x^T M x``; ``mu = 0`` without a previous update
    or when the 2x2 system is singular to working precision: ``det / (M00 M11)`` is
    ``1 - cos^2`` of the angle between the new direction and the previous update in the
    metric ``M``, and below ``100 eps`` (float32: 1.2e-5) it is rounding, whose solution
    would be an arbitrary split between ``alpha`` and ``mu``."""
    det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    tolerance = 100 * jnp.finfo(m.dtype).eps
    use_two = has_previous & (det > tolerance * jnp.abs(m[0, 0] * m[1, 1]))
    safe_det = jnp.where(use_two, det, 1.0)
    alpha_two = (-b[0] * m[1, 1] + b[1] * m[0, 1]) / safe_det
    mu_two = (b[0] * m[0, 1] - b[1] * m[0, 0]) / safe_det
    alpha_one = -b[0] / jnp.where(m[0, 0] > 0, m[0, 0], 1.0)
    return jnp.where(use_two, alpha_two, alpha_one), jnp.where(use_two, mu_two, 0.0)


def _warn_gradient_scale(scale, warn) -> None:
    # `warn` is checked here too: under jax.vmap the lax.cond around this callback becomes a
    # select, which runs the callback whatever the condition.
    if not np.any(np.asarray(warn)):
        return
    scale = np.asarray(scale)[np.asarray(warn)].ravel()[0] if np.ndim(scale) else scale
    warnings.warn(
        "kfax.quadratic_model_step: the gradient passed to update is not the gradient of kfax's "
        "mean loss on inputs (its directional derivative differs by a factor "
        f"{float(scale):.3g}). The adaptive step uses kfax's own loss, so training is unaffected "
        "if that factor is only a scale (a sum over the batch, a per-token mean) or a "
        "regulariser you add; otherwise check that loss, targets and where match your loss.",
        stacklevel=2,
    )


@functools.partial(jax.jit, static_argnums=0)
def _adaptive_step(static, grads, state, params, inputs, targets, where, extra, rule):
    """One step of :func:`quadratic_model_step` (compiled once per wrapped preconditioner)."""
    preconditioner, apply_fn, loss = static.preconditioner, static.apply_fn, static.loss
    adaptive_damping, axis_name = static.adaptive_damping, static.axis_name
    damping_every, min_damping, max_damping, fixed_damping = rule
    # Levenberg-Marquardt owns the damping in the state; without it the option (which
    # optax.inject_hyperparams may change between steps) is the damping.
    lam = state.damping if adaptive_damping else jnp.asarray(fixed_damping, state.damping.dtype)
    direction, inner = preconditioner.update(
        grads,
        state.inner,
        params,
        inputs=inputs,
        targets=targets,
        where=where,
        damping=lam,
        **extra,
    )
    delta = jax.tree.map(jnp.negative, direction)
    previous = state.previous_update
    cut = _model_sub_batch(apply_fn, params, inputs, targets, where, static)
    whole_batch = cut is None
    if not whole_batch:
        inputs, targets, where = cut
    tangents = jax.tree.map(lambda a, b: jnp.stack([a, b.astype(a.dtype)]), delta, previous)
    b, m, norms, before = _quadratic_terms(
        apply_fn, loss, params, inputs, targets, where, tangents, lam, axis_name
    )
    alpha, mu = _solve(b, m + lam * norms, state.count > 0)
    step = jax.tree.map(lambda d, p: (alpha * d + mu * p).astype(d.dtype), delta, previous)
    x = jnp.stack([alpha, mu])
    predicted = b @ x + 0.5 * x @ m @ x  # the undamped model: rho compares the loss with it
    along = _trees.vdot(grads, delta)
    scale = along / jnp.where(b[0] != 0, b[0], 1.0)
    # A zero gradient (optax.MultiSteps between its applying steps) says nothing of the scale.
    if whole_batch:
        off = jnp.abs(scale - 1) > _SCALE_TOLERANCE
    elif static.model_batch_size >= _SUB_BATCH_MIN_TO_WARN:
        band = (scale < 1 / _SUB_BATCH_SCALE_BAND) | (scale > _SUB_BATCH_SCALE_BAND)
        off = (state.count == 0) & band
    else:
        off = jnp.asarray(False)
    warn = (along != 0) & off
    jax.lax.cond(warn, lambda: jax.debug.callback(_warn_gradient_scale, scale, warn), lambda: None)

    def ratio():
        new = optax.apply_updates(params, step)
        after = _pmean(loss(apply_fn(new, inputs).astype(before.dtype), targets, where), axis_name)
        return (after - before) / jnp.minimum(predicted, -jnp.finfo(before.dtype).tiny)

    measure = adaptive_damping & (state.count % damping_every == 0)
    rho = jax.lax.cond(measure, ratio, lambda: state.info.reduction_ratio)
    omega = jnp.asarray(_OMEGA, lam.dtype) ** damping_every
    moved = jnp.where(
        rho > _LOWER_ABOVE, lam * omega, jnp.where(rho < _RAISE_BELOW, lam / omega, lam)
    )
    ok = _trees.all_finite((alpha, mu, step, predicted))
    measured = measure & ok & jnp.isfinite(rho)
    new_lam = jnp.where(measured, jnp.clip(moved, min_damping, max_damping), lam)
    info = StepInfo(
        *(jnp.where(ok, v, 0.0).astype(lam.dtype) for v in (alpha, mu, predicted)),
        jnp.where(measured, rho, state.info.reduction_ratio).astype(lam.dtype),
        jnp.where(measured, state.count, state.info.ratio_step),
        lam,
        jnp.where(jnp.isfinite(scale), scale, 0.0).astype(lam.dtype),
        state.info.skipped_steps + (~ok).astype(jnp.int32),
    )
    stored = jax.tree.map(lambda s, p: jnp.where(ok, s, p), step, previous)
    return step, QuadraticModelState(
        state.count + 1, inner, stored, new_lam.astype(lam.dtype), info
    )


def _model_sub_batch(apply_fn, params, inputs, targets, where, static):
    """``(inputs, targets, where)`` cut to their last ``model_batch_size`` examples, or ``None``
    for the whole batch: no option, a batch no larger, or (``kfac``'s default only) a batch the
    cut cannot follow. The batch size is the outputs' leading axis; a cut is valid when the cut
    inputs' outputs have one row per cut target (a model that flattens positions into rows,
    outputs ``(N R, C)`` for inputs ``(N, R, ...)``, has no such cut)."""
    size = static.model_batch_size
    if size is None:
        return None
    batch = jax.eval_shape(apply_fn, params, inputs).shape[0]
    if size >= batch:
        return None
    take = functools.partial(_sub_batches.take_sub_batch, last=True)
    cut_inputs = take(inputs, size, batch, static.batch_axes)
    rows = jax.eval_shape(apply_fn, params, cut_inputs).shape[0]
    if rows == size:
        return cut_inputs, take(targets, size, batch), take(where, size, batch)
    if not static.model_batch_strict:
        return None
    raise ValueError(
        f"model_batch_size={size}: the model's outputs have {batch} rows, but its last {size} "
        f"examples cannot be cut from the inputs (the cut inputs give {rows} rows; a model that "
        "flattens positions into rows has no such cut). Pass batch_axes to say which input "
        "leaves are batched, or leave model_batch_size unset."
    )


def quadratic_model_step(
    preconditioner: optax.GradientTransformation,
    apply_fn: Any,
    loss: Loss,
    *,
    damping: float = 1e-2,
    adaptive_damping: bool = True,
    damping_every: int = 5,
    min_damping: float = 1e-4,
    max_damping: float = 1e10,
    axis_name: Any = None,
    model_batch_size: int | None = None,
    batch_axes: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Step size, momentum and damping from the quadratic model (module docstring).

    Args:
      preconditioner: a transform that accepts ``update(..., damping=lam)``, such as
        :func:`kfax.scale_by_kfac`; its output is the direction ``-Delta`` to descend along.
      apply_fn, loss: the model and the output distribution of the preconditioner.
      damping: the initial damping ``lam`` (> 0).
      adaptive_damping: adjust ``lam`` every ``damping_every`` steps by the reduction ratio.
      damping_every: cadence of the adjustment; ``lam`` moves by ``(19/20)^damping_every``.
      min_damping, max_damping: bounds of the adjusted damping.
      axis_name: the device axis of ``pmap`` / ``shard_map`` (as the preconditioner's): the
        model's terms and the reduction ratio are averaged across it.
      model_batch_size: evaluate the quadratic model and the reduction ratio on the last
        ``model_batch_size`` examples of each batch (of each device's batch under ``pmap`` or
        ``shard_map``); a Python int, or ``None`` (the default) for the whole batch, as is any
        size >= the batch. ``StepInfo.gradient_scale`` is then a sub-batch estimate: the
        warning about it is given on the first step only, for a scale outside ``[1/2, 2]``, and
        only from 32 examples (on the whole batch: on any step, beyond 10% of 1). If the last
        examples are all masked (``where`` or an ``ignore_index``), the model sees no data and
        the step is zero: put padding first, or use the whole batch.
      batch_axes: which input leaves are batched, for ``model_batch_size`` (``0`` or ``None``
        per leaf, like ``jax.vmap``'s ``in_axes``; default: leaves whose leading axis has the
        outputs' batch size).

    Returns:
      A transform whose ``update(grads, state, params, *, inputs, targets, where=None)`` returns
      the step ``d`` to add to the parameters (already signed), with
      :class:`QuadraticModelState` (its ``info`` is a :class:`StepInfo`).

    Raises:
      ValueError: for invalid options, an ``update`` without ``params``, ``inputs`` or
        ``targets``, or a ``model_batch_size`` whose cut the inputs cannot follow (outputs that
        flatten positions into rows; ``kfax.kfac``'s default takes the whole batch there).

    References:
      Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
      curvature", ICML 2015, sections 6.5 (damping) and 7 (step size and momentum).
    """
    check_loss(loss)
    _validation.positive("damping", damping)
    _validation.count("damping_every", damping_every)
    _validation.positive("min_damping", min_damping)
    _validation.positive("max_damping", max_damping)
    strict = not isinstance(model_batch_size, AtMost)
    model_batch_size = _validation.static_count("model_batch_size", model_batch_size)
    _sub_batches.check_batch_axes_entries(batch_axes)
    preconditioner = optax.with_extra_args_support(preconditioner)
    static = _Static(
        preconditioner,
        apply_fn,
        loss,
        adaptive_damping,
        axis_name,
        model_batch_size,
        batch_axes,
        strict,
    )

    def init_fn(params):
        dtype = _trees.floating_dtype(params)
        # Every leaf its own buffer, so that the state can be donated (jit donate_argnums).
        zero = lambda: jnp.zeros((), dtype)  # noqa: E731
        lam = lambda: jnp.array(damping, dtype)  # noqa: E731
        info = StepInfo(
            zero(),
            zero(),
            zero(),
            jnp.ones((), dtype),
            jnp.asarray(-1, jnp.int32),
            lam(),
            zero(),
            jnp.zeros((), jnp.int32),
        )
        return QuadraticModelState(
            jnp.zeros((), jnp.int32),
            preconditioner.init(params),
            optax.tree.zeros_like(params),
            lam(),
            info,
        )

    def update_fn(grads, state, params=None, *, inputs=None, targets=None, where=None, **extra):
        if params is None or inputs is None or targets is None:
            raise ValueError(
                "the adaptive step (kfax.kfac(None, ...) / quadratic_model_step) needs params, "
                "inputs=... and targets=... in update: it evaluates the loss on the batch."
            )
        _check_same_shapes(state.previous_update, params)
        if model_batch_size is not None:
            _sub_batches.check_batch_axes(batch_axes, inputs)
        rule = (damping_every, min_damping, max_damping, damping)
        return _adaptive_step(static, grads, state, params, inputs, targets, where, extra, rule)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_same_shapes(previous_update: Any, params: Any) -> None:
    """The stored previous update has the shapes of the parameters at ``init``."""
    old, old_tree = jax.tree_util.tree_flatten_with_path(previous_update)
    new, new_tree = jax.tree_util.tree_flatten_with_path(params)
    if old_tree != new_tree:
        raise ValueError(
            "params do not match the K-FAC state (the adaptive step's): the parameter tree "
            "changed since "
            f"init (state built for {old_tree}, params are {new_tree})."
        )
    for (path, a), (_, b) in zip(old, new, strict=True):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(
                f"params do not match the K-FAC state (the adaptive step's): parameter "
                f"{jax.tree_util.keystr(path)!r} has shape {jnp.shape(b)}, but the state was "
                f"built for shape {jnp.shape(a)}."
            )
