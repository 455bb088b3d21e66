"""Tapped evaluation (kfax._capture): outputs unchanged, gradients recovered from taps.

The identity checked on every model: the weight gradient of the mean loss, in K-FAC layout, is
``sum_rows h g^T / batch`` from the captured layer inputs and output cotangents. It pins down the
row order of patches, the weight layout and the bias, whatever the framework.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfax
from kfax import _capture
from tests import models


def model_cases():
    p, f, x, _ = models.mlp(sizes=(4, 5, 3))
    yield "pure-jax mlp", p, f, x
    yield "sequence inputs", p, f, jax.random.normal(jax.random.key(5), (3, 2, 4))
    yield "linen mlp", *models.linen_mlp()
    yield "nnx mlp", *models.nnx_mlp()
    yield "linen cnn", *models.linen_cnn()
    w = jax.random.normal(jax.random.key(0), (3, 4))
    yield (
        "pytorch layout",
        {"w": w, "b": jnp.ones(3)},
        (lambda p, z: jnp.tanh(z @ p["w"].T + p["b"])),
        jnp.ones((2, 4)),
    )


@pytest.mark.parametrize("case", list(model_cases()), ids=lambda c: c[0])
def test_captured_rows_reproduce_the_weight_and_bias_gradients(x64, case):
    _, params, apply_fn, inputs = case
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    inputs = inputs.astype(jnp.float64)
    loss = kfax.losses.SquaredError()
    targets = jnp.zeros_like(apply_fn(params, inputs))
    batch = inputs.shape[0]

    tapped = _capture.capture(apply_fn, params, inputs)
    np.testing.assert_allclose(tapped.outputs, apply_fn(params, inputs), atol=1e-12)
    cotangent = loss.output_gradient(tapped.outputs, targets) / batch
    grads, layer_cotangents = tapped.pullback(cotangent)
    expected = jax.grad(lambda p: loss(apply_fn(p, inputs), targets))(params)
    for a, b in zip(
        jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-12)

    leaves = jax.tree_util.tree_leaves(expected)
    for site in tapped.layers:
        h = site.geometry.input_rows(tapped.layer_inputs[site.name])
        g = site.geometry.output_rows(layer_cotangents[site.name])
        np.testing.assert_allclose(
            h.T @ g, site.geometry.weight_matrix(leaves[site.weight_leaf]), atol=1e-12
        )
        assert site.bias_leaf is not None
        np.testing.assert_allclose(g.sum(0), leaves[site.bias_leaf], atol=1e-12)
        roundtrip = site.geometry.weight_from_matrix(
            site.geometry.weight_matrix(leaves[site.weight_leaf])
        )
        np.testing.assert_array_equal(roundtrip, leaves[site.weight_leaf])


def test_capture_runs_under_jit_and_matches_eager(x64):
    params, apply_fn, inputs = models.linen_cnn()

    def layer_inputs(p, x):
        return _capture.capture(apply_fn, p, x).layer_inputs

    eager, jitted = layer_inputs(params, inputs), jax.jit(layer_inputs)(params, inputs)
    for name in eager:
        np.testing.assert_allclose(eager[name], jitted[name], atol=1e-12)


def test_a_model_with_several_outputs_is_refused():
    params, apply_fn, inputs, _ = models.mlp()
    with pytest.raises(ValueError, match="single array of model outputs"):
        _capture.capture(lambda p, x: (apply_fn(p, x), x), params, inputs)
