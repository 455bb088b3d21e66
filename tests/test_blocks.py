"""Curvature blocks (kfax.blocks) against dense float64 references built here.

Every block in ``kfax.blocks.BLOCKS`` is checked to apply the inverse of the damped matrix it
documents (``block.dense``), and that matrix is checked against its closed form: exact Tikhonov
on ``A (x) B`` for the eigen block, the factored form for the factored block, EKFAC's definition
of its scalings from per-example gradients. References are written from the layer's inputs and
the loss's Hessian in this file, not from kfax's capture machinery.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfax
from kfax import _plan, blocks, statistics
from tests import models

BLOCK_NAMES = sorted(blocks.BLOCKS)
CENTERINGS = ("exact", "simple", "none")
VARIANCE = 0.5


def single_layer(bias=True, batch=12, d_in=3, d_out=2, key=0, mean=0.0):
    """One dense layer ``x @ K + b`` whose output is the model output."""
    keys = jax.random.split(jax.random.key(key), 3)
    params = {"dense": {"kernel": jax.random.normal(keys[0], (d_in, d_out))}}
    if bias:
        params["dense"]["bias"] = jax.random.normal(keys[1], (d_out,))
    x = mean + jax.random.normal(keys[2], (batch, d_in))

    def apply_fn(p, z):
        out = z @ p["dense"]["kernel"]
        return out + p["dense"]["bias"] if bias else out

    return params, apply_fn, x


def block_for(apply_fn, params, x, name, centering, layer="dense"):
    plan = _plan.make_plan(
        apply_fn,
        kfax.losses.SquaredError(VARIANCE),
        params,
        x,
        kind="exact",
        samples=1,
        block=name,
        centering=centering,
        others=optax.identity(),
    )
    return plan.blocks[layer]


def observed(block, apply_fn, params, x, damping, loss=None, kind="exact", **kwargs):
    """(statistics, curvature) after one batch (ema_decay 0) and a refresh."""
    loss = loss or kfax.losses.SquaredError(VARIANCE)
    batch = statistics.statistics_pass(apply_fn, loss, params, x, kind=kind, **kwargs)
    stats, curvature = block.init(jnp.float64)
    stats = block.observe(stats, batch.layers[block.site.name], 0.0)
    curvature = block.refresh(stats, damping)
    curvature = block.observe_in_basis(curvature, batch.layers[block.site.name], 0.0)
    return stats, curvature


def kfac_order(grads, bias=True):
    """A layer gradient in K-FAC order: vec of the (d_in, d_out) kernel, then the bias."""
    parts = [grads["kernel"].reshape(-1)]
    if bias:
        parts.append(grads["bias"])
    return jnp.concatenate(parts)


def reference_factors(x, d_out):
    """``A`` pieces from the inputs and ``B = mean_n Hessian = I / variance`` (linear layer,
    squared error: the exact output cotangents are the columns of I / sqrt(variance))."""
    n = x.shape[0]
    mean = x.mean(0)
    covariance = (x - mean).T @ (x - mean) / n
    second = x.T @ x / n
    b = jnp.eye(d_out) / VARIANCE
    return mean, covariance, second, b


def homogeneous(second, mean):
    d = mean.shape[0]
    a = jnp.zeros((d + 1, d + 1))
    return a.at[:d, :d].set(second).at[:d, d].set(mean).at[d, :d].set(mean).at[d, d].set(1.0)


def lower(mean):
    d = mean.shape[0]
    return jnp.eye(d + 1).at[:d, d].set(mean)


# -------------------------------------------------------------------------- every block


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("centering", CENTERINGS)
@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_every_block_applies_the_inverse_of_its_documented_dense_matrix(x64, name, centering, bias):
    params, apply_fn, x = single_layer(bias=bias)
    block = block_for(apply_fn, params, x, name, centering)
    lam = 0.3
    stats, curvature = observed(block, apply_fn, params, x, lam)
    grad = jax.tree.map(lambda p: jax.random.normal(jax.random.key(9), p.shape), params["dense"])
    layer_grad = blocks.LayerGradient(grad["kernel"], grad.get("bias"))
    out = block.precondition(stats, curvature, layer_grad, lam)
    expected = jnp.linalg.solve(block.dense(curvature, lam), kfac_order(grad, bias))
    got = kfac_order({"kernel": out.weight, "bias": out.bias}, bias)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("centering", CENTERINGS)
def test_eigen_block_is_exact_tikhonov_and_centred_damping_is_lam_L_L_transpose(x64, centering):
    """``A (x) B + lam I`` (homogeneous); ``A_hom (x) B + lam (L L^T (x) I)`` with
    ``L = [[I, m], [0, 1]]`` for centred K-FAC (``"exact"``)."""
    params, apply_fn, x = single_layer(batch=9)
    block = block_for(apply_fn, params, x, "eigen", centering)
    lam = 0.2
    _, curvature = observed(block, apply_fn, params, x, lam)
    mean, covariance, second, b = reference_factors(x, 2)
    a_hom = homogeneous(second, mean)
    if centering == "none":
        expected = jnp.kron(a_hom, b) + lam * jnp.eye(8)
    elif centering == "exact":
        expected = jnp.kron(a_hom, b) + lam * jnp.kron(lower(mean) @ lower(mean).T, jnp.eye(2))
    else:  # "simple": (L (x) I) blockdiag(C (x) B + lam, B + lam)
        core = jnp.kron(covariance, b) + lam * jnp.eye(6)
        full = jax.scipy.linalg.block_diag(core, b + lam * jnp.eye(2))
        expected = jnp.kron(lower(mean), jnp.eye(2)) @ full
    np.testing.assert_allclose(block.dense(curvature, lam), expected, atol=1e-12)


@pytest.mark.parametrize("centering", ["exact", "none"])
def test_factored_block_damps_each_factor_by_pi_with_the_bias_coordinate_counted(x64, centering):
    """``(A + pi sqrt(lam) I) (x) (B + sqrt(lam)/pi I)``; for centred K-FAC ``A`` is
    ``L blockdiag(C + pi sqrt(lam) I, 1) L^T`` and ``tr A / d_A = (tr C + 1) / (d_in + 1)``: the
    bias coordinate of ``A`` is not damped."""
    params, apply_fn, x = single_layer(batch=9)
    block = block_for(apply_fn, params, x, "factored", centering)
    lam = 0.2
    _, curvature = observed(block, apply_fn, params, x, lam)
    mean, covariance, second, b = reference_factors(x, 2)
    if centering == "none":
        a = homogeneous(second, mean)
        pi = jnp.sqrt((jnp.trace(a) / 4) / (jnp.trace(b) / 2))
        expected = jnp.kron(
            a + pi * jnp.sqrt(lam) * jnp.eye(4), b + jnp.sqrt(lam) / pi * jnp.eye(2)
        )
    else:
        pi = jnp.sqrt(((jnp.trace(covariance) + 1) / 4) / (jnp.trace(b) / 2))
        inner = jax.scipy.linalg.block_diag(covariance + pi * jnp.sqrt(lam) * jnp.eye(3), 1.0)
        a = lower(mean) @ inner @ lower(mean).T
        expected = jnp.kron(a, b + jnp.sqrt(lam) / pi * jnp.eye(2))
    np.testing.assert_allclose(block.dense(curvature, lam), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("centering", ["exact", "none"])
def test_ekfac_with_fresh_scalings_equals_the_eigen_block_on_an_exactly_kronecker_layer(
    x64, centering
):
    """One dense layer with squared error: every example's output factor is ``I / variance``, so
    the layer's block is exactly ``A (x) B`` and EKFAC's scalings are K-FAC's eigenvalues."""
    params, apply_fn, x = single_layer(batch=15)
    lam = 1e-3
    dense = {}
    for name in ("eigen", "ekfac"):
        block = block_for(apply_fn, params, x, name, centering)
        dense[name] = block.dense(observed(block, apply_fn, params, x, lam)[1], lam)
    np.testing.assert_allclose(dense["ekfac"], dense["eigen"], rtol=1e-9, atol=1e-12)


