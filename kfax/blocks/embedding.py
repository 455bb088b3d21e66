"""Embedding block: ``diag(a) (x) B`` with exact Tikhonov damping; never ``vocab x vocab``.

For a table ``E`` of ``V`` rows (kind ``"embedding"``), the input of the gather is the one-hot
vector of the id, so K-FAC's input factor is diagonal: ``a_v`` = the frequency of id ``v`` among
the rows (examples and positions) that count. The output factor is a dense layer's,
``B = 1/N sum_n sum_r g g^T`` (K-FAC-expand). With ``B = Q diag(s) Q^T``,

    (diag(a) (x) B + lam I)^{-1} vec(M) = vec([(M Q) / (a s^T + lam)] Q^T),

``M`` the ``(V, d)`` gradient. The block equals the exact curvature block where K-FAC is exact
for an embedding (for example a linear read-out of the embedding with a Gaussian output: every
example's ``g g^T`` is the same). Frequencies and ``B`` are bias-corrected moving averages; a
batch in which no row counted leaves the frequencies as they were.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from kfax import _tracing
from kfax._moments import HIGHEST, output_moment, pool_mean
from kfax.blocks.base import LayerGradient
from kfax.blocks.eigen import eigh
from kfax.blocks.kronecker_statistics import moving_average_step
from kfax.statistics import LayerCapture


class EmbeddingStatistics(NamedTuple):
    """``a`` (id frequencies, ``(V,)``), ``B`` (``(d, d)``) and the average's normaliser."""

    frequencies: jax.Array
    output: jax.Array
    weight: jax.Array


class EmbeddingCurvature(NamedTuple):
    """The frequencies at the last refresh and the eigendecomposition of ``B``."""

    frequencies: jax.Array
    q_b: jax.Array
    s_b: jax.Array


@dataclasses.dataclass(frozen=True)
class EmbeddingBlock:
    site: _tracing.LayerSite
    centering: str = "exact"  # unused: a gather has no bias

    name: ClassVar[str] = "embedding"
    observes_in_basis: ClassVar[bool] = False
    kinds: ClassVar[tuple[str, ...]] = ("embedding",)

    def factor_sizes(self) -> tuple[str, str]:
        return f"{self.site.geometry.d_in}(diag)", f"{self.site.geometry.d_out}^2"

    def init(self, dtype: Any) -> tuple[EmbeddingStatistics, EmbeddingCurvature]:
        v, d = self.site.geometry.d_in, self.site.geometry.d_out
        statistics = EmbeddingStatistics(
            jnp.zeros((v,), dtype), jnp.zeros((d, d), dtype), jnp.zeros((), dtype)
        )
        curvature = EmbeddingCurvature(
            jnp.ones((v,), dtype), jnp.eye(d, dtype=dtype), jnp.ones((d,), dtype)
        )
        return statistics, curvature

    def batch_frequencies(self, capture: LayerCapture, dtype) -> tuple[jax.Array, jax.Array]:
        """``(a, rows counted)`` of one batch, pooled across devices."""
        counts = self.site.geometry.token_counts(capture.inputs, capture.row_weights, dtype)
        total = jnp.sum(counts)
        counts, total = pool_mean(counts, capture), pool_mean(total, capture)
        return counts / jnp.maximum(total, jnp.finfo(dtype).tiny), total

    def observe(self, statistics, capture: LayerCapture, decay) -> EmbeddingStatistics:
        dtype = statistics.output.dtype
        frequencies, total = self.batch_frequencies(capture, dtype)
        output = output_moment(self.site.geometry, capture).astype(dtype)
        beta, weight = moving_average_step(statistics.weight, decay)
        fresh = statistics.frequencies + beta * (frequencies - statistics.frequencies)
        return EmbeddingStatistics(
            jnp.where(total > 0, fresh, statistics.frequencies),
            statistics.output + beta * (output - statistics.output),
            weight,
        )

    def refresh(self, statistics: EmbeddingStatistics, damping) -> EmbeddingCurvature:
        del damping
        s_b, q_b = eigh(statistics.output)
        return EmbeddingCurvature(statistics.frequencies, q_b, s_b)

    def observe_in_basis(self, curvature, capture, decay):
        del capture, decay
        return curvature

    def precondition(self, statistics, curvature: EmbeddingCurvature, grad, damping):
        del statistics
        dtype = curvature.q_b.dtype
        m = grad.weight.astype(dtype)
        rotated = jnp.matmul(m, curvature.q_b, precision=HIGHEST)
        scaled = rotated / (jnp.outer(curvature.frequencies, curvature.s_b) + damping)
        return LayerGradient(jnp.matmul(scaled, curvature.q_b.T, precision=HIGHEST), None)

    def dense(self, curvature: EmbeddingCurvature, damping) -> jax.Array:
        """``diag(a) (x) B + lam I`` over ``vec`` of the ``(V, d)`` table (row-major)."""
        b = (curvature.q_b * curvature.s_b) @ curvature.q_b.T
        size = curvature.frequencies.shape[0] * b.shape[0]
        return jnp.kron(jnp.diag(curvature.frequencies), b) + damping * jnp.eye(size, dtype=b.dtype)
