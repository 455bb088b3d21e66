"""The moments behind a Kronecker block's factors: their moving averages, the input factor each
centring asks for, and one batch's moments under each weight-sharing rule.

The statistics are ``E[h]``, ``Cov(h)`` and ``E[g g^T]`` (``docs/math.md``), each a bias-corrected
moving average over statistics batches; the mean and covariance are merged as a two-component
mixture, so no cancellation occurs however large the mean. ``"expand"`` weight sharing averages
over examples and positions; ``"reduce"`` takes each example's mean input and the sum of its
cotangents over positions (Eschenhagen et al. 2023).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kfax import _tracing
from kfax._moments import HIGHEST, input_moments, output_moment, pool_mean, statistics_dtype
from kfax.statistics import LayerCapture

WEIGHT_SHARINGS = ("expand", "reduce")


class KroneckerStatistics(NamedTuple):
    """Bias-corrected moving averages of one layer's moments.

    Attributes:
      mean: ``E[h]``, shape ``(d_in,)``.
      covariance: ``Cov(h) = E[(h - mean)(h - mean)^T]``, shape ``(d_in, d_in)``.
      output: ``E[g g^T]`` (mean over examples of the sum over positions), ``(d_out, d_out)``.
      weight: the moving average's normaliser, ``1 - decay^t`` after ``t`` batches (0: no data).
    """

    mean: jax.Array
    covariance: jax.Array
    output: jax.Array
    weight: jax.Array


def moving_average_step(weight: jax.Array, decay: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(beta, new_weight)``: a bias-corrected average moves by ``beta`` towards a new batch.

    With ``new_weight = decay * weight + (1 - decay)`` and ``beta = (1 - decay) / new_weight``,
    the average after batches ``x_1 ... x_t`` is ``sum_s decay^(t-s) (1 - decay) x_s / (1 -
    decay^t)``; the first batch (``weight = 0``) gives ``beta = 1``.
    """
    decay = jnp.asarray(decay, weight.dtype)
    new_weight = decay * weight + (1 - decay)
    return (1 - decay) / jnp.maximum(new_weight, jnp.finfo(weight.dtype).tiny), new_weight


def merge_moments(
    statistics: KroneckerStatistics,
    mean: jax.Array,
    covariance: jax.Array,
    count: jax.Array,
    output: jax.Array,
    decay: jax.Array,
) -> KroneckerStatistics:
    """Mix a batch's (mean, covariance) into the averages as a two-component mixture.

    ``mean' = mean + beta d``, ``C' = (1 - beta) C + beta C_batch + beta (1 - beta) d d^T`` with
    ``d = mean_batch - mean``: every term is positive semi-definite, so no cancellation occurs
    however large the mean (Chan, Golub and LeVeque's pairwise update). A batch in which no row
    counted (``count = 0``) leaves the input side as it was.
    """
    beta, weight = moving_average_step(statistics.weight, decay)
    empty = count <= 0
    mean = jnp.where(empty, statistics.mean, mean)
    covariance = jnp.where(empty, statistics.covariance, covariance)
    delta = mean - statistics.mean
    return KroneckerStatistics(
        mean=statistics.mean + beta * delta,
        covariance=(1 - beta) * statistics.covariance
        + beta * covariance
        + (beta * (1 - beta)) * jnp.outer(delta, delta),
        output=statistics.output + beta * (output - statistics.output),
        weight=weight,
    )


def input_factor(
    mean: jax.Array, covariance: jax.Array, has_bias: bool, centering: str
) -> jax.Array:
    """``A`` from ``E[h]`` and ``Cov(h)``: the covariance ``C`` (centred, a layer with a bias),
    ``E[[h;1][h;1]^T]`` (homogeneous, ``centering="none"``; the homogeneous coordinate last), or
    ``E[h h^T]`` (a layer without a bias)."""
    if has_bias and centering != "none":
        return covariance
    second = covariance + jnp.outer(mean, mean)
    if not has_bias:
        return second
    one = jnp.ones((1, 1), second.dtype)
    top = jnp.concatenate([second, mean[:, None]], axis=1)
    return jnp.concatenate([top, jnp.concatenate([mean[None, :], one], axis=1)], axis=0)


@dataclasses.dataclass(frozen=True)
class _MeanRows:
    """A geometry whose rows are given: each example's mean input (K-FAC-reduce)."""

    d_in: int

    def input_rows(self, x: jax.Array) -> jax.Array:
        return x


def batch_moments(site: _tracing.LayerSite, capture: LayerCapture, weight_sharing: str):
    """``(InputMoments, E[g g^T])`` of one batch, K-FAC-expand or K-FAC-reduce."""
    geometry = site.geometry
    if weight_sharing == "expand":
        return input_moments(geometry, capture), output_moment(geometry, capture)
    rows = geometry.input_rows(capture.inputs)
    rows = rows.astype(statistics_dtype(rows.dtype))
    rows = rows.reshape(capture.batch, -1, rows.shape[-1])
    if capture.row_weights is None:
        means, counted = jnp.mean(rows, axis=1), None
    else:
        weights = capture.row_weights.astype(rows.dtype).reshape(capture.batch, -1)
        totals = jnp.sum(weights, axis=1)
        means = jnp.einsum("nr,nri->ni", weights, rows, precision=HIGHEST)
        means = means / jnp.maximum(totals, jnp.finfo(rows.dtype).tiny)[:, None]
        counted = (totals > 0).astype(rows.dtype)
    moments = input_moments(
        _MeanRows(geometry.d_in), dataclasses.replace(capture, inputs=means, row_weights=counted)
    )
    g = jax.vmap(geometry.output_rows)(capture.cotangents)
    g = g.astype(statistics_dtype(g.dtype)).reshape(g.shape[0], capture.batch, -1, g.shape[-1])
    sums = jnp.sum(g, axis=2).reshape(-1, g.shape[-1])
    output = jnp.matmul(sums.T, sums, precision=HIGHEST) * capture.scale.astype(sums.dtype)
    return moments, pool_mean(output, capture)
