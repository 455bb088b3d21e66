"""The benchmark tasks: a model, its initial parameters, a loss and a data set.

Each task is a :class:`Task` with the kfax loss and the matching kfac-jax loss kind, the data
as numpy arrays ``(inputs, targets)``, the set the reported loss is evaluated on, and the
learning-rate grids of the fixed-step optimisers. ``quick=True`` gives tiny versions for smoke
tests. The MNIST tasks train on the 10,000 MNIST test images (``examples.data.load_mnist``;
scikit-learn's digits if MNIST is absent) and report the loss on that same training set. The
transformer task is a character-level language model on the Python standard library's own
source (read from the directory of ``os.__file__``; no downloads) and reports the loss on
held-out files, in nats per token.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import kfax
from examples import data as data_lib
from examples import models

TASKS = ("autoencoder", "mlp", "cnn", "deep_linear", "transformer")

# Learning-rate grids of the fixed-step optimisers, per task. "kfac" covers every kfax K-FAC
# variant with a learning rate, "kfac_jax_fixed" the fixed-step kfac-jax. The run widens a grid
# whose best value lies at its edge (benchmarks.run --widen), so these are starting points.
_GRIDS = {
    "autoencoder": {
        "adam": (3e-4, 1e-3, 3e-3),
        "sgd": (1e-3, 3e-3, 1e-2),
        "muon": (0.01, 0.03, 0.1, 0.3),
        "psgd": (3e-4, 1e-3, 3e-3),
        "sophia": (1e-4, 3e-4, 1e-3),
        "kfac": (1e-3, 1e-2, 0.1),
        "kfac_jax_fixed": (1e-3, 1e-2, 0.1),
    },
    "mlp": {
        "adam": (3e-4, 1e-3, 3e-3),
        "sgd": (0.01, 0.03, 0.1),
        "muon": (0.01, 0.03, 0.1),
        "psgd": (3e-4, 1e-3, 3e-3),
        "sophia": (1e-4, 3e-4, 1e-3),
        "kfac": (0.03, 0.1, 0.3),
        "kfac_jax_fixed": (0.03, 0.1, 0.3),
    },
    "cnn": {
        "adam": (1e-3, 3e-3, 1e-2),
        "sgd": (0.01, 0.03, 0.1),
        "muon": (0.01, 0.03, 0.1),
        "psgd": (3e-4, 1e-3, 3e-3),
        "sophia": (3e-4, 1e-3, 3e-3),
        "kfac": (0.03, 0.1, 0.3),
        "kfac_jax_fixed": (0.03, 0.1, 0.3),
    },
    "deep_linear": {
        "adam": (1e-3, 3e-3, 1e-2),
        "sgd": (0.01, 0.03, 0.1),
        "muon": (0.003, 0.01, 0.03),
        "psgd": (1e-3, 3e-3, 1e-2),
        "sophia": (1e-3, 3e-3, 1e-2),
        "kfac": (0.03, 0.1, 0.3),
        "kfac_jax_fixed": (0.03, 0.1, 0.3),
    },
    # The language model's loss is summed over the 64 positions of a window (kfax's loss
    # convention), so SGD's learning rates are 64x smaller than for a per-token mean; the
    # other optimisers are invariant to that scale (kfax up to its damping).
    "transformer": {
        "adam": (1e-3, 3e-3, 1e-2),
        "sgd": (1e-4, 3e-4, 1e-3),
        "muon": (0.01, 0.03, 0.1),
        "psgd": (3e-4, 1e-3, 3e-3),
        "sophia": (3e-4, 1e-3, 3e-3),
        "kfac": (0.01, 0.03, 0.1),
        "kfac_jax_fixed": (0.01, 0.03, 0.1),
    },
}

# Per task: the batch size, the steps between evaluations (full and quick), and the learning
# rate Muon gives the parameters it does not orthogonalise (Adam's part: biases, norms and, for
# the transformer, the embeddings and the output layer, as Muon's authors advise).
_BATCH = {"transformer": (32, 8)}
_EVAL_EVERY = {"transformer": (25, 5)}
_MUON_ADAM_LR = {"transformer": 3e-3, "deep_linear": 3e-3, "cnn": 3e-3}


@dataclasses.dataclass
class Task:
    """One benchmark problem.

    Attributes:
      name: one of :data:`TASKS`.
      params: initial parameters (a pytree of float32 arrays).
      apply_fn: ``apply_fn(params, inputs) -> outputs``.
      loss: the kfax loss (mean over the batch of the sum over positions).
      loss_kind: the same loss for the kfac-jax adapter.
      inputs, targets: the training set (numpy arrays with a leading example axis).
      grids: learning-rate grid per optimiser family.
      description: a one-line summary for the JSON record.
      eval_inputs, eval_targets: the set the reported loss is evaluated on (``None``: the
        training set).
      eval_batch_size: examples per evaluation batch (``None``: the training batch size).
      loss_scale: multiplies every reported loss (the language model reports nats per token:
        ``1 / context``); optimisers always see the unscaled loss.
      loss_unit: what a reported loss is.
      batch_size, quick_batch_size: default training batch sizes.
      eval_every, quick_eval_every: default steps between evaluations.
      muon_options: extra ``optax.contrib.muon`` options a careful user passes on this task.
    """

    name: str
    params: Any
    apply_fn: Callable[[Any, Any], jax.Array]
    loss: Any
    loss_kind: str
    inputs: np.ndarray
    targets: np.ndarray
    grids: dict[str, tuple[float, ...]]
    description: str
    eval_inputs: np.ndarray | None = None
    eval_targets: np.ndarray | None = None
    eval_batch_size: int | None = None
    loss_scale: float = 1.0
    loss_unit: str = "nats per example"
    batch_size: int = 1000
    quick_batch_size: int = 64
    eval_every: int = 10
    quick_eval_every: int = 5
    muon_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def loss_fn(self, params: Any, inputs: Any, targets: Any) -> jax.Array:
        """The mean training loss of ``params`` on a batch (unscaled: what is optimised)."""
        return self.loss(self.apply_fn(params, inputs), targets)

    def eval_set(self) -> tuple[np.ndarray, np.ndarray]:
        """``(inputs, targets)`` the reported loss is evaluated on."""
        if self.eval_inputs is None:
            return self.inputs, self.targets
        return self.eval_inputs, self.eval_targets


def _mnist(quick: bool) -> data_lib.Dataset:
    dataset = data_lib.load_mnist()
    if quick:
        dataset = dataset._replace(images=dataset.images[:512], labels=dataset.labels[:512])
    return dataset


def _deep_linear_data(
    seed: int, width: int, n: int, noise: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """Ill-conditioned Gaussian inputs (scales 1 to 0.01) and a noisy random linear map."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(0.0, -2.0, width)
    inputs = rng.standard_normal((n, width)) * scales
    teacher = rng.standard_normal((width, width)) / np.sqrt(width)
    targets = inputs @ teacher + noise * rng.standard_normal((n, width))
    return inputs.astype(np.float32), targets.astype(np.float32)


