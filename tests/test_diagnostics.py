"""Research diagnostics (kfax.diagnostics) against exact references built in this file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import kfax
from kfax import diagnostics
from tests import models


def dense_layer(key=0, batch=10, d_in=3, d_out=3):
    keys = jax.random.split(jax.random.key(key), 3)
    params = {
        "dense": {
            "kernel": jax.random.normal(keys[0], (d_in, d_out)),
            "bias": 0.1 * jax.random.normal(keys[1], (d_out,)),
        }
    }
    x = jax.random.normal(keys[2], (batch, d_in)) + 0.5

    def apply_fn(p, z):
        return z @ p["dense"]["kernel"] + p["dense"]["bias"]

    return params, apply_fn, x


def test_kronecker_residual_is_zero_where_kfac_is_exact(x64):
    params, apply_fn, x = dense_layer()
    residual = diagnostics.kronecker_residual(apply_fn, kfax.losses.SquaredError(), params, x)
    assert float(residual["dense"]) < 1e-12
    params, apply_fn, x, _ = models.deep_linear(width=3, depth=3, batch=10)
    residual = diagnostics.kronecker_residual(apply_fn, kfax.losses.SquaredError(), params, x)
    assert all(float(r) < 1e-12 for r in residual.values()), residual


def test_kronecker_residual_of_a_softmax_layer_equals_the_dense_reference(x64):
    """One dense layer with softmax: G = E[hom hom^T (x) H_n], K-FAC A (x) B with
    A = E[hom hom^T], B = E[H_n], both built here from the inputs and jax.hessian."""
    params, apply_fn, x = dense_layer(batch=12)
    loss = kfax.losses.SoftmaxCrossEntropy()
    hom = jnp.concatenate([x, jnp.ones((12, 1))], axis=1)
    outputs = apply_fn(params, x)
    hessians = jax.vmap(jax.hessian(lambda f: -jax.nn.log_softmax(f)[0]))(outputs)
    g = jnp.mean(jax.vmap(lambda a, h: jnp.kron(jnp.outer(a, a), h))(hom, hessians), axis=0)
    a, b = hom.T @ hom / 12, jnp.mean(hessians, axis=0)
    expected = jnp.linalg.norm(jnp.kron(a, b) - g) / jnp.linalg.norm(g)
    for centering in ("exact", "none"):
        got = diagnostics.kronecker_residual(apply_fn, loss, params, x, centering=centering)
        np.testing.assert_allclose(got["dense"], expected, rtol=1e-10)
    assert float(expected) > 1e-3  # softmax: the residual is a real covariance term


def test_centred_and_homogeneous_damping_differ_and_the_residual_measures_it(x64):
    """At lam = 0 both are A_hom (x) B; with lam the centred eigen block adds
    lam (L L^T - I) (x) I, whose norm the residuals' difference reflects."""
    params, apply_fn, x = dense_layer(batch=12)
    loss = kfax.losses.SquaredError()
    lam = 0.5
    centred = diagnostics.kronecker_residual(apply_fn, loss, params, x, damping=lam)["dense"]
    homogeneous = diagnostics.kronecker_residual(
        apply_fn, loss, params, x, damping=lam, centering="none"
    )["dense"]
    assert float(homogeneous) < 1e-12  # exact layer, exact Tikhonov
    mean = x.mean(0)
    lower = jnp.eye(4).at[:3, 3].set(mean)
    extra = lam * jnp.kron(lower @ lower.T - jnp.eye(4), jnp.eye(3))
    exact_block = kfax.exact.layer_block(apply_fn, loss, params, x, "dense", kind="exact")
    expected = jnp.linalg.norm(extra) / jnp.linalg.norm(exact_block + lam * jnp.eye(12))
    np.testing.assert_allclose(centred, expected, rtol=1e-10)


def enumerated_variances(apply_fn, params, x):
    """Both estimators by enumerating the classes, with jax.grad and jax.hessian of -log p_y."""
    flat, unravel = ravel_pytree(params)

    def nll(theta, xi, y):
        return -jax.nn.log_softmax(apply_fn(unravel(theta), xi[None])[0])[y]

    @jax.jit
    def one_example(xi):
        p = jax.nn.softmax(apply_fn(params, xi[None])[0])
        classes = jnp.arange(p.shape[0])
        grads = jax.vmap(jax.grad(nll), in_axes=(None, None, 0))(flat, xi, classes)
        hessians = jax.vmap(jax.hessian(nll), in_axes=(None, None, 0))(flat, xi, classes)
        outer = jnp.einsum("yi,yj->yij", grads, grads)
        fisher = jnp.einsum("y,yij->ij", p, outer)
        score = p @ jnp.sum((outer - fisher) ** 2, axis=(1, 2))
        hessian = p @ jnp.sum((hessians - fisher) ** 2, axis=(1, 2))
        return score, hessian

    score, hessian = jax.vmap(one_example)(x)
    return score.mean(), hessian.mean()


