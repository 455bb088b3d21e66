"""Embeddings (kind "embedding", block "embedding"): found from gathers, exact where K-FAC is.

References are built here from ``kfax.exact`` (per-example Jacobians) or by hand from the ids
and ``jax.vjp`` cotangents, never from kfax's own statistics.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kfax
from kfax import exact
from tests import models

LOSS = kfax.losses.SquaredError(0.5)


class LinenEmbed(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Dense(2)(nn.Embed(7, 3)(ids))


class NNXEmbed(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(7, 3, rngs=rngs)
        self.out = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, ids):
        return self.out(self.embed(ids))


def _kinds(apply_fn, params, ids):
    return [(layer.name, layer.kind, layer.d_in, layer.d_out) for layer in
            kfax.find_layers(apply_fn, params, ids).layers]  # fmt: skip


def test_gathers_from_a_table_are_embeddings_and_a_one_hot_product_is_a_dense_layer():
    table = {"E": jnp.ones((7, 3))}
    ids = jnp.zeros((4, 5), jnp.int32)
    for gather in (lambda p, i: p["E"][i], lambda p, i: jnp.take(p["E"], i, axis=0)):
        assert _kinds(gather, table, ids) == [("E", "embedding", 7, 3)]
    one_hot = _kinds(lambda p, i: jax.nn.one_hot(i, 7) @ p["E"], table, ids)
    assert one_hot == [("E", "dense", 7, 3)]
    model = LinenEmbed()
    params = model.init(jax.random.key(0), ids)["params"]
    found = _kinds(lambda p, i: model.apply({"params": p}, i), params, ids)
    assert found == [("Embed_0", "embedding", 7, 3), ("Dense_0", "dense", 3, 2)]
    graphdef, state = nnx.split(NNXEmbed(nnx.Rngs(0)))
    found = _kinds(lambda s, i: nnx.merge(graphdef, s)(i), state, ids)
    assert found == [("embed", "embedding", 7, 3), ("out", "dense", 3, 2)]
    # Indices that do not depend on the inputs (a positional table read by position) are not
    # an embedding: its rows are shared by every example.
    constant = _kinds(lambda p, i: p["E"][jnp.arange(5)] + 0.0 * i[..., None], table, ids)
    assert constant == [("E", "parameter", 1, 21)]


@pytest.mark.parametrize("positions", [None, 4], ids=["one-token", "four-positions"])
def test_embedding_block_equals_the_exact_block_where_kfac_is_exact_for_embeddings(x64, positions):
    """A linear read-out with a Gaussian output: every example's ``g g^T`` is the same, so
    ``diag(a) (x) B`` is the exact Gauss-Newton block, one token per example or several
    positions with independent outputs (K-FAC-expand), at damping 0."""
    params, apply_fn, ids = models.embedding_readout(positions=positions)
    block, dense, _ = models.observed_block(apply_fn, LOSS, params, ids, "E")
    reference = exact.layer_block(apply_fn, LOSS, params, ids, "E", kind="exact")
    assert block.name == "embedding"
    np.testing.assert_allclose(dense, reference, atol=1e-12)


def test_embedding_block_is_diag_frequencies_kron_output_factor_and_inverts_it(x64):
    """The documented matrix ``diag(a) (x) B + lam I`` (``a``: the ids' frequencies among the
    rows that count, ``B = 1/N sum_n sum_r g g^T``), written from the ids and the cotangents
    of the gathered rows; ``precondition`` applies its inverse. Masked positions (``where``)
    count nowhere."""
    k = jax.random.split(jax.random.key(1), 3)
    params = {"E": jax.random.normal(k[0], (6, 3)), "W": jax.random.normal(k[1], (3, 4))}
    ids = jax.random.randint(k[2], (5, 3), 0, 6)
    where = jnp.ones((5, 3)).at[0, 1].set(0.0).at[3, 2].set(0.0)

    def apply_fn(p, i):
        return jnp.tanh(p["E"][i]) @ p["W"]

    loss = kfax.losses.SoftmaxCrossEntropy()
    lam = 0.3
    block, dense, (stats, curvature) = models.observed_block(
        apply_fn, loss, params, ids, "E", damping=lam, where=where
    )
    counted = where.reshape(-1)
    a = jnp.zeros(6).at[ids.reshape(-1)].add(counted) / counted.sum()
    rows, vjp = jax.vjp(lambda e: jnp.tanh(e) @ params["W"], params["E"][ids])
    columns = loss.curvature_sqrt(rows, where)
    g = jax.vmap(lambda u: vjp(u)[0])(columns).reshape(-1, 3)
    b = g.T @ g / 5
    expected = jnp.kron(jnp.diag(a), b) + lam * jnp.eye(18)
    np.testing.assert_allclose(dense, expected, atol=1e-12)
    grad = kfax.blocks.LayerGradient(jax.random.normal(k[0], (6, 3)), None)
    out = block.precondition(stats, curvature, grad, lam)
    np.testing.assert_allclose(
        out.weight.reshape(-1), jnp.linalg.solve(expected, grad.weight.reshape(-1)), atol=1e-12
    )


def test_a_large_vocabulary_never_makes_a_vocab_by_vocab_matrix():
    params = {"E": jax.ShapeDtypeStruct((50_000, 8), jnp.float32)}
    ids = jax.ShapeDtypeStruct((2, 3), jnp.int32)
    tx = kfax.scale_by_kfac(lambda p, i: p["E"][i], LOSS, example_inputs=ids)
    state = jax.eval_shape(tx.init, params)
    sizes = [leaf.size for leaf in jax.tree.leaves((state.statistics, state.curvature))]
    assert max(sizes) == 50_000
