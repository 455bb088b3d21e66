"""Scanned layers: ``lax.scan`` over stacked layers (also Flax ``nn.scan`` and ``nnx.scan``),
``lax.scan`` over time with weights closed over, and ``jax.checkpoint``.

A stack of layers gets one block per layer of the stack, equal to the blocks of the same
network unrolled with one parameter per layer; a weight used at every step of a scan shares it
over the steps like positions, its factors equal to those written from a hand-unrolled model.
This file also runs under the oldest supported JAX (``make test-oldjax``).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kfax
from kfax import _capture
from tests import models

LOSS = kfax.losses.SquaredError(0.5)


def _layers(apply_fn, params, x):
    return [(layer.name, layer.kind, layer.stack, layer.positions, layer.bias_path)
            for layer in kfax.find_layers(apply_fn, params, x).layers]  # fmt: skip


def test_a_scan_over_stacked_parameters_is_one_stacked_layer():
    stacked, scanned, _, _, x = models.stacked_tanh()
    assert _layers(scanned, stacked, x) == [("W", "dense", (3,), 2, "b")]


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.LayerNorm()(nn.Dense(4)(x))), None


class LinenScanned(nn.Module):
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(LinenBlock) if self.remat else LinenBlock
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return nn.Dense(2)(stack()(x, None)[0])


@pytest.mark.parametrize("remat", [False, True], ids=["nn.scan", "nn.scan-of-nn.remat"])
def test_flax_linen_scan_and_remat_layers_are_found_per_layer_of_the_stack(remat):
    model = LinenScanned(remat)
    x = jnp.ones((2, 5, 4))
    params = model.init(jax.random.key(0), x)["params"]
    found = _layers(lambda p, z: model.apply({"params": p}, z), params, x)
    s = "ScanCheckpointLinenBlock_0" if remat else "ScanLinenBlock_0"
    assert found == [
        (f"{s}/Dense_0", "dense", (3,), 5, f"{s}/Dense_0/bias"),
        (f"{s}/LayerNorm_0", "scale_shift", (3,), 5, f"{s}/LayerNorm_0/bias"),
        ("Dense_0", "dense", (), 5, "Dense_0/bias"),
    ]


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.lin(x))


class NNXStack(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return NNXBlock(rngs)

        self.blocks = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def forward(block, h):
            return block(h)

        return forward(self.blocks, x)


def test_nnx_scan_over_vmapped_layers_is_a_stacked_layer():
    graphdef, state = nnx.split(NNXStack(nnx.Rngs(0)))
    found = _layers(lambda s, z: nnx.merge(graphdef, s)(z), state, jnp.ones((2, 4)))
    assert found == [("blocks/lin", "dense", (3,), 1, "blocks/lin/bias")]


def test_a_stacked_block_equals_the_blocks_of_the_unrolled_network(x64):
    """Per layer of the stack: the same damped matrix as the unrolled network's layer, and
    ``scale_by_kfac`` gives the same updates (eigen blocks, sampled Fisher, three steps)."""
    stacked, scanned, unrolled, unrolled_fn, x = models.stacked_tanh()
    block, dense, _ = models.observed_block(scanned, LOSS, stacked, x, "W", block="eigen",
                                            damping=0.1, centering="exact")  # fmt: skip
    assert block.name == "eigen" and block.inner.name == "eigen"
    per_layer = [
        models.observed_block(unrolled_fn, LOSS, unrolled, x, f"l{i}", block="eigen",
                              damping=0.1, centering="exact")[1]
        for i in range(3)
    ]  # fmt: skip
    np.testing.assert_allclose(dense, jax.scipy.linalg.block_diag(*per_layer), atol=1e-12)

    y = jax.random.normal(jax.random.key(9), x.shape)
    runs = {}
    for label, fn, params in (("stacked", scanned, stacked), ("unrolled", unrolled_fn, unrolled)):
        tx = kfax.scale_by_kfac(fn, LOSS, example_inputs=x, block="eigen", damping=0.1)
        state = tx.init(params)
        for _ in range(3):
            grads = jax.grad(lambda p, fn=fn: LOSS(fn(p, x), y))(params)
            updates, state = tx.update(grads, state, params, inputs=x, targets=y)
        runs[label] = updates
    for i in range(3):
        for leaf in ("W", "b"):
            np.testing.assert_allclose(
                runs["stacked"][leaf][i], runs["unrolled"][f"l{i}"][leaf], rtol=1e-10, atol=1e-12
            )


def test_captured_rows_of_a_stack_reproduce_its_gradients(x64):
    stacked, scanned, _, _, x = models.stacked_tanh()
    tapped = _capture.capture(scanned, stacked, x)
    grads, cotangents = tapped.pullback(jnp.ones_like(tapped.outputs))
    expected = jax.grad(lambda p: jnp.sum(scanned(p, x)))(stacked)
    np.testing.assert_allclose(grads["W"], expected["W"], atol=1e-12)
    h, g = tapped.layer_inputs["W"], cotangents["W"]  # (layers, batch, positions, width)
    np.testing.assert_allclose(jnp.einsum("lnti,lnto->lio", h, g), expected["W"], atol=1e-12)
    np.testing.assert_allclose(jnp.einsum("lnto->lo", g), expected["b"], atol=1e-12)


def test_a_weight_closed_over_by_a_scan_over_time_shares_it_like_positions(x64):
    """``A = 1/(N T) sum h h^T`` and ``B = 1/N sum_n sum_t g g^T`` over the steps, written from
    a Python-unrolled copy of the network with a perturbation on every step's pre-activation."""
    params, apply_fn, xs = models.rnn()
    assert _layers(apply_fn, params, xs) == [
        ("U", "dense", (), 6, None),
        ("W", "dense", (), 6, None),
    ]

    def unrolled(eps):
        h, hs, inputs = jnp.zeros((5, 4)), [], []
        for t in range(6):
            inputs.append(h)
            h = jnp.tanh(xs[:, t] @ params["U"] + h @ params["W"] + eps[:, t])
            hs.append(h)
        return jnp.stack(hs, 1), jnp.stack(inputs, 1)

    outputs, vjp, h = jax.vjp(unrolled, jnp.zeros((5, 6, 4)), has_aux=True)
    g = jax.vmap(lambda u: vjp(u)[0])(LOSS.curvature_sqrt(outputs))
    factors = kfax.kronecker_factors(apply_fn, LOSS, kind="exact")(params, xs)
    np.testing.assert_allclose(factors["W"].a, jnp.einsum("nti,ntj->ij", h, h) / 30, atol=1e-12)
    np.testing.assert_allclose(factors["W"].b, jnp.einsum("cnti,cntj->ij", g, g) / 5, atol=1e-12)
    np.testing.assert_allclose(factors["U"].a, jnp.einsum("nti,ntj->ij", xs, xs) / 30, atol=1e-12)


def test_a_scanned_model_trains_with_kfac_jitted():
    stacked, scanned, _, _, x = models.stacked_tanh()
    y = jnp.tanh(x[..., ::-1])
    tx = kfax.kfac(None, scanned, LOSS, example_inputs=x)

    @jax.jit
    def step(p, state):
        value, grads = jax.value_and_grad(lambda q: LOSS(scanned(q, x), y))(p)
        updates, state = tx.update(grads, state, p, inputs=x, targets=y)
        return optax.apply_updates(p, updates), state, value

    p, state = stacked, tx.init(stacked)
    values = []
    for _ in range(10):
        p, state, value = step(p, state)
        values.append(float(value))
    assert values[-1] < 0.5 * values[0], values
