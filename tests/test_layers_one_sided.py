"""Very large layers: a Kronecker factor wider than ``max_factor_size`` becomes diagonal.

The one-sided block keeps the narrow side's factor dense and the wide side's diagonal, is
chosen automatically whatever Kronecker block was asked for, and inverts the documented matrix
``A (x) B + lam I`` with the wide factor replaced by its diagonal (centred K-FAC's algebra
unchanged). Memory is linear in the wide side.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfax
from tests import models

LOSS = kfax.losses.SoftmaxCrossEntropy()


@pytest.mark.parametrize("centering", ["exact", "none"])
@pytest.mark.parametrize("wide", ["input", "output", "both"])
def test_a_wide_side_is_diagonal_and_the_block_inverts_its_documented_matrix(x64, wide, centering):
    sizes, limit = {"input": ((6, 4), 5), "output": ((3, 6), 5), "both": ((6, 5), 4)}[wide]
    d_in, d_out = sizes
    params, apply_fn, x, _ = models.mlp(sizes=sizes, batch=9)
    lam = 0.2
    block, dense, (stats, curvature) = models.observed_block(
        apply_fn, LOSS, params, x, "dense_0", block="factored", damping=lam,
        centering=centering, max_factor_size=limit,
    )  # fmt: skip
    assert block.name == "one_sided" and block.requested == "factored"
    assert (block.diagonal_input, block.diagonal_output) == (wide != "output", wide != "input")
    # The reference: the eigen block's matrix with the wide factors replaced by diagonals.
    eigen, _, (eigen_stats, _) = models.observed_block(
        apply_fn, LOSS, params, x, "dense_0", block="eigen", damping=lam, centering=centering
    )
    a = eigen.input_factor(eigen_stats)
    b = eigen_stats.output
    a = jnp.diag(jnp.diag(a)) if block.diagonal_input else a
    b = jnp.diag(jnp.diag(b)) if block.diagonal_output else b
    core = jnp.kron(a, b) + lam * jnp.eye(a.shape[0] * d_out)
    if centering == "none":
        expected = core
    else:
        lower = jnp.eye(d_in + 1).at[:d_in, d_in].set(eigen_stats.mean)
        full = jax.scipy.linalg.block_diag(core, b + lam * jnp.eye(d_out))
        transform = jnp.kron(lower, jnp.eye(d_out))
        expected = transform @ full @ transform.T
    np.testing.assert_allclose(dense, expected, rtol=1e-10, atol=1e-12)
    grad = kfax.blocks.LayerGradient(
        jax.random.normal(jax.random.key(1), sizes), jax.random.normal(jax.random.key(2), (d_out,))
    )
    out = block.precondition(stats, curvature, grad, lam)
    np.testing.assert_allclose(
        jnp.r_[out.weight.reshape(-1), out.bias],
        jnp.linalg.solve(dense, jnp.r_[grad.weight.reshape(-1), grad.bias]),
        rtol=1e-9,
    )


def test_a_50k_word_output_projection_keeps_memory_linear_in_the_vocabulary():
    params = {"head": jax.ShapeDtypeStruct((64, 50_000), jnp.float32)}
    x = jax.ShapeDtypeStruct((2, 64), jnp.float32)
    apply_fn = lambda p, z: z @ p["head"]  # noqa: E731
    tx = kfax.scale_by_kfac(apply_fn, LOSS, example_inputs=x)
    state = jax.eval_shape(tx.init, params)
    sizes = [leaf.size for leaf in jax.tree.leaves((state.statistics, state.curvature))]
    assert max(sizes) == 50_000  # the diagonal of B; A is 64^2
    row = kfax.describe(apply_fn, params, x).splitlines()[2].split()
    assert row[6:] == ["one_sided", "64^2", "50000(diag)"]
    lifted = kfax.describe(apply_fn, params, x, max_factor_size=60_000).splitlines()[2].split()
    assert lifted[6:] == ["factored", "64^2", "50000^2"]
