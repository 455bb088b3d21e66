"""Kronecker block with exact Tikhonov damping through eigendecompositions.

With ``A = Q_A diag(s_A) Q_A^T`` and ``B = Q_B diag(s_B) Q_B^T``,
``(A (x) B + lam I)^{-1} vec(M) = vec(Q_A [(Q_A^T M Q_B) / (s_A s_B^T + lam)] Q_B^T)``. The damping
is applied when the block is used, so a new damping takes effect at once. For centred K-FAC the
matrix this inverts is ``A_hom (x) B + lam (L L^T (x) I)`` with ``L = [[I, m], [0, 1]]``
(``docs/math.md``).
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from kfax._moments import HIGHEST
from kfax.blocks.kronecker import KroneckerBlock


class EigenBasis(NamedTuple):
    """Eigenvectors and eigenvalues (clipped at 0) of a layer's two factors."""

    q_a: jax.Array
    s_a: jax.Array
    q_b: jax.Array
    s_b: jax.Array


def eigh(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues (clipped at 0) and eigenvectors of a symmetric matrix."""
    values, vectors = jnp.linalg.eigh(0.5 * (matrix + matrix.T))
    return jnp.maximum(values, 0.0), vectors


def rotate(basis: EigenBasis, matrix: jax.Array) -> jax.Array:
    """``Q_A^T M Q_B``."""
    return jnp.matmul(
        jnp.matmul(basis.q_a.T, matrix, precision=HIGHEST), basis.q_b, precision=HIGHEST
    )


def rotate_back(basis: EigenBasis, matrix: jax.Array) -> jax.Array:
    """``Q_A M Q_B^T``."""
    return jnp.matmul(
        jnp.matmul(basis.q_a, matrix, precision=HIGHEST), basis.q_b.T, precision=HIGHEST
    )


class EigenBlock(KroneckerBlock):
    name: ClassVar[str] = "eigen"

    def identity_factors(self, input_size: int, output_size: int, dtype: Any) -> EigenBasis:
        return EigenBasis(
            jnp.eye(input_size, dtype=dtype),
            jnp.ones((input_size,), dtype),
            jnp.eye(output_size, dtype=dtype),
            jnp.ones((output_size,), dtype),
        )

    def refresh_factors(self, a, b, damping) -> EigenBasis:
        del damping
        s_a, q_a = eigh(a)
        s_b, q_b = eigh(b)
        return EigenBasis(q_a, s_a, q_b, s_b)

    def eigenvalues(self, factors: Any) -> jax.Array:
        """The diagonal of the block in the Kronecker eigenbasis: ``s_A s_B^T``."""
        return jnp.outer(factors.s_a, factors.s_b)

    def apply(self, factors, matrix, damping):
        return rotate_back(factors, rotate(factors, matrix) / (self.eigenvalues(factors) + damping))

    def solve_output(self, factors, vector, damping):
        rotated = jnp.matmul(vector, factors.q_b, precision=HIGHEST) / (factors.s_b + damping)
        return jnp.matmul(rotated, factors.q_b.T, precision=HIGHEST)

    def dense_core(self, factors, damping):
        q = jnp.kron(factors.q_a, factors.q_b)
        return (q * (self.eigenvalues(factors) + damping).reshape(-1)) @ q.T

    def dense_output(self, factors, damping):
        return (factors.q_b * (factors.s_b + damping)) @ factors.q_b.T
