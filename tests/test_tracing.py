"""Layer finding (kfax._tracing via kfax.find_layers): every model shape the issue names.

This file is also run under the oldest supported JAX (``make test-oldjax``), since it is the one
place that depends on how JAX prints programs.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kfax
from kfax import _capture, _tracing
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


def test_every_used_parameter_is_a_layer_and_only_unused_ones_are_unmatched_with_a_reason():
    """A scalar gate times a dense output is a one-feature scale; an unused leaf has no
    gradient, and an integer leaf none either: those are the only unmatched parameters."""
    params = {"w": jnp.ones((3, 2)), "scale": jnp.ones(()), "unused": jnp.ones(4)}
    params["step"] = jnp.zeros((), jnp.int32)
    report = kfax.find_layers(lambda p, x: p["scale"] * (x @ p["w"]), params, jnp.ones((2, 3)))
    assert [(layer.name, layer.kind) for layer in report.layers] == [
        ("w", "dense"),
        ("scale", "scale_shift"),
    ]
    assert dict(report.unmatched) == {
        "step": "not a floating-point array (int32)",
        "unused": "not used by apply_fn (no gradient)",
    }
    table = kfax.describe(lambda p, x: p["scale"] * (x @ p["w"]), params, jnp.ones((2, 3)))
    assert "unused: not used by apply_fn (no gradient)" in table and "2 layers found." in table


def test_a_weight_used_twice_is_one_parameter_layer_whose_note_names_both_uses():
    params = {"w": jnp.ones((3, 3))}
    report = kfax.find_layers(lambda p, x: (x @ p["w"]) @ p["w"], params, jnp.ones((2, 3)))
    assert [(layer.name, layer.kind) for layer in report.layers] == [("w", "parameter")]
    assert report.layers[0].note == "used by 2 dense operations (shared: tied or reused)"
    assert report.unmatched == ()


def test_grouped_convolutions_are_reported_as_unsupported():
    class Depthwise(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (3, 3), feature_group_count=2)(x).reshape(x.shape[0], -1)

    model = Depthwise()
    x = jnp.ones((1, 4, 4, 2))
    params = model.init(jax.random.key(0), x)["params"]
    apply_fn = lambda p, z: model.apply({"params": p}, z)  # noqa: E731
    traced = _tracing.trace(apply_fn, params, x)
    layers = {layer.weight_path: layer for layer in traced.layers}
    assert layers["Conv_0/kernel"].kind == "parameter"
    assert "groups" in layers["Conv_0/kernel"].note
    assert layers["Conv_0/bias"].kind == "scale_shift"  # a shift of the grouped output
    (warning,) = traced.warnings
    assert "'Conv_0/kernel'" in warning and "feature or batch groups" in warning


def test_a_model_whose_parameters_have_no_gradient_raises_a_clear_error():
    params = {"unused": jnp.ones(3), "count": jnp.zeros((), jnp.int32)}
    fn = kfax.kronecker_factors(lambda p, x: 2.0 * x, kfax.losses.SquaredError(), kind="exact")
    with pytest.raises(kfax.NoLayersError, match="no floating-point parameter is used"):
        fn(params, jnp.ones((2, 3)))


# --------------------------------------------------------------------------------------------
# Shared parameters: a parameter used by a layer operation and by anything else is a
# "parameter" layer (a diagonal block of its own) whose note names every use.


def test_a_tied_embedding_is_a_parameter_layer_whose_note_names_every_use(x64):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    params = {
        "E": jax.random.normal(k1, (7, 4)),
        "W": jax.random.normal(k2, (4, 4)),
        "b": jnp.zeros(7),
    }
    ids = jax.random.randint(k3, (5, 3), 0, 7)

    def apply_fn(p, i):
        h = jnp.tanh(p["E"][i] @ p["W"])
        return h @ p["E"].T + p["b"]

    report = kfax.find_layers(apply_fn, params, ids)
    kinds = {layer.name: layer.kind for layer in report.layers}
    assert kinds == {"W": "dense", "b": "scale_shift", "E": "parameter"}
    notes = {layer.name: layer.note for layer in report.layers}
    assert notes["E"] == (
        "used by an embedding gather and a dense operation (shared: tied or reused)"
    )
    # The output bias belongs to an operation that is not a layer: it is a shift of its own.
    assert report.unmatched == ()
    table = kfax.describe(apply_fn, params, ids)
    assert "  E: used by an embedding gather and a dense operation" in table
    assert not _tracing.trace(apply_fn, params, ids).warnings  # every use is a known layer op

    # Why (float64): E's gradient is not the output layer's h^T g.
    g = jax.random.normal(k4, (5, 3, 7))
    _, vjp = jax.vjp(lambda p: apply_fn(p, ids), params)
    full = vjp(g)[0]["E"]
    h = jnp.tanh(params["E"][ids] @ params["W"])
    layer_part = jnp.einsum("bto,btd->od", g, h)
    assert float(jnp.linalg.norm(full - layer_part)) > 0.1 * float(jnp.linalg.norm(full))


def test_two_layers_sharing_one_bias_are_bias_free_and_the_bias_says_it_is_shared():
    params = {"a": {"kernel": jnp.ones((3, 4))}, "b": {"kernel": jnp.ones((4, 4))}}
    params["bias"] = jnp.zeros(4)

    def apply_fn(p, x):
        h = jnp.tanh(x @ p["a"]["kernel"] + p["bias"])
        return h @ p["b"]["kernel"] + p["bias"]

    report = kfax.find_layers(apply_fn, params, jnp.ones((2, 3)))
    assert [(layer.name, layer.bias_path) for layer in report.layers] == [
        ("a", None),
        ("b", None),
        ("bias", None),
    ]
    assert report.layers[2].note == (
        "used by the bias of 2 dense operations (shared: tied or reused)"
    )
    assert report.suspect_biases == (("bias", "a"), ("bias", "b"))


def test_a_block_applied_twice_is_weight_sharing_and_its_bias_goes_with_it():
    params = {"block": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}, "out": jnp.ones((4, 2))}

    def apply_fn(p, x):
        for _ in range(2):
            x = jnp.tanh(x @ p["block"]["kernel"] + p["block"]["bias"])
        return x @ p["out"]

    report = kfax.find_layers(apply_fn, params, jnp.ones((2, 4)))
    notes = {layer.weight_path: (layer.kind, layer.note) for layer in report.layers}
    assert notes == {
        "out": ("dense", ""),
        "block/kernel": ("parameter", "used by 2 dense operations (shared: tied or reused)"),
        "block/bias": (
            "parameter",
            "used by the bias of 2 dense operations (shared: tied or reused)",
        ),
    }
    assert report.suspect_biases == ()


def test_a_weight_used_outside_its_layer_takes_the_layers_bias_out_with_it():
    params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}, "out": jnp.ones((4, 2))}

    def apply_fn(p, x):
        h = jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"])
        return (h @ p["out"]) * jnp.sum(p["dense"]["kernel"])

    traced = _tracing.trace(apply_fn, params, jnp.ones((2, 3)))
    layers = {layer.weight_path: (layer.kind, layer.note) for layer in traced.layers}
    assert layers == {
        "dense/bias": ("scale_shift", ""),  # its operation is not a layer: a shift of its own
        "out": ("dense", ""),
        "dense/kernel": (
            "parameter",
            "used by a dense operation and reduce_sum (shared: tied or reused)",
        ),
    }
    (warning,) = traced.warnings
    assert "'dense/kernel' is used by reduce_sum" in warning


def test_a_bias_also_used_elsewhere_leaves_its_layer_bias_free():
    params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}

    def apply_fn(p, x):
        return (x @ p["dense"]["kernel"] + p["dense"]["bias"]) * jnp.sum(p["dense"]["bias"])

    report = kfax.find_layers(apply_fn, params, jnp.ones((2, 3)))
    assert [(layer.name, layer.kind, layer.bias_path) for layer in report.layers] == [
        ("dense", "dense", None),
        ("dense/bias", "parameter", None),
    ]
    assert report.layers[1].note == (
        "used by the bias of a dense operation and reduce_sum (shared: tied or reused)"
    )
    assert report.suspect_biases == (("dense/bias", "dense"),)


def test_a_weight_leaving_a_jit_is_followed_to_its_other_uses():
    params = {"w": jnp.ones((3, 3))}

    def apply_fn(p, x):
        w = jax.jit(lambda v: v.T)(p["w"])  # passes through a call: still the same weight
        return (x @ w) * w[0, 0]

    (layer,) = kfax.find_layers(apply_fn, params, jnp.ones((2, 3))).layers
    assert (layer.kind, layer.note) == (
        "parameter",
        "used by a dense operation and slice (shared: tied or reused)",
    )


def test_a_bias_added_outside_a_jitted_layer_is_its_bias(x64):
    params = {"w": jax.random.normal(jax.random.key(0), (3, 4)), "b": jnp.ones(4)}
    x = jax.random.normal(jax.random.key(1), (5, 3))

    def apply_fn(p, z):
        return jnp.tanh(jax.jit(lambda w, v: v @ w)(p["w"], z) + p["b"]) @ jnp.ones((4, 2))

    tapped = _capture.capture(apply_fn, params, x)
    assert [(s.name, s.bias_path) for s in tapped.layers] == [("w", "b")]
    grads, cotangents = tapped.pullback(jnp.ones((5, 2)))
    np.testing.assert_allclose(grads["b"], cotangents["w"].sum(0), rtol=1e-12)


# --------------------------------------------------------------------------------------------
# Suspect biases: a bias-like parameter of a bias-free layer, added after another operation.

SHIFT = jnp.linspace(-1.0, 1.0, 4)


@pytest.mark.parametrize(
    "apply_fn",
    [
        lambda p, x: (x @ p["d"]["kernel"] + SHIFT) + p["d"]["bias"],
        lambda p, x: (x @ p["d"]["kernel"]) * p["s"] + p["d"]["bias"],
        lambda p, x: (-(x @ p["d"]["kernel"]) / p["s"] + 1.0) + p["d"]["bias"],
    ],
    ids=["plus-shift", "times-scale", "negated-divided-shifted"],
)
def test_a_bias_added_after_an_affine_operation_is_a_suspect_bias(apply_fn):
    params = {"d": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}, "s": jnp.ones(())}
    x = jnp.ones((2, 3))
    report = kfax.find_layers(apply_fn, params, x)
    assert [(layer.name, layer.bias_path) for layer in report.layers][0] == ("d", None)
    assert report.suspect_biases == (("d/bias", "d"),)
    kinds = {layer.weight_path: layer.kind for layer in report.layers}
    assert kinds["d/bias"] == "scale_shift"  # a shift of its own, not the layer's bias
    table = kfax.describe(apply_fn, params, x)
    assert "Suspect bias: d/bias looks like a bias of layer 'd'" in table


class _DenseThenNorm(nn.Module):
    norm: str

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4, use_bias=False)(x)
        if self.norm == "layernorm":
            return nn.LayerNorm()(h)
        if self.norm == "rmsnorm":
            return nn.RMSNorm()(h) + self.param("bias", nn.initializers.zeros, (4,))
        return nn.BatchNorm(use_running_average=self.norm == "batchnorm-eval")(h)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "batchnorm-train"])
def test_a_normalisation_bias_after_a_bias_free_layer_is_not_suspect(norm):
    model = _DenseThenNorm(norm)
    x = jax.random.normal(jax.random.key(0), (6, 3))
    variables = model.init(jax.random.key(1), x)

    def apply_fn(p, z):
        out = model.apply({**variables, "params": p}, z, mutable=["batch_stats"])
        return out[0]

    report = kfax.find_layers(apply_fn, variables["params"], x)
    assert [(layer.name, layer.bias_path) for layer in report.layers][0] == ("Dense_0", None)
    norm_layer = report.layers[1]
    assert (norm_layer.kind, norm_layer.d_out) == ("scale_shift", 4)
    if norm == "batchnorm-train":
        # The scale multiplies the batch's own statistics (no batch axis) before the data: no
        # per-example tap, so it is a parameter layer (diagonal block); the bias is a shift.
        assert (norm_layer.weight_path, report.layers[2].kind) == (
            "BatchNorm_0/bias",
            "parameter",
        )
    else:
        assert norm_layer.bias_path is not None  # the norm's scale and its shift pair up
    assert report.suspect_biases == ()


def test_suspect_bias_rule_edges_nonlinearity_own_bias_and_eval_mode_batchnorm():
    params = {"d": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}, "b0": jnp.zeros(4)}
    x = jnp.ones((2, 3))
    after_tanh = kfax.find_layers(
        lambda p, z: jnp.tanh(z @ p["d"]["kernel"]) + p["d"]["bias"], params, x
    )
    assert after_tanh.suspect_biases == ()
    # The layer has a bias of its own (b0): a second one is not suspect.
    own_bias = kfax.find_layers(
        lambda p, z: (z @ p["d"]["kernel"] + p["b0"]) * 2.0 + p["d"]["bias"], params, x
    )
    assert [layer.bias_path for layer in own_bias.layers] == ["b0", None]
    assert own_bias.layers[1].weight_path == "d/bias"  # a shift of its own
    assert own_bias.suspect_biases == ()
    # Eval-mode BatchNorm is an affine map of the layer output (fixed running averages): flagged.
    model = _DenseThenNorm("batchnorm-eval")
    variables = model.init(jax.random.key(1), x)
    report = kfax.find_layers(
        lambda p, z: model.apply({**variables, "params": p}, z), variables["params"], x
    )
    assert report.suspect_biases == (("BatchNorm_0/bias", "Dense_0"),)


# --------------------------------------------------------------------------------------------
# Complex parameters and outputs (issue 15): a clear error, naming them.


def _complex_model():
    """The issue's smallest input: f = |x @ W + b| @ V + c, W and b complex (float64)."""
    k = jax.random.split(jax.random.key(0), 5)
    params = {
        "W": jax.random.normal(k[0], (3, 4)) + 1j * jax.random.normal(k[1], (3, 4)),
        "b": jax.random.normal(k[2], (4,)) * (1 + 0.5j),
        "V": jax.random.normal(k[3], (4, 2)),
        "c": jnp.zeros(2),
    }
    x = jax.random.normal(k[4], (32, 3))
    return params, lambda p, z: jnp.abs(z @ p["W"] + p["b"]) @ p["V"] + p["c"], x


