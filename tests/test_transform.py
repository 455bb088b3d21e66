"""The K-FAC preconditioner (kfax.scale_by_kfac, kfax.kfac) against exact identities.

Exactness tests run in float64 with ``ema_decay=0`` and ``inverse_every=1``, so that the state
holds exactly this batch's factors; the damping is tiny and the tolerances follow from it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import kfax
from tests import models

EXACT = dict(kind="exact", ema_decay=0.0, inverse_every=1)


def one_direction(opt, params, inputs, grads, targets=None):
    state = opt.init(params)
    direction, state = opt.update(grads, state, params, inputs=inputs, targets=targets)
    return direction, state


def mean_loss_grad(apply_fn, loss, params, inputs, targets):
    return jax.grad(lambda p: loss(apply_fn(p, inputs), targets))(params)


@pytest.mark.parametrize("method", ["factored", "eigen"])
def test_centered_update_equals_homogeneous_update_at_zero_damping(x64, method):
    params, apply_fn, inputs, _ = models.mlp(sizes=(3, 4, 2), batch=12)
    loss = kfax.losses.SigmoidCrossEntropy()  # full-rank D: B is invertible at zero damping
    targets = jax.random.uniform(jax.random.key(5), (12, 2))
    grads = mean_loss_grad(apply_fn, loss, params, inputs, targets)
    options = dict(EXACT, example_inputs=inputs, damping=1e-24, damping_method=method)
    centered, _ = one_direction(
        kfax.scale_by_kfac(apply_fn, loss, centered=True, **options), params, inputs, grads
    )
    homogeneous, _ = one_direction(
        kfax.scale_by_kfac(apply_fn, loss, centered=False, **options), params, inputs, grads
    )
    for a, b in zip(
        jax.tree_util.tree_leaves(centered), jax.tree_util.tree_leaves(homogeneous), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)
    simple, _ = one_direction(
        kfax.scale_by_kfac(apply_fn, loss, bias_update="simple", **options), params, inputs, grads
    )
    assert not np.allclose(simple["dense_0"]["bias"], centered["dense_0"]["bias"])
    np.testing.assert_allclose(simple["dense_0"]["kernel"], centered["dense_0"]["kernel"])


@pytest.mark.parametrize("centered", [True, False])
def test_one_step_of_linear_regression_lands_on_least_squares(x64, centered):
    key = jax.random.key(0)
    x = jax.random.normal(key, (20, 3))
    y = jax.random.normal(jax.random.fold_in(key, 1), (20, 2))
    params = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}

    def apply_fn(p, z):
        return z @ p["dense"]["kernel"] + p["dense"]["bias"]

    loss = kfax.losses.SquaredError()
    opt = optax.chain(
        kfax.scale_by_kfac(
            apply_fn, loss, example_inputs=x, damping=1e-20, centered=centered, **EXACT
        ),
        optax.scale(-1.0),
    )
    grads = mean_loss_grad(apply_fn, loss, params, x, y)
    updates, _ = one_direction(opt, params, x, grads)
    new = optax.apply_updates(params, updates)
    design = jnp.concatenate([x, jnp.ones((20, 1))], axis=1)
    solution = jnp.linalg.lstsq(design, y)[0]
    np.testing.assert_allclose(new["dense"]["kernel"], solution[:3], atol=1e-8)
    np.testing.assert_allclose(new["dense"]["bias"], solution[3], atol=1e-8)


def test_deep_linear_kfac_step_is_depth_times_the_exact_natural_gradient_in_function_space(x64):
    """Bernacchia et al. 2018: block-diagonal K-FAC moves the outputs L times the exact NG step."""
    depth = 3
    params, apply_fn, inputs, _ = models.deep_linear(width=3, depth=depth, batch=10)
    loss = kfax.losses.SquaredError()
    targets = jax.random.normal(jax.random.key(3), (10, 3))
    grads = mean_loss_grad(apply_fn, loss, params, inputs, targets)
    direction, _ = one_direction(
        kfax.scale_by_kfac(apply_fn, loss, example_inputs=inputs, damping=1e-24, **EXACT),
        params,
        inputs,
        grads,
    )
    flat_grad, unravel = ravel_pytree(grads)
    fisher = kfax.exact.curvature_matrix(apply_fn, loss, params, inputs, kind="exact")
    natural = unravel(jnp.linalg.pinv(fisher, hermitian=True, rtol=1e-10) @ flat_grad)

    def output_change(step):
        return jax.jvp(lambda p: apply_fn(p, inputs), (params,), (step,))[1].ravel()

    kfac_move, ng_move = output_change(direction), output_change(natural)
    cosine = kfac_move @ ng_move / (jnp.linalg.norm(kfac_move) * jnp.linalg.norm(ng_move))
    np.testing.assert_allclose(cosine, 1.0, atol=1e-8)
    np.testing.assert_allclose(
        jnp.linalg.norm(kfac_move) / jnp.linalg.norm(ng_move), depth, rtol=1e-8
    )


@pytest.mark.parametrize("centered", [True, False])
def test_ekfac_with_fresh_scalings_equals_kfac_on_an_exactly_kronecker_layer(x64, centered):
    params, apply_fn, inputs, _ = models.mlp(sizes=(4, 3), batch=15)
    loss = kfax.losses.SquaredError(variance=0.5)
    targets = jnp.zeros((15, 3))
    grads = mean_loss_grad(apply_fn, loss, params, inputs, targets)
    options = dict(EXACT, example_inputs=inputs, damping=1e-3, damping_method="eigen")
    ekfac, _ = one_direction(
        kfax.scale_by_kfac(apply_fn, loss, eigen_correction=True, centered=centered, **options),
        params,
        inputs,
        grads,
    )
    kfac_dir, _ = one_direction(
        kfax.scale_by_kfac(apply_fn, loss, centered=centered, **options), params, inputs, grads
    )
    for a, b in zip(
        jax.tree_util.tree_leaves(ekfac), jax.tree_util.tree_leaves(kfac_dir), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_eigen_damping_is_exact_tikhonov_on_the_kronecker_product(x64):
    """(A (x) B + lam I)^{-1} vec(M) computed densely equals the eigen-damped direction."""
    params, apply_fn, inputs, _ = models.mlp(sizes=(3, 2), bias=False, batch=9)
    loss = kfax.losses.SoftmaxCrossEntropy()
    targets = jnp.arange(9) % 2
    grads = mean_loss_grad(apply_fn, loss, params, inputs, targets)
    lam = 0.3
    direction, _ = one_direction(
        kfax.scale_by_kfac(
            apply_fn, loss, example_inputs=inputs, damping=lam, damping_method="eigen", **EXACT
        ),
        params,
        inputs,
        grads,
    )
    f = kfax.kronecker_factors(apply_fn, loss, kind="exact")(params, inputs)["dense_0"]
    dense = jnp.kron(f.a, f.b) + lam * jnp.eye(6)
    expected = jnp.linalg.solve(dense, grads["dense_0"]["kernel"].ravel()).reshape(3, 2)
    np.testing.assert_allclose(direction["dense_0"]["kernel"], expected, rtol=1e-10)


def test_adaptive_step_size_and_momentum_solve_the_two_by_two_quadratic_model(x64):
    """At the chosen d = alpha Delta + mu d_prev, grad q(d) is orthogonal to Delta and d_prev,
    and q(d) is the predicted change (dense G from kfax.exact; linear model, so G is exact)."""
    params, apply_fn, inputs, _ = models.mlp(sizes=(3, 2), batch=16)
    loss = kfax.losses.SquaredError()
    targets = jax.random.normal(jax.random.key(1), (16, 2))
    lam = 0.05
    opt = kfax.kfac(
        None, apply_fn, loss, example_inputs=inputs, damping=lam, adaptive_damping=False, **EXACT
    )
    state = opt.init(params)
    for step in range(2):
        grads = mean_loss_grad(apply_fn, loss, params, inputs, targets)
        previous = state[0].previous_update
        updates, state = opt.update(grads, state, params, inputs=inputs, targets=targets)
        info = state[0].info
        g = ravel_pytree(grads)[0]
        d = ravel_pytree(updates)[0]
        prev = ravel_pytree(previous)[0]
        curvature = kfax.exact.curvature_matrix(apply_fn, loss, params, inputs, kind="exact")
        curvature = curvature + lam * jnp.eye(g.size)
        residual = g + curvature @ d
        delta = (d - info.momentum * prev) / info.learning_rate
        np.testing.assert_allclose(delta @ residual, 0.0, atol=1e-10)
        if step == 0:
            assert float(info.momentum) == 0.0
        else:
            np.testing.assert_allclose(prev @ residual, 0.0, atol=1e-10)
            assert abs(float(info.momentum)) > 1e-6
        np.testing.assert_allclose(
            info.predicted_change, g @ d + 0.5 * d @ curvature @ d, rtol=1e-9
        )
        params = optax.apply_updates(params, updates)


def test_factors_accumulate_in_float32_for_bfloat16_params():
    params, apply_fn, inputs, _ = models.mlp(sizes=(4, 5, 3))
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    inputs = inputs.astype(jnp.bfloat16)
    loss = kfax.losses.SoftmaxCrossEntropy()
    targets = jnp.arange(6) % 3
    grads = mean_loss_grad(apply_fn, loss, params, inputs, targets)
    opt = kfax.scale_by_kfac(apply_fn, loss, example_inputs=inputs)
    direction, state = one_direction(opt, params, inputs, grads)
    assert all(d.dtype == jnp.bfloat16 for d in jax.tree_util.tree_leaves(direction))
    assert all(m.dtype == jnp.float32 for m in jax.tree_util.tree_leaves(state.moments))
    assert all(
        np.isfinite(np.asarray(d, np.float32)).all() for d in jax.tree_util.tree_leaves(direction)
    )
