"""Statistics on a sub-batch: which input leaves are batched, and the first examples of them.

``stats_batch_size`` takes the statistics on the first examples of a batch; ``batch_axes`` says
which input leaves are batched (a pytree prefix of the inputs with ``0`` or ``None`` per leaf,
like ``jax.vmap``'s ``in_axes``).
"""

from __future__ import annotations

from typing import Any

import jax

from kfax import _capture


def _leading(x: Any) -> int | None:
    shape = getattr(x, "shape", None)
    return shape[0] if shape else None


def take_sub_batch(
    tree: Any, size: int, batch: int, batch_axes: Any = None, last: bool = False
) -> Any:
    """The first ``size`` examples of every batched leaf of ``tree`` (the last ones with
    ``last=True``); other leaves unchanged.

    ``batch_axes`` is ``None`` (a leaf is batched when its leading axis has the outputs' batch
    size ``batch``: lookup tables, masks of another shape and PRNG keys are left whole) or a
    pytree prefix of ``tree`` with ``0`` for batched leaves and ``None`` for the others, as in
    ``jax.vmap``'s ``in_axes``.
    """
    if tree is None:
        return None
    cut = (lambda x: x[-size:]) if last else (lambda x: x[:size])
    if batch_axes is None:
        return jax.tree.map(lambda x: cut(x) if _leading(x) == batch else x, tree)
    axes = jax.tree.broadcast(batch_axes, tree, is_leaf=lambda a: a is None)
    return jax.tree.map(
        lambda axis, x: x if axis is None else cut(x), axes, tree, is_leaf=lambda a: a is None
    )


def check_batch_axes(batch_axes: Any, inputs: Any) -> None:
    """``batch_axes`` must be a pytree prefix of the inputs holding only 0 and None."""
    if batch_axes is None:
        return
    check_batch_axes_entries(batch_axes)
    try:
        axes = jax.tree.broadcast(batch_axes, inputs, is_leaf=lambda a: a is None)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"batch_axes must be a pytree prefix of the inputs (like jax.vmap's in_axes): {error}"
        ) from None
    for axis in jax.tree.leaves(axes, is_leaf=lambda a: a is None):
        if axis not in (0, None):
            raise ValueError(f"batch_axes entries must be 0 or None, got {axis!r}.")


def check_batch_axes_entries(batch_axes: Any) -> None:
    """Every entry of ``batch_axes`` must be 0 or None (checked when a transform is built)."""
    if batch_axes is None:
        return
    for axis in jax.tree.leaves(batch_axes, is_leaf=lambda a: a is None):
        zero = isinstance(axis, int) and not isinstance(axis, bool) and axis == 0
        if not (axis is None or zero):
            raise ValueError(
                f"batch_axes entries must be 0 (batched along the leading axis) or None (not "
                f"batched), got {axis!r} in batch_axes={batch_axes!r}."
            )


def cut_to_sub_batch(apply_fn, params, inputs, targets, where, size, batch_axes):
    """``(inputs, targets, where)`` cut to their first ``size`` examples (the batch size is the
    outputs' leading axis, from ``apply_fn``'s trace)."""
    batch = _capture.trace_layers(apply_fn, params, inputs).output_avals[0][0][0]
    take = take_sub_batch
    return (
        take(inputs, size, batch, batch_axes),
        take(targets, size, batch),
        take(where, size, batch),
    )
