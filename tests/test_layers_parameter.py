"""Tied and reused weights and unknown primitives: kind "parameter", block "diagonal".

A parameter used by several operations (a tied embedding and output projection, a block applied
twice) or by a primitive kfax does not know gets its own diagonal block, stated in ``describe``
(with a warning naming the primitive and the parameter for an unknown use), never a crash and
never one use's block. Its statistic ``scale * sum_c (sum_n eps_n v_cn)^2`` is unbiased for the
diagonal of the curvature; over all sign patterns it is that diagonal exactly.
"""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfax
from kfax import _capture, exact, statistics
from tests import models


def tied(key=0, vocab=5, width=3, batch=3, positions=2):
    k = jax.random.split(jax.random.key(key), 3)
    params = {
        "E": jax.random.normal(k[0], (vocab, width)),
        "W": jax.random.normal(k[1], (width, width)),
    }
    ids = jax.random.randint(k[2], (batch, positions), 0, vocab)

    def apply_fn(p, i):
        return jnp.tanh(p["E"][i] @ p["W"]) @ p["E"].T

    return params, apply_fn, ids


def test_a_tied_embedding_gets_the_diagonal_block_stated_in_describe_without_a_warning():
    params, apply_fn, ids = tied()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = kfax.describe(apply_fn, params, ids)
        kfax.scale_by_kfac(apply_fn, kfax.losses.SoftmaxCrossEntropy(), example_inputs=ids).init(
            params
        )
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:4]}
    assert rows["E"][1] == "parameter" and rows["E"][6:] == ["diagonal", "-", "15(diag)"]
    assert "  E: used by an embedding gather and a dense operation (shared: tied or reused)" in (
        table.splitlines()
    )


def test_an_unknown_primitive_falls_back_to_the_diagonal_block_with_a_warning_and_trains():
    """``jnp.cumsum`` of a weight is no layer operation kfax knows: a warning names it and the
    parameter, the parameter gets the diagonal block, and optimisation proceeds."""
    params, apply_fn, x, _ = models.mlp(sizes=(4, 5, 3))

    def odd(p, z):
        kernel = jnp.cumsum(p["dense_0"]["kernel"], axis=0)
        return apply_fn({**p, "dense_0": {**p["dense_0"], "kernel": kernel}}, z)

    loss = kfax.losses.SoftmaxCrossEntropy()
    y = jnp.arange(6) % 3
    tx = kfax.kfac(0.1, odd, loss, example_inputs=x)
    with pytest.warns(UserWarning, match=r"'dense_0/kernel' is used by cumsum"):
        state = tx.init(params)
    p = params
    for _ in range(3):
        grads = jax.grad(lambda q: loss(odd(q, x), y))(p)
        updates, state = tx.update(grads, state, p, inputs=x, targets=y)
        p = optax.apply_updates(p, updates)
    assert float(loss(odd(p, x), y)) < float(loss(odd(params, x), y))
    report = kfax.find_layers(odd, params, x)
    kinds = {layer.weight_path: layer.kind for layer in report.layers}
    assert kinds["dense_0/kernel"] == "parameter" and report.unmatched == ()


def test_the_signed_column_gradient_squared_averages_to_the_exact_diagonal_over_all_signs(
    x64, monkeypatch
):
    """For ``kind="exact"`` the statistic over every pattern of example signs averages to
    ``diag(1/N sum_n J_n^T D_n J_n)``, the exact Gauss-Newton diagonal of the tied weight."""
    params, apply_fn, ids = tied(batch=2)
    loss = kfax.losses.SoftmaxCrossEntropy()
    patterns = list(itertools.product((-1.0, 1.0), repeat=2))
    diagonals = []
    for pattern in patterns:
        signs = jnp.asarray(pattern)
        monkeypatch.setattr(
            _capture, "example_signs", lambda o, c, s=signs: s.reshape((-1,) + (1,) * (c.ndim - 1))
        )
        _, dense, _ = models.observed_block(apply_fn, loss, params, ids, "E")
        diagonals.append(jnp.diag(dense))
    full = exact.curvature_matrix(apply_fn, loss, params, ids, kind="exact")
    reference = jnp.diag(full)[: params["E"].size]  # E comes first in the flat parameters
    np.testing.assert_allclose(jnp.mean(jnp.stack(diagonals), axis=0), reference, atol=1e-12)
    assert float(jnp.max(jnp.abs(diagonals[0] - reference))) > 1e-3  # one pattern is not


def test_with_sampled_targets_the_statistic_is_the_squared_gradient_of_the_sampled_loss(x64):
    """``kind="mc"``: ``(sum_n eps_n grad l_n(y~_n))^2 / N`` with the targets kfax samples,
    written with ``jax.grad`` of each example's loss."""
    params, apply_fn, ids = tied(batch=4)
    loss = kfax.losses.SoftmaxCrossEntropy()
    key = jax.random.key(7)
    _, dense, _ = models.observed_block(apply_fn, loss, params, ids, "E", kind="mc", key=key)
    outputs = apply_fn(params, ids)
    (sample_key,) = jax.random.split(key, 1)
    y = loss.sample(sample_key, outputs)
    # the statistics pass gives each cotangent column a signs key split from its key
    (signs_key,) = jax.random.split(jax.random.fold_in(key, statistics._SIGNS_STREAM), 1)
    signs = _capture.example_signs(signs_key, loss.sampled_cotangent(sample_key, outputs, None))
    per_example = jax.vmap(
        lambda i, t: jax.grad(lambda p: loss(apply_fn(p, i[None]), t[None]))(params)["E"]
    )(ids, y)
    expected = jnp.square(jnp.einsum("n,nij->ij", signs.reshape(-1), per_example)) / 4
    np.testing.assert_allclose(jnp.diag(dense), expected.reshape(-1), atol=1e-12)
