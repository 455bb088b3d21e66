"""Data parallelism: pmap and sharded jit give the single-device result on the whole batch.

float64 throughout; the tolerance 1e-9 leaves room for the different summation order of the
pooled moments (measured differences are ~1e-15). Targets of kind="exact" and "empirical" do
not depend on the device, so the comparison is exact; kind="mc" is checked for agreement across
devices and for different samples per device.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kfax
from tests import models

DEVICES = 8
BATCH = 32
LOSS = kfax.losses.SoftmaxCrossEntropy()


@pytest.fixture(scope="module")
def problem():
    params, apply_fn, x, _ = models.mlp(sizes=(4, 6, 3), batch=BATCH)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    x = x.astype(jnp.float64) + 1.0
    y = jnp.arange(BATCH) % 3
    return params, apply_fn, x, y


def optimiser(apply_fn, x, axis_name=None, **options):
    return kfax.kfac(
        None,
        apply_fn,
        LOSS,
        example_inputs=x[: BATCH // DEVICES],
        damping_every=1,
        axis_name=axis_name,
        **options,
    )


def single_device_run(problem, steps, **options):
    params, apply_fn, x, y = problem
    opt = optimiser(apply_fn, x, **options)

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda q: LOSS(apply_fn(q, x), y))(p)
        u, s = opt.update(g, s, p, inputs=x, targets=y)
        return optax.apply_updates(p, u), s

    out, p, s = [], params, opt.init(params)
    for _ in range(steps):
        p, s = step(p, s)
        out.append((p, s))
    return out


def replicate(tree):
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (DEVICES, *jnp.shape(a))), tree)


def assert_close(actual, expected, rtol=1e-9):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(
            a, e, rtol=rtol, atol=rtol * max(1.0, float(jnp.max(jnp.abs(e))))
        )


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_pmap_matches_one_device_on_the_whole_batch_for_twenty_adaptive_steps(problem, kind):
    params, apply_fn, x, y = problem
    expected = single_device_run(problem, 20, kind=kind)
    opt = optimiser(apply_fn, x, axis_name="devices", kind=kind)

    def step(p, s, xs, ys):
        g = jax.lax.pmean(jax.grad(lambda q: LOSS(apply_fn(q, xs), ys))(p), "devices")
        u, s = opt.update(g, s, p, inputs=xs, targets=ys)
        return optax.apply_updates(p, u), s

    step = jax.pmap(step, axis_name="devices")
    xs, ys = x.reshape(DEVICES, -1, x.shape[-1]), y.reshape(DEVICES, -1)
    p, s = replicate(params), replicate(opt.init(params))
    for i, (p_one, s_one) in enumerate(expected):
        p, s = step(p, s, xs, ys)
        for device in (0, DEVICES - 1):
            got = jax.tree.map(lambda a, d=device: a[d], (p, s))
            try:
                assert_close(got, (p_one, s_one))
            except AssertionError as error:
                raise AssertionError(f"step {i + 1}, device {device}: {error}") from None


def test_pmap_with_sampled_targets_keeps_devices_identical_and_samples_differ(problem):
    params, apply_fn, x, y = problem
    tx = kfax.scale_by_kfac(apply_fn, LOSS, example_inputs=x[:4], axis_name="devices")
    xs = jnp.broadcast_to(x[:4], (DEVICES, 4, x.shape[-1]))  # the same examples everywhere

    def factors(s):
        return jax.lax.all_gather(s.statistics["dense_1"].output, "devices")

    def step(p, s, xb):
        g = jax.grad(lambda q: LOSS(apply_fn(q, xb), y[:4]))(p)
        _, s = tx.update(g, s, p, inputs=xb)
        local = kfax.kronecker_factors(apply_fn, LOSS, kind="mc")(
            p, xb, key=jax.random.fold_in(jax.random.key(0), jax.lax.axis_index("devices"))
        )
        return s, local["dense_1"].b

    s, local_b = jax.pmap(step, axis_name="devices")(
        replicate(params), replicate(tx.init(params)), xs
    )
    pooled = s.statistics["dense_1"].output
    for d in range(1, DEVICES):
        np.testing.assert_array_equal(pooled[d], pooled[0])
    assert not np.allclose(local_b[0], local_b[1])  # the same inputs, different samples


def test_sharded_jit_over_a_data_parallel_mesh_needs_no_axis_name(problem):
    """XLA inserts the collectives: inputs split over 8 devices, state replicated."""
    params, apply_fn, x, y = problem
    expected = single_device_run(problem, 10, kind="exact")
    mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
    ys = jax.device_put(y, NamedSharding(mesh, P("batch")))
    opt = optimiser(apply_fn, x, kind="exact")

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda q: LOSS(apply_fn(q, xs), ys))(p)
        u, s = opt.update(g, s, p, inputs=xs, targets=ys)
        return optax.apply_updates(p, u), s

    p, s = params, opt.init(params)
    for i, want in enumerate(expected):
        p, s = step(p, s)
        try:
            assert_close((p, s), want)
        except AssertionError as error:
            raise AssertionError(f"step {i + 1}: {error}") from None


def test_an_axis_name_that_is_not_bound_is_a_clear_error(problem):
    params, apply_fn, x, y = problem
    tx = kfax.scale_by_kfac(apply_fn, LOSS, example_inputs=x, axis_name="devices")
    g = jax.grad(lambda q: LOSS(apply_fn(q, x), y))(params)
    with pytest.raises(ValueError, match="axis_name 'devices' is not bound"):
        tx.update(g, tx.init(params), params, inputs=x)


def test_shard_map_without_vma_checks_matches_one_device_on_the_whole_batch(problem):
    """``jax.shard_map(..., check_vma=False)`` with ``axis_name``: the pmap result."""
    params, apply_fn, x, y = problem
    expected = single_device_run(problem, 10, kind="exact")
    opt = optimiser(apply_fn, x, axis_name="batch", kind="exact")
    step = jax.jit(_shard_mapped_step(opt, apply_fn, check_vma=False))
    p, s = params, opt.init(params)
    for i, want in enumerate(expected):
        p, s = step(p, s, x, y)
        try:
            assert_close((p, s), want)
        except AssertionError as error:
            raise AssertionError(f"step {i + 1}: {error}") from None


def test_shard_map_with_vma_checks_is_a_clear_error_naming_check_vma(problem):
    params, apply_fn, x, y = problem
    tx = kfax.scale_by_kfac(apply_fn, LOSS, example_inputs=x[:4], axis_name="batch")
    mapped = _shard_mapped_step(tx, apply_fn, check_vma=True)
    with pytest.raises(ValueError, match="check_vma=False"):
        jax.jit(mapped)(params, tx.init(params), x, y)


def _shard_mapped_step(opt, apply_fn, *, check_vma):
    """One training step under ``jax.shard_map`` over a mesh axis "batch": the batch split,
    parameters and state replicated, gradients averaged across the axis."""
    mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))

    def step(p, s, xs, ys):
        g = jax.lax.pmean(jax.grad(lambda q: LOSS(apply_fn(q, xs), ys))(p), "batch")
        u, s = opt.update(g, s, p, inputs=xs, targets=ys)
        return optax.apply_updates(p, u), s

    specs = (P(), P(), P("batch"), P("batch"))
    return jax.shard_map(step, mesh=mesh, in_specs=specs, out_specs=(P(), P()), check_vma=check_vma)
