"""Evaluate ``apply_fn`` with taps: layer inputs, and a pullback to layer-output cotangents.

Turns ``(apply_fn, params, inputs)`` into the model outputs, each layer's input activation, and
a pullback that maps an output cotangent to the parameter gradient and to the cotangent of every
layer's output. The forward pass runs once; the pullback may be applied to many cotangents
(the loss gradient, sampled targets, columns of the curvature square root). It knows nothing of
losses, statistics or optimisers.
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
      layer_inputs: ``{layer_name: input activation}``.
      pullback: ``cotangent -> (param_gradient, {layer_name: output cotangent})``, linear in the
        cotangent, which has the shape of ``outputs``.
      layers: the layer sites found by tracing.
    """

    outputs: jax.Array
    layer_inputs: dict[str, jax.Array]
    pullback: Callable[[jax.Array], tuple[Any, dict[str, jax.Array]]]
    layers: tuple[_tracing.LayerSite, ...]


class NoLayersError(ValueError):
    """Raised when tracing a model finds no dense or convolution layer."""


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
      NoLayersError: no dense or convolution layer was found.
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
            "kfax found no dense or convolution layer in apply_fn: no parameter is consumed by "
            f"a matrix product or convolution. Parameters seen: {listing}."
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
    zeros = {site.name: jnp.zeros(site.output_shape, site.output_dtype) for site in traced.layers}

    def tapped(leaves, perturbations):
        outputs, layer_inputs = _tracing.tapped_call(traced, leaves, input_leaves, perturbations)
        return outputs[0], layer_inputs

    if param_gradients:
        outputs, vjp_fn, layer_inputs = jax.vjp(tapped, leaves, zeros, has_aux=True)
    else:
        outputs, vjp_fn, layer_inputs = jax.vjp(lambda z: tapped(leaves, z), zeros, has_aux=True)

    def pullback(cotangent):
        cotangents = vjp_fn(jnp.asarray(cotangent, outputs.dtype))
        if not param_gradients:
            return None, cotangents[0]
        leaf_grads, layer_cotangents = cotangents
        return jax.tree_util.tree_unflatten(traced.param_treedef, leaf_grads), layer_cotangents

    return Capture(outputs, layer_inputs, pullback, traced.layers)