# -------------------------------------------------------------------------- EKFAC's scalings


def test_ekfac_scalings_of_a_convolution_sum_positions_before_squaring(x64):
    """George et al. 2018: ``s = E_n[(Q_A^T G_n Q_B)^2]`` with ``G_n`` example n's gradient
    (summed over output locations). A strided SAME convolution with a bias, empirical Fisher,
    homogeneous coordinates; ``G_n`` from ``jax.grad`` of each example's loss."""
    params, apply_fn, x = models.linen_cnn(side=5, channels=2, batch=4)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    x = x.astype(jnp.float64)
    loss = kfax.losses.SoftmaxCrossEntropy()
    y = jnp.arange(4) % 3
    plan = _plan.make_plan(
        apply_fn,
        loss,
        params,
        x,
        kind="empirical",
        samples=1,
        block="ekfac",
        centering="none",
        others=optax.identity(),
    )
    block = plan.blocks["Conv_1"]
    stats, curvature = observed(
        block, apply_fn, params, x, 0.1, loss=loss, kind="empirical", targets=y
    )
    basis = curvature.factors

    def example_grad(xi, yi):
        g = jax.grad(lambda p: loss(apply_fn(p, xi[None]), yi[None]))(params)["Conv_1"]
        weight = block.site.geometry.weight_matrix(g["kernel"])
        return jnp.concatenate([weight, g["bias"][None]], axis=0)

    per_example = jax.vmap(example_grad)(x, y)
    rotated = jnp.einsum("ia,nio,ob->nab", basis.q_a, per_example, basis.q_b)
    expected = jnp.mean(jnp.square(rotated), axis=0)
    np.testing.assert_allclose(basis.scalings, expected, rtol=1e-9, atol=1e-14)
    assert block.site.positions > 1  # locations share the weight: the test is not vacuous


