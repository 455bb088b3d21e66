"""One preconditioner step (kfax._step): with ``batch_layers=True`` layers of equal shapes run
as one batched computation.

The batched path must give what each layer's block gives on its own (float64, 1e-12); the
compiled step factorises each layer once (not once per statistics branch), and with
``batch_layers=True`` runs the products of a group of equal layers as one batch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfax
from kfax import _plan, statistics
from tests import models

SIZES = (4, 6, 6, 6, 6, 3)  # dense_1..dense_3 are 6 -> 6: one group of three


@pytest.mark.parametrize("block", ["factored", "eigen", "ekfac"])
def test_batched_blocks_give_the_per_layer_updates(x64, block):
    """EKFAC merges the batch in this step's bases: the other step structure (kfax._step)."""
    params, apply_fn, x, _ = models.mlp(sizes=SIZES, batch=20)
    y = jnp.arange(20) % 3
    loss = kfax.losses.SoftmaxCrossEntropy()
    grads = jax.grad(lambda p: loss(apply_fn(p, x), y))(params)
    lam = 0.05
    tx = kfax.scale_by_kfac(
        apply_fn,
        loss,
        example_inputs=x,
        kind="exact",
        block=block,
        ema_decay=0.0,
        damping=lam,
        batch_layers=True,
    )
    updates, _ = tx.update(grads, tx.init(params), params, inputs=x)

    plan = _plan.make_plan(
        apply_fn,
        loss,
        params,
        x,
        kind="exact",
        samples=1,
        block=block,
        centering="exact",
        others=optax.identity(),
    )
    batch = statistics.statistics_pass(apply_fn, loss, params, x, kind="exact")
    for name, layer_block in plan.blocks_in_order:  # each layer on its own, no vmap
        stats, curvature = layer_block.init(jnp.float64)
        stats = layer_block.observe(stats, batch.layers[name], 0.0)
        curvature = layer_block.refresh(stats, lam)
        curvature = layer_block.observe_in_basis(curvature, batch.layers[name], 0.0)
        grad = kfax.blocks.LayerGradient(grads[name]["kernel"], grads[name]["bias"])
        delta = layer_block.precondition(stats, curvature, grad, lam)
        np.testing.assert_allclose(
            updates[name]["kernel"], delta.weight, rtol=1e-12, atol=1e-14, err_msg=name
        )
        np.testing.assert_allclose(
            updates[name]["bias"], delta.bias, rtol=1e-12, atol=1e-14, err_msg=name
        )


@pytest.mark.parametrize("batch_layers", [False, True])
def test_the_compiled_step_factorises_each_layer_once_and_batches_products_on_request(
    batch_layers,
):
    """Five layers in three shape groups. The refresh factorises each layer on its own (ten
    Cholesky factorisations, A and B per layer), once: the statistics and the refresh are
    separate branches, so the refresh is not compiled into both ways of the statistics branch
    (a batched factorisation deadlocks XLA's CPU runtime now and then: kfax/_step.py,
    _refresh). With ``batch_layers=True`` the products of the three 6 x 6 layers run as one
    batch of three; by default each layer runs its own."""
    params, apply_fn, x, _ = models.mlp(sizes=SIZES, batch=20)
    y = jnp.arange(20) % 3
    loss = kfax.losses.SoftmaxCrossEntropy()
    tx = kfax.scale_by_kfac(apply_fn, loss, example_inputs=x, batch_layers=batch_layers)
    grads = jax.grad(lambda p: loss(apply_fn(p, x), y))(params)
    step = jax.jit(lambda s: tx.update(grads, s, params, inputs=x))
    lowered = step.lower(tx.init(params)).as_text()  # StableHLO: one call per factorisation
    calls = [line for line in lowered.splitlines() if "func.call @_cholesky" in line]
    assert len(calls) == 10, len(calls)
    assert not any("tensor<3x6x6xf32>" in line for line in calls)
    jaxpr = str(jax.make_jaxpr(step)(tx.init(params)))
    batched = any("f32[3,6,6] = dot_general" in line for line in jaxpr.splitlines())
    assert batched == batch_layers


def _two_scanned_stacks():
    """Two stacks of three 8 -> 8 layers, each run by its own ``lax.scan``, then an output."""
    keys = jax.random.split(jax.random.key(1), 4)
    params = {
        "s1": {"W": jax.random.normal(keys[0], (3, 8, 8)) / 3, "b": jnp.zeros((3, 8))},
        "s2": {"W": jax.random.normal(keys[1], (3, 8, 8)) / 3, "b": jnp.full((3, 8), 0.1)},
        "out": {"kernel": jax.random.normal(keys[2], (8, 4)) / 3},
    }

    def apply_fn(p, x):
        def body(h, wb):
            return jnp.tanh(h @ wb[0] + wb[1]), None

        h = jax.lax.scan(body, x, (p["s1"]["W"], p["s1"]["b"]))[0]
        h = jax.lax.scan(body, h, (p["s2"]["W"], p["s2"]["b"]))[0]
        return h @ p["out"]["kernel"]

    return params, apply_fn, jax.random.normal(keys[3], (16, 8))


def test_two_stacks_of_the_same_shapes_are_one_group_and_give_the_per_layer_updates(x64):
    """A stack's block wraps a per-layer block with a site of its own; two stacks of the same
    shapes still form one group (a batch of two stacks in the compiled step) and give the
    updates of per-layer blocks at every step of an inverse_every=2 cadence (float64)."""
    params, apply_fn, x = _two_scanned_stacks()
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    x, y = x.astype(jnp.float64), jnp.arange(16) % 4
    loss = kfax.losses.SoftmaxCrossEntropy()
    runs = {}
    for batch_layers in (False, True):
        tx = kfax.scale_by_kfac(
            apply_fn, loss, example_inputs=x, kind="exact", inverse_every=2,
            batch_layers=batch_layers,
        )  # fmt: skip

        @jax.jit
        def step(p, s, tx=tx):
            g = jax.grad(lambda q: loss(apply_fn(q, x), y))(p)
            u, s = tx.update(g, s, p, inputs=x)
            return optax.apply_updates(p, jax.tree.map(lambda v: -0.1 * v, u)), s, u

        p, s, updates = params, tx.init(params), []
        for _ in range(4):
            p, s, u = step(p, s)
            updates.append(u)
        runs[batch_layers] = updates
        jaxpr = str(jax.make_jaxpr(step)(params, tx.init(params)))
        assert any("f64[2,3,8,8] = dot_general" in line for line in jaxpr.splitlines()) == (
            batch_layers
        )
    for i, (a, b) in enumerate(zip(runs[False], runs[True], strict=True)):
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(v, u, rtol=1e-12, atol=1e-14, err_msg=f"step {i + 1}")
