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

The model's terms, its solve and its sub-batch (``model_batch_size``) are in
:mod:`kfax._quadratic_model`; the check of the gradient's scale in :mod:`kfax._gradient_scale`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfax import _arguments, _gradient_scale, _quadratic_model, _sub_batches, _trees, _validation
from kfax.losses import Loss, check_loss

# Levenberg-Marquardt: lower lam when rho > 3/4, raise it when rho < 1/4, by (19/20)^every.
_LOWER_ABOVE, _RAISE_BELOW, _OMEGA = 0.75, 0.25, 19.0 / 20.0


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
    cut = _quadratic_model.model_sub_batch(apply_fn, params, inputs, targets, where, static)
    tangents = jax.tree.map(lambda a, b: jnp.stack([a, b.astype(a.dtype)]), delta, previous)

    def terms(data):
        return _quadratic_model.quadratic_terms(
            apply_fn, loss, params, *data, tangents, lam, axis_name
        )

    (b, m, norms, before, counted), on_model_examples = _quadratic_model.on_model_examples(
        terms, (inputs, targets, where), cut
    )
    alpha, mu = _quadratic_model.solve(b, m + lam * norms, state.count > 0)
    step = jax.tree.map(lambda d, p: (alpha * d + mu * p).astype(d.dtype), delta, previous)
    x = jnp.stack([alpha, mu])
    predicted = b @ x + 0.5 * x @ m @ x  # the undamped model: rho compares the loss with it
    along = _trees.vdot(grads, delta)
    # The gradient-scale check follows the examples the model saw (the whole batch's rule on a
    # step that fell back to it).
    scale = on_model_examples(
        lambda _, whole: _gradient_scale.check(
            along, b[0], state.count, None if whole else static.model_batch_size
        )
    )

    def ratio():
        new = optax.apply_updates(params, step)

        def loss_after(data, _):
            x, y, w = data
            return _quadratic_model.pmean(
                loss(apply_fn(new, x).astype(before.dtype), y, w), axis_name
            )

        after = on_model_examples(loss_after)
        rho = (after - before) / jnp.minimum(predicted, -jnp.finfo(before.dtype).tiny)
        return rho.astype(state.info.reduction_ratio.dtype)  # float64 outputs, float32 state

    measure = adaptive_damping & (state.count % damping_every == 0)
    rho = jax.lax.cond(measure, ratio, lambda: state.info.reduction_ratio)
    omega = jnp.asarray(_OMEGA, lam.dtype) ** damping_every
    moved = jnp.where(
        rho > _LOWER_ABOVE, lam * omega, jnp.where(rho < _RAISE_BELOW, lam / omega, lam)
    )
    ok = _trees.all_finite((alpha, mu, step, predicted))
    # A batch where nothing counts (every position masked) predicts and measures nothing: the
    # damping stays where it is.
    measured = measure & ok & jnp.isfinite(rho) & (counted > 0)
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
        only from 32 examples (on the whole batch: on any step, beyond 10% of 1). Where no
        position of the last examples counts (all masked by ``where`` or an ``ignore_index``,
        on every device: padding at the batch's end), that step's model and ratio take the
        whole batch.
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
    strict = not isinstance(model_batch_size, _quadratic_model.AtMost)
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
        _arguments.check_same_shapes_as_state(state.previous_update, params)
        if model_batch_size is not None:
            _sub_batches.check_batch_axes(batch_axes, inputs)
        rule = (damping_every, min_damping, max_damping, damping)
        return _adaptive_step(static, grads, state, params, inputs, targets, where, extra, rule)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
