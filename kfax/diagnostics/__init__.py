"""Curvature diagnostics for research: how good is the approximation, and how noisy its estimate.

Each function answers one question with one call, on models small enough for dense references
(``kfax.exact``): the Kronecker residual of a layer's block, the variance of the two unbiased
Fisher estimators, the distance between the true and the empirical Fisher and between the steps
they give, the fidelity of any step to the exact natural gradient in function space, the closed
form of the natural gradient of deep linear networks, and the invariance of the K-FAC step to an
affine reparametrisation of a layer's inputs. Formulas: ``docs/math.md``.
"""

from kfax.diagnostics._estimators import FisherVariance, fisher_estimator_variance
from kfax.diagnostics._invariance import affine_reparametrisation_gap
from kfax.diagnostics._residual import kronecker_residual
from kfax.diagnostics._steps import (
    Fidelity,
    FisherComparison,
    deep_linear_natural_gradient,
    natural_gradient,
    natural_gradient_fidelity,
    true_versus_empirical_fisher,
)

__all__ = [
    "FisherComparison",
    "FisherVariance",
    "Fidelity",
    "affine_reparametrisation_gap",
    "deep_linear_natural_gradient",
    "fisher_estimator_variance",
    "kronecker_residual",
    "natural_gradient",
    "natural_gradient_fidelity",
    "true_versus_empirical_fisher",
]
