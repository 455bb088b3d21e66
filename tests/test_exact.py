"""Dense references (kfax.exact) against closed forms and plain autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import kfax
from tests import models


def test_linear_regression_curvature_is_the_input_second_moment_times_identity(x64):
    x = jax.random.normal(jax.random.key(0), (7, 3))
    params = {"w": jax.random.normal(jax.random.key(1), (3, 2))}
    g = kfax.exact.curvature_matrix(lambda p, z: z @ p["w"], kfax.losses.SquaredError(), params, x)
    np.testing.assert_allclose(g, jnp.kron(x.T @ x / 7, jnp.eye(2)), atol=1e-12)


def test_gauss_newton_equals_the_hessian_for_a_linear_softmax_model(x64):
    params, apply_fn, inputs, _ = models.mlp(sizes=(3, 4), batch=5)
    labels = jnp.array([0, 1, 2, 3, 0])
    loss = kfax.losses.SoftmaxCrossEntropy()
    flat, unravel = ravel_pytree(params)
    hessian = jax.hessian(lambda t: loss(apply_fn(unravel(t), inputs), labels))(flat)
    ggn = kfax.exact.curvature_matrix(apply_fn, loss, params, inputs, kind="exact")
    np.testing.assert_allclose(ggn, hessian, atol=1e-12)


def test_empirical_fisher_is_the_mean_outer_product_of_per_example_gradients(x64):
    params, apply_fn, inputs, _ = models.mlp(sizes=(3, 4, 2), batch=5)
    targets = jax.random.normal(jax.random.key(3), (5, 2))
    loss = kfax.losses.SquaredError()
    flat, unravel = ravel_pytree(params)
    grads = jax.jacrev(lambda t: loss.per_example(apply_fn(unravel(t), inputs), targets))(flat)
    expected = grads.T @ grads / 5
    got = kfax.exact.curvature_matrix(
        apply_fn, loss, params, inputs, kind="empirical", targets=targets
    )
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_layer_indices_put_the_weight_matrix_first_and_the_bias_last():
    params, apply_fn, inputs, _ = models.mlp(sizes=(2, 3, 2))
    idx = kfax.exact.layer_indices(apply_fn, params, inputs, "dense_1")
    # ravel order: dense_0/bias(3), dense_0/kernel(6), dense_1/bias(2), dense_1/kernel(6)
    np.testing.assert_array_equal(idx, [11, 12, 13, 14, 15, 16, 9, 10])
