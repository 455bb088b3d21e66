"""Per-layer Kronecker factors of the Fisher, the exact Gauss-Newton or the empirical Fisher.

The public entry point is :func:`kronecker_factors`, a function transformation in the style of
``jax.grad``. The building blocks (:func:`output_cotangents`, :func:`layer_moments`,
:func:`factors_from_moments`) are shared with the optimiser, which keeps moving averages of the
raw moments and centres them only when it needs the factors. Knows nothing of optimiser state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kfax import _capture, _layers, _tracing
from kfax.losses import Loss, check_loss

KINDS = ("mc", "exact", "empirical")


class Moments(NamedTuple):
    """Raw per-layer statistics: ``second = E[h h^T]``, ``mean = E[h]``, ``output = E[g g^T]``.

    Expectations are means over examples and positions for the input side, and means over
    examples (and samples) of sums over positions for the output side (K-FAC-expand).
    """

    second: jax.Array
    mean: jax.Array
    output: jax.Array


class Factors(NamedTuple):
    """The Kronecker factors of one layer, ``G_layer ~ a (x) b``.

    Attributes:
      a: the input factor. ``E[[h;1][h;1]^T]`` (size ``d_in + 1``, homogeneous coordinate last)
        for a layer with a bias when not centered; the covariance ``E[h h^T] - E[h] E[h]^T`` when
        centered; ``E[h h^T]`` for a layer without a bias.
      mean: ``E[h]``.
      b: the output factor ``E[g g^T]``.
    """

    a: jax.Array
    mean: jax.Array
    b: jax.Array


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(
            f"kind must be one of {KINDS}: 'mc' (true Fisher, targets sampled from the model), "
            f"'exact' (exact Gauss-Newton), 'empirical' (empirical Fisher, data targets); "
            f"got {kind!r}."
        )


def check_samples(samples: Any) -> None:
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}.")


def output_cotangents(
    loss: Loss,
    kind: str,
    outputs: jax.Array,
    *,
    targets: jax.Array | None = None,
    key: jax.Array | None = None,
    samples: int = 1,
) -> tuple[jax.Array, float]:
    """Output cotangents ``u`` for a curvature kind, stacked on a leading column axis.

    Returns ``(columns, scale)`` such that the output factor of a layer is
    ``scale * sum_columns sum_rows g g^T`` with ``g = J_a^T u`` (MATH.md):

    * ``mc``: ``u = grad_f l(f, y~)``, ``y~ ~ p(y | f)``, one column per sample, drawn with
      ``jax.random.split(key, samples)``; ``scale = 1 / (batch * samples)``.
    * ``exact``: the columns of ``S`` with ``S S^T = D``; ``scale = 1 / batch``.
    * ``empirical``: ``u = grad_f l(f, y)`` for the data targets; ``scale = 1 / batch``.
    """
    check_kind(kind)
    batch = outputs.shape[0]
    outputs = jax.lax.stop_gradient(outputs)
    if kind == "mc":
        if key is None:
            raise ValueError(
                "kind='mc' samples targets from the model and needs a PRNG key: pass key=..."
            )
        keys = jax.random.split(key, samples)
        columns = jax.vmap(lambda k: loss.output_gradient(outputs, loss.sample(k, outputs)))(keys)
        return columns, 1.0 / (batch * samples)
    if kind == "exact":
        return loss.curvature_sqrt(outputs), 1.0 / batch
    if targets is None:
        raise ValueError(
            "kind='empirical' uses the data's own labels: pass targets=... (or use kind='mc' for "
            "the true Fisher, which samples targets from the model)."
        )
    return loss.output_gradient(outputs, targets)[None], 1.0 / batch


def layer_moments(
    layers: tuple[_tracing.LayerSite, ...],
    layer_inputs: Mapping[str, jax.Array],
    layer_cotangents: Mapping[str, jax.Array],
    scale: float,
) -> dict[str, Moments]:
    """Per-layer raw moments from layer inputs and column-stacked layer-output cotangents."""
    moments = {}
    for site in layers:
        second, mean = _layers.input_moments(site.geometry, layer_inputs[site.name])
        output = _layers.output_moment(site.geometry, layer_cotangents[site.name], scale)
        moments[site.name] = Moments(second, mean, output)
    return moments


def homogeneous(second: jax.Array, mean: jax.Array) -> jax.Array:
    """``E[[h;1][h;1]^T]`` from ``E[h h^T]`` and ``E[h]`` (homogeneous coordinate last)."""
    one = jnp.ones((1, 1), second.dtype)
    top = jnp.concatenate([second, mean[:, None]], axis=1)
    bottom = jnp.concatenate([mean[None, :], one], axis=1)
    return jnp.concatenate([top, bottom], axis=0)


def centered(second: jax.Array, mean: jax.Array) -> jax.Array:
    """The covariance ``E[h h^T] - E[h] E[h]^T``."""
    return second - jnp.outer(mean, mean)


def factors_from_moments(moments: Moments, has_bias: bool, center: bool) -> Factors:
    """Assemble :class:`Factors` from raw moments (see its docstring for the three cases)."""
    if not has_bias:
        a = moments.second
    elif center:
        a = centered(moments.second, moments.mean)
    else:
        a = homogeneous(moments.second, moments.mean)
    return Factors(a, moments.mean, moments.output)


def kronecker_factors(
    apply_fn: Callable[[Any, Any], jax.Array],
    loss: Loss,
    *,
    kind: str = "mc",
    samples: int = 1,
    centered: bool = False,
) -> Callable[..., dict[str, Factors]]:
    """Transform ``apply_fn`` into a function returning each layer's Kronecker factors.

    For a layer ``a = W h + b`` with output cotangents ``g = J_a^T u`` (``u`` chosen by ``kind``),
    the curvature block of the mean loss is approximated as ``A (x) B`` with
    ``A = E[[h;1][h;1]^T]`` and ``B = E[g g^T]`` (Martens & Grosse 2015). Positions that share a
    weight (sequence axes, convolution locations) follow K-FAC-expand: ``A`` averages over
    examples and positions, ``B`` averages over examples the sum over positions.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs``, unmodified: layers are found by tracing.
      loss: an output distribution from :mod:`kfax.losses`.
      kind: ``"mc"`` (true Fisher, targets sampled from the model; needs ``key``), ``"exact"``
        (exact Gauss-Newton through a square root of the output curvature), or ``"empirical"``
        (empirical Fisher from the data targets; needs ``targets``).
      samples: targets sampled per input for ``kind="mc"``.
      centered: return the centered covariance ``C = E[h h^T] - E[h] E[h]^T`` as ``a`` for layers
        with a bias (seed 000: the form centered K-FAC inverts).

    Returns:
      ``fn(params, inputs, *, targets=None, key=None) -> {layer_name: Factors}``; jit-compatible.

    Example:
      >>> import jax, jax.numpy as jnp, kfax
      >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
      >>> apply_fn = lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"]
      >>> fn = kfax.kronecker_factors(apply_fn, kfax.losses.SquaredError(), kind="exact")
      >>> factors = fn(params, jnp.ones((5, 3)))
      >>> factors["dense"].a.shape, factors["dense"].b.shape
      ((4, 4), (2, 2))

    References:
      Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
      curvature", ICML 2015. Grosse & Martens, "A Kronecker-factored approximate Fisher matrix for
      convolution layers", ICML 2016. Eschenhagen et al., "Kronecker-factored approximate
      curvature for modern neural network architectures", NeurIPS 2023.
    """
    check_loss(loss)
    check_kind(kind)
    check_samples(samples)

    def factors_fn(params, inputs, *, targets=None, key=None) -> dict[str, Factors]:
        if kind == "mc" and key is None:
            raise ValueError(
                "kind='mc' samples targets from the model: pass key=jax.random.key(...)."
            )
        if kind == "empirical" and targets is None:
            raise ValueError("kind='empirical' needs the data targets: pass targets=...")
        tapped = _capture.capture(apply_fn, params, inputs, param_gradients=False)
        columns, scale = output_cotangents(
            loss, kind, tapped.outputs, targets=targets, key=key, samples=samples
        )
        cotangents = jax.vmap(lambda u: tapped.pullback(u)[1])(columns)
        moments = layer_moments(tapped.layers, tapped.layer_inputs, cotangents, scale)
        return {
            site.name: factors_from_moments(
                moments[site.name], site.bias_path is not None, centered
            )
            for site in tapped.layers
        }

    return factors_fn
