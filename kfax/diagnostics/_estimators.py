"""The variance of the two unbiased Fisher estimators (score outer product, negative Hessian)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from kfax.losses import SoftmaxCrossEntropy


class FisherVariance(NamedTuple):
    """``E ||F_hat - F||_F^2`` per example, averaged over the batch, for one sampled target.

    With ``k`` independent targets per input the variance of their mean is this divided by ``k``.

    Attributes:
      score: the score-outer-product estimator ``J^T u u^T J``, ``u = grad_f l(f, y~)``.
      hessian: the negative-Hessian estimator ``J^T H J + sum_c u_c grad^2 f_c``.
      fisher_norm: ``||F||_F^2`` per example, averaged, for scale.
    """

    score: jax.Array
    hessian: jax.Array
    fisher_norm: jax.Array


def fisher_estimator_variance(
    apply_fn: Callable[[Any, Any], jax.Array],
    loss: SoftmaxCrossEntropy,
    params: Any,
    inputs: jax.Array,
) -> FisherVariance:
    """Variances of the two unbiased Fisher estimators of a categorical model (Soen & Sun 2021).

    For each input ``x`` with a target ``y~ ~ p(. | x)``, the score outer product
    ``grad log p grad log p^T`` and the negative Hessian ``-grad^2 log p`` both have expectation
    ``F(x) = J^T H J``. Their variances depend on the network: the Hessian estimator's noise is
    ``sum_c u_c grad^2 f_c``, which vanishes for a model linear in its parameters. The
    expectations over ``y~`` are computed exactly, by enumerating the classes with their
    probabilities (no sampling). Dense: for models with at most a few hundred parameters.
    """
    flat, unravel = ravel_pytree(params)

    def one_example(x):
        def f(theta):
            return apply_fn(unravel(theta), x[None])[0]

        outputs = f(flat)
        p = jax.nn.softmax(outputs)
        jac = jax.jacfwd(f)(flat)  # (classes, P)
        hess = jax.hessian(f)(flat)  # (classes, P, P)
        fisher = jac.T @ (jnp.diag(p) - jnp.outer(p, p)) @ jac
        scores = (p[None, :] - jnp.eye(p.shape[0])) @ jac  # (y, P): grad l for label y
        score_est = jnp.einsum("yi,yj->yij", scores, scores)
        noise = jnp.einsum("yc,cij->yij", p[None, :] - jnp.eye(p.shape[0]), hess)
        hessian_est = fisher[None] + noise

        def variance(estimates):
            return p @ jnp.sum(jnp.square(estimates - fisher[None]), axis=(1, 2))

        return variance(score_est), variance(hessian_est), jnp.sum(jnp.square(fisher))

    score, hess, norm = jax.jit(jax.vmap(one_example))(inputs)
    del loss
    return FisherVariance(jnp.mean(score), jnp.mean(hess), jnp.mean(norm))
