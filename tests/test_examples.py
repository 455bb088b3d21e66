"""Tests for the shared example data loader and model builders (examples/)."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import data, models

MNIST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
HAS_MNIST = (data.default_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file()
needs_mnist = pytest.mark.skipif(not HAS_MNIST, reason="MNIST not found at ../shared/data/mnist")
needs_sklearn = pytest.mark.skipif(not HAS_SKLEARN, reason="scikit-learn not installed")


# ---------------------------------------------------------------- load_mnist


@needs_mnist
def test_mnist_shapes_range_and_class_counts_match_the_readme():
    ds = data.load_mnist()
    assert ds.name == "mnist" and ds.side == 28
    assert ds.images.shape == (10000, 784) and ds.images.dtype == np.float32
    assert ds.labels.shape == (10000,) and ds.labels.dtype == np.int32
    assert ds.images.min() == 0.0 and ds.images.max() == 1.0
    assert np.bincount(ds.labels, minlength=10).tolist() == MNIST_CLASS_COUNTS


@needs_mnist
def test_mnist_unflattened_is_nhwc_with_the_same_pixels():
    flat = data.load_mnist()
    ds = data.load_mnist(flatten=False)
    assert ds.images.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(ds.images.reshape(10000, -1), flat.images)


@needs_sklearn
def test_missing_mnist_falls_back_to_digits_with_a_warning(tmp_path):
    missing = tmp_path / "no-mnist-here"
    with pytest.warns(data.MnistNotFoundWarning, match="no-mnist-here"):
        ds = data.load_mnist(missing)
    assert ds.name == "digits" and ds.side == 8
    assert ds.images.shape == (1797, 64) and ds.images.dtype == np.float32
    assert ds.labels.shape == (1797,) and ds.labels.dtype == np.int32
    assert 0.0 <= ds.images.min() and ds.images.max() == 1.0
    with pytest.warns(data.MnistNotFoundWarning):
        assert data.load_mnist(missing, flatten=False).images.shape == (1797, 8, 8, 1)


def test_env_var_sets_the_default_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("KFAX_MNIST_DIR", str(tmp_path))
    assert data.default_mnist_dir() == tmp_path


def test_missing_mnist_without_sklearn_says_what_to_install(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "sklearn" else real_find_spec(n, *a)
    )
    with pytest.raises(FileNotFoundError, match="pip install scikit-learn"):
        data.load_mnist(tmp_path)


def _write_idx(path: Path, magic: int, dims: tuple[int, ...], payload: bytes) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + payload)


def test_small_idx_files_are_read_and_scaled(tmp_path):
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8) * 15
    _write_idx(tmp_path / data._IMAGES_FILE, 2051, (2, 3, 3), pixels.tobytes())
    _write_idx(tmp_path / data._LABELS_FILE, 2049, (2,), bytes([7, 1]))
    ds = data.load_mnist(tmp_path)
    assert ds.name == "mnist" and ds.side == 3
    np.testing.assert_allclose(ds.images, pixels.reshape(2, 9) / 255.0, rtol=1e-6)
    assert ds.labels.tolist() == [7, 1]


def test_wrong_magic_number_is_a_clear_error(tmp_path):
    _write_idx(tmp_path / data._IMAGES_FILE, 2049, (1, 2, 2), bytes(4))
    _write_idx(tmp_path / data._LABELS_FILE, 2049, (1,), bytes(1))
    with pytest.raises(ValueError, match="magic number 2049"):
        data.load_mnist(tmp_path)


def test_truncated_file_is_a_clear_error(tmp_path):
    _write_idx(tmp_path / data._IMAGES_FILE, 2051, (2, 2, 2), bytes(5))
    _write_idx(tmp_path / data._LABELS_FILE, 2049, (2,), bytes(2))
    with pytest.raises(ValueError, match="damaged"):
        data.load_mnist(tmp_path)


def test_image_and_label_counts_must_agree(tmp_path):
    _write_idx(tmp_path / data._IMAGES_FILE, 2051, (2, 1, 1), bytes(2))
    _write_idx(tmp_path / data._LABELS_FILE, 2049, (3,), bytes(3))
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        data.load_mnist(tmp_path)


# ---------------------------------------------------------------- batches


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_batches_are_deterministic_for_a_seed_and_differ_across_seeds():
    x, y = np.arange(50.0).reshape(25, 2), np.arange(25)
    first = _take(data.batches((x, y), 4, key_or_seed=3), 10)
    again = _take(data.batches((x, y), 4, key_or_seed=3), 10)
    other = _take(data.batches((x, y), 4, key_or_seed=4), 10)
    for (a, b), (c, d) in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    assert any(not np.array_equal(a[1], c[1]) for a, c in zip(first, other, strict=True))
    for bx, by in first:  # Rows stay paired with their labels.
        np.testing.assert_array_equal(bx[:, 0], 2.0 * by)


def test_batches_drop_the_remainder_and_cover_each_epoch_once():
    x = np.arange(10)
    out = list(data.batches(x, 3, key_or_seed=0, epochs=2))
    assert len(out) == 6 and all(b.shape == (3,) for b in out)
    for epoch in (out[:3], out[3:]):
        seen = np.concatenate(epoch)
        assert len(np.unique(seen)) == 9
    assert not np.array_equal(np.concatenate(out[:3]), np.concatenate(out[3:]))


def test_batches_accept_jax_keys_and_datasets():
    ds = data.Dataset(np.zeros((8, 4), np.float32), np.arange(8, dtype=np.int32), "toy", 2)
    for key in (jax.random.key(1), jax.random.PRNGKey(1)):
        a = [b[1] for b in data.batches(ds, 4, key_or_seed=key, epochs=1)]
        b = [b[1] for b in data.batches(ds, 4, key_or_seed=key, epochs=1)]
        assert len(a) == 2
        np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))


def test_batches_reject_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(np.zeros(4), 5, key_or_seed=0))
    with pytest.raises(ValueError, match="differ in length"):
        next(data.batches((np.zeros(4), np.zeros(3)), 2, key_or_seed=0))


# ---------------------------------------------------------------- models


def _check(params, apply_fn, inputs, out_shape):
    """apply_fn runs under jit and gives finite float32 outputs of the expected shape."""
    out = jax.jit(apply_fn)(params, inputs)
    assert out.shape == out_shape and out.dtype == jnp.float32
    assert np.isfinite(out).all()


def test_autoencoder_layers_shapes_and_jit():
    params, apply_fn = models.autoencoder(jax.random.key(0))
    sizes = models.MNIST_AUTOENCODER_SIZES
    assert sorted(params) == [f"dense_{i}" for i in range(8)]
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        assert params[f"dense_{i}"]["kernel"].shape == (d_in, d_out)
        assert params[f"dense_{i}"]["bias"].shape == (d_out,)
    _check(params, apply_fn, jnp.ones((5, 784)), (5, 784))


def test_autoencoder_code_and_output_layers_are_linear():
    # Four layers 6-5-2-5-6: tanh after dense_0 and dense_2 only (dense_1 is the code).
    params, apply_fn = models.autoencoder(jax.random.key(0), (6, 5, 2, 5, 6))
    jaxpr = jax.make_jaxpr(apply_fn)(params, jnp.ones((3, 6)))
    assert [e.primitive.name for e in jaxpr.eqns].count("tanh") == 2


def test_autoencoder_follows_the_input_width_of_sizes():
    params, apply_fn = models.autoencoder(jax.random.key(1), (64, 32, 8, 32, 64), jax.nn.relu)
    _check(params, apply_fn, jnp.ones((2, 64)), (2, 64))


def test_deep_linear_is_a_product_of_kernels():
    params, apply_fn = models.deep_linear(jax.random.key(0), width=4, depth=3)
    assert all(set(layer) == {"kernel"} for layer in params.values())
    x = jax.random.normal(jax.random.key(1), (5, 4))
    product = (
        params["dense_0"]["kernel"] @ params["dense_1"]["kernel"] @ params["dense_2"]["kernel"]
    )
    np.testing.assert_allclose(apply_fn(params, x), x @ product, rtol=1e-5, atol=1e-5)
    params_b, apply_b = models.deep_linear(jax.random.key(0), width=4, depth=2, bias=True)
    assert params_b["dense_1"]["bias"].shape == (4,)
    _check(params_b, apply_b, x, (5, 4))


def test_mlp_classifier_shapes_and_jit():
    params, apply_fn = models.mlp_classifier(jax.random.key(0), 64, hidden=(16, 8), classes=10)
    assert params["Dense_0"]["kernel"].shape == (64, 16)
    assert params["Dense_2"]["kernel"].shape == (8, 10)
    _check(params, apply_fn, jnp.ones((3, 64)), (3, 10))


@pytest.mark.parametrize("side", [28, 8])
def test_cnn_shapes_and_jit_for_nhwc_and_flat_inputs(side):
    params, apply_fn = models.cnn(jax.random.key(0), side=side, channels=(4, 6))
    assert params["Conv_0"]["kernel"].shape == (3, 3, 1, 4)
    assert params["Conv_1"]["kernel"].shape == (3, 3, 4, 6)
    x = jax.random.uniform(jax.random.key(1), (2, side, side, 1))
    _check(params, apply_fn, x, (2, 10))
    jitted = jax.jit(apply_fn)
    np.testing.assert_allclose(jitted(params, x.reshape(2, -1)), jitted(params, x), rtol=1e-6)


def test_nnx_mlp_split_apply_matches_the_module():
    params, apply_fn = models.nnx_mlp(0, input_dim=12, hidden=(8,), classes=3)
    shapes = [leaf.shape for leaf in jax.tree.leaves(params)]
    assert sorted(shapes) == sorted([(12, 8), (8,), (8, 3), (3,)])
    x = jax.random.normal(jax.random.key(2), (4, 12))
    _check(params, apply_fn, x, (4, 3))
    module = models.NNXMLP(12, (8,), 3, rngs=models.nnx.Rngs(0))
    np.testing.assert_allclose(apply_fn(params, x), module(x), rtol=1e-6)
    # apply_fn is a pure function of params: gradients flow to every parameter.
    grads = jax.grad(lambda p: apply_fn(p, x).sum())(params)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


@needs_sklearn
def test_digits_fallback_feeds_every_model(tmp_path):
    with pytest.warns(data.MnistNotFoundWarning):
        ds = data.load_mnist(tmp_path)
    x = jnp.asarray(ds.images[:4])
    key = jax.random.key(0)
    _check(*models.autoencoder(key, (64, 32, 8, 32, 64)), x, (4, 64))
    _check(*models.mlp_classifier(key, 64), x, (4, 10))
    _check(*models.cnn(key, side=ds.side), x, (4, 10))
    _check(*models.nnx_mlp(0, 64, (16,), 10), x, (4, 10))
