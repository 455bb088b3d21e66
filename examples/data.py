"""Loads the example data set and cuts it into shuffled mini-batches.

Reads the MNIST test set kept in ``../shared/data/mnist`` (gzip-compressed IDX files) into numpy
arrays. Without that folder it falls back to scikit-learn's 8x8 ``digits`` and warns. It never
downloads anything and knows nothing of models or optimisers.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Dataset", "MnistNotFoundWarning", "batches", "default_mnist_dir", "load_mnist"]

_IMAGES_FILE = "t10k-images-idx3-ubyte.gz"
_LABELS_FILE = "t10k-labels-idx1-ubyte.gz"
_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions.
_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension.


class Dataset(NamedTuple):
    """Images and labels of one data set.

    Attributes:
      images: float32 in [0, 1], shape ``[N, side * side]`` or ``[N, side, side, 1]`` (NHWC).
      labels: int32 class labels, shape ``[N]``.
      name: ``"mnist"`` or ``"digits"`` (the scikit-learn fallback).
      side: image height and width in pixels (28 for MNIST, 8 for digits).
    """

    images: np.ndarray
    labels: np.ndarray
    name: str
    side: int


class MnistNotFoundWarning(UserWarning):
    """MNIST was not found, so the scikit-learn digits data set is used instead."""


def default_mnist_dir() -> Path:
    """``$KFAX_MNIST_DIR`` if set, else ``<repo>/../shared/data/mnist``."""
    env = os.environ.get("KFAX_MNIST_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parent.parent
    return repo.parent / "shared" / "data" / "mnist"


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Reads one gzip IDX file of unsigned bytes, checking its magic number and size."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: {len(data)} bytes is shorter than the {header}-byte IDX header.")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: magic number {found} (expected {magic}); not an MNIST IDX file.")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(
            f"{path}: {len(data)} bytes, but the header {dims} implies {expected}; file is damaged."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _load_digits(flatten: bool) -> Dataset:
    from sklearn.datasets import load_digits  # Imported here: scikit-learn is optional.

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # Pixel values are 0..16.
    labels = digits.target.astype(np.int32)
    images = images.reshape(len(images), -1) if flatten else images[..., None]
    return Dataset(images, labels, "digits", 8)


def load_mnist(root: str | os.PathLike[str] | None = None, *, flatten: bool = True) -> Dataset:
    """Loads the 10,000-image MNIST test set, or scikit-learn's digits if MNIST is absent.

    Args:
      root: folder holding ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``.
        Defaults to ``$KFAX_MNIST_DIR``, else ``../shared/data/mnist`` beside the repository.
      flatten: return images as ``[N, side * side]`` rather than ``[N, side, side, 1]``.

    Returns:
      A :class:`Dataset` with float32 images in [0, 1] and int32 labels. If the files are
      missing, the 1,797 8x8 scikit-learn digits (``name="digits"``, ``side=8``) and a
      :class:`MnistNotFoundWarning`.

    Raises:
      ValueError: an MNIST file exists but is not a valid IDX file.
      FileNotFoundError: MNIST is missing and scikit-learn is not installed.
    """
    root = Path(root) if root is not None else default_mnist_dir()
    images_path, labels_path = root / _IMAGES_FILE, root / _LABELS_FILE
    if not (images_path.is_file() and labels_path.is_file()):
        if importlib.util.find_spec("sklearn") is None:
            raise FileNotFoundError(
                f"MNIST was not found at {root} (expected {_IMAGES_FILE} and {_LABELS_FILE}), "
                "and scikit-learn, needed for the digits fallback, is not installed. "
                "Set KFAX_MNIST_DIR to the MNIST folder, or run `pip install scikit-learn`."
            )
        warnings.warn(
            f"MNIST was not found at {root}; using scikit-learn's 8x8 digits data set instead.",
            MnistNotFoundWarning,
            stacklevel=2,
        )
        return _load_digits(flatten)

    raw_images = _read_idx(images_path, _IMAGES_MAGIC, ndim=3)
    raw_labels = _read_idx(labels_path, _LABELS_MAGIC, ndim=1)
    if len(raw_images) != len(raw_labels):
        raise ValueError(f"{root}: {len(raw_images)} images but {len(raw_labels)} labels.")
    n, side, _ = raw_images.shape
    images = raw_images.astype(np.float32) / 255.0
    images = images.reshape(n, side * side) if flatten else images.reshape(n, side, side, 1)
    return Dataset(images, raw_labels.astype(np.int32), "mnist", side)


def _rng(key_or_seed: Any) -> np.random.Generator:
    """A numpy generator from an int seed or a JAX PRNG key (raw uint32 or typed)."""
    if isinstance(key_or_seed, (int, np.integer)):
        return np.random.default_rng(int(key_or_seed))
    dtype = getattr(key_or_seed, "dtype", None)
    if dtype is not None and not isinstance(dtype, np.dtype):
        import jax  # A typed key (dtype key<...>, not a numpy dtype): JAX reads its bits.

        key_or_seed = jax.random.key_data(key_or_seed)
    return np.random.default_rng(np.asarray(key_or_seed, dtype=np.uint32).ravel())


def batches(
    dataset_arrays: np.ndarray | Sequence[np.ndarray],
    batch_size: int,
    *,
    key_or_seed: Any,
    epochs: int | None = None,
) -> Iterator[Any]:
    """Yields shuffled mini-batches, reshuffling every epoch and dropping the remainder.

    Args:
      dataset_arrays: one array, or a tuple of arrays sharing their leading dimension (a
        :class:`Dataset` yields ``(images, labels)``).
      batch_size: examples per batch; at most the number of examples.
      key_or_seed: an int seed or a JAX PRNG key; the same value gives the same batches.
      epochs: number of passes over the data; ``None`` for an endless stream.

    Yields:
      A batch in the structure given: one array, or a tuple of arrays.
    """
    if isinstance(dataset_arrays, Dataset):
        dataset_arrays = (dataset_arrays.images, dataset_arrays.labels)
    single = isinstance(dataset_arrays, np.ndarray) or hasattr(dataset_arrays, "shape")
    arrays = [np.asarray(dataset_arrays)] if single else [np.asarray(a) for a in dataset_arrays]
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"arrays differ in length: {[len(a) for a in arrays]}")
    if not 1 <= batch_size <= n:
        raise ValueError(
            f"batch_size must be in [1, {n}] (the number of examples), got {batch_size}"
        )
    if epochs is not None and epochs < 0:
        raise ValueError(f"epochs must be >= 0 or None, got {epochs}")

    rng = _rng(key_or_seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield arrays[0][idx] if single else tuple(a[idx] for a in arrays)
        epoch += 1
