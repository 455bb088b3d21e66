"""Runs the kfax demo: trains the MNIST autoencoder with several optimisers (placeholder).

For now it only loads the data (MNIST, or scikit-learn's digits if MNIST is absent) and builds
the autoencoder; the optimiser comparison is wired in later. Run it as ``make demo``.
"""

from __future__ import annotations

import jax
import numpy as np

from examples.data import load_mnist
from examples.models import MNIST_AUTOENCODER_SIZES, autoencoder

# Autoencoder widths for the 8x8 digits fallback, mirroring the MNIST shape.
DIGITS_AUTOENCODER_SIZES = (64, 128, 64, 32, 8, 32, 64, 128, 64)


def main() -> None:
    data = load_mnist()
    sizes = MNIST_AUTOENCODER_SIZES if data.name == "mnist" else DIGITS_AUTOENCODER_SIZES
    params, apply_fn = autoencoder(jax.random.key(0), sizes)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    logits = jax.jit(apply_fn)(params, data.images[:8])
    print(f"data: {data.name}, images {data.images.shape}, labels {data.labels.shape}")
    print(f"autoencoder {sizes}: {n_params:,} parameters, output {logits.shape}")
    print("kfax demo: optimiser comparison not yet wired")


if __name__ == "__main__":
    main()