def test_both_forms_of_the_per_example_squares_agree(x64):
    """Per-example matrices and products of position pairs are the same sum."""
    from kfax.blocks.ekfac import per_example_squares

    keys = jax.random.split(jax.random.key(3), 2)
    h = jax.random.normal(keys[0], (5, 3, 4))  # N, R, i
    g = jax.random.normal(keys[1], (2, 5, 3, 6))  # C, N, R, o
    direct = jnp.einsum("nri,cnro->cnio", h, g)
    expected = jnp.sum(jnp.square(direct), axis=(0, 1)) * 0.1
    np.testing.assert_allclose(per_example_squares(h, g, 0.1), expected, rtol=1e-12)
    h_wide = jnp.tile(h, (1, 1, 10))  # i = 40: the pairs form is now the cheaper one
    direct = jnp.einsum("nri,cnro->cnio", h_wide, g)
    expected = jnp.sum(jnp.square(direct), axis=(0, 1)) * 0.1
    np.testing.assert_allclose(per_example_squares(h_wide, g, 0.1), expected, rtol=1e-12)


def test_ekfac_never_applies_scalings_measured_in_another_basis(x64):
    """Statistics every 2 steps, refreshes every 3: step 3 refreshes the basis without new
    statistics. At every step the update must be ``Q [(Q^T M Q) / (s + lam)] Q^T`` with ``s``
    measured in the current basis ``Q`` from the last statistics batch (ema_decay 0), or K-FAC's
    own eigenvalues when no batch has been measured in it yet."""
    params, apply_fn, _, _ = models.mlp(sizes=(4, 5, 3), batch=10)
    loss = kfax.losses.SoftmaxCrossEntropy()
    keys = jax.random.split(jax.random.key(4), 2)
    xs = jax.random.normal(keys[0], (6, 10, 4)) * jnp.linspace(0.5, 2.0, 6)[:, None, None]
    ys = jax.random.randint(keys[1], (6, 10), 0, 3)
    lam = 1e-2
    tx = kfax.scale_by_kfac(
        apply_fn,
        loss,
        example_inputs=xs[0],
        block="ekfac",
        kind="empirical",
        centering="none",
        ema_decay=0.0,
        stats_every=2,
        inverse_every=3,
        damping=lam,
    )
    state = tx.init(params)

    def per_example_matrices(x, y):
        def one(xi, yi):
            g = jax.grad(lambda p: loss(apply_fn(p, xi[None]), yi[None]))(params)["dense_1"]
            return jnp.concatenate([g["kernel"], g["bias"][None]], axis=0)

        return jax.vmap(one)(x, y)

    last_statistics = None
    for step in range(6):
        x, y = xs[step], ys[step]
        grads = jax.grad(lambda p, x=x, y=y: loss(apply_fn(p, x), y))(params)
        updates, state = tx.update(grads, state, params, inputs=x, targets=y)
        if step % 2 == 0:
            last_statistics = (x, y)
        basis = state.curvature["dense_1"].factors
        refreshed_since = step - step % 3
        measured_since_refresh = (
            last_statistics is not None and (step - step % 2) >= refreshed_since
        )
        if measured_since_refresh:
            g_n = per_example_matrices(*last_statistics)
            rotated = jnp.einsum("ia,nio,ob->nab", basis.q_a, g_n, basis.q_b)
            scalings = jnp.mean(jnp.square(rotated), axis=0)
        else:
            scalings = jnp.outer(basis.s_a, basis.s_b)
        m = jnp.concatenate([grads["dense_1"]["kernel"], grads["dense_1"]["bias"][None]], 0)
        rotated_grad = basis.q_a.T @ m @ basis.q_b
        expected = basis.q_a @ (rotated_grad / (scalings + lam)) @ basis.q_b.T
        got = jnp.concatenate(
            [updates["dense_1"]["kernel"], updates["dense_1"]["bias"][None]], axis=0
        )
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12, err_msg=f"step {step}")


