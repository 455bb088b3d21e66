"""Evaluate ``apply_fn`` with taps: layer inputs, and a pullback to layer-output cotangents.

Turns ``(apply_fn, params, inputs)`` into the model outputs, each layer's input activation, and
a pullback that maps an output cotangent to the parameter gradient and to the cotangent of every
layer's output. The forward pass runs once; the pullback may be applied to many cotangents
(the loss gradient, sampled targets, columns of the curvature square root). It knows nothing of
losses, statistics or optimisers.

Layer inputs and cotangents are in the canonical layout of :mod:`kfax.layers.layout` (rows
example-major, features last; a stack of layers on leading axes). When the model has
``"parameter"`` layers (tied or reused weights, unknown primitives), whose tap gives the gradient
summed over the batch, the cotangents of those taps are pulled back from the output cotangent
with each example's share multiplied by a random sign ``eps_n``: ``E[(sum_n eps_n v_n)^2] =
sum_n v_n^2`` makes the square of such a cotangent unbiased for the sum of the examples' squares,
whatever the curvature kind. Without parameter gradients (``param_gradients=False``, the
statistics pass) the whole pullback is signed, which leaves every per-example statistic
(``g g^T``, per-example gradients) unchanged; with them, the parameter taps come from a second,
signed pullback and everything else is exact. The signs come from a key the statistics pass
splits from the step's key, one per cotangent column.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kfax import _tracing


class Capture(NamedTuple):
    """One tapped forward pass.

    Attributes:
      outputs: the model outputs (a single array).
      layer_inputs: ``{layer_name: input activation}`` (canonical layout; ``None`` for a layer
        whose taps record no input).
      pullback: ``cotangent -> (param_gradient, {layer_name: output cotangent})``, linear in the
        cotangent, which has the shape of ``outputs``. A layer with several taps (a scale and
        its shift) gets a tuple of cotangents.
      layers: the layer sites found by tracing.
    """

    outputs: jax.Array
    layer_inputs: dict[str, jax.Array]
    pullback: Callable[[jax.Array], tuple[Any, dict[str, jax.Array]]]
    layers: tuple[_tracing.LayerSite, ...]


class NoLayersError(ValueError):
    """Raised when tracing a model finds no parameter to precondition."""


def trace_layers(apply_fn: Callable, params: Any, inputs: Any) -> _tracing.Trace:
    """Trace ``apply_fn`` (cached) and check that kfax can precondition it.

    The trace is cached (64 entries, least recently used dropped): a later call with the same
    ``apply_fn`` object, the same parameter and input tree structures and the same leaf shapes
    and dtypes (arrays, tracers or ``jax.ShapeDtypeStruct``) returns the same :class:`Trace`
    without calling ``apply_fn``. As with ``jax.jit``, values ``apply_fn`` closes over are read
    when it is first traced.

    Raises:
      ValueError: a parameter leaf is complex (named, with its dtype), the model output is
        complex, or ``apply_fn`` does not return a single array. kfax preconditions real
        parameters and real outputs only; real and imaginary parts can be trained as separate
        real parameters.
      NoLayersError: no parameter of ``apply_fn`` has a gradient (every one is non-floating,
        complex or unused).
    """
    traced = _tracing.cached_trace(apply_fn, params, inputs)
    if traced.complex_leaves:
        complex_paths = set(traced.complex_leaves)
        avals = traced.closed_jaxpr.jaxpr.invars[: traced.num_leaves]
        named = ", ".join(
            f"{path!r} is {aval.aval.dtype}"
            for path, aval in zip(traced.leaf_paths, avals, strict=True)
            if path in complex_paths
        )
        raise ValueError(
            f"kfax does not support complex parameters yet: {named}. Train the real and "
            "imaginary parts as separate real parameters: kfax preconditions those that feed a "
            "real dense or convolution layer (for example a real layer on the stacked real and "
            "imaginary parts of its input), and the others get the `unmatched` transform."
        )
    if traced.output_treedef.num_leaves != 1:
        raise ValueError(
            "apply_fn must return a single array of model outputs (logits or means); it returned "
            f"a pytree with {traced.output_treedef.num_leaves} leaves: {traced.output_treedef}."
        )
    shape, dtype = traced.output_avals[0]
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise ValueError(
            f"kfax does not support complex model outputs yet: apply_fn returns outputs of dtype "
            f"{dtype} and shape {shape}. Return real outputs (for example the real and imaginary "
            "parts stacked along the last axis, with a loss written for them); parameters can "
            "stay real."
        )
    if not traced.layers:
        listing = "; ".join(f"{p}: {why}" for p, why in traced.unmatched) or "no parameters"
        raise NoLayersError(
            "kfax found no layer in apply_fn: no floating-point parameter is used by it. "
            f"Parameters seen: {listing}."
        )
    return traced


def capture(
    apply_fn: Callable,
    params: Any,
    inputs: Any,
    *,
    param_gradients: bool = True,
    traced: _tracing.Trace | None = None,
) -> Capture:
    """Run ``apply_fn(params, inputs)`` once with taps on every layer (see :class:`Capture`).

    With ``param_gradients=False`` the pullback returns ``None`` in place of the parameter
    gradient and skips computing it. ``traced`` reuses an earlier :func:`trace_layers` of the
    same function at the same shapes.
    """
    if traced is None:
        traced = trace_layers(apply_fn, params, inputs)
    leaves = jax.tree_util.tree_leaves(params)
    input_leaves = jax.tree_util.tree_leaves(inputs)
    zeros = {site.name: site.zeros() for site in traced.layers}
    signed = [site.name for site in traced.layers if site.kind == "parameter"]

    def tapped(leaves, perturbations):
        outputs, layer_inputs = _tracing.tapped_call(traced, leaves, input_leaves, perturbations)
        return outputs[0], layer_inputs

    if param_gradients:
        outputs, vjp_fn, layer_inputs = jax.vjp(tapped, leaves, zeros, has_aux=True)
    else:
        outputs, vjp_fn, layer_inputs = jax.vjp(lambda z: tapped(leaves, z), zeros, has_aux=True)

    def pullback(cotangent, signs_key=None):
        cotangent = jnp.asarray(cotangent, outputs.dtype)
        if signed and not param_gradients:
            cotangent = cotangent * example_signs(signs_key, cotangent)
        cotangents = vjp_fn(cotangent)
        if not param_gradients:
            return None, cotangents[0]
        leaf_grads, layer_cotangents = cotangents
        if signed:  # the parameter taps from a second, signed pullback; the rest exact
            with_signs = vjp_fn(cotangent * example_signs(signs_key, cotangent))[1]
            layer_cotangents = {**layer_cotangents, **{n: with_signs[n] for n in signed}}
        return jax.tree_util.tree_unflatten(traced.param_treedef, leaf_grads), layer_cotangents

    return Capture(outputs, layer_inputs, pullback, traced.layers)


def example_signs(key: jax.Array | None, cotangent: jax.Array) -> jax.Array:
    """Random signs, one per example (Rademacher, from ``key``), broadcastable against
    ``cotangent``. The statistics pass gives each cotangent column a key of its own, split from
    the step's key, so the signs differ between columns and between steps and are the same with
    and without ``jit``; without a key (a gradient-only pullback) a fixed key is used."""
    if key is None:
        key = jax.random.key(0)
    signs = jax.random.rademacher(key, (cotangent.shape[0],), dtype=cotangent.dtype)
    return signs.reshape((-1,) + (1,) * (cotangent.ndim - 1))
