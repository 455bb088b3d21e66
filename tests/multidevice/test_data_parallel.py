"""Data parallelism: pmap and sharded jit give the single-device result on the whole batch.

float64 throughout; the tolerance 1e-9 leaves room for the different summation order of the
pooled moments (measured differences are ~1e-15). Targets of kind="exact" and "empirical" do
not depend on the device, so the comparison is exact; kind="mc" is checked for agreement across
devices and for different samples per device.
"""

import contextlib

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
    params, apply_fn, x, _ = models.mlp(sizes=(4, 6, 5, 3), batch=BATCH)
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
        stats_every=1,  # statistics pooled across devices on every step (kfac's default: 4 or 5)
        axis_name=axis_name,
        **options,
    )


_RUNS: dict = {}  # one device's run per options, shared by the tests (xdist: per worker)


def single_device_run(problem, steps, **options):
    """The parameters and state after each of ``steps`` steps on one device, whole batch."""
    key = tuple(sorted(options.items()))
    if key not in _RUNS:
        _RUNS[key] = _single_device_run(problem, 20, **options)
    assert steps <= 20
    return _RUNS[key][:steps]


def _single_device_run(problem, steps, **options):
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


def assert_close_at_step(i, actual, expected, rtol=1e-9):
    try:
        assert_close(actual, expected, rtol)
    except AssertionError as error:
        raise AssertionError(f"step {i + 1}: {error}") from None


@pytest.mark.parametrize(
    "kind, inverse_strategy", [("exact", "replicated"), ("empirical", "distributed")]
)
def test_pmap_matches_one_device_on_the_whole_batch_for_twenty_adaptive_steps(
    problem, kind, inverse_strategy
):
    """Every step (statistics every step, refreshes every 10, damping every step) on devices 0
    and 7: with ``inverse_strategy="distributed"`` the three layers are refreshed on devices 0,
    1 and 2 only and shared, and device 7, which refreshes none, holds the same state. (The
    other pairs of kind and strategy: the shard_map test runs both strategies on "exact".)"""
    params, apply_fn, x, y = problem
    expected = single_device_run(problem, 20, kind=kind)
    opt = optimiser(apply_fn, x, axis_name="devices", kind=kind, inverse_strategy=inverse_strategy)

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


@pytest.mark.parametrize("inverse_strategy", ["replicated", "distributed"])
def test_sharded_jit_over_a_data_parallel_mesh_needs_no_axis_name(problem, inverse_strategy):
    """XLA inserts the collectives: inputs split over 8 devices, state replicated; 20
    adaptive steps. "distributed": under jax.set_mesh the refreshes are spread over the mesh's
    devices (a shard_map inside the step), with the same result."""
    params, apply_fn, x, y = problem
    expected = single_device_run(problem, 20, kind="exact")
    mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
    ys = jax.device_put(y, NamedSharding(mesh, P("batch")))
    opt = optimiser(apply_fn, x, kind="exact", inverse_strategy=inverse_strategy)

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda q: LOSS(apply_fn(q, xs), ys))(p)
        u, s = opt.update(g, s, p, inputs=xs, targets=ys)
        return optax.apply_updates(p, u), s

    p, s = params, opt.init(params)
    with jax.set_mesh(mesh) if inverse_strategy == "distributed" else contextlib.nullcontext():
        for i, want in enumerate(expected):
            p, s = step(p, s)
            assert_close_at_step(i, (p, s), want)
    # "distributed": each device picks the layers it owns by its index on the mesh.
    with jax.set_mesh(mesh):
        text = step.lower(p, s).as_text()
    assert ("partition_id" in text) == (inverse_strategy == "distributed")


