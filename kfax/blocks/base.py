"""The protocol every curvature block implements, and the types it exchanges with the optimiser.

A block approximates one layer's curvature and applies its damped inverse. It is a small frozen
object built per layer (it knows the layer's geometry and options) with pure methods over pytree
state, so the optimiser can keep its state in a ``NamedTuple``, move it through ``jit``,
``lax.cond`` and checkpoints, and stay ignorant of what kind of block it holds. Knows nothing of
tracing, cadences or the optimiser's state beyond one layer's.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple, Protocol

import jax

from kfax import _tracing
from kfax.statistics import LayerCapture


class LayerGradient(NamedTuple):
    """A layer's gradient (or update) as K-FAC reads it.

    Attributes:
      weight: the weight as a ``(d_in, d_out)`` matrix (row-major ``h (x) g`` order).
      bias: the bias, shape ``(d_out,)``, or ``None`` for a layer without one.
    """

    weight: jax.Array
    bias: jax.Array | None


class Block(Protocol):
    """One layer's curvature: statistics, a refreshed inverse (or basis), and its application.

    ``statistics`` and ``curvature`` are pytrees of arrays whose structure ``init`` fixes.
    """

    name: ClassVar[str]
    site: _tracing.LayerSite

    def init(self, dtype: Any) -> tuple[Any, Any]:
        """``(statistics, curvature)`` before any data: zero statistics, identity curvature."""

    def observe(self, statistics: Any, capture: LayerCapture, decay: jax.Array) -> Any:
        """Merge one batch into the moving averages (``decay`` of the old, bias-corrected)."""

    def refresh(self, statistics: Any, damping: jax.Array) -> Any:
        """A new inverse or eigenbasis from the statistics, for damping ``damping``."""

    def observe_in_basis(self, curvature: Any, capture: LayerCapture, decay: jax.Array) -> Any:
        """Merge a batch into statistics that live in the curvature's basis (EKFAC's scalings);
        blocks without such statistics return ``curvature`` unchanged, and may say so with a
        class attribute ``observes_in_basis = False`` (absent: assumed True), which lets the
        step compile the refresh once instead of once per statistics branch."""

    def precondition(
        self, statistics: Any, curvature: Any, grad: LayerGradient, damping: jax.Array
    ) -> LayerGradient:
        """The damped inverse applied to the layer's gradient."""
