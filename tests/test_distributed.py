"""Placement of refreshes and state across devices (kfax.distributed, kfax.sharding): the cost
model, the balanced assignment, the state's layout, and the options' errors. The strategies'
results and the split state are compared under pmap, shard_map and sharded jit in
tests/multidevice (8 simulated devices)."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import kfax
from kfax.distributed import assign_owners, device_loads, refresh_cost
from tests import models


def test_the_refresh_cost_is_d_cubed_per_square_factor_and_the_size_otherwise():
    stats = {"a": jnp.zeros((5, 5)), "b": jnp.zeros((3, 3)), "diag": jnp.zeros(7)}
    assert refresh_cost(stats) == 5**3 + 3**3 + 7
    assert refresh_cost(jnp.zeros((4, 6, 6))) == 4 * 6**3  # a stack: each factor counted


def test_layers_go_to_the_least_loaded_device_most_costly_first():
    costs = {"a": 8, "b": 7, "c": 6, "d": 5, "e": 4}
    owners = assign_owners(costs, 2)
    # a -> 0, b -> 1, c -> 1 (7 < 8), d -> 0 (8 < 13), e -> 0 (13 = 13: the lower index)
    assert owners == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 0}
    assert device_loads(costs, owners, 2) == [17, 13]


def test_the_assignment_is_deterministic_and_covers_every_layer_once():
    costs = {f"layer_{i}": (i * 37) % 11 for i in range(20)}
    first = assign_owners(costs, 8)
    assert first == assign_owners(dict(reversed(list(costs.items()))), 8)
    assert sorted(first) == sorted(costs)
    loads = device_loads(costs, first, 8)
    # LPT's guarantee: no device exceeds the mean load by more than the largest single cost
    assert max(loads) <= sum(costs.values()) / 8 + max(costs.values())


def test_one_device_owns_everything():
    assert set(assign_owners({"a": 3, "b": 1}, 1).values()) == {0}
    with pytest.raises(ValueError, match="n_devices must be at least 1"):
        assign_owners({"a": 1}, 0)


def test_distributed_inverses_need_devices_and_unknown_strategies_are_named():
    """Without axis_name, "distributed" spreads refreshes over the jax.set_mesh mesh; with no
    mesh set there are no devices to spread over: a clear error at update, naming the fix."""
    params, apply_fn, x, _ = models.mlp()
    y = jnp.arange(6) % 3
    loss = kfax.losses.SoftmaxCrossEntropy()
    tx = kfax.scale_by_kfac(apply_fn, loss, example_inputs=x, inverse_strategy="distributed")
    grads = jax.grad(lambda p: loss(apply_fn(p, x), y))(params)
    with pytest.raises(ValueError, match=r"no mesh is set: call the step inside .*set_mesh"):
        jax.jit(lambda s: tx.update(grads, s, params, inputs=x))(tx.init(params))
    with pytest.raises(ValueError, match="inverse_strategy must be one of"):
        kfax.kfac(0.1, apply_fn, loss, example_inputs=x, inverse_strategy="kaisa")


def test_distributed_inverses_on_a_one_device_mesh_equal_replicated_ones(x64):
    """Sharded jax.jit under jax.set_mesh: the refresh runs in a shard_map over the mesh; on a
    one-device mesh it is the replicated refresh, bit for bit, at every step of the cadence."""
    params, apply_fn, x, _ = models.mlp()  # float64 under the x64 fixture
    y = jnp.arange(6) % 3
    loss = kfax.losses.SoftmaxCrossEntropy()
    mesh = jax.make_mesh((1,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    runs = {}
    for strategy in ("replicated", "distributed"):
        tx = kfax.kfac(
            0.1, apply_fn, loss, example_inputs=x, inverse_every=2, inverse_strategy=strategy
        )

        @jax.jit
        def step(p, s, tx=tx):
            g = jax.grad(lambda q: loss(apply_fn(q, x), y))(p)
            u, s = tx.update(g, s, p, inputs=x, targets=y)
            return optax.apply_updates(p, u), s

        p, s, trace = params, tx.init(params), []
        with jax.set_mesh(mesh):
            for _ in range(3):
                p, s = step(p, s)
                trace.append((p, s))
        runs[strategy] = trace
    for replicated, distributed in zip(runs["replicated"], runs["distributed"], strict=True):
        chex.assert_trees_all_equal(replicated, distributed)


@pytest.mark.parametrize("axis_name", [(), ("a", ""), (1, 2), "", ["a"]])
def test_an_axis_name_that_names_no_axis_is_refused_at_build(axis_name):
    params, apply_fn, x, _ = models.mlp()
    loss = kfax.losses.SoftmaxCrossEntropy()
    with pytest.raises(ValueError, match="axis_name must be a non-empty string"):
        kfax.scale_by_kfac(apply_fn, loss, example_inputs=x, axis_name=axis_name)


@pytest.mark.parametrize("batch_size", [0, -8, 7])
def test_the_data_parallel_example_refuses_a_batch_some_device_gets_nothing_of(batch_size):
    from examples.data_parallel import check_divides  # noqa: PLC0415

    with pytest.raises(SystemExit, match=f"--batch-size {batch_size}"):
        check_divides(batch_size, 8)


@pytest.mark.parametrize("module", [kfax.distributed, kfax.sharding], ids=lambda m: m.__name__)
def test_the_module_examples_run(module):
    import doctest  # noqa: PLC0415

    result = doctest.testmod(module)
    assert result.attempted >= 1 and result.failed == 0


def test_state_shardings_split_square_factors_whose_size_divides_and_replicate_the_rest():
    """On a one-device mesh every square statistic and inverse divides, so each is split by
    rows; the counters, key, means, health and damping are replicated."""
    params, apply_fn, x, _ = models.mlp(sizes=(4, 6, 3), batch=8)
    state = kfax.scale_by_kfac(apply_fn, kfax.losses.SquaredError(), example_inputs=x).init(params)
    mesh = jax.make_mesh((1,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    layout = kfax.state_shardings(state, mesh)
    split = jax.sharding.PartitionSpec("batch", None)
    for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(layout), strict=True):
        square = leaf.ndim == 2 and leaf.shape[0] == leaf.shape[1]
        assert sharding.spec == (split if square else jax.sharding.PartitionSpec())
    assert sum(s.spec == split for s in jax.tree.leaves(layout)) == 8  # 2 layers x 4 matrices


def test_state_shardings_of_a_state_without_kfac_is_a_clear_error():
    params, _, _, _ = models.mlp(sizes=(4, 6, 3), batch=8)
    mesh = jax.make_mesh((1,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match="found no kfax.KFACState"):
        kfax.state_shardings(optax.adam(1e-3).init(params), mesh)


def test_state_shardings_names_what_is_wrong_with_its_arguments():
    params, apply_fn, x, _ = models.mlp(sizes=(4, 6, 3), batch=8)
    state = kfax.scale_by_kfac(apply_fn, kfax.losses.SquaredError(), example_inputs=x).init(params)
    auto = jax.make_mesh((1,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    explicit = jax.make_mesh((1,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
    cases = [
        ((state, explicit), "AxisType.Explicit"),
        ((state, None), "mesh must be a jax.sharding.Mesh"),
        ((state, auto, 0), "axes must be a mesh axis name or a tuple"),
        ((state, auto, ("batch", "batch")), "names a mesh axis twice"),
        # a state taken out of jax.pmap: every leaf has a leading device axis
        ((jax.tree.map(lambda a: a[None], state), auto), "leading device axis"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            kfax.state_shardings(*args)
