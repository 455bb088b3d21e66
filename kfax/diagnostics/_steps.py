"""Whole-model steps against exact references: the true and the empirical Fisher, the natural
gradient and a step's fidelity to it, the closed form for deep linear networks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from kfax import exact
from kfax.losses import Loss


class FisherComparison(NamedTuple):
    """The true and the empirical Fisher of a batch, and the steps they give.

    Attributes:
      distance: ``||F_emp - F||_F / ||F||_F``.
      step_cosine: cosine between ``(F + lam I)^{-1} g`` and ``(F_emp + lam I)^{-1} g``.
      step_norm_ratio: ``|(F_emp + lam I)^{-1} g| / |(F + lam I)^{-1} g|``.
    """

    distance: jax.Array
    step_cosine: jax.Array
    step_norm_ratio: jax.Array


def true_versus_empirical_fisher(
    apply_fn: Callable[[Any, Any], jax.Array],
    loss: Loss,
    params: Any,
    inputs: Any,
    targets: Any,
    *,
    damping: float = 1e-3,
) -> FisherComparison:
    """How far the empirical Fisher (data labels) is from the true one (labels from the model),
    as matrices and as preconditioners of the gradient of the mean loss."""
    true = exact.curvature_matrix(apply_fn, loss, params, inputs, kind="exact", targets=targets)
    empirical = exact.curvature_matrix(
        apply_fn, loss, params, inputs, kind="empirical", targets=targets
    )
    grad = ravel_pytree(jax.grad(lambda p: loss(apply_fn(p, inputs), targets))(params))[0]
    eye = jnp.eye(grad.size)
    step_true = jnp.linalg.solve(true + damping * eye, grad)
    step_emp = jnp.linalg.solve(empirical + damping * eye, grad)
    return FisherComparison(
        jnp.linalg.norm(empirical - true) / jnp.linalg.norm(true),
        step_true @ step_emp / (jnp.linalg.norm(step_true) * jnp.linalg.norm(step_emp)),
        jnp.linalg.norm(step_emp) / jnp.linalg.norm(step_true),
    )


class Fidelity(NamedTuple):
    """A step against the exact natural-gradient step, compared by how they move the outputs.

    Attributes:
      cosine: cosine between ``J step`` and ``J step_ng`` over the batch's outputs.
      norm_ratio: ``|J step| / |J step_ng|``.
    """

    cosine: jax.Array
    norm_ratio: jax.Array


def natural_gradient(
    apply_fn: Callable[[Any, Any], jax.Array],
    loss: Loss,
    params: Any,
    inputs: Any,
    targets: Any,
    *,
    rtol: float = 1e-10,
) -> Any:
    """The exact natural-gradient direction ``pinv(F) grad`` (dense Fisher of the mean loss)."""
    fisher = exact.curvature_matrix(apply_fn, loss, params, inputs, kind="exact", targets=targets)
    grad, unravel = ravel_pytree(jax.grad(lambda p: loss(apply_fn(p, inputs), targets))(params))
    return unravel(jnp.linalg.pinv(fisher, hermitian=True, rtol=rtol) @ grad)


def natural_gradient_fidelity(
    apply_fn: Callable[[Any, Any], jax.Array],
    loss: Loss,
    params: Any,
    inputs: Any,
    targets: Any,
    step: Any,
) -> Fidelity:
    """How well ``step`` (any optimiser's descent direction, e.g. an optax update divided by
    ``-learning_rate``) agrees with the exact natural gradient in function space.

    Parameter-space directions are not unique when the Fisher is singular, so both are compared
    through the change of the outputs they cause, ``J step``.
    """
    ng = natural_gradient(apply_fn, loss, params, inputs, targets)

    def move(direction):
        return jax.jvp(lambda p: apply_fn(p, inputs), (params,), (direction,))[1].ravel()

    a, b = move(step), move(ng)
    return Fidelity(
        a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)), jnp.linalg.norm(a) / jnp.linalg.norm(b)
    )


def deep_linear_natural_gradient(
    kernels: list[jax.Array], inputs: jax.Array, targets: jax.Array
) -> list[jax.Array]:
    """Closed-form natural gradient of a deep linear network ``y = x K_1 K_2 ... K_L`` with a
    Gaussian output of unit variance (Bernacchia, Lengyel & Hennequin 2018).

    The function-space natural gradient of ``L = |x M - y|^2 / (2N)`` in the end-to-end map
    ``M = K_1 ... K_L`` is the Newton step ``dM = (X^T X)^{-1} X^T (X M - Y)``; the parameter
    step ``dK_l = (1/L) (K_1 ... K_{l-1})^{-1} dM (K_{l+1} ... K_L)^{-1}`` realises it to first
    order and equals the exact natural gradient's output change. Square invertible kernels.
    """
    depth = len(kernels)
    total = kernels[0]
    for kernel in kernels[1:]:
        total = total @ kernel
    d_total = jnp.linalg.solve(inputs.T @ inputs, inputs.T @ (inputs @ total - targets))
    steps = []
    for layer in range(depth):
        below = jnp.eye(kernels[0].shape[0])
        for kernel in kernels[:layer]:
            below = below @ kernel
        above = jnp.eye(kernels[-1].shape[1])
        for kernel in kernels[layer + 1 :]:
            above = above @ kernel
        steps.append(jnp.linalg.solve(below, d_total) @ jnp.linalg.inv(above) / depth)
    return steps
