"""The quadratic model of the adaptive step: its terms on a batch, its 2x2 solve, and the
sub-batch it is evaluated on (``model_batch_size``).

With ``model_batch_size=n`` the model (``grad_f L``, ``J``, ``H``) and the reduction ratio are those
of the loss on the batch's last ``n`` examples, while the direction ``Delta`` still comes from the
whole batch: the two Jacobian-vector products and the losses of ``rho`` then cost ``n / N`` of the
batch's. The last examples, because the preconditioner's ``stats_batch_size`` takes the first: a
model on the very examples that made the Kronecker factors is blind to the directions the factors
estimate worst (those orthogonal to the sub-batch's activations, where ``Delta`` is largest). On
the MNIST autoencoder (batch 1000, statistics on the first 250, damping 1e-2) a model on those same
250 examples let the loss diverge within 7 steps. Where no position of the sub-batch counts
(padding at the batch's end), :func:`on_model_examples` falls back to the whole batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kfax import _sub_batches, _trees


class AtMost(int):
    """A ``model_batch_size`` that is a default, not a demand (``kfax.kfac``'s 256): a batch the
    cut cannot follow (outputs that flatten positions into rows) takes the whole batch instead
    of raising."""


def pmean(x, axis_name):
    return x if axis_name is None else jax.lax.pmean(x, axis_name)


def quadratic_terms(apply_fn, loss, params, inputs, targets, where, tangents, lam, axis_name):
    """Gradient terms ``b``, the 2x2 curvature ``<J t_i, H J t_j>``, the Gram matrix
    ``<t_i, t_j>`` of the tangents, the loss at ``params``, and the positions that counted (the
    sum of the loss's position weights, averaged over devices)."""
    outputs, jvps = jax.vmap(
        lambda t: jax.jvp(lambda p: apply_fn(p, inputs), (params,), (t,)), out_axes=(None, 0)
    )(tangents)
    dtype = jnp.promote_types(outputs.dtype, lam.dtype)
    outputs, jvps = outputs.astype(dtype), jvps.astype(dtype)
    weights = loss.position_weights(outputs, targets, where)
    n = outputs.shape[0]
    gradient = loss.output_gradient(outputs, targets, where) / n
    curvature = jax.vmap(lambda v: loss.curvature_product(outputs, v, weights) / n)(jvps)
    # Reductions, not einsum's dot products: see _trees.vdot (accuracy on long axes, in JAX
    # 0.10 too for b).
    b = _trees.contract(jvps, gradient[None], keep=1)
    m = _trees.contract(jvps[:, None], curvature[None], keep=2)
    norms = _trees.gram(tangents)
    counted = jnp.sum(weights)
    b, m, value, counted = pmean((b, m, loss(outputs, targets, where), counted), axis_name)
    return b, m, norms, value, counted


def solve(b: jax.Array, m: jax.Array, has_previous: jax.Array) -> tuple[jax.Array, jax.Array]:
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


def model_sub_batch(apply_fn, params, inputs, targets, where, static):
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


def on_model_examples(terms, whole, cut):
    """``terms(examples)`` (:func:`quadratic_terms`' tuple, whose last entry counts the
    positions) on the model's examples, and ``run(fn)``, which evaluates ``fn(examples,
    is_whole)`` on the same ones: the sub-batch ``cut``, or the ``whole`` batch where ``cut`` is
    ``None`` or none of its positions counts (padding at the batch's end; the count is averaged
    over devices, so they agree). The fallback is a ``lax.cond``: only such a step pays for the
    whole batch."""
    if cut is None:
        return terms(whole), lambda fn: fn(whole, True)
    on_cut = terms(cut)
    empty = on_cut[-1] <= 0

    def run(fn):
        return jax.lax.cond(empty, lambda: fn(whole, True), lambda: fn(cut, False))

    return jax.lax.cond(empty, lambda: terms(whole), lambda: on_cut), run