@pytest.mark.parametrize("linear", [True, False], ids=["linear", "tanh-mlp"])
def test_fisher_estimator_variances_equal_the_enumerated_references(x64, linear):
    """Soen & Sun 2021: a model linear in its parameters has a noiseless Hessian estimator."""
    if linear:
        params, apply_fn, x = dense_layer(batch=4, d_in=2, d_out=3)
    else:
        params, apply_fn, x, _ = models.mlp(sizes=(2, 3, 3), batch=4)
    loss = kfax.losses.SoftmaxCrossEntropy()
    got = diagnostics.fisher_estimator_variance(apply_fn, loss, params, x)
    score, hessian = enumerated_variances(apply_fn, params, x)
    np.testing.assert_allclose(got.score, score, rtol=1e-10)
    np.testing.assert_allclose(got.hessian, hessian, rtol=1e-10, atol=1e-14)
    if linear:
        assert float(got.hessian) < 1e-20
    else:
        assert float(got.hessian) > 1e-6


def test_true_versus_empirical_fisher_equals_per_example_references(x64):
    params, apply_fn, x, _ = models.mlp(sizes=(3, 4, 3), batch=8)
    y = jnp.arange(8) % 3
    loss = kfax.losses.SoftmaxCrossEntropy()
    flat, unravel = ravel_pytree(params)

    def nll(theta, xi, yi):
        return -jax.nn.log_softmax(apply_fn(unravel(theta), xi[None])[0])[yi]

    per_example = jax.vmap(jax.grad(nll), in_axes=(None, 0, 0))(flat, x, y)
    empirical = per_example.T @ per_example / 8

    def true_fisher_of(xi):
        jac = jax.jacfwd(lambda t: apply_fn(unravel(t), xi[None])[0])(flat)
        p = jax.nn.softmax(apply_fn(params, xi[None])[0])
        return jac.T @ (jnp.diag(p) - jnp.outer(p, p)) @ jac

    true = jnp.mean(jax.vmap(true_fisher_of)(x), axis=0)
    got = diagnostics.true_versus_empirical_fisher(apply_fn, loss, params, x, y, damping=1e-2)
    np.testing.assert_allclose(
        got.distance, jnp.linalg.norm(empirical - true) / jnp.linalg.norm(true), rtol=1e-10
    )
    g = per_example.mean(0)
    a = jnp.linalg.solve(true + 1e-2 * jnp.eye(g.size), g)
    b = jnp.linalg.solve(empirical + 1e-2 * jnp.eye(g.size), g)
    np.testing.assert_allclose(
        got.step_cosine, a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)), rtol=1e-9
    )
    np.testing.assert_allclose(
        got.step_norm_ratio, jnp.linalg.norm(b) / jnp.linalg.norm(a), rtol=1e-9
    )


def test_kfac_on_a_deep_linear_network_is_depth_times_the_natural_gradient_and_the_closed_form(x64):
    depth = 3
    params, apply_fn, x, _ = models.deep_linear(width=3, depth=depth, batch=10)
    y = jax.random.normal(jax.random.key(3), (10, 3))
    loss = kfax.losses.SquaredError()
    grads = jax.grad(lambda p: loss(apply_fn(p, x), y))(params)
    tx = kfax.scale_by_kfac(
        apply_fn,
        loss,
        example_inputs=x,
        kind="exact",
        ema_decay=0.0,
        inverse_every=1,
        damping=1e-24,
    )
    kfac_step, _ = tx.update(grads, tx.init(params), params, inputs=x)
    fidelity = diagnostics.natural_gradient_fidelity(apply_fn, loss, params, x, y, kfac_step)
    np.testing.assert_allclose(fidelity.cosine, 1.0, atol=1e-8)
    np.testing.assert_allclose(fidelity.norm_ratio, depth, rtol=1e-8)
    kernels = [params[f"dense_{i}"]["kernel"] for i in range(depth)]
    closed = diagnostics.deep_linear_natural_gradient(kernels, x, y)
    closed = {f"dense_{i}": {"kernel": k} for i, k in enumerate(closed)}
    fidelity = diagnostics.natural_gradient_fidelity(apply_fn, loss, params, x, y, closed)
    np.testing.assert_allclose(fidelity.cosine, 1.0, atol=1e-10)
    np.testing.assert_allclose(fidelity.norm_ratio, 1.0, rtol=1e-8)
    ng = diagnostics.natural_gradient(apply_fn, loss, params, x, y)
    fidelity = diagnostics.natural_gradient_fidelity(apply_fn, loss, params, x, y, ng)
    np.testing.assert_allclose((fidelity.cosine, fidelity.norm_ratio), (1.0, 1.0), rtol=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_the_kfac_step_is_invariant_to_affine_maps_of_layer_inputs_without_damping(x64, seed):
    """A property over random invertible maps: zero gap without damping (to rounding), and a
    measurable one with damping 0.1."""
    params, apply_fn, x, _ = models.mlp(sizes=(3, 4, 2), batch=16)
    x = x + 2.0
    y = jax.random.uniform(jax.random.key(seed + 10), (16, 2))
    loss = kfax.losses.SigmoidCrossEntropy()
    keys = jax.random.split(jax.random.key(seed), 2)
    transform = jnp.eye(3) + 0.5 * jax.random.normal(keys[0], (3, 3))
    shift = jax.random.normal(keys[1], (3,))
    for centering in ("exact", "none"):
        gap = diagnostics.affine_reparametrisation_gap(
            apply_fn, loss, params, x, y, transform, shift, "dense_0", centering=centering
        )
        assert float(gap) < 1e-8, (centering, float(gap))
    damped = diagnostics.affine_reparametrisation_gap(
        apply_fn, loss, params, x, y, transform, shift, "dense_0", damping=0.1
    )
    assert float(damped) > 1e-4
