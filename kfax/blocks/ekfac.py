"""Eigenvalue-corrected K-FAC (EKFAC, George et al. 2018).

Keeps K-FAC's Kronecker eigenbasis ``Q_A (x) Q_B`` and re-estimates the diagonal in it from
per-example gradients: ``s = E_n[(Q_A^T G_n Q_B)^2]``, where ``G_n = sum_r h_nr g_nr^T`` is example
``n``'s gradient as a ``(d_in, d_out)`` matrix (positions are summed *before* squaring, as the
paper defines it) and ``h`` is centred or homogeneous as the block's centring says. Then
``Delta = Q_A [(Q_A^T M Q_B) / (s + lam)] Q_B^T``.

The scalings live with the basis they were measured in: a refresh starts their moving average
anew, and until a statistics step has measured them in the new basis the block uses K-FAC's own
eigenvalues ``s_A s_B^T`` there. Scalings estimated in one basis are never applied in another,
whatever the cadences.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from kfax._moments import HIGHEST, pool_mean, statistics_dtype
from kfax.blocks.eigen import EigenBlock, eigh
from kfax.blocks.kronecker import KroneckerCurvature
from kfax.blocks.kronecker_statistics import moving_average_step
from kfax.statistics import LayerCapture


class EKFACBasis(NamedTuple):
    """K-FAC's eigenbasis and eigenvalues, and the scalings measured in that basis."""

    q_a: jax.Array
    s_a: jax.Array
    q_b: jax.Array
    s_b: jax.Array
    scalings: jax.Array
    scalings_weight: jax.Array


def per_example_squares(h: jax.Array, g: jax.Array, scale: jax.Array) -> jax.Array:
    """``scale * sum_c sum_n (sum_r h_nr g_cnr^T)^2``, elementwise, for ``h (N, R, i)``,
    ``g (C, N, R, o)``.

    One position per example: ``(h^2)^T (sum_c g^2)``. Several: whichever of two exact forms needs
    less memory, the per-example matrices (``C N i o``) or products of position pairs
    (``N R^2 (i + o)``).
    """
    columns, batch, positions = g.shape[0], g.shape[1], g.shape[2]
    d_in, d_out = h.shape[-1], g.shape[-1]
    if positions == 1:
        g_sq = jnp.sum(jnp.square(g[:, :, 0]), axis=0)
        return jnp.matmul(jnp.square(h[:, 0]).T, g_sq, precision=HIGHEST) * scale
    if columns * d_in * d_out <= positions * positions * (d_in + d_out):
        per_example = jnp.einsum("nri,cnro->cnio", h, g, precision=HIGHEST)
        return jnp.sum(jnp.square(per_example), axis=(0, 1)) * scale
    h_pairs = jnp.einsum("nri,nsi->nrsi", h, h, precision=HIGHEST).reshape(-1, d_in)
    g_pairs = jnp.einsum("cnro,cnso->nrso", g, g, precision=HIGHEST).reshape(-1, d_out)
    del batch
    return jnp.matmul(h_pairs.T, g_pairs, precision=HIGHEST) * scale


class EKFACBlock(EigenBlock):
    name: ClassVar[str] = "ekfac"
    observes_in_basis: ClassVar[bool] = True

    def identity_factors(self, input_size: int, output_size: int, dtype: Any) -> EKFACBasis:
        basis = super().identity_factors(input_size, output_size, dtype)
        return EKFACBasis(*basis, jnp.zeros((input_size, output_size), dtype), jnp.zeros((), dtype))

    def refresh_factors(self, a, b, damping) -> EKFACBasis:
        del damping
        s_a, q_a = eigh(a)
        s_b, q_b = eigh(b)
        zeros = jnp.zeros((a.shape[0], b.shape[0]), a.dtype)
        return EKFACBasis(q_a, s_a, q_b, s_b, zeros, jnp.zeros((), a.dtype))

    def eigenvalues(self, factors: EKFACBasis) -> jax.Array:
        measured = factors.scalings_weight > 0
        return jnp.where(measured, factors.scalings, jnp.outer(factors.s_a, factors.s_b))

    def layer_rows(self, curvature: KroneckerCurvature, capture: LayerCapture) -> jax.Array:
        """Rows of ``h`` as the block's input factor sees them, shape ``(N, R, input_size)``."""
        rows = self.site.geometry.input_rows(capture.inputs)
        rows = rows.astype(statistics_dtype(rows.dtype))
        if self.centred:
            rows = rows - curvature.mean.astype(rows.dtype)
        elif self.homogeneous:
            rows = jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), rows.dtype)], axis=1)
        return rows.reshape(capture.batch, -1, rows.shape[-1])

    def observe_in_basis(
        self, curvature: KroneckerCurvature, capture: LayerCapture, decay: jax.Array
    ) -> KroneckerCurvature:
        basis: EKFACBasis = curvature.factors
        dtype = basis.q_a.dtype
        h = jnp.matmul(
            self.layer_rows(curvature, capture).astype(dtype), basis.q_a, precision=HIGHEST
        )
        g = jax.vmap(self.site.geometry.output_rows)(capture.cotangents).astype(dtype)
        g = jnp.matmul(g, basis.q_b, precision=HIGHEST)
        g = g.reshape(g.shape[0], capture.batch, -1, g.shape[-1])
        fresh = pool_mean(per_example_squares(h, g, capture.scale.astype(dtype)), capture)
        beta, weight = moving_average_step(basis.scalings_weight, decay)
        scalings = basis.scalings + beta * (fresh - basis.scalings)
        return curvature._replace(factors=basis._replace(scalings=scalings, scalings_weight=weight))