def test_complex_parameters_are_refused_by_name_and_never_layers(x64):
    params, apply_fn, x = _complex_model()
    traced = _tracing.trace(apply_fn, params, x)
    assert traced.complex_leaves == ("W", "b")
    assert traced.output_avals == (((32, 2), jnp.dtype("float64")),)
    assert [(s.name, s.bias_path) for s in traced.layers] == [("V", "c")]
    reasons = dict(traced.unmatched)
    assert reasons["W"].startswith("complex (complex128)") and reasons["b"].startswith("complex")
    with pytest.raises(ValueError, match="'W' is complex128, 'b' is complex128") as error:
        _capture.trace_layers(apply_fn, params, x)
    assert "real and imaginary parts as separate real parameters" in str(error.value)


def test_complex_outputs_are_refused(x64):
    params = {"V": jnp.ones((3, 2)), "U": jnp.ones((3, 2))}
    x = jnp.ones((4, 3))

    def apply_fn(p, z):
        return z @ p["V"] + 1j * (z @ p["U"])

    with pytest.raises(ValueError, match=r"complex model outputs.*complex128.*\(4, 2\)"):
        _capture.trace_layers(apply_fn, params, x)


# --------------------------------------------------------------------------------------------
# nnx models with Dropout and BatchNorm (issue 13 item 5).