# ------------------------------------------------------------------------ language model


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes of the character-level language model (the issue's model is the default)."""

    depth: int = 2
    width: int = 128
    context: int = 64
    heads: int = 4
    mlp_ratio: int = 4
    vocab: int = 256  # bytes
    train_bytes: int | None = None  # cap on the training text (None: all of it)
    eval_windows: int = 512


QUICK_TRANSFORMER = TransformerConfig(
    depth=1, width=32, context=16, heads=2, train_bytes=64_000, eval_windows=32
)


def stdlib_text(validation_every: int = 10) -> tuple[bytes, bytes, int]:
    """The Python standard library's top-level ``*.py`` sources as bytes, split by file.

    Files are read in sorted order from the directory of ``os.__file__``; every
    ``validation_every``-th file (the 10th, 20th, ...) is held out. Returns ``(train,
    validation, number of files)``; files are separated by a newline. Deterministic for a
    given Python installation (the text differs between Python versions).
    """
    files = sorted(Path(os.__file__).resolve().parent.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no *.py files beside {os.__file__}")
    train, validation = [], []
    for i, path in enumerate(files):
        (validation if (i + 1) % validation_every == 0 else train).append(path.read_bytes())
    return b"\n".join(train), b"\n".join(validation), len(files)


def byte_windows(text: bytes, context: int, limit: int | None = None) -> np.ndarray:
    """Non-overlapping windows of ``context + 1`` bytes (stride ``context``), as int32."""
    data = np.frombuffer(text, dtype=np.uint8)
    n = (len(data) - 1) // context
    if limit is not None:
        n = min(n, limit)
    index = np.arange(n)[:, None] * context + np.arange(context + 1)[None, :]
    return data[index].astype(np.int32)


def _dense(rng: np.random.Generator, d_in: int, d_out: int, std: float) -> dict:
    return {
        "kernel": jnp.asarray(std * rng.standard_normal((d_in, d_out)), jnp.float32),
        "bias": jnp.zeros((d_out,), jnp.float32),
    }


def _norm(width: int) -> dict:
    return {"scale": jnp.ones((width,), jnp.float32), "bias": jnp.zeros((width,), jnp.float32)}


def _layer_norm(x: jax.Array, p: dict, eps: float = 1e-5) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def transformer_lm(seed: int, cfg: TransformerConfig) -> tuple[dict, Callable]:
    """A pre-norm GPT-style byte-level language model in plain JAX: ``(params, apply_fn)``.

    Token and learned position embeddings, ``cfg.depth`` blocks of causal multi-head attention
    (fused ``qkv`` dense, output ``proj``) and a GELU MLP (``fc``, ``out``), each behind a
    LayerNorm and a residual connection, a final LayerNorm and an untied output layer
    ``head``. ``apply_fn(params, tokens int32[batch, t]) -> logits [batch, t, vocab]``.
    Residual projections start at std ``1 / sqrt(d_in * 2 depth)`` (GPT-2's scaling). The
    initial parameters are drawn with numpy from ``seed`` (no eager JAX operations to compile).
    """
    w, depth = cfg.width, cfg.depth
    rng = np.random.default_rng(seed)
    residual = (2 * depth) ** -0.5

    def table(rows: int) -> dict:
        return {"embedding": jnp.asarray(0.02 * rng.standard_normal((rows, w)), jnp.float32)}

    params = {"embed": table(cfg.vocab), "pos": table(cfg.context)}
    hidden = cfg.mlp_ratio * w
    for i in range(depth):
        params[f"block_{i}"] = {
            "ln_1": _norm(w),
            "qkv": _dense(rng, w, 3 * w, w**-0.5),
            "proj": _dense(rng, w, w, w**-0.5 * residual),
            "ln_2": _norm(w),
            "fc": _dense(rng, w, hidden, w**-0.5),
            "out": _dense(rng, hidden, w, hidden**-0.5 * residual),
        }
    params["ln_f"] = _norm(w)
    params["head"] = _dense(rng, w, cfg.vocab, w**-0.5)
    heads, head_dim = cfg.heads, w // cfg.heads

    def dense(p: dict, x: jax.Array) -> jax.Array:
        return x @ p["kernel"] + p["bias"]

    def apply_fn(params: dict, tokens: jax.Array) -> jax.Array:
        b, t = tokens.shape
        x = params["embed"]["embedding"][tokens] + params["pos"]["embedding"][:t]
        causal = jnp.tril(jnp.ones((t, t), bool))
        for i in range(depth):
            block = params[f"block_{i}"]
            qkv = dense(block["qkv"], _layer_norm(x, block["ln_1"]))
            q, k, v = (a.reshape(b, t, heads, head_dim) for a in jnp.split(qkv, 3, axis=-1))
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
            weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
            attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, w)
            x = x + dense(block["proj"], attended)
            x = x + dense(
                block["out"], jax.nn.gelu(dense(block["fc"], _layer_norm(x, block["ln_2"])))
            )
        return dense(params["head"], _layer_norm(x, params["ln_f"]))

    return params, apply_fn


def _examples_transformer() -> Any:
    """``examples.transformer`` when another part of the project provides it, else ``None``."""
    if importlib.util.find_spec("examples.transformer") is None:
        return None
    from examples import transformer  # noqa: PLC0415

    return transformer


_NOT_MUON = {"embed", "embedding", "pos", "positions", "wpe", "wte", "head", "lm_head", "logits"}


def muon_dimensions(vocab: int) -> Callable[[Any], Any]:
    """``optax.contrib.muon``'s ``muon_weight_dimension_numbers`` for a language model.

    Hidden 2-D kernels are orthogonalised. Embeddings, positions and the output layer (a
    name like ``embed``, ``positions`` or ``head``, or a ``vocab``-sized axis) go to Muon's
    Adam, as Muon's authors advise, as do biases and scales. A 3-D attention kernel (Flax
    ``DenseGeneral``: ``(d, heads, head_dim)``, or ``(heads, head_dim, d)`` for the output
    projection ``out``) is one matrix over its first axis, or over its first two.
    """
    from optax.contrib import MuonDimensionNumbers  # noqa: PLC0415

    def dims(path, leaf):
        names = [str(getattr(k, "key", getattr(k, "name", k))).lower() for k in path]
        skip = any(n in _NOT_MUON or n.startswith("embed") for n in names)
        skip = skip or names[-1:] in (["bias"], ["scale"])  # (heads, head_dim) biases too
        if leaf.ndim < 2 or vocab in leaf.shape or skip:
            return None
        if leaf.ndim == 2:
            return MuonDimensionNumbers(0, 1)
        if leaf.ndim == 3:
            return (
                MuonDimensionNumbers((0, 1), 2)
                if "out" in names
                else MuonDimensionNumbers(0, (1, 2))
            )
        return None

    return lambda params: jax.tree_util.tree_map_with_path(dims, params)


def _transformer_task(quick: bool, seed: int) -> dict[str, Any]:
    cfg = QUICK_TRANSFORMER if quick else TransformerConfig()
    train_text, validation_text, files = stdlib_text()
    windows = byte_windows(
        train_text,
        cfg.context,
        None if cfg.train_bytes is None else cfg.train_bytes // cfg.context,
    )
    held_out = byte_windows(validation_text, cfg.context, cfg.eval_windows)
    params, apply_fn = transformer_lm(seed, cfg)
    source = "benchmarks.tasks.transformer_lm"
    found = _examples_transformer()
    if found is not None and hasattr(found, "benchmark_model"):
        params, apply_fn = found.benchmark_model(jax.random.key(seed), quick=quick)
        source = "examples.transformer.benchmark_model"
    description = (
        f"byte-level transformer LM ({source}), {cfg.depth} blocks, width {cfg.width}, "
        f"{cfg.heads} heads, context {cfg.context}; {len(windows)} training windows from "
        f"{files} Python {'.'.join(map(str, sys.version_info[:3]))} stdlib files (every "
        f"10th held out: {len(held_out)} evaluation windows); loss in nats per token"
    )
    return dict(
        params=params,
        apply_fn=apply_fn,
        loss=kfax.losses.SoftmaxCrossEntropy(),
        loss_kind="softmax_xent",
        inputs=windows[:, :-1],
        targets=windows[:, 1:],
        eval_inputs=held_out[:, :-1],
        eval_targets=held_out[:, 1:],
        eval_batch_size=min(256, len(held_out)),
        loss_scale=1.0 / cfg.context,
        loss_unit="nats per token (held-out files)",
        description=description,
        muon_options={"muon_weight_dimension_numbers": muon_dimensions(cfg.vocab)},
    )


def make_task(name: str, *, quick: bool = False, seed: int = 0) -> Task:
    """Builds task ``name``; ``quick`` shrinks the model and the data set to smoke-test size."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {name!r}")
    key = jax.random.key(seed)
    extra: dict[str, Any] = {}
    if name == "transformer":
        fields = _transformer_task(quick, seed)
    elif name == "deep_linear":
        width, depth, n = (16, 3, 512) if quick else (64, 8, 8192)
        inputs, targets = _deep_linear_data(seed, width, n)
        params, apply_fn = models.deep_linear(key, width, depth)
        description = f"deep linear net, {depth} layers of width {width}, {n} Gaussian examples"
        fields = dict(
            params=params,
            apply_fn=apply_fn,
            loss=kfax.losses.SquaredError(),
            loss_kind="squared",
            inputs=inputs,
            targets=targets,
            description=description,
        )
    else:
        fields = _mnist_task(name, quick, key)
    batch, quick_batch = _BATCH.get(name, (1000, 64))
    every, quick_every = _EVAL_EVERY.get(name, (10, 5))
    muon = {"adam_learning_rate": _MUON_ADAM_LR.get(name, 1e-3), **fields.pop("muon_options", {})}
    extra.update(
        batch_size=batch,
        quick_batch_size=quick_batch,
        eval_every=every,
        quick_eval_every=quick_every,
        muon_options=muon,
    )
    return Task(name=name, grids=_GRIDS[name], **fields, **extra)


def _mnist_task(name: str, quick: bool, key: jax.Array) -> dict[str, Any]:
    dataset = _mnist(quick)
    d = dataset.images.shape[1]
    if name == "autoencoder":
        quick_sizes = (d, 32, 8, 32, d)
        full_sizes = (
            models.MNIST_AUTOENCODER_SIZES if d == 784 else (d, 128, 64, 32, 8, 32, 64, 128, d)
        )
        sizes = quick_sizes if quick else full_sizes
        params, apply_fn = models.autoencoder(key, sizes)
        inputs, targets = dataset.images, dataset.images
        description = f"tanh autoencoder {'-'.join(map(str, sizes))}, Bernoulli loss"
        loss, kind = kfax.losses.SigmoidCrossEntropy(), "sigmoid_xent"
    elif name == "mlp":
        hidden = (32,) if quick else (128, 128)
        params, apply_fn = models.mlp_classifier(key, d, hidden)
        inputs, targets = dataset.images, dataset.labels
        description = f"ReLU MLP {d}-{'-'.join(map(str, hidden))}-10, softmax loss"
        loss, kind = kfax.losses.SoftmaxCrossEntropy(), "softmax_xent"
    else:
        channels = (4,) if quick else (8, 16)
        params, apply_fn = models.cnn(key, dataset.side, channels)
        inputs, targets = dataset.images, dataset.labels
        description = f"CNN, 3x3 conv channels {channels}, avg-pool, dense; softmax loss"
        loss, kind = kfax.losses.SoftmaxCrossEntropy(), "softmax_xent"
    description += f", {len(inputs)} {dataset.name} images"
    return dict(
        params=params,
        apply_fn=apply_fn,
        loss=loss,
        loss_kind=kind,
        inputs=inputs,
        targets=targets,
        description=description,
    )
