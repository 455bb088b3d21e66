"""Embeddings: a ``gather`` of rows of a parameter table at integer ids that depend on the data.

``table[ids]`` and ``jnp.take(table, ids, axis=0)`` (Flax ``nn.Embed``, ``nnx.Embed``) are a
dense layer whose input is the one-hot vector of the id: the input factor ``E[h h^T]`` is the
diagonal of token frequencies, and the output factor is that of a dense layer (the cotangents of
the gathered rows). A one-hot product ``one_hot(ids) @ E`` is a dense layer, not this kind. The
capture delivers the ids (any shape, example-major) and the cotangents ``(..., d)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Embedding:
    """A table of ``d_in`` (vocabulary) rows of ``d_out`` features.

    Attributes:
      d_in: the vocabulary size (rows of the table).
      d_out: the feature width.
      vocab_axis: the axis of the table leaf that holds the vocabulary (0 or 1).
      index_width, index_column: the gather's index vectors have ``index_width`` components,
        the id being component ``index_column`` (a vmapped ``table[i]`` also indexes the
        feature axis at 0).
    """

    d_in: int
    d_out: int
    vocab_axis: int = 0
    index_width: int = 1
    index_column: int = 0

    kind = "embedding"
    output_axis = -1

    def input_rows(self, ids: jax.Array) -> jax.Array:
        return ids.reshape(-1, self.index_width)[:, self.index_column]

    def output_rows(self, g: jax.Array) -> jax.Array:
        return g.reshape(-1, self.d_out)

    def weight_matrix(self, w: jax.Array) -> jax.Array:
        return w if self.vocab_axis == 0 else w.T

    def weight_from_matrix(self, m: jax.Array) -> jax.Array:
        return m if self.vocab_axis == 0 else m.T

    def token_counts(self, ids: jax.Array, weights: jax.Array | None, dtype) -> jax.Array:
        """``sum_r w_r [id_r = v]`` for every row ``v`` of the table (ids out of range count
        nowhere, as the gather drops them)."""
        ids = self.input_rows(ids)
        w = jnp.ones(ids.shape, dtype) if weights is None else weights.astype(dtype)
        return jax.ops.segment_sum(w, ids, num_segments=self.d_in)

    def describe(self) -> str:
        return f"{self.d_in} ids -> {self.d_out}"
