"""One-sided Kronecker block: a layer too wide for a dense factor keeps that factor diagonal.

When ``A`` (``d_in`` wide, plus the homogeneous coordinate) or ``B`` (``d_out`` wide) would be
wider than ``max_factor_size`` (a 50,000-word output projection), that side's factor is its
diagonal: ``diag(E[(h - m)^2])`` (centred), ``diag(E[h^2])`` (no bias, or ``[E[h^2]; 1]``
homogeneous) or ``diag(E[g^2])``. Memory and work on that side are linear in its width. The
other side stays dense. Damping is exact Tikhonov through the dense side's eigendecomposition:
with ``A = Q_A diag(s_A) Q_A^T`` (``Q = I`` on a diagonal side),
``(A (x) B + lam I)^{-1} vec(M) = vec(Q_A [(Q_A^T M Q_B) / (s_A s_B^T + lam)] Q_B^T)``, whichever
block (``factored``, ``eigen``, ``ekfac``) was asked for (``requested``). Centring and the bias
follow :class:`~kfax.blocks.kronecker.KroneckerBlock`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from kfax._moments import HIGHEST, pool_mean, statistics_dtype
from kfax.blocks.eigen import eigh
from kfax.blocks.kronecker import KroneckerBlock, KroneckerCurvature
from kfax.blocks.kronecker_statistics import KroneckerStatistics, moving_average_step
from kfax.statistics import LayerCapture


class OneSidedBasis(NamedTuple):
    """Eigenvectors (``None`` on a diagonal side) and eigenvalues of the two factors."""

    q_a: jax.Array | None
    s_a: jax.Array
    q_b: jax.Array | None
    s_b: jax.Array


def _rotate_left(q, m, transpose):
    if q is None:
        return m
    return jnp.matmul(q.T if transpose else q, m, precision=HIGHEST)


def _rotate_right(m, q, transpose):
    if q is None:
        return m
    return jnp.matmul(m, q.T if transpose else q, precision=HIGHEST)


def _dense(q, s):
    return jnp.diag(s) if q is None else (q * s) @ q.T


def diagonal_input_moments(capture: LayerCapture, geometry) -> tuple[jax.Array, ...]:
    """``(mean, E[(h - mean)^2], count)`` over the rows that count, pooled across devices."""
    rows = geometry.input_rows(capture.inputs)
    rows = rows.astype(statistics_dtype(rows.dtype))
    weights = capture.row_weights
    weights = (
        jnp.ones(rows.shape[:1], rows.dtype) if weights is None else weights.astype(rows.dtype)
    )
    count = jnp.sum(weights)
    mean = jnp.matmul(weights, rows, precision=HIGHEST) / jnp.maximum(count, 1e-30)
    variance = jnp.matmul(weights, jnp.square(rows - mean), precision=HIGHEST)
    variance = variance / jnp.maximum(count, 1e-30)
    axis = capture.axis_name
    if axis is None:
        return mean, variance, count
    total = jax.lax.psum(count, axis)
    pooled = jax.lax.psum(count * mean, axis) / jnp.maximum(total, 1e-30)
    spread = count * (variance + jnp.square(mean - pooled))
    return pooled, jax.lax.psum(spread, axis) / jnp.maximum(total, 1e-30), total


@dataclasses.dataclass(frozen=True)
class OneSidedBlock(KroneckerBlock):
    """A Kronecker block with a diagonal factor on each side wider than ``max_factor_size``."""

    requested: str = "factored"

    name: ClassVar[str] = "one_sided"

    @property
    def diagonal_input(self) -> bool:
        return self.max_factor_size is not None and self.input_size > self.max_factor_size

    @property
    def diagonal_output(self) -> bool:
        return self.max_factor_size is not None and self.output_size > self.max_factor_size

    def factor_sizes(self) -> tuple[str, str]:
        a = f"{self.input_size}(diag)" if self.diagonal_input else f"{self.input_size}^2"
        b = f"{self.output_size}(diag)" if self.diagonal_output else f"{self.output_size}^2"
        return a, b

    def init(self, dtype: Any) -> tuple[KroneckerStatistics, KroneckerCurvature]:
        d_in, d_out = self.site.geometry.d_in, self.output_size
        covariance = (d_in,) if self.diagonal_input else (d_in, d_in)
        output = (d_out,) if self.diagonal_output else (d_out, d_out)
        statistics = KroneckerStatistics(
            jnp.zeros((d_in,), dtype),
            jnp.zeros(covariance, dtype),
            jnp.zeros(output, dtype),
            jnp.zeros((), dtype),
        )
        identity = self.identity_factors(self.input_size, d_out, dtype)
        return statistics, KroneckerCurvature(jnp.zeros((d_in,), dtype), identity)

    def observe(self, statistics, capture: LayerCapture, decay) -> KroneckerStatistics:
        geometry = self.site.geometry
        dtype = statistics.covariance.dtype
        if self.diagonal_input:
            mean, covariance, count = diagonal_input_moments(capture, geometry)
        else:
            from kfax._moments import input_moments  # noqa: PLC0415

            mean, covariance, count = input_moments(geometry, capture)
        g = jax.vmap(geometry.output_rows)(capture.cotangents).reshape(-1, geometry.d_out)
        g = g.astype(statistics_dtype(g.dtype))
        if self.diagonal_output:
            output = jnp.sum(jnp.square(g), axis=0)
        else:
            output = jnp.matmul(g.T, g, precision=HIGHEST)
        output = pool_mean(output * capture.scale.astype(g.dtype), capture)
        beta, weight = moving_average_step(statistics.weight, decay)
        empty = count <= 0
        mean = jnp.where(empty, statistics.mean, mean.astype(dtype))
        covariance = jnp.where(empty, statistics.covariance, covariance.astype(dtype))
        delta = mean - statistics.mean
        spread = jnp.square(delta) if self.diagonal_input else jnp.outer(delta, delta)
        return KroneckerStatistics(
            mean=statistics.mean + beta * delta,
            covariance=(1 - beta) * statistics.covariance
            + beta * covariance
            + (beta * (1 - beta)) * spread,
            output=statistics.output + beta * (output.astype(dtype) - statistics.output),
            weight=weight,
        )

    def input_factor(self, statistics: KroneckerStatistics) -> jax.Array:
        if not self.diagonal_input:
            return super().input_factor(statistics)
        if self.centred:
            return statistics.covariance
        second = statistics.covariance + jnp.square(statistics.mean)
        if self.homogeneous:
            return jnp.concatenate([second, jnp.ones((1,), second.dtype)])
        return second

    def input_trace_mean(self, a: jax.Array) -> jax.Array:
        return jnp.mean(a) if a.ndim == 1 else super().input_trace_mean(a)

    def identity_factors(self, input_size: int, output_size: int, dtype) -> OneSidedBasis:
        q_a = None if self.diagonal_input else jnp.eye(input_size, dtype=dtype)
        q_b = None if self.diagonal_output else jnp.eye(output_size, dtype=dtype)
        return OneSidedBasis(
            q_a, jnp.ones((input_size,), dtype), q_b, jnp.ones((output_size,), dtype)
        )

    def refresh_factors(self, a, b, damping) -> OneSidedBasis:
        del damping
        s_a, q_a = (jnp.maximum(a, 0.0), None) if a.ndim == 1 else eigh(a)
        s_b, q_b = (jnp.maximum(b, 0.0), None) if b.ndim == 1 else eigh(b)
        return OneSidedBasis(q_a, s_a, q_b, s_b)

    def apply(self, factors: OneSidedBasis, matrix, damping):
        rotated = _rotate_right(_rotate_left(factors.q_a, matrix, True), factors.q_b, False)
        scaled = rotated / (jnp.outer(factors.s_a, factors.s_b) + damping)
        return _rotate_right(_rotate_left(factors.q_a, scaled, False), factors.q_b, True)

    def solve_output(self, factors: OneSidedBasis, vector, damping):
        rotated = _rotate_right(vector[None], factors.q_b, False) / (factors.s_b + damping)
        return _rotate_right(rotated, factors.q_b, True)[0]

    def dense_core(self, factors: OneSidedBasis, damping):
        a, b = _dense(factors.q_a, factors.s_a), _dense(factors.q_b, factors.s_b)
        return jnp.kron(a, b) + damping * jnp.eye(a.shape[0] * b.shape[0], dtype=a.dtype)

    def dense_output(self, factors: OneSidedBasis, damping):
        b = _dense(factors.q_b, factors.s_b)
        return b + damping * jnp.eye(b.shape[0], dtype=b.dtype)
