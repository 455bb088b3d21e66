"""Tiny models shared by every test: the same MLP, CNN and deep linear network everywhere.

Each builder returns ``(params, apply_fn, inputs)`` with small sizes so that dense references
(``kfax.exact``) stay cheap. Pure-JAX models come with a hand-written ``layer_values`` that
returns each layer's input and the map from its pre-activation to the outputs, for references
that do not use kfax's capture machinery.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


def _dense_params(key, sizes, bias=True, scale=1.0):
    params = {}
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        key, wk, bk = jax.random.split(key, 3)
        layer = {"kernel": scale * jax.random.normal(wk, (d_in, d_out)) / jnp.sqrt(d_in)}
        if bias:
            layer["bias"] = 0.1 * jax.random.normal(bk, (d_out,))
        params[f"dense_{i}"] = layer
    return params


def mlp(key=0, sizes=(4, 5, 3), bias=True, batch=6, activation=jnp.tanh):
    """Pure-JAX MLP on a dict of arrays; activation between layers, none on the output."""
    key = jax.random.key(key)
    params = _dense_params(jax.random.fold_in(key, 1), sizes, bias)
    inputs = jax.random.normal(jax.random.fold_in(key, 2), (batch, sizes[0]))
    depth = len(sizes) - 1

    def apply_fn(p, x):
        h = x
        for i in range(depth):
            layer = p[f"dense_{i}"]
            h = h @ layer["kernel"] + (layer["bias"] if "bias" in layer else 0.0)
            if i < depth - 1:
                h = activation(h)
        return h

    def layer_values(p, x, i):
        """Layer i's input, pre-activation, and ``rest(a) -> outputs`` (per example)."""
        h = x
        for j in range(i):
            layer = p[f"dense_{j}"]
            h = activation(h @ layer["kernel"] + layer.get("bias", 0.0))
        layer = p[f"dense_{i}"]
        a = h @ layer["kernel"] + layer.get("bias", 0.0)

        def rest(a_single):
            z = a_single
            for j in range(i, depth):
                if j > i:
                    lj = p[f"dense_{j}"]
                    z = z @ lj["kernel"] + lj.get("bias", 0.0)
                if j < depth - 1:
                    z = activation(z)
            return z

        return h, a, rest

    return params, apply_fn, inputs, layer_values


def deep_linear(key=0, width=3, depth=3, batch=8):
    """Square linear layers without bias or activation (Bernacchia et al. 2018)."""
    params, apply_fn, inputs, values = mlp(
        key, sizes=(width,) * (depth + 1), bias=False, batch=batch, activation=lambda z: z
    )
    return params, apply_fn, inputs, values


class LinenMLP(nn.Module):
    features: tuple = (5, 3)

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.features):
            x = nn.Dense(f)(x)
            if i < len(self.features) - 1:
                x = jnp.tanh(x)
        return x


def linen_mlp(key=0, d_in=4, features=(5, 3), batch=6):
    model = LinenMLP(features)
    inputs = jax.random.normal(jax.random.key(key + 100), (batch, d_in))
    params = model.init(jax.random.key(key), inputs)["params"]
    return params, lambda p, x: model.apply({"params": p}, x), inputs


