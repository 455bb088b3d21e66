"""What every Kronecker-factored block shares: the factors' statistics, centring, and the bias.

A Kronecker block approximates a layer's curvature as ``A (x) B``. This module holds the block's
statistics (``E[h]``, ``Cov(h)``, ``E[g g^T]``; their moving averages, the input factor and a
batch's moments are in :mod:`kfax.blocks.kronecker_statistics`) and turns a layer's gradient
into the matrix a concrete block (``factored``, ``eigen``, ``ekfac``) inverts, and back. Concrete
blocks only say how to refresh their curvature from ``(A, B, damping)``, apply it to a matrix,
and solve with the output factor.

Centring (``docs/math.md``, "Centered K-FAC"), for a layer ``a = K^T h + b`` with a bias:

* ``"exact"``: ``A = C = Cov(h)``; ``Delta_K = C^{-1} (dK - m db^T) B^{-1}``,
  ``Delta_b = B^{-1} db - Delta_K^T m``; at zero damping this equals homogeneous K-FAC exactly;
* ``"simple"``: the same weight update, ``Delta_b = B^{-1} db``;
* ``"none"``: homogeneous K-FAC, ``A = E[[h; 1][h; 1]^T]`` (size ``d_in + 1``).

The mean ``m`` used by the update is the one stored with the curvature at its last refresh, so
the identity with homogeneous K-FAC holds on every step, not only on refresh steps.

Weight sharing (positions that share the weight: sequence axes, attention, convolution
locations; Eschenhagen et al. 2023), with ``N`` examples and ``R`` positions each:

* ``"expand"`` (default): ``A`` averages over examples and positions, ``B = 1/N sum_n sum_r g
  g^T``; exact for a linear layer whose positions have independent outputs;
* ``"reduce"``: ``A`` from each example's mean input over its (counted) positions, ``B = 1/N
  sum_n (sum_r g)(sum_r g)^T``; exact for a linear layer whose outputs are summed (or averaged)
  over positions before the loss.

A layer whose factor on one side is wider than ``max_factor_size`` gets the one-sided block
(:mod:`kfax.blocks.one_sided`): that side's factor is diagonal.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from kfax import _tracing
from kfax._moments import HIGHEST
from kfax.blocks.base import LayerGradient
from kfax.blocks.kronecker_statistics import (
    KroneckerStatistics,
    batch_moments,
    input_factor,
    merge_moments,
)
from kfax.statistics import LayerCapture

CENTERINGS = ("exact", "simple", "none")


class KroneckerCurvature(NamedTuple):
    """A Kronecker block's curvature: the mean it was refreshed with, and the block's own part."""

    mean: jax.Array
    factors: Any


@dataclasses.dataclass(frozen=True)
class KroneckerBlock:
    """Base of the Kronecker blocks: statistics, centring and the bias algebra.

    Subclasses implement ``identity_factors``, ``refresh_factors``, ``apply`` and
    ``solve_output``; see :mod:`kfax.blocks.factored` for the smallest one.

    Attributes:
      site: the layer.
      centering: ``"exact"``, ``"simple"`` or ``"none"`` (module docstring).
      weight_sharing: ``"expand"`` or ``"reduce"`` (module docstring).
      max_factor_size: a side whose factor would be wider than this is diagonal (the
        one-sided block, chosen by :meth:`build`); ``None``: no limit.
    """

    site: _tracing.LayerSite
    centering: str = "exact"
    weight_sharing: str = "expand"
    max_factor_size: int | None = None

    name: ClassVar[str] = "kronecker"
    kinds: ClassVar[tuple[str, ...]] = ("dense", "conv")
    observes_in_basis: ClassVar[bool] = False  # EKFAC overrides observe_in_basis

    @classmethod
    def build(cls, site: _tracing.LayerSite, centering: str = "exact", **options: Any) -> Any:
        """This block for ``site``, or the one-sided block when a factor is too wide."""
        block = cls(site, centering, **options)
        limit = block.max_factor_size
        if limit is not None and (block.input_size > limit or block.output_size > limit):
            from kfax.blocks.one_sided import OneSidedBlock  # noqa: PLC0415 (imports this)

            return OneSidedBlock(site, centering, **options, requested=cls.name)
        return block

    def factor_sizes(self) -> tuple[str, str]:
        """How :func:`kfax.describe` shows the sizes of ``A`` and ``B``."""
        return f"{self.input_size}^2", f"{self.output_size}^2"

    # ---------------------------------------------------------------- shape of the factors

    @property
    def has_bias(self) -> bool:
        return self.site.bias_path is not None

    @property
    def centred(self) -> bool:
        return self.has_bias and self.centering != "none"

    @property
    def homogeneous(self) -> bool:
        return self.has_bias and self.centering == "none"

    @property
    def input_size(self) -> int:
        """Size of ``A``: ``d_in``, plus the homogeneous coordinate for homogeneous K-FAC."""
        return self.site.geometry.d_in + int(self.homogeneous)

    @property
    def output_size(self) -> int:
        return self.site.geometry.d_out

    # ---------------------------------------------------------------- statistics

    def init(self, dtype: Any) -> tuple[KroneckerStatistics, KroneckerCurvature]:
        d_in, d_out = self.site.geometry.d_in, self.output_size
        statistics = KroneckerStatistics(
            jnp.zeros((d_in,), dtype),
            jnp.zeros((d_in, d_in), dtype),
            jnp.zeros((d_out, d_out), dtype),
            jnp.zeros((), dtype),
        )
        identity = self.identity_factors(self.input_size, d_out, dtype)
        return statistics, KroneckerCurvature(jnp.zeros((d_in,), dtype), identity)

    def observe(
        self, statistics: KroneckerStatistics, capture: LayerCapture, decay: jax.Array
    ) -> KroneckerStatistics:
        moments, output = batch_moments(self.site, capture, self.weight_sharing)
        dtype = statistics.covariance.dtype
        return merge_moments(
            statistics,
            moments.mean.astype(dtype),
            moments.covariance.astype(dtype),
            moments.count,
            output.astype(dtype),
            decay,
        )

    def input_factor(self, statistics: KroneckerStatistics) -> jax.Array:
        return input_factor(statistics.mean, statistics.covariance, self.has_bias, self.centering)

    def input_trace_mean(self, a: jax.Array) -> jax.Array:
        """The mean eigenvalue of the whole input factor, the bias coordinate included.

        Centred K-FAC's input factor is ``blockdiag(C, 1)`` in centred coordinates, so the bias
        coordinate counts with its 1: a layer whose input is constant (``C = 0``) keeps a
        positive trace, and its bias keeps a finite damping (issue: a frozen bias).
        """
        if self.centred:
            return (jnp.trace(a) + 1) / (a.shape[0] + 1)
        return jnp.trace(a) / a.shape[0]

    # ---------------------------------------------------------------- curvature

    def refresh(self, statistics: KroneckerStatistics, damping: jax.Array) -> KroneckerCurvature:
        a = self.input_factor(statistics)
        factors = self.refresh_factors(a, statistics.output, jnp.asarray(damping, a.dtype))
        return KroneckerCurvature(statistics.mean, factors)

    def observe_in_basis(
        self, curvature: KroneckerCurvature, capture: LayerCapture, decay: jax.Array
    ) -> KroneckerCurvature:
        del capture, decay
        return curvature

    def precondition(
        self,
        statistics: KroneckerStatistics,
        curvature: KroneckerCurvature,
        grad: LayerGradient,
        damping: jax.Array,
    ) -> LayerGradient:
        del statistics
        dtype = curvature.mean.dtype
        damping = jnp.asarray(damping, dtype)
        dk = grad.weight.astype(dtype)
        # A bias over several output axes (DenseGeneral) is flattened as the output features.
        db = None if grad.bias is None else grad.bias.astype(dtype).reshape(-1)
        mean = curvature.mean
        if self.centred:
            dk = dk - jnp.outer(mean, db)
        elif self.homogeneous:
            dk = jnp.concatenate([dk, db[None, :]], axis=0)
        delta = self.apply(curvature.factors, dk, damping)
        if self.homogeneous:
            return LayerGradient(delta[:-1], delta[-1].reshape(grad.bias.shape))
        if not self.centred:
            return LayerGradient(delta, None)
        delta_b = self.solve_output(curvature.factors, db, damping)
        if self.centering == "exact":
            delta_b = delta_b - jnp.matmul(delta.T, mean, precision=HIGHEST)
        return LayerGradient(delta, delta_b.reshape(grad.bias.shape))

    def dense(self, curvature: KroneckerCurvature, damping: jax.Array) -> jax.Array:
        """The damped curvature this block inverts, as a dense matrix (for tests, diagnostics).

        Coordinates are the layer's parameters in K-FAC order: ``vec`` of the ``(d_in, d_out)``
        weight matrix (row-major), then the bias. ``precondition`` applies this matrix's inverse.
        Centred blocks invert ``(L (x) I) blockdiag(core, B_d) (L (x) I)^T`` with
        ``L = [[I, m], [0, 1]]`` (``"exact"``), or ``(L (x) I) blockdiag(core, B_d)``
        (``"simple"``), where ``core`` acts on the centred weight and ``B_d`` on the bias.
        """
        damping = jnp.asarray(damping, curvature.mean.dtype)
        core = self.dense_core(curvature.factors, damping)
        if not self.centred:
            return core
        output = self.dense_output(curvature.factors, damping)
        d_in, d_out = self.site.geometry.d_in, self.output_size
        zeros = jnp.zeros((core.shape[0], d_out), core.dtype)
        full = jnp.block([[core, zeros], [zeros.T, output]])
        lower = jnp.eye(d_in + 1, dtype=core.dtype).at[:d_in, d_in].set(curvature.mean)
        transform = jnp.kron(lower, jnp.eye(d_out, dtype=core.dtype))
        if self.centering == "simple":
            return transform @ full
        return transform @ full @ transform.T

    # ---------------------------------------------------------------- for subclasses

    def identity_factors(self, input_size: int, output_size: int, dtype: Any) -> Any:
        raise NotImplementedError

    def refresh_factors(self, a: jax.Array, b: jax.Array, damping: jax.Array) -> Any:
        raise NotImplementedError

    def apply(self, factors: Any, matrix: jax.Array, damping: jax.Array) -> jax.Array:
        raise NotImplementedError

    def solve_output(self, factors: Any, vector: jax.Array, damping: jax.Array) -> jax.Array:
        raise NotImplementedError

    def dense_core(self, factors: Any, damping: jax.Array) -> jax.Array:
        """The matrix ``apply`` inverts, over ``vec`` of an ``(input_size, d_out)`` matrix."""
        raise NotImplementedError

    def dense_output(self, factors: Any, damping: jax.Array) -> jax.Array:
        """The matrix ``solve_output`` inverts, ``(d_out, d_out)``."""
        raise NotImplementedError
