"""A small character-level transformer language model (Flax linen) and its byte-level data.

The text is the Python standard library's own source, read from the directory of
``os.__file__`` (present on every machine with Python; nothing is downloaded), as bytes: the
vocabulary is the 256 byte values. The model is a pre-norm GPT-style decoder: token embedding
(``nn.Embed``), a learned positional table added to it, ``depth`` blocks of causal
``nn.MultiHeadDotProductAttention`` (``DenseGeneral`` projections with kernels ``(d, heads,
head_dim)`` and ``(heads, head_dim, d)``) and a GELU MLP, each behind a ``LayerNorm`` and a
residual connection, a final ``LayerNorm`` and an output layer (untied, or tied to the
embedding with ``tied=True``: ``nn.Embed.attend``). kfax preconditions it without edits:
``python -m examples.transformer`` prints what it does with every parameter and trains it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfax

__all__ = [
    "TransformerLM",
    "batches",
    "benchmark_model",
    "language_model",
    "stdlib_bytes",
]


def stdlib_bytes(max_bytes: int | None = None) -> np.ndarray:
    """The standard library's top-level ``*.py`` files (sorted, newline-joined) as uint8."""
    files = sorted(Path(os.__file__).resolve().parent.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no *.py files beside {os.__file__}")
    chunks, size = [], 0
    for path in files:
        chunks.append(path.read_bytes())
        size += len(chunks[-1]) + 1
        if max_bytes is not None and size >= max_bytes:
            break
    data = np.frombuffer(b"\n".join(chunks), dtype=np.uint8)
    return data if max_bytes is None else data[:max_bytes]


def batches(
    data: np.ndarray, batch_size: int, context: int, seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless random windows: ``(inputs, targets)`` int32 ``(batch, context)``, the targets
    shifted by one byte."""
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(data) - context - 1, size=batch_size)
        index = starts[:, None] + np.arange(context + 1)[None, :]
        window = data[index].astype(np.int32)
        yield window[:, :-1], window[:, 1:]


class Block(nn.Module):
    heads: int
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        causal = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h, mask=causal)
        h = nn.LayerNorm()(x)
        h = nn.Dense(width)(nn.gelu(nn.Dense(self.mlp_ratio * width)(h)))
        return x + h


class TransformerLM(nn.Module):
    """``tokens int32[batch, t] -> logits [batch, t, vocab]``."""

    vocab: int = 256
    width: int = 64
    depth: int = 2
    heads: int = 4
    context: int = 32
    tied: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        embed = nn.Embed(self.vocab, self.width)
        positions = self.param(
            "positions", nn.initializers.normal(0.02), (self.context, self.width)
        )
        x = embed(tokens) + positions[: tokens.shape[1]]
        for _ in range(self.depth):
            x = Block(self.heads)(x)
        x = nn.LayerNorm()(x)
        return embed.attend(x) if self.tied else nn.Dense(self.vocab)(x)


def language_model(key: jax.Array, **sizes) -> tuple[dict, callable, TransformerLM]:
    """``(params, apply_fn, module)`` of a :class:`TransformerLM` with the given sizes."""
    model = TransformerLM(**sizes)
    tokens = jnp.zeros((1, model.context), jnp.int32)
    params = model.init(key, tokens)["params"]
    return params, lambda p, x: model.apply({"params": p}, x), model


def benchmark_model(key: jax.Array, quick: bool = False) -> tuple[dict, callable]:
    """The benchmark suite's sizes: 2 blocks, width 128, context 64, 4 heads (quick: 1 block,
    width 32, context 16, 2 heads)."""
    sizes = dict(depth=1, width=32, context=16, heads=2) if quick else {}
    params, apply_fn, _ = language_model(key, **{"depth": 2, "width": 128, "context": 64,
                                                 "heads": 4, **sizes})  # fmt: skip
    return params, apply_fn


def main(steps: int = 60, batch_size: int = 16) -> None:
    params, apply_fn, model = language_model(jax.random.key(0))
    data = stdlib_bytes(2_000_000)
    stream = batches(data, batch_size, model.context)
    example, _ = next(stream)
    print(kfax.describe(apply_fn, params, example))
    loss = kfax.losses.SoftmaxCrossEntropy()
    optimisers = {
        "kfac(None)": kfax.kfac(None, apply_fn, loss, example_inputs=example),
        "kfac(0.3)": kfax.kfac(0.3, apply_fn, loss, example_inputs=example),
        "adam(3e-3)": optax.adam(3e-3),
    }
    for name, tx in optimisers.items():
        p, state = params, tx.init(params)

        @jax.jit
        def step(p, state, x, y, tx=tx):
            value, grads = jax.value_and_grad(lambda q: loss(apply_fn(q, x), y))(p)
            updates, state = tx.update(grads, state, p, inputs=x, targets=y)
            return optax.apply_updates(p, updates), state, value

        stream = batches(data, batch_size, model.context, seed=1)
        start, values = time.perf_counter(), []
        for _ in range(steps):
            x, y = next(stream)
            p, state, value = step(p, state, x, y)
            values.append(float(value) / model.context)
        seconds = time.perf_counter() - start
        print(
            f"{name:>10}: {values[0]:.3f} -> {np.mean(values[-10:]):.3f} nats per byte "
            f"in {steps} steps ({seconds:.1f} s)"
        )


if __name__ == "__main__":
    main()