@pytest.mark.parametrize("inverse_strategy", ["replicated", "distributed"])
def test_a_state_split_by_rows_over_the_mesh_gives_the_replicated_result(inverse_strategy):
    """kfax.state_shardings under sharded jit: on a 7-16-8 MLP the factors of size 16 and 8
    are split by rows over the 8 devices (each holds 1/8 of them), the 7 x 7 input factor is
    replicated; 20 adaptive steps equal one device on the whole batch at every step, and the
    state keeps its layout from step to step."""
    params, apply_fn, x, _ = models.mlp(sizes=(7, 16, 8), batch=BATCH)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    x, y = x.astype(jnp.float64), jnp.arange(BATCH) % 8
    expected = _single_device_run((params, apply_fn, x, y), 20, kind="exact")
    mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    xs, ys = (jax.device_put(a, NamedSharding(mesh, P("batch"))) for a in (x, y))
    opt = optimiser(apply_fn, x, kind="exact", inverse_strategy=inverse_strategy)
    shardings = kfax.state_shardings(opt.init(params), mesh)
    replicated = NamedSharding(mesh, P())

    def step(p, s):
        g = jax.grad(lambda q: LOSS(apply_fn(q, xs), ys))(p)
        u, s = opt.update(g, s, p, inputs=xs, targets=ys)
        return optax.apply_updates(p, u), s

    step = jax.jit(step, out_shardings=(replicated, shardings))
    p, s = params, jax.device_put(opt.init(params), shardings)
    with jax.set_mesh(mesh):
        for i, want in enumerate(expected):
            p, s = step(p, s)
            assert_close_at_step(i, (p, s), want)

    inner = s.inner
    split = [
        inner.statistics["dense_0"].output,  # 16 x 16
        inner.statistics["dense_1"].covariance,  # 16 x 16
        inner.statistics["dense_1"].output,  # 8 x 8
        inner.curvature["dense_0"].factors.b_inverse,
        inner.curvature["dense_1"].factors.a_inverse,
        inner.curvature["dense_1"].factors.b_inverse,
    ]
    for leaf in split:
        assert leaf.sharding.spec == P("batch", None)
        assert {shard.data.shape for shard in leaf.addressable_shards} == {
            (leaf.shape[0] // DEVICES, leaf.shape[1])
        }
    for leaf in (
        inner.statistics["dense_0"].covariance,
        inner.curvature["dense_0"].factors.a_inverse,
    ):
        assert leaf.shape == (7, 7) and leaf.sharding.is_fully_replicated


def test_state_shardings_names_an_axis_the_mesh_does_not_have(problem):
    params, apply_fn, x, _ = problem
    mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    state = jax.eval_shape(optimiser(apply_fn, x).init, params)
    with pytest.raises(ValueError, match=r"mesh has axes \['batch'\], not \['model'\]"):
        kfax.state_shardings(state, mesh, axes="model")


def test_an_axis_name_that_is_not_bound_is_a_clear_error(problem):
    params, apply_fn, x, y = problem
    tx = kfax.scale_by_kfac(apply_fn, LOSS, example_inputs=x, axis_name="devices")
    g = jax.grad(lambda q: LOSS(apply_fn(q, x), y))(params)
    with pytest.raises(ValueError, match="axis_name 'devices' is not bound"):
        tx.update(g, tx.init(params), params, inputs=x)


@pytest.mark.parametrize("inverse_strategy", ["replicated", "distributed"])
def test_shard_map_without_vma_checks_matches_one_device_on_the_whole_batch(
    problem, inverse_strategy
):
    """``jax.shard_map(..., check_vma=False)`` with ``axis_name``: 20 adaptive steps give the
    single-device result, with either inverse strategy."""
    params, apply_fn, x, y = problem
    opt = optimiser(apply_fn, x, axis_name="batch", kind="exact", inverse_strategy=inverse_strategy)
    step = jax.jit(_shard_mapped_step(opt, apply_fn, check_vma=False))
    p, s = params, opt.init(params)
    for i, want in enumerate(single_device_run(problem, 20, kind="exact")):
        p, s = step(p, s, x, y)
        assert_close_at_step(i, (p, s), want)


@pytest.mark.parametrize(
    "options, check_vma, message",
    [
        # kfax replays apply_fn from a trace made outside the map: no varying-axis types.
        ({"axis_name": "batch"}, True, "check_vma=False"),
        # Inside the map the devices are the map's: kfax must be told the axis to pool over.
        (
            {"inverse_strategy": "distributed"},
            False,
            "without axis_name: build it with axis_name='batch'",
        ),
    ],
    ids=["vma-checks", "distributed-without-axis-name"],
)
def test_an_update_inside_shard_map_that_kfax_cannot_serve_is_a_clear_error(
    problem, options, check_vma, message
):
    params, apply_fn, x, y = problem
    tx = kfax.scale_by_kfac(apply_fn, LOSS, example_inputs=x[:4], **options)
    mapped = _shard_mapped_step(tx, apply_fn, check_vma=check_vma)
    with pytest.raises(ValueError, match=message):
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


def test_each_layer_is_refreshed_by_exactly_its_owner():
    """A refresh that returns the index of the device computing it: after sharing, every device
    holds ``owner + 1`` for each layer, so exactly one device (the owner) computed it."""
    costs = {"big": 1000, "mid": 600, "small_a": 300, "small_b": 300, "tiny": 1}
    owners = kfax.distributed.assign_owners(costs, DEVICES)

    def shared(_):
        index = jax.lax.axis_index("devices").astype(jnp.float32)
        return kfax.distributed.refresh_on_owners(
            costs, lambda n: index + 1.0, lambda n: jnp.zeros((), jnp.float32), "devices"
        )

    got = jax.pmap(shared, axis_name="devices")(jnp.zeros(DEVICES))
    for name, owner in owners.items():
        np.testing.assert_array_equal(got[name], np.full(DEVICES, owner + 1.0))
    assert len(set(owners.values())) == len(costs)  # five layers, eight devices: one each


def test_a_state_does_not_depend_on_the_number_of_devices(problem):
    """A state is the same on every device count (its shapes are the layers'), so a run may move
    from 8 devices to 4 mid-training: 5 steps on 8 then 5 on 4 equal 10 steps on one device."""
    params, apply_fn, x, y = problem
    expected = single_device_run(problem, 10, kind="exact")[-1]
    opt = optimiser(apply_fn, x, axis_name="devices", kind="exact", inverse_strategy="distributed")

    def step(p, s, xs, ys):
        g = jax.lax.pmean(jax.grad(lambda q: LOSS(apply_fn(q, xs), ys))(p), "devices")
        u, s = opt.update(g, s, p, inputs=xs, targets=ys)
        return optax.apply_updates(p, u), s

    p, s = params, opt.init(params)
    for devices in (DEVICES, DEVICES // 2):
        mapped = jax.pmap(step, axis_name="devices", devices=jax.devices()[:devices])
        xs, ys = x.reshape(devices, -1, x.shape[-1]), y.reshape(devices, -1)
        p, s = jax.tree.map(lambda a, n=devices: jnp.broadcast_to(a, (n, *a.shape)), (p, s))
        for _ in range(5):
            p, s = mapped(p, s, xs, ys)
        p, s = jax.tree.map(lambda a: np.asarray(a[0]), (p, s))  # to the host between maps
    assert_close((p, s), expected)


def test_a_batch_that_does_not_divide_across_devices_is_a_clear_error(problem):
    """JAX's own machinery names the problem before kfax sees a batch; kfax adds nothing that
    could hide it. 30 examples do not divide over 8 devices."""
    params, apply_fn, x, y = problem
    mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match="partitioned 8 times.*evenly divide"):
        jax.device_put(x[:30], NamedSharding(mesh, P("batch")))
    opt = optimiser(apply_fn, x, axis_name="batch", kind="exact")
    step = jax.jit(_shard_mapped_step(opt, apply_fn, check_vma=False))
    with pytest.raises(ValueError, match="8 does not evenly divide 30"):
        step(params, opt.init(params), x[:30], y[:30])


def test_a_batch_sharded_over_explicit_mesh_axes_is_a_clear_error(problem):
    """jax.make_mesh's default axis type is Explicit: kfax names the supported set-ups."""
    params, apply_fn, x, y = problem
    mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
    xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
    ys = jax.device_put(y, NamedSharding(mesh, P("batch")))
    opt = optimiser(apply_fn, x, kind="exact")
    g = jax.grad(lambda q: LOSS(apply_fn(q, x), y))(params)
    with pytest.raises(ValueError, match="AxisType.Explicit"):
        jax.jit(lambda s: opt.update(g, s, params, inputs=xs, targets=ys))(opt.init(params))


@pytest.mark.parametrize(
    "argv",
    [
        ["--mode", "jit"],
        ["--mode", "jit", "--inverse-strategy", "distributed", "--shard-state"],
        ["--mode", "shard_map", "--inverse-strategy", "distributed"],
    ],
)
def test_the_data_parallel_example_trains_on_eight_devices(argv):
    from examples import data_parallel  # noqa: PLC0415

    result = data_parallel.main([*argv, "--steps", "8", "--batch-size", "64", "--width", "32"])
    assert result["devices"] == DEVICES
    # The state's bytes on device 0 (width 32; MNIST's 784 inputs or the digits' 64): split by
    # kfax.state_shardings, every factor of a size that divides by 8 keeps 1/8 of its rows.
    megabytes = {
        ("mnist", False): 5.063728,
        ("mnist", True): 0.732464,
        ("digits", False): 0.081328,
        ("digits", True): 0.023984,
    }[result["data"], "--shard-state" in argv]
    assert result["state_mb_per_device"] == pytest.approx(megabytes, rel=1e-6)
    assert result["losses"][-1] < 0.8 * result["losses"][0]  # from ~2.3 (ten classes)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "1001"], "does not divide over 8 devices"),
        (["--mode", "shard_map", "--shard-state"], "--shard-state splits the state under sharded"),
    ],
)
def test_the_data_parallel_example_names_bad_arguments(argv, message):
    from examples import data_parallel  # noqa: PLC0415

    with pytest.raises(SystemExit, match=message):
        data_parallel.main(argv)


