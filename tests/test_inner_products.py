"""Inner products over long leaves are accurate in float32 on every supported JAX.

On XLA:CPU, long dot products accumulate in one running float32 sum (``jnp.vdot`` in JAX 0.9,
matrix-vector ``jnp.einsum`` in JAX 0.9 and 0.10): on two correlated random 4096 x 4096 leaves
``jnp.vdot`` loses 2.6% of the inner product in JAX 0.9, the quadratic model's gradient term
below lost 6e-4 in both versions, and on a 4096-wide layer the adaptive step's
``<grad, Delta>`` came out a fifth low in JAX 0.9, so it warned that the gradient was not that
of its loss. kfax's inner products (``<grad, Delta>``, the norm
constraint, the quadratic model's terms) are reductions instead; this file runs on the oldest
supported JAX too (``make test-oldjax``). The references are float64 sums of the same float32
numbers, so the only error measured is the accumulation's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import kfax
from kfax import _quadratic_model, _trees

# float32 products summed well: relative error a few 1e-8 here; one running sum: 1e-2.
TOLERANCE = 1e-5


def _correlated(shape, seed=0):
    """Two float32 arrays whose products are mostly positive (as ``grad`` and ``Delta``)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(np.float32)
    b = (0.5 * a + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return a, b


def _relative_error(value, exact):
    return float(np.max(np.abs(np.asarray(value, np.float64) - exact)) / np.max(np.abs(exact)))


def test_the_inner_product_of_two_16m_entry_leaves_is_accurate_in_float32():
    a, b = _correlated((4096, 4096))
    exact = np.sum(a.astype(np.float64) * b.astype(np.float64))
    small_a, small_b = _correlated((3,), seed=1)
    trees = ({"w": a, "v": small_a}, {"w": b, "v": small_b})
    exact += np.sum(small_a.astype(np.float64) * small_b.astype(np.float64))
    value = jax.jit(_trees.vdot)(*jax.tree.map(jnp.asarray, trees))
    assert value.dtype == jnp.float32
    assert _relative_error(value, exact) < TOLERANCE


def test_the_gram_matrix_of_two_stacked_16m_entry_leaves_is_accurate_in_float32():
    """The quadratic model's ``<t_i, t_j>`` of its two tangents (direction, previous update)."""
    a, b = _correlated((4096, 4096), seed=4)
    stacked = {"w": jnp.asarray(np.stack([a, b]))}
    rows = np.stack([a, b]).reshape(2, -1).astype(np.float64)
    value = jax.jit(_trees.gram)(stacked)
    assert value.shape == (2, 2) and value.dtype == jnp.float32
    assert _relative_error(value, rows @ rows.T) < TOLERANCE


def test_the_quadratic_models_terms_on_16m_outputs_are_accurate_in_float32():
    """``b_k = <J t_k, grad_f L>`` and ``M_ij = <J t_i, H J t_j>`` for the squared error
    (``H = I / n``) of a model whose outputs have 2^24 entries (``f(p, x) = p * x``)."""
    n, d = 256, 65536
    x, y = _correlated((n, d), seed=2)
    params = {"scale": jnp.ones(d, jnp.float32)}
    rng = np.random.default_rng(3)
    tangents = {"scale": jnp.asarray(1.0 + 0.1 * rng.standard_normal((2, d)), jnp.float32)}
    loss = kfax.losses.SquaredError()

    def apply_fn(p, inputs):
        return inputs * p["scale"]

    # Arguments, not constants captured by the jitted function (XLA would fold 64 MB constants).
    b, m, *_ = jax.jit(
        lambda t, x, y: _quadratic_model.quadratic_terms(
            apply_fn, loss, params, x, y, None, t, jnp.float32(0), None
        )
    )(tangents, jnp.asarray(x), jnp.asarray(y))
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    jvps = (np.asarray(tangents["scale"], np.float64)[:, None, :] * x64).reshape(2, -1)  # J t_k
    gradient = (x64 - y64).reshape(-1) / n  # grad_f of the mean over examples of |f - y|^2 / 2
    exact_b = jvps @ gradient
    exact_m = jvps @ jvps.T / n
    assert _relative_error(b, exact_b) < TOLERANCE
    assert _relative_error(m, exact_m) < TOLERANCE
