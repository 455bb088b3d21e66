"""One batch's moments of a layer's inputs and output cotangents, pooled across devices.

``E[h]`` and ``Cov(h)`` over the rows of ``h`` that count (centred in two passes, so float32 keeps
the covariance when the mean dwarfs the spread), and ``E[g g^T]`` as ``scale * sum g g^T``
(K-FAC-expand; ``docs/math.md``). Statistics accumulate in float32 or wider. Under ``pmap`` or
``shard_map`` (a capture with an ``axis_name``) the moments are those of the union of the
devices' rows, exactly. The blocks merge these into their moving averages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from kfax._layers import Geometry
    from kfax.statistics import LayerCapture

HIGHEST = jax.lax.Precision.HIGHEST


class InputMoments(NamedTuple):
    """``E[h]``, ``Cov(h)`` over the rows that count, and how many rows counted."""

    mean: jax.Array
    covariance: jax.Array
    count: jax.Array


def statistics_dtype(dtype: Any) -> Any:
    """Statistics accumulate in float32 or wider, whatever the activation dtype."""
    return jnp.promote_types(dtype, jnp.float32)


def input_moments(geometry: Geometry, capture: LayerCapture) -> InputMoments:
    """Mean and covariance of the rows of ``h`` that count, centred in two passes.

    Centring about the batch's own mean before the product keeps the covariance accurate in
    float32 when the mean dwarfs the spread (inputs of mean 30 and spread 0.03).
    """
    rows = geometry.input_rows(capture.inputs)
    rows = rows.astype(statistics_dtype(rows.dtype))
    weights = capture.row_weights
    if weights is None:
        count = jnp.asarray(rows.shape[0], rows.dtype)
        mean = jnp.mean(rows, axis=0)
        centred = rows - mean
        weighted = centred
    else:
        weights = weights.astype(rows.dtype)
        count = jnp.sum(weights)
        safe = jnp.maximum(count, 1e-30)
        mean = jnp.matmul(weights, rows, precision=HIGHEST) / safe
        centred = rows - mean
        weighted = centred * weights[:, None]
    covariance = jnp.matmul(weighted.T, centred, precision=HIGHEST) / jnp.maximum(count, 1e-30)
    if capture.axis_name is None:
        return InputMoments(mean, covariance, count)
    return _pool_moments(InputMoments(mean, covariance, count), capture.axis_name)


def _pool_moments(local: InputMoments, axis_name: Any) -> InputMoments:
    """The moments of the union of every device's rows, exactly.

    ``C = sum_d c_d (C_d + (m_d - m)(m_d - m)^T) / sum_d c_d``: the devices' (small) means and
    counts are gathered, the covariances summed. Centring about each device's own mean keeps
    float32 accurate; the spread of the device means restores what per-device centring left
    out, so the result is the covariance of the whole batch, not the mean of per-device ones.
    """
    counts = jax.lax.all_gather(local.count, axis_name)
    means = jax.lax.all_gather(local.mean, axis_name).reshape(-1, local.mean.shape[-1])
    counts = counts.reshape(-1)
    total = jnp.maximum(jnp.sum(counts), 1e-30)
    mean = jnp.matmul(counts, means, precision=HIGHEST) / total
    spread = (means - mean) * jnp.sqrt(counts)[:, None]
    between = jnp.matmul(spread.T, spread, precision=HIGHEST)
    within = jax.lax.psum(local.count * local.covariance, axis_name)
    return InputMoments(mean, (within + between) / total, jnp.sum(counts))


def pool_mean(x: Any, capture: LayerCapture) -> Any:
    """``x`` averaged over the devices of ``capture.axis_name`` (unchanged without one): for
    batch statistics that are means over equally many examples on every device."""
    if capture.axis_name is None:
        return x
    return jax.lax.pmean(x, capture.axis_name)


def output_moment(geometry: Geometry, capture: LayerCapture) -> jax.Array:
    """``scale * sum over columns and rows of g g^T`` (K-FAC-expand)."""
    rows = jax.vmap(geometry.output_rows)(capture.cotangents).reshape(-1, geometry.d_out)
    rows = rows.astype(statistics_dtype(rows.dtype))
    moment = jnp.matmul(rows.T, rows, precision=HIGHEST) * capture.scale.astype(rows.dtype)
    return pool_mean(moment, capture)
