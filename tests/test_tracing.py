"""Layer finding (kfax._tracing via kfax.find_layers): every model shape the issue names.

This file is also run under the oldest supported JAX (``make test-oldjax``), since it is the one
place that depends on how JAX prints programs.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import kfax
from tests import models


def names(report):
    return [(layer.name, layer.kind, layer.d_in, layer.d_out) for layer in report.layers]


def test_pure_jax_mlp_layers_are_named_by_parameter_path():
    params, apply_fn, inputs, _ = models.mlp(sizes=(4, 5, 3))
    report = kfax.find_layers(apply_fn, params, inputs)
    assert names(report) == [("dense_0", "dense", 4, 5), ("dense_1", "dense", 5, 3)]
    assert report.layers[0].weight_path == "dense_0/kernel"
    assert report.layers[0].bias_path == "dense_0/bias"
    assert report.unmatched == ()


def test_linen_mlp_and_nnx_mlp():
    params, apply_fn, inputs = models.linen_mlp()
    assert names(kfax.find_layers(apply_fn, params, inputs)) == [
        ("Dense_0", "dense", 4, 5),
        ("Dense_1", "dense", 5, 3),
    ]
    state, apply_fn, inputs = models.nnx_mlp()
    report = kfax.find_layers(apply_fn, state, inputs)
    assert [(n, k, i, o) for n, k, i, o in names(report)] == [
        ("l1", "dense", 4, 5),
        ("l2", "dense", 5, 3),
    ]
    assert all(layer.bias_path for layer in report.layers)
    assert report.unmatched == ()


def test_linen_cnn_convolutions_are_found_with_patch_widths_and_positions():
    params, apply_fn, inputs = models.linen_cnn(side=4, channels=2)
    report = kfax.find_layers(apply_fn, params, inputs)
    assert names(report) == [
        ("Conv_0", "conv", 2 * 9, 3),
        ("Conv_1", "conv", 3 * 4, 4),
        ("Dense_0", "dense", 16, 3),
    ]
    assert [layer.positions for layer in report.layers] == [16, 4, 1]
    assert all(layer.bias_path for layer in report.layers)


def test_nested_jit_checkpoint_and_custom_jvp_do_not_hide_layers():
    params, _, inputs, _ = models.mlp(sizes=(4, 5, 3))

    @jax.jit
    def first(layer, x):
        return jax.nn.gelu(x @ layer["kernel"] + layer["bias"])

    def apply_fn(p, x):
        h = jax.checkpoint(first)(p["dense_0"], x)
        h = jax.nn.relu(h)
        return jax.jit(lambda q, z: z @ q["kernel"] + q["bias"])(p["dense_1"], h)

    report = kfax.find_layers(apply_fn, params, inputs)
    assert names(report) == [("dense_0", "dense", 4, 5), ("dense_1", "dense", 5, 3)]
    assert all(layer.bias_path for layer in report.layers)


def test_pytorch_layout_and_einsum_are_dense_layers():
    key = jax.random.key(0)
    params = {"w": jax.random.normal(key, (3, 4)), "b": jnp.zeros(3)}
    inputs = jnp.ones((2, 4))
    for fn in (
        lambda p, x: x @ p["w"].T + p["b"],
        lambda p, x: jnp.einsum("bi,oi->bo", x, p["w"]) + p["b"],
        lambda p, x: (p["w"] @ x.T).T + p["b"],
    ):
        report = kfax.find_layers(fn, params, inputs)
        assert [(layer.d_in, layer.d_out) for layer in report.layers] == [(4, 3)]
        assert report.layers[0].bias_path == "b"


def test_sequence_inputs_count_positions():
    params, apply_fn, _, _ = models.mlp(sizes=(4, 3))
    report = kfax.find_layers(apply_fn, params, jnp.ones((2, 7, 4)))
    assert report.layers[0].positions == 7


def test_shape_dtype_struct_inputs_are_enough():
    params, apply_fn, _, _ = models.mlp(sizes=(4, 5, 3))
    spec = jax.ShapeDtypeStruct((1000, 4), jnp.float32)
    assert len(kfax.find_layers(apply_fn, params, spec).layers) == 2


def test_unmatched_parameters_are_reported_with_a_reason():
    params = {"w": jnp.ones((3, 2)), "scale": jnp.ones(()), "unused": jnp.ones(4)}
    report = kfax.find_layers(lambda p, x: p["scale"] * (x @ p["w"]), params, jnp.ones((2, 3)))
    assert [layer.name for layer in report.layers] == ["w"]
    reasons = dict(report.unmatched)
    assert reasons["scale"] == "consumed by mul"
    assert reasons["unused"] == "not consumed by a dense or convolution operation"
    table = kfax.describe(lambda p, x: p["scale"] * (x @ p["w"]), params, jnp.ones((2, 3)))
    assert "scale: consumed by mul" in table and "1 layers found." in table


def test_a_weight_used_twice_is_reported_not_silently_split():
    params = {"w": jnp.ones((3, 3))}
    report = kfax.find_layers(lambda p, x: (x @ p["w"]) @ p["w"], params, jnp.ones((2, 3)))
    assert report.layers == ()
    assert "weight sharing" in dict(report.unmatched)["w"]


def test_grouped_convolutions_are_reported_as_unsupported():
    class Depthwise(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (3, 3), feature_group_count=2)(x).reshape(x.shape[0], -1)

    model = Depthwise()
    x = jnp.ones((1, 4, 4, 2))
    params = model.init(jax.random.key(0), x)["params"]
    report = kfax.find_layers(lambda p, z: model.apply({"params": p}, z), params, x)
    assert report.layers == ()
    assert "groups" in dict(report.unmatched)["Conv_0/kernel"]


def test_a_model_without_layers_raises_a_clear_error():
    params = {"scale": jnp.ones(3)}
    fn = kfax.kronecker_factors(
        lambda p, x: x * p["scale"], kfax.losses.SquaredError(), kind="exact"
    )
    with pytest.raises(kfax.NoLayersError, match="found no dense or convolution layer"):
        fn(params, jnp.ones((2, 3)))
