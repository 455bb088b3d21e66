"""Scale-and-shift block: a full ``k x k`` block per feature from per-example gradients.

For an elementwise scale ``s`` and shift ``b`` (kind ``"scale_shift"``; ``k = 2``, or ``k = 1``
for a scale or a shift alone), feature ``j``'s block is the exact curvature of its parameters,

    F_j = scale * sum_columns sum_n G_nj G_nj^T,   G_nj = (sum_rows x g_scale, sum_rows g_shift)

(each example's gradient of ``(s_j, b_j)`` for one output-cotangent column; the mean over
examples of the curvature kind's expectation). With damping, each feature solves
``(F_j + lam I) delta_j = grad_j``: exact Tikhonov, a new damping takes effect at once. Only the
cross-feature terms of the curvature are left out.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from kfax import _tracing
from kfax._moments import HIGHEST, pool_mean
from kfax.blocks.base import LayerGradient
from kfax.blocks.kronecker_statistics import moving_average_step
from kfax.statistics import LayerCapture


class ScaleShiftStatistics(NamedTuple):
    """``F`` (``(d, k, k)``) and the moving average's normaliser."""

    blocks: jax.Array
    weight: jax.Array


def per_feature_blocks(site: _tracing.LayerSite, capture: LayerCapture, dtype) -> jax.Array:
    """One batch's ``F``, ``(d, k, k)``: per feature, the mean outer product of the examples'
    gradients, pooled across devices."""
    grads = site.geometry.per_example_gradients(capture.inputs, capture.cotangents, capture.batch)
    grads = grads.astype(dtype)
    blocks = jnp.einsum("cnda,cndb->dab", grads, grads, precision=HIGHEST)
    return pool_mean(blocks * capture.scale.astype(dtype), capture)


def solve_small(blocks: jax.Array, vectors: jax.Array, damping) -> jax.Array:
    """``(F_j + lam I)^{-1} v_j`` for every feature ``j``, in closed form (``k`` is 1 or 2)."""
    if blocks.shape[-1] == 1:
        return vectors / (blocks[:, :, 0] + damping)
    a, b = blocks[:, 0, 0] + damping, blocks[:, 0, 1]
    c, d = blocks[:, 1, 0], blocks[:, 1, 1] + damping
    determinant = a * d - b * c
    first = (d * vectors[:, 0] - b * vectors[:, 1]) / determinant
    second = (a * vectors[:, 1] - c * vectors[:, 0]) / determinant
    return jnp.stack([first, second], axis=-1)


def stack_parameters(grad: LayerGradient, dtype) -> jax.Array:
    """``(d, k)``: the scale (the layer's weight) and the shift (its bias) per feature."""
    parts = [grad.weight.astype(dtype).reshape(-1)]
    if grad.bias is not None:
        parts.append(grad.bias.astype(dtype).reshape(-1))
    return jnp.stack(parts, axis=-1)


def unstack_parameters(delta: jax.Array, grad: LayerGradient) -> LayerGradient:
    bias = None if grad.bias is None else delta[:, 1].reshape(grad.bias.shape)
    return LayerGradient(delta[:, 0], bias)


@dataclasses.dataclass(frozen=True)
class ScaleShiftBlock:
    site: _tracing.LayerSite
    centering: str = "exact"  # unused

    name: ClassVar[str] = "scale_shift"
    observes_in_basis: ClassVar[bool] = False
    kinds: ClassVar[tuple[str, ...]] = ("scale_shift",)

    @property
    def k(self) -> int:
        return self.site.geometry.d_in

    def factor_sizes(self) -> tuple[str, str]:
        return "-", f"{self.site.geometry.d_out}x{self.k}^2"

    def init(self, dtype: Any) -> tuple[ScaleShiftStatistics, jax.Array]:
        d, k = self.site.geometry.d_out, self.k
        statistics = ScaleShiftStatistics(jnp.zeros((d, k, k), dtype), jnp.zeros((), dtype))
        return statistics, jnp.broadcast_to(jnp.eye(k, dtype=dtype), (d, k, k))

    def observe(self, statistics, capture: LayerCapture, decay) -> ScaleShiftStatistics:
        fresh = per_feature_blocks(self.site, capture, statistics.blocks.dtype)
        beta, weight = moving_average_step(statistics.weight, decay)
        return ScaleShiftStatistics(statistics.blocks + beta * (fresh - statistics.blocks), weight)

    def refresh(self, statistics: ScaleShiftStatistics, damping) -> jax.Array:
        del damping
        return statistics.blocks

    def observe_in_basis(self, curvature, capture, decay):
        del capture, decay
        return curvature

    def precondition(self, statistics, curvature: jax.Array, grad, damping) -> LayerGradient:
        del statistics
        vectors = stack_parameters(grad, curvature.dtype)
        return unstack_parameters(solve_small(curvature, vectors, damping), grad)

    def dense(self, curvature: jax.Array, damping) -> jax.Array:
        """The damped matrix over (scale entries, then shift entries), as K-FAC orders them."""
        d, k = self.site.geometry.d_out, self.k
        full = jnp.zeros((k, d, k, d), curvature.dtype)
        index = jnp.arange(d)
        full = full.at[:, index, :, index].set(curvature)
        return full.reshape(k * d, k * d) + damping * jnp.eye(k * d, dtype=curvature.dtype)
