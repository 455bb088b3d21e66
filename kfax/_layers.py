"""Compatibility name for :mod:`kfax.layers` (the layer geometries, one module per kind)."""

from __future__ import annotations

from kfax.layers import *  # noqa: F403
from kfax.layers import Geometry  # noqa: F401
