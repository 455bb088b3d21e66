"""A stack of blocks: one block per layer of a stack (a scan over layers), by ``jax.vmap``.

Wraps any block built for one layer of the stack: its statistics and curvature gain a leading
stack axis, and every method maps over it. The capture of a stacked layer holds inputs
``(*stack, ...)`` and cotangents ``(columns, *stack, ...)``; the gradient matrix from
:class:`kfax.layers.Stacked` is ``(layers, d_in, d_out)`` and the bias keeps its leaf's shape
``(*stack, ...)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from kfax import _tracing
from kfax.blocks.base import LayerGradient


@dataclasses.dataclass(frozen=True)
class StackedBlock:
    """``inner`` (a block of one layer) for every layer of ``site``'s stack."""

    site: _tracing.LayerSite
    inner: Any

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def observes_in_basis(self) -> bool:
        return getattr(self.inner, "observes_in_basis", True)

    @property
    def size(self) -> int:
        return self.site.geometry.size

    @property
    def depth(self) -> int:
        return len(self.site.stack_shape)

    def factor_sizes(self) -> tuple[str, str]:
        return self.inner.factor_sizes()

    def __getattr__(self, attribute: str) -> Any:
        # Sizes and options of the inner block (input_size, output_size, centering, ...).
        if attribute in ("site", "inner") or attribute.startswith("__"):
            raise AttributeError(attribute)
        return getattr(self.inner, attribute)

    def init(self, dtype: Any) -> tuple[Any, Any]:
        return jax.vmap(lambda _: self.inner.init(dtype))(jnp.arange(self.size))

    def _split(self, capture) -> tuple[Any, Any]:
        """Inputs ``(layers, ...)`` and cotangents ``(layers, columns, ...)``."""

        def inputs(x):
            return x.reshape((self.size,) + x.shape[self.depth :])

        def cotangents(g):
            g = g.reshape((g.shape[0], self.size) + g.shape[1 + self.depth :])
            return jnp.moveaxis(g, 1, 0)

        return (
            jax.tree.map(inputs, capture.inputs),
            jax.tree.map(cotangents, capture.cotangents),
        )

    def _per_layer(self, method, state, capture, decay):
        """``method`` of the inner block on each layer of the stack, with its slice of the
        capture (vmapped over the stack)."""
        inputs, cotangents = self._split(capture)

        def one(layer_state, x, g):
            return method(layer_state, dataclasses.replace(capture, inputs=x, cotangents=g), decay)

        return jax.vmap(one)(state, inputs, cotangents)

    def observe(self, statistics, capture, decay):
        return self._per_layer(self.inner.observe, statistics, capture, decay)

    def refresh(self, statistics, damping):
        return jax.vmap(lambda s: self.inner.refresh(s, damping))(statistics)

    def observe_in_basis(self, curvature, capture, decay):
        return self._per_layer(self.inner.observe_in_basis, curvature, capture, decay)

    def precondition(self, statistics, curvature, grad: LayerGradient, damping) -> LayerGradient:
        bias = grad.bias
        if bias is not None:
            bias = bias.reshape((self.size,) + bias.shape[self.depth :])

        def one(stats, curv, weight, b):
            return self.inner.precondition(stats, curv, LayerGradient(weight, b), damping)

        delta = jax.vmap(one)(statistics, curvature, grad.weight, bias)
        if grad.bias is None:
            return LayerGradient(delta.weight, None)
        return LayerGradient(delta.weight, delta.bias.reshape(grad.bias.shape))

    def dense(self, curvature, damping) -> jax.Array:
        """Block-diagonal over the layers of the stack, each in its own K-FAC order."""
        blocks = [
            self.inner.dense(jax.tree.map(lambda c, i=i: c[i], curvature), damping)
            for i in range(self.size)
        ]
        return jax.scipy.linalg.block_diag(*blocks)