def test_float32_pmap_step_matches_one_device_within_rounding(problem):
    """float32: 8 devices pool 4-example moments where one device sums 32, so the factors
    differ by rounding, |dF| <= ~BATCH * eps32 * |F| (tolerance 1e-5); a damped inverse
    amplifies that by at most its condition number kappa, and the update (inverse x gradient x
    inverse) by kappa_A * kappa_B, measured here from the float64 factors (tolerance
    1e-5 * kappa_A * kappa_B, floor 1e-5)."""
    params, apply_fn, x, y = problem
    params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    x32 = x.astype(jnp.float32)
    options = dict(kind="exact", damping=1e-2, axis_name=None)

    def build(**more):
        return kfax.scale_by_kfac(apply_fn, LOSS, example_inputs=x32[:4], **{**options, **more})

    def step(tx, axis=None):
        def inner(p, s, xb, yb):
            g = jax.grad(lambda q: LOSS(apply_fn(q, xb), yb))(p)
            if axis:
                g = jax.lax.pmean(g, axis)
            return tx.update(g, s, p, inputs=xb, targets=yb)

        return inner

    one = build()
    u_one, s_one = jax.jit(step(one))(params32, one.init(params32), x32, y)
    many = build(axis_name="devices", inverse_strategy="distributed")  # pools as "replicated"
    xs, ys = x32.reshape(DEVICES, -1, x.shape[-1]), y.reshape(DEVICES, -1)
    u_many, s_many = jax.pmap(step(many, "devices"), axis_name="devices")(
        replicate(params32), replicate(many.init(params32)), xs, ys
    )
    u_many, s_many = jax.tree.map(lambda a: a[DEVICES - 1], (u_many, s_many))
    assert_close(s_many.statistics, s_one.statistics, rtol=1e-5)
    exact = jax.jit(kfax.kronecker_factors(apply_fn, LOSS, kind="exact"))(params, x, targets=y)
    kappa = 0.0  # the largest kappa_A * kappa_B over the layers
    for factors in exact.values():
        product = 1.0
        for f in (factors.a, factors.b):
            eig = np.linalg.eigvalsh(np.asarray(f))
            product *= (eig.max() + 0.1) / (eig.min() + 0.1)  # damping 1e-2: ~0.1 each side
        kappa = max(kappa, product)
    print(f"largest kappa_A * kappa_B: {kappa:.1f}")
    assert_close(u_many, u_one, rtol=max(1e-5, 1e-5 * kappa))
    assert_close(s_many.curvature, s_one.curvature, rtol=max(1e-5, 1e-5 * kappa))


def test_the_distributed_benchmark_measures_work_and_bytes_of_both_strategies(tmp_path):
    from benchmarks import distributed  # noqa: PLC0415

    record = distributed.main(["--quick", "--steps=0", f"--out={tmp_path}"])  # no timing
    summary, strategies = record["summary"], record["strategies"]
    assert (tmp_path / "distributed_autoencoder_quick_b64.json").is_file()
    most = summary["max_refresh_cost_per_device"]
    assert (
        most["distributed"] < most["replicated"] == strategies["replicated"]["refresh_cost_total"]
    )
    owners = strategies["distributed"]["owners"]
    assert sorted(set(owners.values())) == list(range(len(set(owners.values()))))
    assert summary["inverse_sharing_bytes_per_refresh"] > 0
    assert 0 < summary["gradient_allreduce_bytes"] < summary["statistics_collective_bytes"]
