"""Damped inverses and eigenbases of Kronecker factors, and applying them to a gradient matrix.

Pure array functions on one layer's factors: factored (pi) Tikhonov damping with explicit
inverses, and exact Tikhonov damping through eigendecompositions (which EKFAC rescales).
Knows nothing of layers, tracing or optimiser state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def pi_factor(a: jax.Array, b: jax.Array) -> jax.Array:
    """``pi = sqrt((tr A / d_A) / (tr B / d_B))`` (Martens & Grosse 2015, section 6.3)."""
    mean_a = jnp.trace(a) / a.shape[0]
    mean_b = jnp.trace(b) / b.shape[0]
    tiny = jnp.finfo(a.dtype).tiny
    return jnp.sqrt(jnp.maximum(mean_a, tiny) / jnp.maximum(mean_b, tiny))


def damped_inverse(matrix: jax.Array, damping: jax.Array) -> jax.Array:
    """``(M + damping I)^{-1}`` for a symmetric positive semi-definite ``M``, through Cholesky."""
    eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
    sym = 0.5 * (matrix + matrix.T) + damping * eye
    factor = jax.scipy.linalg.cho_factor(sym, lower=True)
    return jax.scipy.linalg.cho_solve(factor, eye)


def factored_inverses(
    a: jax.Array, b: jax.Array, damping: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(A + pi sqrt(lam) I)^{-1}`` and ``(B + sqrt(lam) / pi I)^{-1}``."""
    pi = pi_factor(a, b)
    root = jnp.sqrt(damping)
    return damped_inverse(a, pi * root), damped_inverse(b, root / pi)


def eigh(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues (clipped at 0) and eigenvectors of a symmetric matrix."""
    values, vectors = jnp.linalg.eigh(0.5 * (matrix + matrix.T))
    return jnp.maximum(values, 0.0), vectors


def kron_apply(a_inv: jax.Array, grad: jax.Array, b_inv: jax.Array) -> jax.Array:
    """``A^{-1} M B^{-1}``: the Kronecker inverse applied to ``vec(M)`` (row-major ``h (x) g``)."""
    return jnp.matmul(jnp.matmul(a_inv, grad, precision=HIGHEST), b_inv, precision=HIGHEST)


def eigen_apply(
    q_a: jax.Array, q_b: jax.Array, scale: jax.Array, grad: jax.Array, damping: jax.Array
) -> jax.Array:
    """``Q_A [(Q_A^T M Q_B) / (scale + damping)] Q_B^T`` (exact Tikhonov, or EKFAC's scalings)."""
    rotated = jnp.matmul(jnp.matmul(q_a.T, grad, precision=HIGHEST), q_b, precision=HIGHEST)
    rotated = rotated / (scale + damping)
    return jnp.matmul(jnp.matmul(q_a, rotated, precision=HIGHEST), q_b.T, precision=HIGHEST)
