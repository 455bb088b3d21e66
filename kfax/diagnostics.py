"""Curvature diagnostics for research: how good is the approximation, and how noisy its estimate.

Each function answers one question with one call, on models small enough for dense references
(``kfax.exact``): the Kronecker residual of a layer's block, the variance of the two unbiased
Fisher estimators, the distance between the true and the empirical Fisher and between the steps
they give, the fidelity of any step to the exact natural gradient in function space, the closed
form of the natural gradient of deep linear networks, and the invariance of the K-FAC step to an
affine reparametrisation of a layer's inputs. Formulas: ``docs/math.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from kfax import _plan, _trees, exact, statistics
from kfax.losses import Loss, SoftmaxCrossEntropy
from kfax.transform import scale_by_kfac


def _kfac_blocks(apply_fn, loss, params, inputs, *, kind, block, centering, targets, key, samples):
    """Each layer's block with this batch's statistics (no moving average) and fresh curvature."""
    plan = _plan.make_plan(
        apply_fn,
        loss,
        params,
        inputs,
        kind=kind,
        samples=samples,
        block=block,
        centering=centering,
        others=optax.identity(),
    )
    batch = statistics.statistics_pass(
        apply_fn, loss, params, inputs, kind=kind, samples=samples, targets=targets, key=key
    )
    out = {}
    for name, layer_block in plan.blocks_in_order:
        stats, _ = layer_block.init(_trees.floating_dtype(params))
        stats = layer_block.observe(stats, batch.layers[name], 0.0)
        out[name] = (layer_block, stats)
    return out


def kronecker_residual(
    apply_fn: Callable[[Any, Any], jax.Array],
    loss: Loss,
    params: Any,
    inputs: Any,
    *,
    kind: str = "exact",
    damping: float = 0.0,
    block: str = "eigen",
    centering: str = "exact",
    targets: Any = None,
    key: jax.Array | None = None,
    samples: int = 1,
) -> dict[str, jax.Array]:
    """``||K_l - (G_l + lam I)||_F / ||G_l + lam I||_F`` for every layer.

    ``G_l`` is the layer's exact curvature block (``kfax.exact.layer_block``, K-FAC order) and
    ``K_l`` the damped matrix the block inverts (``block.dense``) from this batch's statistics.
    At ``damping=0`` centred and homogeneous K-FAC give the same matrix ``A_hom (x) B``; with
    damping, centred K-FAC's ``lam (L L^T (x) I)`` (eigen block) departs from ``lam I``, which the
    residual measures. The residual is 0 where K-FAC is exact (one dense layer with squared
    error; deep linear networks with Gaussian outputs).

    Example:
      >>> import jax, jax.numpy as jnp, kfax
      >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
      >>> f = lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"]
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> r = kfax.diagnostics.kronecker_residual(f, kfax.losses.SquaredError(), params, x)
      >>> float(r["dense"]) < 1e-5
      True
    """
    blocks = _kfac_blocks(
        apply_fn,
        loss,
        params,
        inputs,
        kind=kind,
        block=block,
        centering=centering,
        targets=targets,
        key=key,
        samples=samples,
    )
    out = {}
    for name, (layer_block, stats) in blocks.items():
        exact_block = exact.layer_block(
            apply_fn,
            loss,
            params,
            inputs,
            name,
            kind=kind,
            targets=targets,
            key=key,
            samples=samples,
        )
        damped = exact_block + damping * jnp.eye(exact_block.shape[0])
        approx = layer_block.dense(layer_block.refresh(stats, damping), damping)
        out[name] = jnp.linalg.norm(approx - damped) / jnp.linalg.norm(damped)
    return out


# -------------------------------------------------------------------------- Fisher estimators


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


# -------------------------------------------------------------------------- whole-model steps


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


# -------------------------------------------------------------------------- invariance


def affine_reparametrisation_gap(
    apply_fn: Callable[[Any, Any], jax.Array],
    loss: Loss,
    params: Any,
    inputs: jax.Array,
    targets: Any,
    transform: jax.Array,
    shift: jax.Array,
    layer: str,
    *,
    damping: float = 0.0,
    centering: str = "exact",
) -> jax.Array:
    """How much an affine reparametrisation of the first layer's inputs changes the K-FAC step.

    The inputs become ``x T + c`` and the first layer ``(K, b)`` becomes ``(T^{-1} K,
    b - c T^{-1} K)``: the same function. With exact statistics and no damping, K-FAC's step
    moves the outputs identically in both parametrisations (the natural gradient's invariance,
    which K-FAC keeps for affine maps of a layer's inputs); returns
    ``|J' step' - J step| / |J step|`` over the batch's outputs. ``params[layer]`` must hold a
    ``"kernel"`` and a ``"bias"`` applied as ``x @ kernel + bias``.
    """
    kernel, bias = params[layer]["kernel"], params[layer]["bias"]
    new_kernel = jnp.linalg.solve(transform, kernel)
    moved = {
        **params,
        layer: {**params[layer], "kernel": new_kernel, "bias": bias - shift @ new_kernel},
    }
    new_inputs = inputs @ transform + shift

    def output_move(p, x):
        grads = jax.grad(lambda q: loss(apply_fn(q, x), targets))(p)
        tx = scale_by_kfac(
            apply_fn,
            loss,
            example_inputs=x,
            kind="exact",
            ema_decay=0.0,
            inverse_every=1,
            damping=max(damping, 1e-30),
            block="eigen",
            centering=centering,
        )
        step, _ = tx.update(grads, tx.init(p), p, inputs=x)
        return jax.jvp(lambda q: apply_fn(q, x), (p,), (step,))[1].ravel()

    before = output_move(params, inputs)
    after = output_move(moved, new_inputs)
    return jnp.linalg.norm(after - before) / jnp.linalg.norm(before)