class _NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.l2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(jax.nn.relu(self.bn(self.l1(x)))))


def _nnx_state_values(model):
    leaves = jax.tree.leaves(nnx.state(model, nnx.Not(nnx.RngKey)))
    return [np.asarray(leaf) for leaf in leaves]


def test_nnx_split_with_dropout_and_batchnorm_traces_and_leaves_the_model_alone():
    model = _NNXNet(nnx.Rngs(0))
    graphdef, state = nnx.split(model)  # the whole state: RNG keys and counts included
    x = jax.random.normal(jax.random.key(1), (6, 4))
    before = _nnx_state_values(model)

    def apply_fn(s, z):
        return nnx.merge(graphdef, s)(z)

    report = kfax.find_layers(apply_fn, state, x)
    assert [(layer.name, layer.kind) for layer in report.layers] == [
        ("l1", "dense"),
        ("bn", "scale_shift"),  # the shift (train mode: see the linen BatchNorm test)
        ("l2", "dense"),
        ("bn/scale", "parameter"),
    ]
    reasons = dict(report.unmatched)
    # Running averages are read only to be updated: no effect on the outputs, no gradient.
    assert reasons["bn/mean"] == "read by apply_fn but without effect on its outputs (no gradient)"
    assert reasons["drop/rngs/count"] == "not a floating-point array (uint32)"
    assert reasons["drop/rngs/key"].startswith("not a floating-point array (key<")
    assert "drop/rngs/count: not a floating-point array" in kfax.describe(apply_fn, state, x)
    after = _nnx_state_values(model)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


