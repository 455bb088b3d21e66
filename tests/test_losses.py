"""Output distributions: gradients, curvature roots and samples vs autodiff and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfax
from kfax.losses import SigmoidCrossEntropy, SoftmaxCrossEntropy, SquaredError

KEY = jax.random.key(0)


def cases(shape):
    out = jax.random.normal(KEY, shape)
    labels = jax.random.randint(jax.random.key(1), shape[:-1], 0, shape[-1])
    soft = jax.random.uniform(jax.random.key(2), shape)
    return [
        (SoftmaxCrossEntropy(), out, labels),
        (SoftmaxCrossEntropy(), out, jax.nn.softmax(soft * 3)),
        (SigmoidCrossEntropy(), out, soft),
        (SquaredError(variance=0.5), out, soft),
    ]


@pytest.mark.parametrize("shape", [(5, 4), (3, 2, 4)])
def test_output_gradient_is_the_autodiff_gradient_of_each_examples_loss(x64, shape):
    for loss, out, targets in cases(shape):
        expected = jax.grad(lambda f, lo=loss, t=targets: jnp.sum(lo.per_example(f, t)))(out)
        np.testing.assert_allclose(loss.output_gradient(out, targets), expected, atol=1e-12)


@pytest.mark.parametrize("shape", [(5, 4), (3, 2, 4)])
def test_curvature_sqrt_squares_to_the_loss_hessian(x64, shape):
    """S S^T = d^2 l / d f^2 per example, positions included (block diagonal over positions)."""
    for loss, out, targets in cases(shape):
        cols = loss.curvature_sqrt(out)  # (C, batch, *event)
        n = out.shape[0]
        s = cols.reshape(cols.shape[0], n, -1)
        d_from_s = jnp.einsum("cni,cnj->nij", s, s)

        def per_example(f, y, loss=loss):
            return loss.per_example(f[None], y[None])[0]

        hess = jax.vmap(jax.hessian(per_example))(out, targets).reshape(d_from_s.shape)
        np.testing.assert_allclose(d_from_s, hess, atol=1e-12)
        tangent = jax.random.normal(jax.random.key(7), out.shape)
        product = loss.curvature_product(out, tangent).reshape(n, -1)
        np.testing.assert_allclose(
            product, jnp.einsum("nij,nj->ni", hess, tangent.reshape(n, -1)), atol=1e-12
        )


def test_mean_loss_closed_forms():
    assert np.isclose(SoftmaxCrossEntropy()(jnp.zeros((2, 4)), jnp.array([0, 3])), np.log(4))
    assert np.isclose(SigmoidCrossEntropy()(jnp.zeros((2, 3)), jnp.ones((2, 3))), 3 * np.log(2))
    assert np.isclose(SquaredError(variance=2.0)(jnp.ones((2, 3)), jnp.zeros((2, 3))), 0.75)


def test_samples_follow_the_model_distribution():
    logits = jnp.array([[0.0, 1.0, -1.0]])
    keys = jax.random.split(KEY, 20000)
    draws = jax.vmap(lambda k: SoftmaxCrossEntropy().sample(k, logits))(keys)[:, 0]
    freq = np.bincount(np.asarray(draws), minlength=3) / draws.size
    p = np.asarray(jax.nn.softmax(logits[0]))
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / draws.size))
    bern = jax.vmap(lambda k: SigmoidCrossEntropy().sample(k, logits))(keys)
    s = np.asarray(jax.nn.sigmoid(logits[0]))
    assert np.all(np.abs(bern.mean(0)[0] - s) < 4 * np.sqrt(s * (1 - s) / 20000))
    gauss = jax.vmap(lambda k: SquaredError(variance=4.0).sample(k, logits))(keys)
    assert abs(float((gauss - logits).std()) - 2.0) < 0.05


def test_bad_targets_and_options_are_named():
    with pytest.raises(ValueError, match=r"targets of shape \(3,\) do not match"):
        SoftmaxCrossEntropy()(jnp.zeros((2, 4)), jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match="variance must be > 0"):
        SquaredError(variance=0.0)
    with pytest.raises(ValueError, match="batch axis and an event axis"):
        SigmoidCrossEntropy()(jnp.zeros(3), jnp.zeros(3))
    with pytest.raises(TypeError, match="output distribution"):
        kfax.kronecker_factors(lambda p, x: x, lambda f, y: 0.0)
