"""Dense layers over shared positions: DenseGeneral / attention projections, K-FAC-expand and
K-FAC-reduce (Eschenhagen et al. 2023), each exact in the setting the paper states.

Exact blocks come from ``kfax.exact`` (per-example Jacobians of the whole model).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfax
from kfax import _capture, exact
from tests import models

LOSS = kfax.losses.SquaredError(0.5)
BATCH, POSITIONS, D_IN, D_OUT = 6, 4, 3, 2


def _linear(key=0):
    k = jax.random.split(jax.random.key(key), 3)
    params = {"dense": {"kernel": jax.random.normal(k[0], (D_IN, D_OUT)),
                        "bias": jax.random.normal(k[1], (D_OUT,))}}  # fmt: skip
    x = jax.random.normal(k[2], (BATCH, POSITIONS, D_IN)) + 0.5
    return params, x


def per_position(p, x):
    """Every position has its own output: the setting where K-FAC-expand is exact."""
    return x @ p["dense"]["kernel"] + p["dense"]["bias"]


def summed(p, x):
    """The outputs are summed over positions before the loss: K-FAC-reduce is exact."""
    return jnp.sum(per_position(p, x), axis=1)


@pytest.mark.parametrize(
    "weight_sharing, model, exact_here",
    [
        ("expand", per_position, True),
        ("reduce", summed, True),
        ("expand", summed, False),
        ("reduce", per_position, False),
    ],
    ids=["expand-per-position", "reduce-summed", "expand-summed", "reduce-per-position"],
)
def test_kfac_expand_and_reduce_are_exact_where_the_paper_says_and_only_there(
    x64, weight_sharing, model, exact_here
):
    params, x = _linear()
    _, dense, _ = models.observed_block(
        model, LOSS, params, x, "dense", block="eigen", weight_sharing=weight_sharing
    )
    reference = exact.layer_block(model, LOSS, params, x, "dense", kind="exact")
    error = float(jnp.max(jnp.abs(dense - reference)) / jnp.max(jnp.abs(reference)))
    if exact_here:
        assert error < 1e-13
    else:
        assert error > 0.1


def test_kronecker_factors_reduce_averages_each_examples_inputs_and_sums_its_cotangents(x64):
    """``A = 1/(N R^2) sum_n (sum_r h)(sum_r h)^T`` (homogeneous), ``B = 1/N sum_n (sum_r g)
    (sum_r g)^T``, written from the inputs and ``I / variance`` (a linear layer)."""
    params, x = _linear()
    factors = kfax.kronecker_factors(summed, LOSS, kind="exact", centering="none",
                                     weight_sharing="reduce")(params, x)["dense"]  # fmt: skip
    sums = jnp.concatenate([x.sum(1), jnp.full((BATCH, 1), POSITIONS)], axis=1)
    np.testing.assert_allclose(factors.a, sums.T @ sums / (BATCH * POSITIONS**2), atol=1e-12)
    np.testing.assert_allclose(factors.b, POSITIONS**2 * jnp.eye(D_OUT) / 0.5, atol=1e-12)
    with pytest.raises(ValueError, match="weight_sharing"):
        kfax.kronecker_factors(summed, LOSS, weight_sharing="mean")
    with pytest.raises(ValueError, match="weight_sharing"):
        kfax.scale_by_kfac(summed, LOSS, example_inputs=x, weight_sharing="sum")


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)(x, x)
        return nn.Dense(2)(jnp.tanh(h))


def test_attention_projections_are_dense_layers_over_flattened_axes(x64):
    """Flax's query/key/value kernels ``(d, heads, head_dim)`` and output kernel ``(heads,
    head_dim, d)`` are dense layers whose matrix flattens the contracted and the output axes:
    the captured rows reproduce every gradient (``h^T g``, and the bias from ``sum g``)."""
    model = Attention()
    x = jax.random.normal(jax.random.key(3), (3, 5, 4))
    params = model.init(jax.random.key(4), x)["params"]
    apply_fn = lambda p, z: model.apply({"params": p}, z)  # noqa: E731
    report = kfax.find_layers(apply_fn, params, x)
    shapes = {layer.name.split("/")[-1]: (layer.d_in, layer.d_out, layer.positions)
              for layer in report.layers}  # fmt: skip
    assert shapes == {"query": (4, 4, 5), "key": (4, 4, 5), "value": (4, 4, 5),
                      "out": (4, 4, 5), "Dense_0": (4, 2, 5)}  # fmt: skip
    tapped = _capture.capture(apply_fn, params, x)
    targets = jnp.zeros_like(tapped.outputs)
    grads, cotangents = tapped.pullback(LOSS.output_gradient(tapped.outputs, targets) / 3)
    expected = jax.grad(lambda p: LOSS(apply_fn(p, x), targets))(params)
    leaves = jax.tree.leaves(expected)
    for a, b in zip(jax.tree.leaves(grads), leaves, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-12)
    for site in tapped.layers:
        h = site.geometry.input_rows(tapped.layer_inputs[site.name])
        g = site.geometry.output_rows(cotangents[site.name])
        weight = leaves[site.weight_leaf]
        np.testing.assert_allclose(h.T @ g, site.geometry.weight_matrix(weight), atol=1e-12)
        np.testing.assert_allclose(g.sum(0), leaves[site.bias_leaf].reshape(-1), atol=1e-12)
        roundtrip = site.geometry.weight_from_matrix(site.geometry.weight_matrix(weight))
        np.testing.assert_array_equal(roundtrip, weight)


def test_dense_general_blocks_are_exact_for_a_linear_model_with_independent_positions(x64):
    """``DenseGeneral(features=(2, 3))`` over a sequence, its outputs per position: expand is
    exact, the bias ``(2, 3)`` included (flattened as the output features)."""

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.DenseGeneral((2, 3))(x)
            return y.reshape(y.shape[:2] + (6,))

    model = Model()
    _, x = _linear()
    params = model.init(jax.random.key(0), x)["params"]
    apply_fn = lambda p, z: model.apply({"params": p}, z)  # noqa: E731
    _, dense, _ = models.observed_block(apply_fn, LOSS, params, x, "DenseGeneral_0", block="eigen")
    reference = exact.layer_block(apply_fn, LOSS, params, x, "DenseGeneral_0", kind="exact")
    np.testing.assert_allclose(dense, reference, atol=1e-12)