_as_pure = getattr(nnx, "as_pure", None) or nnx.pure  # older flax


def _non_params(model):
    """The state besides the parameters, as arrays (a snapshot, not the live Variables)."""
    return _as_pure(nnx.state(model, nnx.Not(nnx.Param)))


def test_nnx_optimizer_with_batchnorm_and_dropout_trains_when_apply_fn_merges_its_arguments():
    model = _NNXNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (16, 4))
    y = jnp.arange(16) % 3
    loss = kfax.losses.SoftmaxCrossEntropy()
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    # The first attempt: the merged module shares rest's Variables, BatchNorm writes to them
    # inside kfax's trace and nnx raises TraceContextError; kfax says what to do instead.
    def shared(p, z):
        return nnx.merge(graphdef, p, rest)(z)

    with pytest.raises(ValueError, match=r"BatchNorm.*nnx\.merge\(graphdef, params, inputs\[1\]"):
        nnx.Optimizer(model, kfax.kfac(None, shared, loss, example_inputs=x), wrt=nnx.Param)

    # The pattern that works: the non-parameter state travels with the inputs.
    def apply_fn(params, inputs):
        z, state = inputs
        return nnx.merge(graphdef, params, state, copy=True)(z)

    # It is the user's forward pass exactly: same dropout mask, same batch statistics.
    before = _non_params(model)
    params = _as_pure(nnx.state(model, nnx.Param))
    np.testing.assert_array_equal(apply_fn(params, (x, before)), model(x))

    tx = kfax.kfac(None, apply_fn, loss, example_inputs=(x, _non_params(model)))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        state = _non_params(model)  # before the gradient's forward pass changes it
        value, grads = nnx.value_and_grad(lambda m: loss(m(x), y))(model)
        optimizer.update(model, grads, inputs=(x, state), targets=y)
        return value

    mean_before = np.asarray(model.bn.mean[...])
    values = [float(step(model, optimizer, x, y)) for _ in range(3)]
    assert all(np.isfinite(values))
    assert not np.array_equal(mean_before, np.asarray(model.bn.mean[...]))  # the user's step
    assert int(model.drop.rngs.count[...]) == 4


