"""The benchmark tasks: a model, its initial parameters, a loss and a training set.

Each task is a :class:`Task` with the kfax loss and the matching kfac-jax loss kind, the data
as numpy arrays ``(inputs, targets)`` and the learning-rate grids of the fixed-step optimisers.
``quick=True`` gives tiny versions for smoke tests. The MNIST tasks train on the 10,000 MNIST
test images (``examples.data.load_mnist``; scikit-learn's digits if MNIST is absent).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import kfax
from examples import data as data_lib
from examples import models

TASKS = ("autoencoder", "mlp", "cnn", "deep_linear")

# Learning-rate grids of the fixed-step optimisers, per task (kfac covers every kfax K-FAC
# variant, kfac_jax_fixed the fixed-step kfac-jax).
_GRIDS = {
    "autoencoder": {
        "adam": (3e-4, 1e-3, 3e-3),
        "sgd": (1e-3, 3e-3, 1e-2),
        "kfac": (1e-3, 1e-2, 0.1),
        "kfac_jax_fixed": (1e-3, 1e-2, 0.1),
    },
    "mlp": {
        "adam": (3e-4, 1e-3, 3e-3),
        "sgd": (0.01, 0.03, 0.1),
        "kfac": (0.03, 0.1, 0.3),
        "kfac_jax_fixed": (0.03, 0.1, 0.3),
    },
    "cnn": {
        "adam": (1e-3, 3e-3, 1e-2),
        "sgd": (0.01, 0.03, 0.1),
        "kfac": (0.03, 0.1, 0.3),
        "kfac_jax_fixed": (0.03, 0.1, 0.3),
    },
    "deep_linear": {
        "adam": (1e-3, 3e-3, 1e-2),
        "sgd": (0.01, 0.03, 0.1),
        "kfac": (0.03, 0.1, 0.3),
        "kfac_jax_fixed": (0.03, 0.1, 0.3),
    },
}


@dataclasses.dataclass
class Task:
    """One benchmark problem.

    Attributes:
      name: one of :data:`TASKS`.
      params: initial parameters (a pytree of float32 arrays).
      apply_fn: ``apply_fn(params, inputs) -> outputs``.
      loss: the kfax loss (mean over the batch).
      loss_kind: the same loss for the kfac-jax adapter.
      inputs, targets: the training set (numpy arrays with a leading example axis).
      grids: learning-rate grid per optimiser family.
      description: a one-line summary for the JSON record.
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

    def loss_fn(self, params: Any, inputs: Any, targets: Any) -> jax.Array:
        """The mean training loss of ``params`` on a batch."""
        return self.loss(self.apply_fn(params, inputs), targets)


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


def make_task(name: str, *, quick: bool = False, seed: int = 0) -> Task:
    """Builds task ``name``; ``quick`` shrinks the model and the data set to smoke-test size."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {name!r}")
    key = jax.random.key(seed)
    if name == "deep_linear":
        width, depth, n = (16, 3, 512) if quick else (64, 8, 8192)
        inputs, targets = _deep_linear_data(seed, width, n)
        params, apply_fn = models.deep_linear(key, width, depth)
        description = f"deep linear net, {depth} layers of width {width}, {n} Gaussian examples"
        loss, kind = kfax.losses.SquaredError(), "squared"
    else:
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
    return Task(
        name=name,
        params=params,
        apply_fn=apply_fn,
        loss=loss,
        loss_kind=kind,
        inputs=inputs,
        targets=targets,
        grids=_GRIDS[name],
        description=description,
    )
