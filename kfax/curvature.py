"""Per-layer Kronecker factors of the Fisher, the exact Gauss-Newton or the empirical Fisher.

The public entry point is :func:`kronecker_factors`, a function transformation in the style of
``jax.grad``. It runs the same statistics pass (:mod:`kfax.statistics`) and builds the same input
factor (:func:`kfax.blocks.kronecker_statistics.input_factor`) as the optimiser, with the same
defaults. Knows nothing of optimiser state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from kfax import _capture, _validation, statistics
from kfax.blocks.kronecker import CENTERINGS
from kfax.blocks.kronecker_statistics import WEIGHT_SHARINGS, batch_moments, input_factor
from kfax.losses import Loss, check_loss


class Factors(NamedTuple):
    """The Kronecker factors of one layer, ``G_layer ~ a (x) b``.

    Attributes:
      a: the input factor: the covariance ``C = E[h h^T] - E[h] E[h]^T`` for a layer with a bias
        (``centering="exact"`` or ``"simple"``), ``E[[h;1][h;1]^T]`` (size ``d_in + 1``, the
        homogeneous coordinate last) with ``centering="none"``, and ``E[h h^T]`` for a layer
        without a bias. Averages run over the rows (examples and shared positions) that count.
      mean: ``E[h]``.
      b: the output factor ``E[g g^T]``: the mean over examples of the sum over positions.
    """

    a: jax.Array
    mean: jax.Array
    b: jax.Array


def kronecker_factors(
    apply_fn: Callable[[Any, Any], jax.Array],
    loss: Loss,
    *,
    kind: str = "mc",
    samples: int | None = None,
    centering: str = "exact",
    weight_sharing: str = "expand",
) -> Callable[..., dict[str, Factors]]:
    """Transform ``apply_fn`` into a function returning each layer's Kronecker factors.

    For a layer ``a = W h + b`` with output cotangents ``g = J_a^T u`` (``u`` chosen by ``kind``),
    the curvature block of the mean loss is approximated as ``A (x) B`` with
    ``A = E[[h;1][h;1]^T]`` and ``B = E[g g^T]`` (Martens & Grosse 2015). Positions that share a
    weight (sequence axes, convolution locations) follow K-FAC-expand: ``A`` averages over
    examples and positions, ``B`` averages over examples the sum over positions. Positions the
    loss masks (``where``, an ignored label) do not count in ``A`` and have zero cotangents.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs``, unmodified: layers are found by tracing.
      loss: an output distribution from :mod:`kfax.losses`.
      kind: ``"mc"`` (true Fisher, targets sampled from the model; needs ``key``), ``"exact"``
        (exact Gauss-Newton through a square root of the output curvature), or ``"empirical"``
        (empirical Fisher from the data targets; needs ``targets``).
      samples: targets sampled per input for ``kind="mc"`` (default 1).
      centering: ``"exact"`` (default, as the optimiser) or ``"simple"`` give the centred
        covariance for layers with a bias; ``"none"`` gives the homogeneous factor.
      weight_sharing: ``"expand"`` (default) or ``"reduce"`` (Eschenhagen et al. 2023): ``A``
        from each example's mean input over its positions and ``B`` from each example's summed
        output cotangents.

    Only dense and convolution layers have Kronecker factors here (one layer each; a stack of
    layers from a scan is left out); embeddings, scales and shifts and whole parameters have
    blocks of their own (:mod:`kfax.blocks`).

    Returns:
      ``fn(params, inputs, *, targets=None, where=None, key=None) -> {layer_name: Factors}``;
      jit-compatible.

    Raises:
      ValueError: for an unknown ``kind`` or ``centering``, ``samples < 1``, a missing ``key``
        (``mc``) or ``targets`` (``empirical``, or a loss with an ``ignore_index``).

    Example:
      >>> import jax, jax.numpy as jnp, kfax
      >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
      >>> apply_fn = lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"]
      >>> fn = kfax.kronecker_factors(apply_fn, kfax.losses.SquaredError(), kind="exact")
      >>> factors = fn(params, jnp.ones((5, 3)))
      >>> factors["dense"].a.shape, factors["dense"].b.shape
      ((3, 3), (2, 2))

    References:
      Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
      curvature", ICML 2015. Grosse & Martens, "A Kronecker-factored approximate Fisher matrix for
      convolution layers", ICML 2016. Eschenhagen et al., "Kronecker-factored approximate
      curvature for modern neural network architectures", NeurIPS 2023.
    """
    check_loss(loss)
    statistics.check_kind(kind)
    samples = statistics.check_samples(samples)
    _validation.choice("centering", centering, CENTERINGS)
    _validation.choice("weight_sharing", weight_sharing, WEIGHT_SHARINGS)

    def factors_fn(params, inputs, *, targets=None, where=None, key=None) -> dict[str, Factors]:
        if kind == "mc" and key is None:
            raise ValueError(
                "kind='mc' samples targets from the model: pass key=jax.random.key(...)."
            )
        if kind == "empirical" and targets is None:
            raise ValueError("kind='empirical' needs the data targets: pass targets=...")
        statistics.check_targets(loss, _capture.trace_layers(apply_fn, params, inputs), targets)
        batch = statistics.statistics_pass(
            apply_fn,
            loss,
            params,
            inputs,
            kind=kind,
            samples=samples,
            targets=targets,
            where=where,
            key=key,
        )
        factors = {}
        for site in batch.sites:
            if site.geometry.kind not in ("dense", "conv") or site.stack_shape:
                continue
            capture = batch.layers[site.name]
            moments, output = batch_moments(site, capture, weight_sharing)
            a = input_factor(
                moments.mean, moments.covariance, site.bias_path is not None, centering
            )
            factors[site.name] = Factors(a, moments.mean, output)
        return factors

    return factors_fn