class NNXMLP(nnx.Module):
    def __init__(self, d_in, hidden, d_out, rngs):
        self.l1 = nnx.Linear(d_in, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, d_out, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


def nnx_mlp(key=0, d_in=4, hidden=5, d_out=3, batch=6):
    model = NNXMLP(d_in, hidden, d_out, nnx.Rngs(key))
    graphdef, state = nnx.split(model)
    inputs = jax.random.normal(jax.random.key(key + 100), (batch, d_in))

    def apply_fn(s, x):
        return nnx.merge(graphdef, s)(x)

    return state, apply_fn, inputs


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(3, (3, 3), padding="SAME")(x)
        x = jax.nn.relu(x)
        x = nn.Conv(4, (2, 2), strides=(2, 2), padding="VALID")(x)
        x = jnp.tanh(x)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(3)(x)


def linen_cnn(key=0, side=4, channels=2, batch=3):
    model = LinenCNN()
    inputs = jax.random.normal(jax.random.key(key + 100), (batch, side, side, channels))
    params = model.init(jax.random.key(key), inputs)["params"]
    return params, lambda p, x: model.apply({"params": p}, x), inputs


# --------------------------------------------------------------------------------------------
# Transformers and scanned models (issue 9), and one helper that observes a layer's block.


def observed_block(apply_fn, loss, params, inputs, layer, *, block="default", damping=0.0,
                   kind="exact", centering="none", targets=None, where=None, key=None,
                   **options):  # fmt: skip
    """``(block, dense)``: the plan's block of ``layer`` after one batch (``ema_decay`` 0) and a
    refresh, and the damped matrix it inverts (``block.dense``)."""
    import optax  # noqa: PLC0415

    from kfax import _plan, statistics  # noqa: PLC0415

    plan = _plan.make_plan(
        apply_fn, loss, params, inputs, kind=kind, samples=1, block=block, centering=centering,
        others=optax.identity(), **options,
    )  # fmt: skip
    chosen = plan.blocks[layer]
    batch = statistics.statistics_pass(
        apply_fn, loss, params, inputs, kind=kind, targets=targets, where=where, key=key,
        traced=plan.traced,
    )  # fmt: skip
    stats, curvature = chosen.init(jnp.float64)
    stats = chosen.observe(stats, batch.layers[layer], 0.0)
    curvature = chosen.refresh(stats, damping)
    curvature = chosen.observe_in_basis(curvature, batch.layers[layer], 0.0)
    return chosen, chosen.dense(curvature, damping), (stats, curvature)


def embedding_readout(key=0, vocab=7, width=3, outputs=2, batch=20, positions=None):
    """``E[ids] @ W``: an embedding read out linearly (one token per example by default)."""
    k = jax.random.split(jax.random.key(key), 3)
    params = {
        "E": jax.random.normal(k[0], (vocab, width)),
        "W": jax.random.normal(k[1], (width, outputs)),
    }
    shape = (batch,) if positions is None else (batch, positions)
    ids = jax.random.randint(k[2], shape, 0, vocab)
    return params, lambda p, i: p["E"][i] @ p["W"], ids


class LinenNormMLP(nn.Module):
    """Dense -> tanh -> LayerNorm -> Dense -> RMSNorm -> Dense, over sequence inputs."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(jnp.tanh(nn.Dense(4)(x)))
        h = nn.RMSNorm()(nn.Dense(4)(h))
        return nn.Dense(3)(h)


def linen_norm_mlp(key=0, batch=5, positions=2, d_in=3):
    model = LinenNormMLP()
    inputs = jax.random.normal(jax.random.key(key + 100), (batch, positions, d_in))
    params = model.init(jax.random.key(key), inputs)["params"]
    return params, lambda p, x: model.apply({"params": p}, x), inputs


def stacked_tanh(key=0, layers=3, width=4, batch=5, positions=2):
    """``lax.scan`` over ``layers`` stacked tanh layers, and the same network unrolled with one
    leaf per layer: ``(stacked params, scanned fn, unrolled params, unrolled fn, inputs)``."""
    k = jax.random.split(jax.random.key(key), 3)
    stacked = {
        "W": jax.random.normal(k[0], (layers, width, width)) / 2,
        "b": jax.random.normal(k[1], (layers, width)),
    }
    inputs = jax.random.normal(k[2], (batch, positions, width))

    def scanned(p, x):
        def body(h, wb):
            return jnp.tanh(h @ wb[0] + wb[1]), None

        return jax.lax.scan(body, x, (p["W"], p["b"]))[0]

    unrolled = {f"l{i}": {"W": stacked["W"][i], "b": stacked["b"][i]} for i in range(layers)}

    def unrolled_fn(p, x):
        for i in range(layers):
            x = jnp.tanh(x @ p[f"l{i}"]["W"] + p[f"l{i}"]["b"])
        return x

    return stacked, scanned, unrolled, unrolled_fn, inputs


def rnn(key=0, batch=5, steps=6, d_in=3, width=4):
    """``h_t = tanh(x_t @ U + h_{t-1} @ W)`` by ``lax.scan`` over time, ``U`` and ``W`` closed
    over (shared by every step); outputs ``(batch, steps, width)``."""
    k = jax.random.split(jax.random.key(key), 3)
    params = {
        "U": jax.random.normal(k[0], (d_in, width)),
        "W": jax.random.normal(k[1], (width, width)) / 2,
    }
    inputs = jax.random.normal(k[2], (batch, steps, d_in))

    def apply_fn(p, xs):
        def body(h, x_t):
            h = jnp.tanh(x_t @ p["U"] + h @ p["W"])
            return h, h

        h0 = jnp.zeros((xs.shape[0], width), xs.dtype)
        return jnp.swapaxes(jax.lax.scan(body, h0, jnp.swapaxes(xs, 0, 1))[1], 0, 1)

    return params, apply_fn, inputs


def transformer_lm(key=0, batch=4, **sizes):
    """The example's character-level transformer (``examples.transformer``), tiny by default:
    ``(params, apply_fn, tokens)``."""
    from examples import transformer  # noqa: PLC0415

    sizes = {"width": 16, "depth": 2, "heads": 2, "context": 8, **sizes}
    params, apply_fn, model = transformer.language_model(jax.random.key(key), **sizes)
    tokens = jax.random.randint(jax.random.key(key + 1), (batch, model.context), 0, model.vocab)
    return params, apply_fn, tokens
