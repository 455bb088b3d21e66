"""Output distributions: the losses K-FAC understands.

Each loss is the negative log-likelihood ``l(f, y) = -log p(y | f)`` of a distribution over
targets parametrised by the model outputs ``f``. It knows how to

* compute the loss of each example and the mean loss over a batch (``per_example``, ``__call__``);
* weigh positions: a user mask or per-position weights, a declared ignore label, the mass of a
  probability row (``position_weights``);
* sample targets from the model (``sample``), for the true Fisher, and give the sampled
  cotangent ``sqrt(kappa) grad_f l(f, y~)`` (``sampled_cotangent``);
* give the gradient of each example's loss (``output_gradient``);
* give columns of a square root of the weighted output curvature (``curvature_sqrt``), for the
  exact Gauss-Newton / Fisher, and its products with vectors (``curvature_product``), for
  curvature-vector products in the quadratic model;
* validate targets (``check_targets``).

Shapes and the convention
-------------------------
Outputs have shape ``(batch, *positions, event)``: the last axis is the event (classes,
features), every axis between the batch and the event is a position (tokens, pixel rows); at
least 2-D. Each position ``r`` of example ``n`` has a weight ``kappa_nr`` (``position_weights``,
shape ``outputs.shape[:-1]``, the outputs' dtype)::

    kappa = where                     the user's mask or per-position weights (default 1)
          x [label != ignore_index]   SoftmaxCrossEntropy, integer labels, declared ignore_index
          x s = sum_c y_c             SoftmaxCrossEntropy, probability targets (all-zero row: 0)

and the objective is ``per_example_n = sum_r kappa_nr l(f_nr, y_nr)``, ``loss = mean_n
per_example_n``. With ``H = d^2 l / d f^2`` at one position, every method weighs by the same
``kappa``:

* ``output_gradient`` is ``kappa grad_f l``, exactly ``jax.grad`` of ``sum_n per_example_n``;
* ``curvature_sqrt(outputs, kappa)`` gives columns ``S`` with ``sum_cols S S^T = kappa H`` per
  position, block diagonal over positions;
* ``curvature_product(outputs, v, kappa)`` is ``kappa H v``;
* ``sampled_cotangent(key, outputs, kappa)`` is ``u = sqrt(kappa) grad_f l(f, y~)`` with
  ``y~ ~ p(. | f)``, and ``E[u u^T] = kappa H`` (the Fisher equals the Gauss-Newton matrix for
  these canonical families).

A position of weight 0 gives exactly 0 in all of them, whatever its outputs hold. The package
knows nothing of layers or optimisers.

Modules
-------
* :mod:`~kfax.losses.protocol`: the :class:`Loss` interface and :func:`check_loss`;
* :mod:`~kfax.losses.softmax`, :mod:`~kfax.losses.sigmoid`, :mod:`~kfax.losses.squared_error`:
  one output distribution each;
* ``_base`` (the weighting by ``kappa`` that every distribution shares) and ``_checks`` (the
  argument checks), both private.
"""

from kfax.losses.protocol import Loss, check_loss
from kfax.losses.sigmoid import SigmoidCrossEntropy
from kfax.losses.softmax import SoftmaxCrossEntropy
from kfax.losses.squared_error import SquaredError

__all__ = ["Loss", "SigmoidCrossEntropy", "SoftmaxCrossEntropy", "SquaredError", "check_loss"]
