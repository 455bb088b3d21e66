"""Kronecker factors (kfax.kronecker_factors) against independent references.

References are built from per-example Jacobians of hand-written models (``tests/models.py``) and
from the dense matrices of ``kfax.exact``; exactness checks run in float64.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfax
from tests import models

LOSSES = {
    "softmax": kfax.losses.SoftmaxCrossEntropy(),
    "sigmoid": kfax.losses.SigmoidCrossEntropy(),
    "squared": kfax.losses.SquaredError(variance=0.7),
}


def reference_factors(
    loss, params, apply_fn, inputs, layer_values, layer, kind, targets, key, samples
):
    """A and B of one layer from per-example Jacobians ``J_n = d outputs / d a`` (no capture)."""
    h, a, rest = layer_values(params, inputs, layer)
    outputs = apply_fn(params, inputs)
    n = inputs.shape[0]
    jac = jax.vmap(jax.jacrev(rest))(a)  # (n, out, d_out)

    def per_example(f, y):
        return loss.per_example(f[None], y[None])[0]

    if kind == "exact":
        d = jax.vmap(jax.hessian(per_example))(outputs, targets)
    elif kind == "empirical":
        u = jax.vmap(jax.grad(per_example))(outputs, targets)
        d = jnp.einsum("ni,nj->nij", u, u)
    else:
        keys = jax.random.split(key, samples)
        ys = jax.vmap(lambda k: loss.sample(k, outputs))(keys)
        us = jax.vmap(jax.vmap(jax.grad(per_example)), in_axes=(None, 0))(outputs, ys)
        d = jnp.einsum("sni,snj->nij", us, us) / samples
    b = jnp.einsum("noi,nop,npj->ij", jac, d, jac) / n
    hom = jnp.concatenate([h, jnp.ones((n, 1))], axis=1)
    return hom.T @ hom / n, b


@pytest.mark.parametrize("kind", ["exact", "mc", "empirical"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_factors_equal_per_example_jacobian_references(x64, kind, loss_name):
    loss = LOSSES[loss_name]
    params, apply_fn, inputs, layer_values = models.mlp(sizes=(4, 5, 3, 3), batch=7)
    outputs = apply_fn(params, inputs)
    targets = loss.sample(jax.random.key(9), outputs)
    key = jax.random.key(4)
    fn = jax.jit(kfax.kronecker_factors(apply_fn, loss, kind=kind, samples=3, centering="none"))
    factors = fn(params, inputs, targets=targets, key=key)
    for i in range(3):
        a_ref, b_ref = reference_factors(
            loss, params, apply_fn, inputs, layer_values, i, kind, targets, key, 3
        )
        np.testing.assert_allclose(factors[f"dense_{i}"].a, a_ref, atol=1e-12)
        np.testing.assert_allclose(factors[f"dense_{i}"].b, b_ref, atol=1e-12)
        np.testing.assert_allclose(factors[f"dense_{i}"].mean, a_ref[-1, :-1], atol=1e-12)


def test_monte_carlo_factors_converge_to_exact_at_the_square_root_rate(x64):
    """The error of the sampled output factor falls like samples^(-1/2) (fitted log-log slope)."""
    loss = LOSSES["softmax"]
    params, apply_fn, inputs, _ = models.mlp(sizes=(4, 5, 6), batch=10)
    exact = kfax.kronecker_factors(apply_fn, loss, kind="exact")(params, inputs)["dense_0"].b
    counts = [4, 16, 64, 256]
    errors = []
    for samples in counts:
        fn = jax.jit(kfax.kronecker_factors(apply_fn, loss, kind="mc", samples=samples))
        trials = [fn(params, inputs, key=jax.random.key(100 + t))["dense_0"].b for t in range(20)]
        errors.append(np.mean([np.linalg.norm(b - exact) for b in trials]))
    slope = np.polyfit(np.log(counts), np.log(errors), 1)[0]
    assert -0.6 < slope < -0.4, (slope, errors)


def test_single_dense_layer_with_squared_error_is_exactly_kronecker(x64):
    params, apply_fn, inputs, _ = models.mlp(sizes=(4, 3), batch=9)
    loss = LOSSES["squared"]
    factors = kfax.kronecker_factors(apply_fn, loss, kind="exact", centering="none")(
        params, inputs
    )["dense_0"]
    block = kfax.exact.layer_block(apply_fn, loss, params, inputs, "dense_0", kind="exact")
    np.testing.assert_allclose(jnp.kron(factors.a, factors.b), block, atol=1e-12)


def test_softmax_output_differs_from_kronecker_by_the_covariance_residual(x64):
    """G - A (x) B = E[(hom - E hom) (x) (J^T D J - E J^T D J)], a covariance between the
    factors (George, "The algebra of second order methods"), and is not zero."""
    params, apply_fn, inputs, values = models.mlp(sizes=(4, 3), batch=9)
    loss = LOSSES["softmax"]
    factors = kfax.kronecker_factors(apply_fn, loss, kind="exact", centering="none")(
        params, inputs
    )["dense_0"]
    block = kfax.exact.layer_block(apply_fn, loss, params, inputs, "dense_0", kind="exact")
    outputs = apply_fn(params, inputs)
    h, _, _ = values(params, inputs, 0)
    hom = jnp.concatenate([h, jnp.ones((9, 1))], axis=1)
    hh = jnp.einsum("ni,nj->nij", hom, hom)
    d = jax.vmap(jax.hessian(lambda f: loss.per_example(f[None], jnp.zeros(1, int))[0]))(outputs)
    residual = jnp.mean(jax.vmap(jnp.kron)(hh - hh.mean(0), d - d.mean(0)), axis=0)
    np.testing.assert_allclose(block - jnp.kron(factors.a, factors.b), residual, atol=1e-12)
    assert np.abs(residual).max() > 1e-3


def test_deep_linear_network_with_gaussian_output_has_no_kronecker_residual(x64):
    params, apply_fn, inputs, _ = models.deep_linear(width=3, depth=3, batch=8)
    loss = kfax.losses.SquaredError()
    factors = kfax.kronecker_factors(apply_fn, loss, kind="exact", centering="none")(params, inputs)
    for name, f in factors.items():
        block = kfax.exact.layer_block(apply_fn, loss, params, inputs, name, kind="exact")
        np.testing.assert_allclose(jnp.kron(f.a, f.b), block, atol=1e-12)


def test_convolution_with_one_output_location_is_a_dense_layer(x64):
    class OneLocation(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(3, (3, 3), padding="VALID")(x).reshape(x.shape[0], -1)

    model = OneLocation()
    x = jax.random.normal(jax.random.key(0), (6, 3, 3, 2))
    params = model.init(jax.random.key(1), x)["params"]
    loss = LOSSES["softmax"]
    conv = kfax.kronecker_factors(
        lambda p, z: model.apply({"params": p}, z), loss, kind="exact", centering="none"
    )(params, x)["Conv_0"]
    # The same layer written densely, on inputs flattened in patch order (channel, row, column).
    flat = jnp.transpose(x, (0, 3, 1, 2)).reshape(6, -1)
    kernel = jnp.transpose(params["Conv_0"]["kernel"], (2, 0, 1, 3)).reshape(18, 3)
    dense_params = {"kernel": kernel, "bias": params["Conv_0"]["bias"]}
    dense = kfax.kronecker_factors(
        lambda p, z: z @ p["kernel"] + p["bias"], loss, kind="exact", centering="none"
    )(dense_params, flat)["kernel"]
    np.testing.assert_allclose(conv.a, dense.a, atol=1e-12)
    np.testing.assert_allclose(conv.b, dense.b, atol=1e-12)
    block = kfax.exact.layer_block(
        lambda p, z: model.apply({"params": p}, z), loss, params, x, "Conv_0"
    )
    dense_block = kfax.exact.layer_block(
        lambda p, z: z @ p["kernel"] + p["bias"], loss, dense_params, flat, "kernel"
    )
    np.testing.assert_allclose(block, dense_block, atol=1e-12)


def test_linen_and_nnx_models_give_the_factors_of_the_same_pure_jax_model(x64):
    params, apply_fn, inputs = models.linen_mlp(features=(5, 3))
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    inputs = inputs.astype(jnp.float64)
    pure = {f"dense_{i}": params[f"Dense_{i}"] for i in range(2)}
    _, pure_apply, _, _ = models.mlp(sizes=(4, 5, 3))
    loss = LOSSES["softmax"]
    linen = kfax.kronecker_factors(apply_fn, loss, kind="exact", centering="none")(params, inputs)
    ref = kfax.kronecker_factors(pure_apply, loss, kind="exact", centering="none")(pure, inputs)
    for i in range(2):
        np.testing.assert_allclose(linen[f"Dense_{i}"].b, ref[f"dense_{i}"].b, atol=1e-12)
        np.testing.assert_allclose(linen[f"Dense_{i}"].a, ref[f"dense_{i}"].a, atol=1e-12)


def test_centered_factor_is_the_covariance_and_no_bias_means_raw_second_moment(x64):
    params, apply_fn, inputs, _ = models.mlp(sizes=(4, 3))
    loss = LOSSES["squared"]
    hom = kfax.kronecker_factors(apply_fn, loss, kind="exact", centering="none")(params, inputs)[
        "dense_0"
    ]
    cen = kfax.kronecker_factors(apply_fn, loss, kind="exact")(params, inputs)["dense_0"]
    np.testing.assert_allclose(cen.a, jnp.cov(inputs.T, bias=True), atol=1e-12)
    np.testing.assert_allclose(hom.a[:-1, :-1], inputs.T @ inputs / inputs.shape[0], atol=1e-12)
    nobias, f, x, _ = models.mlp(sizes=(4, 3), bias=False)
    raw = kfax.kronecker_factors(f, loss, kind="exact")(nobias, x)["dense_0"]
    np.testing.assert_allclose(raw.a, x.T @ x / x.shape[0], atol=1e-12)


def test_sequence_positions_follow_kfac_expand(x64):
    """A averages over examples and positions; B averages over examples the sum over positions."""
    params, apply_fn, _, _ = models.mlp(sizes=(4, 3))
    x = jax.random.normal(jax.random.key(2), (5, 6, 4))
    loss = LOSSES["squared"]
    f = kfax.kronecker_factors(apply_fn, loss, kind="exact", centering="none")(params, x)["dense_0"]
    rows = x.reshape(-1, 4)
    np.testing.assert_allclose(f.a[:-1, :-1], rows.T @ rows / 30, atol=1e-12)
    # Linear layer + Gaussian output: g per position is S e_c, so B = positions * I / variance.
    np.testing.assert_allclose(f.b, 6 * jnp.eye(3) / 0.7, atol=1e-12)


def test_bad_options_and_missing_arguments_are_named():
    params, apply_fn, inputs, _ = models.mlp()
    loss = LOSSES["softmax"]
    with pytest.raises(ValueError, match="kind must be one of"):
        kfax.kronecker_factors(apply_fn, loss, kind="fisher")
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        kfax.kronecker_factors(apply_fn, loss, samples=0)
    with pytest.raises(ValueError, match="pass key="):
        kfax.kronecker_factors(apply_fn, loss, kind="mc")(params, inputs)
    with pytest.raises(ValueError, match="needs the data targets"):
        kfax.kronecker_factors(apply_fn, loss, kind="empirical")(params, inputs)
    with pytest.raises(ValueError, match="do not match model outputs"):
        kfax.kronecker_factors(apply_fn, loss, kind="empirical")(
            params, inputs, targets=jnp.zeros(2, int)
        )
