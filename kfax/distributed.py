"""Where refreshes run across devices: every device, or each layer on one device.

With ``axis_name`` set (``pmap`` / ``shard_map``), every device holds the same pooled statistics
and, by default, refreshes every layer itself (``inverse_strategy="replicated"``): no
communication, but ``n_devices - 1`` of the inverse work is redundant. With
``inverse_strategy="distributed"`` each layer is refreshed on one device only (its *owner*),
layers balanced over the devices by their refresh cost (``d^3`` per factor, longest first to the
least loaded device), and the results are shared in one all-reduce in which non-owners
contribute zeros. These are the two ends of the trade-off that KAISA measured (Pauloski et al.,
SC 2021): no broadcast against ``1/n_devices`` of the inverse work per device plus the inverses'
bytes once per refresh.

Under sharded ``jax.jit`` (no ``axis_name``) the same two strategies apply to the devices of
the mesh set with ``jax.set_mesh(mesh)``: ``"distributed"`` runs the refresh inside a
``jax.shard_map`` over every axis of that mesh, with the state replicated in and out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from kfax import _validation

INVERSE_STRATEGIES = ("replicated", "distributed")


def refresh_cost(statistics: Any) -> int:
    """The refresh cost model of a layer from its statistics: ``d^3`` for each square ``d x d``
    factor (a Cholesky, an inverse or an eigendecomposition; stacked factors counted each),
    the size for anything else (diagonals)."""
    cost = 0
    for leaf in jax.tree.leaves(statistics):
        shape = jnp.shape(leaf)
        if len(shape) >= 2 and shape[-1] == shape[-2]:
            cost += math.prod(shape[:-2]) * shape[-1] ** 3
        else:
            cost += math.prod(shape)
    return cost


def assign_owners(costs: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """``{layer: device}``: longest-processing-time-first scheduling, each layer (most costly
    first; ties by name) to the device with the least cost so far (ties: the lowest index).
    Deterministic, so every device computes the same assignment. No device's load exceeds the
    mean load by more than the largest single cost (Graham's bound for this rule).

    Args:
      costs: ``{layer name: refresh cost}`` (e.g. :func:`refresh_cost` of its statistics).
      n_devices: the number of devices on the axis, at least 1.

    Raises:
      ValueError: for ``n_devices < 1``.

    Example:
      >>> from kfax.distributed import assign_owners
      >>> assign_owners({"a": 8, "b": 7, "c": 6, "d": 5}, 2)
      {'a': 0, 'b': 1, 'c': 1, 'd': 0}
    """
    if n_devices < 1:
        raise ValueError(f"n_devices must be at least 1, got {n_devices}.")
    load = [0] * n_devices
    owners = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        device = min(range(n_devices), key=lambda d: (load[d], d))
        owners[name] = device
        load[device] += costs[name]
    return owners


def device_loads(costs: Mapping[str, int], owners: Mapping[str, int], n_devices: int) -> list:
    """The summed cost each device refreshes under ``owners``."""
    load = [0] * n_devices
    for name, device in owners.items():
        load[device] += costs[name]
    return load


def refresh_on_owners(
    costs: Mapping[str, int],
    refresh_one: Callable[[str], Any],
    like: Callable[[str], Any],
    axis_name: Any,
) -> dict[str, Any]:
    """``{name: refresh_one(name)}`` for every layer of ``costs``, computed on the layer's owner
    only and shared across ``axis_name``: each device runs the refreshes it owns
    (``jax.lax.cond`` on its index; the others return zeros shaped as ``like(name)``) and one
    ``psum`` of all layers gives every device every result (adding zeros is exact, so the
    result is the owner's, bit for bit)."""
    n_devices = jax.lax.psum(1, axis_name)
    owners = assign_owners(costs, n_devices)
    me = jax.lax.axis_index(axis_name)
    local = {}
    for name in costs:
        local[name] = jax.lax.cond(
            me == owners[name],
            lambda n=name: refresh_one(n),
            lambda n=name: jax.tree.map(jnp.zeros_like, like(n)),
        )
    return jax.lax.psum(local, axis_name)


def refresh_over_context_mesh(shared: Callable[..., Any], *args: Any) -> Any:
    """``shared(*args, axis_names)`` inside a ``jax.shard_map`` over every axis of the mesh set
    with ``jax.set_mesh`` (sharded ``jax.jit``): ``args`` go in replicated and the result comes
    out replicated, so that :func:`refresh_on_owners` can spread the refreshes over the mesh's
    devices. The map is manual over all axes and skips varying-axis checks (the refreshes
    replay blocks written for replicated values)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise ValueError(
            'inverse_strategy="distributed" without axis_name spreads the refreshes over the '
            "devices of the mesh set with jax.set_mesh(mesh) (sharded jax.jit), but no mesh is "
            "set: call the step inside `with jax.set_mesh(mesh):`, or build with axis_name= "
            'under pmap / shard_map, or use inverse_strategy="replicated".'
        )
    manual = tuple(getattr(mesh, "manual_axes", ()) or ())
    if manual:
        raise ValueError(
            f"kfax's update runs inside jax.shard_map (manual mesh axes {list(manual)}) but "
            f"was built without axis_name: build it with axis_name={manual[0]!r} so that "
            "statistics are pooled across the devices and the refreshes shared over them."
        )
    names = tuple(mesh.axis_names)
    spec = jax.sharding.PartitionSpec()
    mapped = jax.shard_map(
        lambda *a: shared(*a, names),
        mesh=mesh,
        in_specs=tuple(spec for _ in args),
        out_specs=spec,
        check_vma=False,
    )
    return mapped(*args)


def check_device_options(axis_name: Any, inverse_strategy: str) -> None:
    """Build-time checks of ``axis_name`` and ``inverse_strategy``."""
    if axis_name is not None and not _is_axis_name(axis_name):
        raise ValueError(
            f"axis_name must be a non-empty string or a non-empty tuple of them, got {axis_name!r}."
        )
    _validation.choice("inverse_strategy", inverse_strategy, INVERSE_STRATEGIES)


def _is_axis_name(axis_name) -> bool:
    if isinstance(axis_name, tuple):
        return bool(axis_name) and all(_is_axis_name(a) for a in axis_name)
    return isinstance(axis_name, str) and bool(axis_name)


def check_axis_bound(axis_name) -> None:
    if axis_name is None:
        return
    try:
        jax.lax.axis_index(axis_name)
    except NameError:
        raise ValueError(
            f"axis_name {axis_name!r} is not bound: call update inside jax.pmap(..., "
            f"axis_name={axis_name!r}) or jax.shard_map over a mesh with that axis (under "
            "sharded jax.jit leave axis_name=None: XLA inserts the collectives)."
        ) from None


def check_not_explicitly_sharded(outputs: Any) -> None:
    """Statistics contract over the batch; a batch sharded over mesh axes of type ``Explicit``
    (the default of ``jax.make_mesh`` in recent JAX) makes JAX ask every such contraction for an
    output sharding. Name the supported set-ups instead of that error."""
    for leaf in jax.tree.leaves(outputs):
        sharding = getattr(jax.typeof(leaf), "sharding", None) if hasattr(jax, "typeof") else None
        explicit = set(getattr(getattr(sharding, "mesh", None), "explicit_axes", ()) or ())
        used = set()
        for entry in getattr(sharding, "spec", ()) or ():
            used.update(entry if isinstance(entry, tuple) else (entry,))
        if explicit & used:
            raise ValueError(
                f"kfax got a batch sharded over mesh axes {sorted(explicit & used)} of type "
                "AxisType.Explicit; kfax supports data parallelism over Auto axes (sharded "
                "jax.jit: jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) "
                "* len(names)); XLA inserts the collectives) and over manual axes (jax.shard_map "
                "or jax.pmap with axis_name= set on the kfax transform)."
            )
