"""Kronecker block with factored (pi) Tikhonov damping and explicit inverses (Martens & Grosse).

``(A + pi sqrt(lam) I)^{-1} M (B + sqrt(lam) / pi I)^{-1}`` with
``pi = sqrt((tr A / d_A) / (tr B / d_B))``, where ``tr A / d_A`` counts the bias coordinate of
centred K-FAC (see :meth:`KroneckerBlock.input_trace_mean`). The damping is the one of the last
refresh. Both trace means are floored at ``eps`` times the larger, so that ``pi`` stays within
``[sqrt(eps), 1 / sqrt(eps)]`` and neither side's damping vanishes.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from kfax._moments import HIGHEST
from kfax.blocks.kronecker import KroneckerBlock


class FactoredInverse(NamedTuple):
    """``(A + pi sqrt(lam) I)^{-1}`` and ``(B + sqrt(lam) / pi I)^{-1}``."""

    a_inverse: jax.Array
    b_inverse: jax.Array


def damped_inverse(matrix: jax.Array, damping: jax.Array) -> jax.Array:
    """``(M + damping I)^{-1}`` for a symmetric positive semi-definite ``M``, through Cholesky."""
    eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
    factor = jax.scipy.linalg.cho_factor(0.5 * (matrix + matrix.T) + damping * eye, lower=True)
    return jax.scipy.linalg.cho_solve(factor, eye)


class FactoredBlock(KroneckerBlock):
    name: ClassVar[str] = "factored"

    def pi(self, a: jax.Array, b: jax.Array) -> jax.Array:
        mean_a, mean_b = self.input_trace_mean(a), jnp.trace(b) / b.shape[0]
        floor = jnp.finfo(a.dtype).eps * jnp.maximum(jnp.maximum(mean_a, mean_b), 1.0)
        return jnp.sqrt(jnp.maximum(mean_a, floor) / jnp.maximum(mean_b, floor))

    def identity_factors(self, input_size: int, output_size: int, dtype: Any) -> FactoredInverse:
        return FactoredInverse(jnp.eye(input_size, dtype=dtype), jnp.eye(output_size, dtype=dtype))

    def refresh_factors(self, a, b, damping) -> FactoredInverse:
        pi, root = self.pi(a, b), jnp.sqrt(damping)
        return FactoredInverse(damped_inverse(a, pi * root), damped_inverse(b, root / pi))

    def apply(self, factors: FactoredInverse, matrix, damping):
        del damping
        left = jnp.matmul(factors.a_inverse, matrix, precision=HIGHEST)
        return jnp.matmul(left, factors.b_inverse, precision=HIGHEST)

    def solve_output(self, factors: FactoredInverse, vector, damping):
        del damping
        return jnp.matmul(vector, factors.b_inverse, precision=HIGHEST)

    def dense_core(self, factors: FactoredInverse, damping):
        del damping
        return jnp.kron(jnp.linalg.inv(factors.a_inverse), jnp.linalg.inv(factors.b_inverse))

    def dense_output(self, factors: FactoredInverse, damping):
        del damping
        return jnp.linalg.inv(factors.b_inverse)