# -------------------------------------------------------------------------- damping and failures


def test_a_layer_with_constant_input_keeps_a_live_bias_under_centred_kfac(x64):
    """Issue: centred K-FAC froze the bias of a layer whose input is the same for every example
    (C = 0 made pi vanish). With the bias coordinate counted in pi, centred and homogeneous K-FAC
    both fit the targets' mean, as plain least squares does."""
    x = jnp.ones((16, 3)) * jnp.array([0.5, -1.0, 2.0])  # identical rows: C = 0
    y = jax.random.normal(jax.random.key(1), (16, 2)) + 3.0
    params = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}

    def apply_fn(p, z):
        return z @ p["dense"]["kernel"] + p["dense"]["bias"]

    loss = kfax.losses.SquaredError(0.25)
    best = float(loss(jnp.broadcast_to(y.mean(0), y.shape), y))  # the least-squares optimum
    finals = {}
    for centering in ("exact", "none"):
        opt = kfax.kfac(
            0.5,
            apply_fn,
            loss,
            example_inputs=x,
            centering=centering,
            norm_constraint=False,
            momentum=0.0,
        )
        p, state = params, opt.init(params)
        for _ in range(30):
            g = jax.grad(lambda q: loss(apply_fn(q, x), y))(p)
            u, state = opt.update(g, state, p, inputs=x, targets=y)
            p = optax.apply_updates(p, u)
        finals[centering] = float(loss(apply_fn(p, x), y))
    initial = float(loss(apply_fn(params, x), y))
    for centering, final in finals.items():
        assert final - best < 1e-3 * (initial - best), (centering, final, best, initial)


class NaNRefreshBlock(blocks.FactoredBlock):
    """A block whose refresh is never finite: stands in for any layer whose inverse fails."""

    name = "nan-refresh"

    def refresh_factors(self, a, b, damping):
        inverse = super().refresh_factors(a, b, damping)
        return inverse._replace(a_inverse=inverse.a_inverse * jnp.nan)


def test_one_layer_failing_its_refresh_leaves_every_other_layer_exactly_as_without_it(
    x64, monkeypatch
):
    """Refreshes are validated per layer: the failing layer keeps its last good inverse and
    counts the failure; the other layers' curvature and updates are unchanged."""
    monkeypatch.setitem(blocks.BLOCKS, "nan-refresh", NaNRefreshBlock)
    params, apply_fn, x, _ = models.mlp(sizes=(4, 5, 3), batch=10)
    loss = kfax.losses.SoftmaxCrossEntropy()
    y = jnp.arange(10) % 3
    grads = jax.grad(lambda p: loss(apply_fn(p, x), y))(params)
    runs = {}
    for label, block in (("healthy", "factored"), ("failing", {"dense_0": "nan-refresh"})):
        tx = kfax.scale_by_kfac(apply_fn, loss, example_inputs=x, block=block, inverse_every=1)
        state = tx.init(params)
        for _ in range(3):
            updates, state = tx.update(grads, state, params, inputs=x, targets=y)
        runs[label] = (updates, state)
    (healthy, healthy_state), (failing, failing_state) = runs["healthy"], runs["failing"]
    np.testing.assert_array_equal(failing["dense_1"]["kernel"], healthy["dense_1"]["kernel"])
    np.testing.assert_array_equal(failing["dense_1"]["bias"], healthy["dense_1"]["bias"])
    for a, b in zip(
        jax.tree.leaves(failing_state.curvature["dense_1"]),
        jax.tree.leaves(healthy_state.curvature["dense_1"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    # The failing layer was never replaced: it still holds init's identity inverses.
    np.testing.assert_array_equal(failing_state.curvature["dense_0"].factors.a_inverse, jnp.eye(4))
    assert int(failing_state.health["dense_0"].failed_refreshes) == 3
    assert int(failing_state.health["dense_1"].failed_refreshes) == 0
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(failing))
