"""Elementwise scale and shift (kind "scale_shift"): norm layers, gates, positional tables.

The "scale_shift" block must equal the exact per-feature ``k x k`` blocks of the Gauss-Newton
matrix (``kfax.exact``, per-example Jacobians), the "diagonal" block their diagonal.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kfax
from kfax import exact
from tests import models

LOSS = kfax.losses.SquaredError(0.5)


def _reference(apply_fn, params, inputs, layer, k):
    """The exact block over (scale entries, shift entries), cross-feature terms removed."""
    block = exact.layer_block(apply_fn, LOSS, params, inputs, layer, kind="exact")
    d = block.shape[0] // k
    return block * np.kron(np.ones((k, k)), np.eye(d))


def test_layernorm_and_rmsnorm_are_scale_and_shift_layers_linen_and_nnx():
    params, apply_fn, x = models.linen_norm_mlp()
    layers = {layer.name: layer for layer in kfax.find_layers(apply_fn, params, x).layers}
    norm = layers["LayerNorm_0"]
    assert (norm.kind, norm.d_in, norm.d_out, norm.positions) == ("scale_shift", 2, 4, 2)
    assert (norm.weight_path, norm.bias_path) == ("LayerNorm_0/scale", "LayerNorm_0/bias")
    rms = layers["RMSNorm_0"]
    assert (rms.kind, rms.d_in, rms.bias_path) == ("scale_shift", 1, None)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 4, rngs=rngs)
            self.norm = nnx.LayerNorm(4, rngs=rngs)
            self.rms = nnx.RMSNorm(4, rngs=rngs)

        def __call__(self, x):
            return self.rms(self.norm(self.lin(x)))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    report = kfax.find_layers(lambda s, z: nnx.merge(graphdef, s)(z), state, x)
    assert [(layer.name, layer.kind, layer.d_in) for layer in report.layers] == [
        ("lin", "dense", 3),
        ("norm", "scale_shift", 2),
        ("rms", "scale_shift", 1),
    ]
    assert report.unmatched == ()


@pytest.mark.parametrize("layer, k", [("LayerNorm_0", 2), ("RMSNorm_0", 1)])
def test_scale_shift_block_equals_the_exact_per_feature_blocks(x64, layer, k):
    """LayerNorm (scale and shift: ``2 x 2`` per feature) and RMSNorm (scale only), between
    nonlinear layers and over shared positions: exact, since each example's gradient is exact."""
    params, apply_fn, x = models.linen_norm_mlp()
    block, dense, _ = models.observed_block(apply_fn, LOSS, params, x, layer)
    assert block.name == "scale_shift" and block.k == k
    np.testing.assert_allclose(dense, _reference(apply_fn, params, x, layer, k), atol=1e-12)


def test_a_shift_alone_a_scale_alone_and_a_positional_table_are_exact_too(x64):
    """``tanh(x @ W) * s`` (a scale without shift), ``(...) + b`` on a non-layer value (a shift
    alone) and ``x + P`` with ``P`` of shape ``(positions, d)`` broadcast over the batch."""
    k = jax.random.split(jax.random.key(2), 5)
    params = {
        "W": jax.random.normal(k[0], (3, 4)),
        "s": jax.random.normal(k[1], (4,)),
        "b": jax.random.normal(k[2], (4,)),
        "P": jax.random.normal(k[3], (2, 3)),
    }
    x = jax.random.normal(k[4], (5, 2, 3))

    def apply_fn(p, z):
        h = jnp.tanh((z + p["P"]) @ p["W"]) * p["s"]
        return jnp.sin(h) + p["b"]

    found = kfax.find_layers(apply_fn, params, x).layers
    kinds = {(layer.name, layer.d_in, layer.d_out) for layer in found if layer.kind != "dense"}
    assert kinds == {("s", 1, 4), ("b", 1, 4), ("P", 1, 6)}
    for layer in ("s", "b", "P"):
        _, dense, _ = models.observed_block(apply_fn, LOSS, params, x, layer)
        np.testing.assert_allclose(dense, _reference(apply_fn, params, x, layer, 1), atol=1e-12)


def test_the_diagonal_block_is_the_diagonal_of_the_exact_blocks_and_inverts_it(x64):
    params, apply_fn, x = models.linen_norm_mlp()
    lam = 0.1
    block, dense, (stats, curvature) = models.observed_block(
        apply_fn, LOSS, params, x, "LayerNorm_0", block={"LayerNorm_0": "diagonal"}, damping=lam
    )
    reference = _reference(apply_fn, params, x, "LayerNorm_0", 2)
    np.testing.assert_allclose(dense, np.diag(np.diag(reference)) + lam * np.eye(8), atol=1e-12)
    grad = kfax.blocks.LayerGradient(jnp.arange(4.0), jnp.ones(4))
    out = block.precondition(stats, curvature, grad, lam)
    got = jnp.concatenate([out.weight, out.bias])
    np.testing.assert_allclose(got, jnp.linalg.solve(dense, jnp.r_[grad.weight, grad.bias]))


def test_scale_shift_block_applies_the_inverse_of_its_dense_matrix_with_damping(x64):
    params, apply_fn, x = models.linen_norm_mlp()
    lam = 0.2
    block, dense, (stats, curvature) = models.observed_block(
        apply_fn, LOSS, params, x, "LayerNorm_0", damping=lam
    )
    grad = kfax.blocks.LayerGradient(jnp.linspace(-1, 1, 4), jnp.linspace(2, 3, 4))
    out = block.precondition(stats, curvature, grad, lam)
    expected = jnp.linalg.solve(dense, jnp.r_[grad.weight, grad.bias])
    np.testing.assert_allclose(jnp.r_[out.weight, out.bias], expected, rtol=1e-10)
