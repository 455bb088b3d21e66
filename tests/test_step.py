"""One preconditioner step (kfax._step): layers of equal shapes run as one batched computation.

The batched path must give what each layer's block gives on its own (float64, 1e-12), and the
compiled step must hold one set of factorisations per group of equal layers, not per layer.
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
    params, apply_fn, x, _ = models.mlp(sizes=SIZES, batch=20)
    y = jnp.arange(20) % 3
    loss = kfax.losses.SoftmaxCrossEntropy()
    grads = jax.grad(lambda p: loss(apply_fn(p, x), y))(params)
    lam = 0.05
    tx = kfax.scale_by_kfac(
        apply_fn, loss, example_inputs=x, kind="exact", block=block, ema_decay=0.0, damping=lam
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


def test_the_compiled_step_factorises_layer_by_layer_and_preconditions_in_groups():
    """Five layers in three shape groups. The refresh factorises each layer on its own (ten
    Cholesky factorisations, A and B per layer, in each of the two branches that refresh): a
    batched factorisation deadlocks XLA's CPU runtime now and then (kfax/_step.py, _refresh).
    The preconditioning products of the three 6 x 6 layers run as one batch of three."""
    params, apply_fn, x, _ = models.mlp(sizes=SIZES, batch=20)
    y = jnp.arange(20) % 3
    loss = kfax.losses.SoftmaxCrossEntropy()
    tx = kfax.scale_by_kfac(apply_fn, loss, example_inputs=x)
    grads = jax.grad(lambda p: loss(apply_fn(p, x), y))(params)
    text = str(jax.make_jaxpr(lambda s: tx.update(grads, s, params, inputs=x))(tx.init(params)))
    calls = [line for line in text.splitlines() if "jit[name=_cholesky" in line]
    assert len(calls) == 2 * 10, len(calls)
    assert not any("f32[3,6,6] = jit[name=_cholesky" in line for line in calls)
    assert any("f32[3,6,6] = dot_general" in line for line in text.splitlines())
