"""Layer geometries: per layer kind, how activations, cotangents and weights map to curvature.

One module per kind: :mod:`~kfax.layers.dense` (``dot_general``, any number of contracted or
output axes), :mod:`~kfax.layers.conv` (KFC patches), :mod:`~kfax.layers.embedding` (gathers
from a table), :mod:`~kfax.layers.scale_shift` (elementwise scale and shift, norm layers),
:mod:`~kfax.layers.parameter` (a whole parameter: tied, reused, unknown uses), and
:mod:`~kfax.layers.stacked` (one of them repeated over a scan's stack of layers).
:mod:`~kfax.layers.layout` maps tapped values to the canonical layout the statistics read. Knows
nothing of jaxprs (:mod:`kfax._tracing` builds these objects) nor of optimisers.
"""

from __future__ import annotations

from kfax.layers.conv import Conv
from kfax.layers.dense import Dense, dense_from_axes
from kfax.layers.embedding import Embedding
from kfax.layers.layout import SHARED, STACK, Layout, merged_layout, rows_layout
from kfax.layers.parameter import Parameter
from kfax.layers.scale_shift import ScaleShift
from kfax.layers.stacked import Stacked

Geometry = Dense | Conv | Embedding | ScaleShift | Parameter | Stacked

__all__ = [
    "SHARED",
    "STACK",
    "Conv",
    "Dense",
    "Embedding",
    "Geometry",
    "Layout",
    "Parameter",
    "ScaleShift",
    "Stacked",
    "dense_from_axes",
    "merged_layout",
    "rows_layout",
]
