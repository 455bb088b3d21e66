"""Builds the small models shared by the demo, tests, notebooks and benchmarks.

Every builder takes a key or seed and returns ``(params, apply_fn)`` with
``apply_fn(params, inputs) -> outputs`` (logits), the shape kfax traces. Dense layers use the
Flax layout ``x @ kernel + bias`` with ``kernel`` of shape ``[d_in, d_out]``. No losses or
training code live here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "CNN",
    "MNIST_AUTOENCODER_SIZES",
    "MLPClassifier",
    "NNXMLP",
    "autoencoder",
    "cnn",
    "deep_linear",
    "mlp_classifier",
    "nnx_mlp",
    "nnx_split_params",
]

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]

MNIST_AUTOENCODER_SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)


def _dense_init(key: jax.Array, d_in: int, d_out: int, std: float, bias: bool) -> dict:
    layer = {"kernel": std * jax.random.normal(key, (d_in, d_out), jnp.float32)}
    if bias:
        layer["bias"] = jnp.zeros((d_out,), jnp.float32)
    return layer


def autoencoder(
    key: jax.Array,
    sizes: Sequence[int] = MNIST_AUTOENCODER_SIZES,
    activation: Callable[[jax.Array], jax.Array] = jnp.tanh,
) -> tuple[dict, ApplyFn]:
    """The deep autoencoder of Hinton & Salakhutdinov (2006), in plain JAX.

    Layers ``dense_0 .. dense_{L-1}`` map ``sizes[i] -> sizes[i+1]``, with ``activation``
    after every layer except the code (bottleneck, the smallest inner width) and the output,
    which are linear. Outputs are logits for a Bernoulli loss on the ``sizes[0]`` inputs, so
    ``sizes=(64, 32, 16, 8, 16, 32, 64)`` suits the 8x8 digits fallback.

    Init: Glorot normal kernels (std ``sqrt(2 / (d_in + d_out))``), zero biases.
    """
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes needs at least two positive widths, got {sizes}")
    n_layers = len(sizes) - 1
    inner = sizes[1:-1]
    code_layer = inner.index(min(inner)) if inner else -1
    linear_layers = {code_layer, n_layers - 1}

    keys = jax.random.split(key, n_layers)
    params = {
        f"dense_{i}": _dense_init(keys[i], d_in, d_out, (2.0 / (d_in + d_out)) ** 0.5, bias=True)
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    }

    def apply_fn(params: dict, inputs: jax.Array) -> jax.Array:
        x = inputs
        for i in range(n_layers):
            layer = params[f"dense_{i}"]
            x = x @ layer["kernel"] + layer["bias"]
            if i not in linear_layers:
                x = activation(x)
        return x

    return params, apply_fn


def deep_linear(key: jax.Array, width: int, depth: int, bias: bool = False) -> tuple[dict, ApplyFn]:
    """A deep linear network: ``depth`` square dense layers ``dense_i`` with no activation.

    Init: normal kernels with std ``1 / sqrt(width)``, so the product stays of order one;
    zero biases when ``bias=True``.
    """
    if width < 1 or depth < 1:
        raise ValueError(f"width and depth must be >= 1, got width={width}, depth={depth}")
    keys = jax.random.split(key, depth)
    params = {
        f"dense_{i}": _dense_init(keys[i], width, width, width**-0.5, bias) for i in range(depth)
    }

    def apply_fn(params: dict, inputs: jax.Array) -> jax.Array:
        x = inputs
        for i in range(depth):
            layer = params[f"dense_{i}"]
            x = x @ layer["kernel"]
            if bias:
                x = x + layer["bias"]
        return x

    return params, apply_fn


class MLPClassifier(nn.Module):
    """A ReLU multilayer perceptron producing class logits (Flax linen)."""

    features: Sequence[int] = (128, 128)
    classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.features:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.classes)(x)


def mlp_classifier(
    key: jax.Array, input_dim: int, hidden: Sequence[int] = (128, 128), classes: int = 10
) -> tuple[Params, ApplyFn]:
    """An :class:`MLPClassifier` for ``[N, input_dim]`` inputs, as ``(params, apply_fn)``."""
    module = MLPClassifier(features=tuple(hidden), classes=classes)
    params = module.init(key, jnp.zeros((1, input_dim), jnp.float32))["params"]

    def apply_fn(params: Params, inputs: jax.Array) -> jax.Array:
        return module.apply({"params": params}, inputs)

    return params, apply_fn


class CNN(nn.Module):
    """Two 3x3 convolutions with ReLU and 2x2 average pooling, then a dense layer (NHWC)."""

    channels: Sequence[int] = (8, 16)
    classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for c in self.channels:
            x = nn.relu(nn.Conv(c, kernel_size=(3, 3), padding="SAME")(x))
            x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.classes)(x)


def cnn(
    key: jax.Array, side: int = 28, channels: Sequence[int] = (8, 16), classes: int = 10
) -> tuple[Params, ApplyFn]:
    """A :class:`CNN` for ``side x side`` grey images, as ``(params, apply_fn)``.

    ``apply_fn`` takes NHWC images ``[N, side, side, 1]`` or flattened ``[N, side * side]``.
    """
    module = CNN(channels=tuple(channels), classes=classes)
    params = module.init(key, jnp.zeros((1, side, side, 1), jnp.float32))["params"]

    def apply_fn(params: Params, inputs: jax.Array) -> jax.Array:
        if inputs.ndim == 2:
            inputs = inputs.reshape(inputs.shape[0], side, side, 1)
        return module.apply({"params": params}, inputs)

    return params, apply_fn


class NNXMLP(nnx.Module):
    """A ReLU multilayer perceptron producing class logits (Flax nnx)."""

    def __init__(
        self, input_dim: int, hidden: Sequence[int], classes: int, *, rngs: nnx.Rngs
    ) -> None:
        widths = (input_dim, *hidden, classes)
        self.num_layers = len(widths) - 1
        # Named attributes rather than a list, which nnx versions treat differently.
        for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            setattr(self, f"linear_{i}", nnx.Linear(d_in, d_out, rngs=rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = getattr(self, f"linear_{i}")(x)
            if i < self.num_layers - 1:
                x = nnx.relu(x)
        return x


def nnx_split_params(model: nnx.Module) -> tuple[nnx.State, ApplyFn]:
    """Splits an nnx module into ``(params, apply_fn)``.

    ``params`` is the ``nnx.State`` of the module's ``nnx.Param`` variables (a pytree);
    ``apply_fn(params, x)`` merges them with the module's graph definition and any other
    state into a fresh module and calls it, so it is a pure function of ``params``.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply_fn(params: nnx.State, inputs: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params, rest)(inputs)

    return params, apply_fn


def nnx_mlp(
    rngs_seed: int, input_dim: int, hidden: Sequence[int] = (128, 128), classes: int = 10
) -> tuple[nnx.State, ApplyFn]:
    """An :class:`NNXMLP` as ``(params, apply_fn)``, through :func:`nnx_split_params`."""
    model = NNXMLP(input_dim, hidden, classes, rngs=nnx.Rngs(rngs_seed))
    return nnx_split_params(model)
