"""One forward pass for the loss, its gradient and the statistics (kfax.value_and_grad)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfax
from tests import models

LOSS = kfax.losses.SoftmaxCrossEntropy()


@pytest.fixture
def problem():
    params, apply_fn, x, _ = models.mlp(sizes=(4, 6, 3), batch=16)
    return params, apply_fn, x, jnp.arange(16) % 3


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_the_fused_gradient_is_bit_for_bit_jax_grad(problem, jit):
    params, apply_fn, x, y = problem
    fused = kfax.value_and_grad(apply_fn, LOSS)
    reference = jax.value_and_grad(lambda p: LOSS(apply_fn(p, x), y))
    if jit:
        fused, reference = jax.jit(fused), jax.jit(reference)
    (value, grads), _ = fused(params, x, y, key=jax.random.key(0))
    expected_value, expected = reference(params)
    np.testing.assert_array_equal(value, expected_value)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["mc", "exact", "empirical"])
def test_the_fused_statistics_are_those_of_the_separate_pass(x64, problem, kind):
    params, apply_fn, x, y = problem
    key = jax.random.key(3)
    _, fused = kfax.value_and_grad(apply_fn, LOSS, kind=kind, samples=2)(params, x, y, key=key)
    separate = kfax.statistics.statistics_pass(
        apply_fn, LOSS, params, x, kind=kind, samples=2, targets=y, key=key
    )
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(separate), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


def test_update_with_fused_statistics_equals_update_without(x64, problem):
    params, apply_fn, x, y = problem
    opt = kfax.kfac(None, apply_fn, LOSS, example_inputs=x, kind="exact")
    fused = jax.jit(kfax.value_and_grad(apply_fn, LOSS, kind="exact"))

    @jax.jit
    def step_fused(p, s):
        (_, g), stats = fused(p, x, y)
        u, s = opt.update(g, s, p, inputs=x, targets=y, statistics=stats)
        return optax.apply_updates(p, u), s

    @jax.jit
    def step_plain(p, s):
        g = jax.grad(lambda q: LOSS(apply_fn(q, x), y))(p)
        u, s = opt.update(g, s, p, inputs=x, targets=y)
        return optax.apply_updates(p, u), s

    a, b = (params, opt.init(params)), (params, opt.init(params))
    for _ in range(4):
        a, b = step_fused(*a), step_plain(*b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-10, atol=1e-13)


def test_statistics_of_another_kind_or_with_a_sub_batch_are_refused(problem):
    params, apply_fn, x, y = problem
    (_, g), stats = kfax.value_and_grad(apply_fn, LOSS, kind="exact")(params, x, y)
    tx = kfax.scale_by_kfac(apply_fn, LOSS, example_inputs=x)  # kind="mc"
    with pytest.raises(ValueError, match="kind='exact'.*kind='mc'"):
        tx.update(g, tx.init(params), params, inputs=x, statistics=stats)
    tx = kfax.scale_by_kfac(apply_fn, LOSS, example_inputs=x, kind="exact", stats_batch_size=4)
    with pytest.raises(ValueError, match="stats_batch_size"):
        tx.update(g, tx.init(params), params, inputs=x, statistics=stats)
