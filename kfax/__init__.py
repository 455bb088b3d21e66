"""kfax: K-FAC, natural gradient and Gauss-Newton preconditioning as optax transformations."""

from kfax import exact, losses
from kfax._capture import NoLayersError
from kfax.curvature import Factors, Moments, kronecker_factors
from kfax.report import Layer, LayerReport, describe, find_layers
from kfax.transform import EigenBasis, FactoredInverse, KFACState, StepInfo, kfac, scale_by_kfac

__version__ = "0.1.0"

__all__ = [
    "EigenBasis",
    "FactoredInverse",
    "KFACState",
    "StepInfo",
    "kfac",
    "scale_by_kfac",
    "Factors",
    "Layer",
    "LayerReport",
    "Moments",
    "NoLayersError",
    "describe",
    "exact",
    "find_layers",
    "kronecker_factors",
    "losses",
]
