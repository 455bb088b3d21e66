"""Diagonal block: one curvature entry per parameter entry, ``(diag + lam)^{-1} grad``.

The default for kind ``"parameter"`` (a tied or reused weight, or one an unknown primitive
uses) and a choice for dense, convolution and ``"scale_shift"`` layers (``block="diagonal"``).
Its statistics:

* ``"parameter"``: ``scale * sum_columns (sum_n eps_n v_cn)^2``, ``v_cn`` example ``n``'s
  gradient of the whole parameter for output-cotangent column ``c`` and ``eps_n`` random signs
  (:mod:`kfax._capture`): unbiased for the diagonal of the curvature of the mean loss (for
  ``kind="mc"`` the diagonal of the Fisher, ``E[(sum_n grad l_n(y~))^2] / N``), without
  per-example gradients;
* ``"scale_shift"``: the diagonal of :mod:`kfax.blocks.scale_shift`'s exact per-feature blocks;
* dense and convolution layers: ``scale * sum_c sum_n (sum_r h g^T)^2`` per weight entry and
  ``scale * sum_c sum_n (sum_r g)^2`` per bias entry, each example's exact gradient squared (the
  diagonal of the curvature itself, no Kronecker approximation).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from kfax import _tracing
from kfax._moments import HIGHEST, pool_mean, statistics_dtype
from kfax.blocks.base import LayerGradient
from kfax.blocks.ekfac import per_example_squares
from kfax.blocks.kronecker_statistics import moving_average_step
from kfax.blocks.scale_shift import per_feature_blocks
from kfax.statistics import LayerCapture


class DiagonalStatistics(NamedTuple):
    """The weight's and the bias's diagonals (``None`` without a bias), and the normaliser."""

    weight_diagonal: jax.Array
    bias_diagonal: jax.Array | None
    weight: jax.Array


@dataclasses.dataclass(frozen=True)
class DiagonalBlock:
    site: _tracing.LayerSite
    centering: str = "exact"  # unused

    name: ClassVar[str] = "diagonal"
    observes_in_basis: ClassVar[bool] = False
    kinds: ClassVar[tuple[str, ...]] = ("parameter", "scale_shift", "dense", "conv")

    @property
    def _shapes(self) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        g = self.site.geometry
        if g.kind == "parameter":
            return g.shape, None
        d = (g.d_out,)
        if g.kind in ("dense", "conv"):
            return (g.d_in, g.d_out), (d if self.site.bias_path is not None else None)
        return d, (d if g.has_scale and g.has_shift else None)

    def factor_sizes(self) -> tuple[str, str]:
        sizes = [s for s in self._shapes if s is not None]
        entries = sum(math.prod(s) for s in sizes)
        return "-", f"{entries}(diag)"

    def init(self, dtype: Any) -> tuple[DiagonalStatistics, DiagonalStatistics]:
        weight, bias = self._shapes
        statistics = DiagonalStatistics(
            jnp.zeros(weight, dtype),
            None if bias is None else jnp.zeros(bias, dtype),
            jnp.zeros((), dtype),
        )
        return statistics, statistics

    def batch_diagonals(self, capture: LayerCapture, dtype) -> tuple[jax.Array, Any]:
        if self.site.geometry.kind in ("dense", "conv"):
            return self._kronecker_diagonals(capture, dtype)
        if self.site.geometry.kind == "parameter":
            g = capture.cotangents.astype(statistics_dtype(capture.cotangents.dtype))
            squares = jnp.sum(jnp.square(g), axis=0) * capture.scale.astype(g.dtype)
            return pool_mean(squares, capture).astype(dtype), None
        blocks = per_feature_blocks(self.site, capture, dtype)
        diagonal = jnp.diagonal(blocks, axis1=1, axis2=2)
        bias = diagonal[:, 1] if diagonal.shape[1] == 2 else None
        return diagonal[:, 0], bias

    def _kronecker_diagonals(self, capture: LayerCapture, dtype) -> tuple[jax.Array, Any]:
        geometry, n = self.site.geometry, capture.batch
        h = geometry.input_rows(capture.inputs).astype(dtype)
        h = h.reshape(n, -1, geometry.d_in)
        g = jax.vmap(geometry.output_rows)(capture.cotangents).astype(dtype)
        g = g.reshape(g.shape[0], n, -1, geometry.d_out)
        scale = capture.scale.astype(dtype)
        weight = pool_mean(per_example_squares(h, g, scale), capture)
        if self.site.bias_path is None:
            return weight, None
        sums = jnp.sum(g, axis=2)
        bias = jnp.einsum("cno,cno->o", sums, sums, precision=HIGHEST) * scale
        return weight, pool_mean(bias, capture)

    def observe(self, statistics, capture: LayerCapture, decay) -> DiagonalStatistics:
        weight, bias = self.batch_diagonals(capture, statistics.weight_diagonal.dtype)
        beta, normaliser = moving_average_step(statistics.weight, decay)
        mix = lambda old, new: old + beta * (new - old)  # noqa: E731
        return DiagonalStatistics(
            mix(statistics.weight_diagonal, weight),
            None if bias is None else mix(statistics.bias_diagonal, bias),
            normaliser,
        )

    def refresh(self, statistics: DiagonalStatistics, damping) -> DiagonalStatistics:
        del damping
        return statistics

    def observe_in_basis(self, curvature, capture, decay):
        del capture, decay
        return curvature

    def precondition(self, statistics, curvature: DiagonalStatistics, grad, damping):
        del statistics
        dtype = curvature.weight_diagonal.dtype
        weight = grad.weight.astype(dtype).reshape(curvature.weight_diagonal.shape)
        weight = weight / (curvature.weight_diagonal + damping)
        if grad.bias is None:
            return LayerGradient(weight, None)
        bias = grad.bias.astype(dtype).reshape(-1) / (curvature.bias_diagonal + damping)
        return LayerGradient(weight, bias.reshape(grad.bias.shape))

    def dense(self, curvature: DiagonalStatistics, damping) -> jax.Array:
        parts = [curvature.weight_diagonal.reshape(-1)]
        if curvature.bias_diagonal is not None:
            parts.append(curvature.bias_diagonal.reshape(-1))
        return jnp.diag(jnp.concatenate(parts) + damping)