# --------------------------------------------------------------------------------------------
# The trace cache (issue 13 item 7).


def _counting(apply_fn):
    calls = []

    def counted(p, z):
        calls.append(None)
        return apply_fn(p, z)

    return counted, calls


def test_trace_layers_is_cached_for_the_same_function_structure_shapes_and_dtypes():
    params, mlp_fn, x, _ = models.mlp(sizes=(4, 5, 3))
    apply_fn, calls = _counting(mlp_fn)
    first = _capture.trace_layers(apply_fn, params, x)
    assert _capture.trace_layers(apply_fn, params, x) is first
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, x))
    assert _capture.trace_layers(apply_fn, *specs) is first
    seen = []
    jax.jit(lambda p, z: seen.append(_capture.trace_layers(apply_fn, p, z)) or z)(params, x)
    assert seen == [first]
    assert len(calls) == 1

    assert _capture.trace_layers(apply_fn, params, x[:2]) is not first  # another batch size
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    assert _capture.trace_layers(apply_fn, half, x) is not first  # other dtypes
    assert _capture.trace_layers(apply_fn, {"a": params}["a"], (x,)[0]) is first
    assert _capture.trace_layers(lambda p, z: apply_fn(p, z), params, x) is not first
    assert len(calls) == 4


def test_the_trace_cache_is_bounded_and_keeps_no_tracers():
    params, mlp_fn, x, _ = models.mlp(sizes=(4, 5, 3))
    apply_fn, calls = _counting(mlp_fn)
    cache = _tracing.TraceCache(maxsize=2)
    for batch in (1, 2, 3):
        cache(apply_fn, params, x[:batch])
    assert len(cache) == 2 and len(calls) == 3
    cache(apply_fn, params, x[:1])  # evicted: traced again
    assert len(calls) == 4

    cache.clear()

    @jax.jit
    def closes_over_a_tracer(scale):
        cache(lambda p, z: mlp_fn(p, z) * scale, params, x)
        return scale

    closes_over_a_tracer(2.0)
    assert len(cache) == 0
