"""kfax: K-FAC, natural gradient and Gauss-Newton preconditioning as optax transformations."""

from kfax import blocks, diagnostics, distributed, exact, losses, sharding, statistics
from kfax._capture import NoLayersError
from kfax._step import KFACState, LayerHealth
from kfax.adaptive import QuadraticModelState, StepInfo, quadratic_model_step
from kfax.alias import kfac
from kfax.constraints import NormConstraintState, norm_constrained
from kfax.curvature import Factors, kronecker_factors
from kfax.fused import value_and_grad
from kfax.report import Layer, LayerReport, describe, find_layers
from kfax.sharding import state_shardings
from kfax.transform import scale_by_kfac

__version__ = "0.2.0"

__all__ = [
    "Factors",
    "KFACState",
    "Layer",
    "LayerHealth",
    "LayerReport",
    "NoLayersError",
    "NormConstraintState",
    "QuadraticModelState",
    "StepInfo",
    "blocks",
    "describe",
    "diagnostics",
    "distributed",
    "exact",
    "find_layers",
    "kfac",
    "kronecker_factors",
    "losses",
    "norm_constrained",
    "quadratic_model_step",
    "scale_by_kfac",
    "sharding",
    "state_shardings",
    "statistics",
    "value_and_grad",
]
