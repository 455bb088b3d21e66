"""Transformers without model edits: the example's character-level language model and small
models from Flax nnx, Equinox and Haiku.

``describe`` must give every parameter a block (no parameter without a stated reason); every
framework's layers must be found, their captured rows reproduce the gradients, and their norm
blocks equal the exact per-feature blocks; the language model must train with ``kfac(None)``
and ``kfac(lr)``, padded batches included.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kfax
from kfax import _capture, exact
from tests import models

LOSS = kfax.losses.SoftmaxCrossEntropy()


def test_describe_gives_every_parameter_of_the_language_model_a_block():
    params, apply_fn, tokens = models.transformer_lm()
    table = kfax.describe(apply_fn, params, tokens)
    lines = table.splitlines()
    blocks = {line.split()[0]: (line.split()[1], line.split()[6]) for line in lines[2:-2]}
    assert blocks["Embed_0"] == ("embedding", "embedding")
    assert blocks["positions"] == ("scale_shift", "scale_shift")
    assert blocks["Block_0/LayerNorm_0"] == ("scale_shift", "scale_shift")
    assert blocks["Block_1/MultiHeadDotProductAttention_0/query"] == ("dense", "factored")
    assert blocks["Dense_0"] == ("dense", "factored")
    assert lines[-1] == "Every parameter belongs to a layer."
    covered = {p for layer in kfax.find_layers(apply_fn, params, tokens).layers
               for p in (layer.weight_path, layer.bias_path) if p}  # fmt: skip
    paths = {"/".join(str(k.key) for k in path) for path, _ in
             jax.tree_util.tree_flatten_with_path(params)[0]}  # fmt: skip
    assert covered == paths


def test_a_tied_language_model_states_the_tied_embedding():
    params, apply_fn, tokens = models.transformer_lm(tied=True)
    table = kfax.describe(apply_fn, params, tokens)
    assert "  Embed_0/embedding: used by an embedding gather and a dense operation" in table
    assert "Every parameter belongs to a layer." in table


def _train(apply_fn, params, tx, batches, loss=LOSS, where=None):
    @jax.jit
    def step(p, state, x, y):
        value, grads = jax.value_and_grad(lambda q: loss(apply_fn(q, x), y, where))(p)
        updates, state = tx.update(grads, state, p, inputs=x, targets=y, where=where)
        return optax.apply_updates(p, updates), state, value

    p, state, values = params, tx.init(params), []
    for x, y in batches:
        p, state, value = step(p, state, x, y)
        values.append(float(value))
    return np.asarray(values)


@pytest.fixture(scope="module")
def language_data():
    from examples import transformer  # noqa: PLC0415

    params, apply_fn, _ = transformer.language_model(
        jax.random.key(0), width=32, context=32, heads=2
    )
    stream = transformer.batches(transformer.stdlib_bytes(200_000), 8, 32, seed=1)
    return params, apply_fn, [next(stream) for _ in range(30)]


def test_the_language_model_trains_with_kfac_and_a_learning_rate(language_data):
    """2 blocks, width 32, context 32, bytes: 30 steps of ``kfac(0.3)`` take the loss per byte
    from about ln 256 = 5.5 below 3.5 (a unigram byte model of Python source is about 3.4)."""
    params, apply_fn, batches = language_data
    tx = kfax.kfac(0.3, apply_fn, LOSS, example_inputs=batches[0][0])
    per_byte = _train(apply_fn, params, tx, batches) / 32
    assert per_byte[0] > 5.0 and per_byte[-5:].mean() < 3.5, per_byte


def test_padded_batches_train_with_the_adaptive_step_ignore_index_and_where(language_data):
    """``kfac(None)`` with a quarter of every sequence padding: labels ``-100`` (ignored by the
    loss) and ``where`` zero there. The padding counts nowhere, and the model trains."""
    params, apply_fn, batches = language_data
    loss = kfax.losses.SoftmaxCrossEntropy(ignore_index=-100)
    where = jnp.ones((8, 32)).at[:, 24:].set(0.0)
    padded = [(x, np.where(np.arange(32) < 24, y, -100)) for x, y in batches]
    tx = kfax.kfac(None, apply_fn, loss, example_inputs=padded[0][0])
    per_byte = _train(apply_fn, params, tx, padded, loss, where) / 24
    assert per_byte[0] > 5.0 and per_byte[-5:].mean() < 3.5, per_byte


# --------------------------------------------------------------------------------------------
# Other frameworks: layers found, captured rows reproduce the gradients, norms exact.


class NNXLM(nnx.Module):
    def __init__(self, rngs):
        f64 = {"dtype": jnp.float64, "param_dtype": jnp.float64}  # built under the x64 fixture
        self.embed = nnx.Embed(11, 8, rngs=rngs, **f64)
        self.norm = nnx.LayerNorm(8, rngs=rngs, **f64)
        self.attention = nnx.MultiHeadAttention(2, 8, decode=False, rngs=rngs, **f64)
        self.out = nnx.Linear(8, 11, rngs=rngs, **f64)

    def __call__(self, ids):
        x = self.embed(ids)
        h = self.norm(x)
        return self.out(x + self.attention(h))


def nnx_lm():
    graphdef, state = nnx.split(NNXLM(nnx.Rngs(0)))
    return state, lambda s, i: nnx.merge(graphdef, s)(i)


def equinox_lm():
    eqx = pytest.importorskip("equinox")

    class LM(eqx.Module):
        embed: eqx.nn.Embedding
        norm: eqx.nn.LayerNorm
        attention: eqx.nn.MultiheadAttention
        out: eqx.nn.Linear

        def __init__(self, key):
            k = jax.random.split(key, 3)
            self.embed = eqx.nn.Embedding(11, 8, key=k[0])
            self.norm = eqx.nn.LayerNorm(8)
            self.attention = eqx.nn.MultiheadAttention(2, 8, key=k[1])
            self.out = eqx.nn.Linear(8, 11, key=k[2])

        def __call__(self, ids):  # one example
            x = jax.vmap(self.embed)(ids)
            h = jax.vmap(self.norm)(x)
            return jax.vmap(self.out)(x + self.attention(h, h, h))

    params, static = eqx.partition(LM(jax.random.key(0)), eqx.is_inexact_array)
    return params, lambda p, i: jax.vmap(eqx.combine(p, static))(i)


def haiku_lm():
    hk = pytest.importorskip("haiku")

    def forward(ids):
        x = hk.Embed(11, 8)(ids)
        h = hk.LayerNorm(-1, True, True)(x)
        attention = hk.MultiHeadAttention(2, 4, w_init=hk.initializers.VarianceScaling(1.0))
        return hk.Linear(11)(x + attention(h, h, h))

    model = hk.without_apply_rng(hk.transform(forward))
    return model.init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32)), model.apply


@pytest.mark.parametrize("build", [nnx_lm, equinox_lm, haiku_lm], ids=["nnx", "equinox", "haiku"])
def test_framework_language_models_are_found_and_their_blocks_match_references(x64, build):
    params, apply_fn = build()
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    ids = jax.random.randint(jax.random.key(1), (3, 5), 0, 11)
    report = kfax.find_layers(apply_fn, params, ids)
    kinds = sorted(layer.kind for layer in report.layers)
    assert kinds == ["dense"] * 5 + ["embedding", "scale_shift"] and report.unmatched == ()
    tapped = _capture.capture(apply_fn, params, ids)
    targets = jnp.arange(15).reshape(3, 5) % 11
    grads, cotangents = tapped.pullback(LOSS.output_gradient(tapped.outputs, targets))
    expected = jax.tree.leaves(jax.grad(lambda p: 3 * LOSS(apply_fn(p, ids), targets))(params))
    for site in tapped.layers:
        if site.kind in ("dense", "embedding"):
            g = site.geometry.output_rows(cotangents[site.name])
        if site.kind == "dense":
            h = site.geometry.input_rows(tapped.layer_inputs[site.name])
            weight = site.geometry.weight_matrix(expected[site.weight_leaf])
            np.testing.assert_allclose(h.T @ g, weight, atol=1e-12)
        elif site.kind == "embedding":
            rows = site.geometry.input_rows(tapped.layer_inputs[site.name])
            scattered = jnp.zeros((11, 8)).at[rows].add(g)
            np.testing.assert_allclose(scattered, expected[site.weight_leaf], atol=1e-12)
        else:
            square = kfax.losses.SquaredError()
            _, dense, _ = models.observed_block(apply_fn, square, params, ids, site.name)
            block = exact.layer_block(apply_fn, square, params, ids, site.name, kind="exact")
            # Flax's attention computes its softmax in float32 even for float64 inputs, so in
            # the nnx model the two routes to the norm's block agree to float32 rounding only.
            tolerance = {"rtol": 1e-6} if build is nnx_lm else {"atol": 1e-12}
            np.testing.assert_allclose(
                dense, block * np.kron(np.ones((2, 2)), np.eye(8)), **tolerance
            )
