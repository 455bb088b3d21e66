"""Find the layers of a JAX function from its jaxpr, and re-run it with taps on them.

This package is the only part of kfax that reads jaxprs. It knows which operations make a layer
(dense ``dot_general``, convolutions, embedding gathers, elementwise scales and shifts) and how
parameters flow into them (through ``jit``, ``checkpoint``, custom-derivative wrappers, casts,
transposes and ``scan``); it knows nothing of curvature or optimisers. Per-kind arithmetic
lives in :mod:`kfax.layers`; this package only builds the geometry objects defined there.

* :mod:`~kfax._tracing.jaxprs`: the facts about jaxprs it relies on (public
  ``jax.extend.core``);
* :mod:`~kfax._tracing.finder`: the walk that records every parameter use, with the matchers
  of :mod:`~kfax._tracing.products` (dense, convolution, embedding) and
  :mod:`~kfax._tracing.elementwise` (biases, shifts, scales);
* :mod:`~kfax._tracing.verdict`: which operations are layers, and why every other parameter
  is not;
* :mod:`~kfax._tracing.tapped`: the tapped evaluation (scans become tapped scans).

A parameter is a layer's weight (or bias) only when that layer operation is its *only* use. A
parameter used anywhere else too (a tied embedding, a block applied twice, a primitive kfax does
not know) is a layer of kind ``"parameter"``, whose note names every use; only parameters
without a gradient (non-floating, complex, unused) are left unmatched.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from kfax._tracing.finder import Finder
from kfax._tracing.sites import LayerSite, Tap
from kfax._tracing.tapped import tapped_call
from kfax._tracing.verdict import Verdict

__all__ = ["LayerSite", "Tap", "Trace", "TraceCache", "cached_trace", "tapped_call", "trace"]


@dataclasses.dataclass(frozen=True)
class Trace:
    """A traced ``apply_fn``: its jaxpr over flat parameter leaves and inputs, and what was found.

    Attributes:
      closed_jaxpr: the program over ``(*parameter leaves, *input leaves)``.
      param_treedef, input_treedef, output_treedef: the pytree structures around it.
      leaf_paths: the path of every parameter leaf (``"a/b/kernel"``), in flattening order.
      layers: the layers, in program order, then the ``"parameter"`` layers in leaf order. A
        layer's weight (and bias, if any) is used by that layer operation and by nothing else,
        except for a ``"parameter"`` layer (its ``note`` names every use).
      unmatched: ``(path, reason)`` for every parameter leaf no layer covers: ``"not a
        floating-point array (uint32)"`` (integer and PRNG-key leaves, such as an nnx Dropout's
        RNG state), ``"complex (complex64): ..."``, ``"not used by apply_fn (no gradient)"``.
      num_leaves: the number of parameter leaves.
      complex_leaves: paths of complex-valued parameter leaves (never layers; kfax refuses them
        in :func:`kfax._capture.trace_layers`).
      output_avals: ``(shape, dtype)`` of each flat output.
      suspect_biases: ``(bias_path, layer_name)`` for a floating leaf shaped like the output
        features of a bias-free dense layer or convolution, added along them after operations
        that keep the output an affine function of it (casts, negation, transposes, and ``+ - *
        /`` with an operand that does not depend on the inputs: ``(x @ K + shift) + b``,
        ``(x @ K) * s + b``), or directly but shared with another layer; K-FAC then treats the
        layer as bias-free and the leaf gets a block of its own. A bias after anything that
        depends on the inputs again is not suspect: LayerNorm, RMSNorm and train-mode BatchNorm
        subtract or divide by statistics of the layer output itself, so their bias is not
        flagged; eval-mode BatchNorm (fixed running averages) is affine, and its bias is flagged.
      warnings: one message per parameter that a primitive kfax does not recognise as a layer
        operation uses (it gets the ``"parameter"`` kind's diagonal block).
    """

    closed_jaxpr: Any
    param_treedef: Any
    input_treedef: Any
    output_treedef: Any
    leaf_paths: tuple[str, ...]
    layers: tuple[LayerSite, ...]
    unmatched: tuple[tuple[str, str], ...]
    num_leaves: int
    complex_leaves: tuple[str, ...] = ()
    output_avals: tuple[tuple[tuple[int, ...], Any], ...] = ()
    suspect_biases: tuple[tuple[str, str], ...] = ()
    warnings: tuple[str, ...] = ()


def path_to_str(path: Sequence[Any]) -> str:
    """Render a pytree key path as ``a/b/0``, the way parameter names read in Flax.

    A trailing ``.value`` attribute (how Flax nnx variables flatten) is dropped.
    """
    path = list(path)
    if path and getattr(path[-1], "name", None) in ("value", "raw_value"):
        path = path[:-1]
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def trace(apply_fn: Callable, params: Any, inputs: Any) -> Trace:
    """Trace ``apply_fn(params, inputs)`` and find its layers (see :class:`Trace`).

    Works on concrete arrays, tracers and ``jax.ShapeDtypeStruct`` alike (only shapes and
    dtypes are used). Not cached: :func:`cached_trace` is.
    """
    path_leaves, param_treedef = jax.tree_util.tree_flatten_with_path(params)
    leaf_paths = tuple(path_to_str(p) for p, _ in path_leaves)
    input_leaves, input_treedef = jax.tree_util.tree_flatten(inputs)
    num_leaves = len(path_leaves)
    avals = [_shape_dtype(x) for x in [leaf for _, leaf in path_leaves] + input_leaves]
    closed, output_treedef = _make_jaxpr(apply_fn, param_treedef, input_treedef, avals)
    jaxpr = closed.jaxpr
    leaf_avals = [v.aval for v in jaxpr.invars[:num_leaves]]
    outputs = jaxpr.outvars
    batch = outputs[0].aval.shape[0] if outputs and len(outputs[0].aval.shape) else 1
    finder = Finder(leaf_avals, int(batch))
    finder.run(jaxpr, num_leaves)
    verdict = Verdict(finder, leaf_paths, int(batch))
    layers = tuple(verdict.layers) + tuple(verdict.fallback_layers())
    covered = {s.weight_leaf for s in layers} | {s.bias_leaf for s in layers}
    return Trace(
        closed_jaxpr=closed,
        param_treedef=param_treedef,
        input_treedef=input_treedef,
        output_treedef=output_treedef,
        leaf_paths=leaf_paths,
        layers=layers,
        unmatched=verdict.unmatched(covered),
        num_leaves=num_leaves,
        complex_leaves=tuple(
            path
            for path, aval in zip(leaf_paths, leaf_avals, strict=True)
            if jnp.issubdtype(aval.dtype, jnp.complexfloating)
        ),
        output_avals=tuple((tuple(v.aval.shape), v.aval.dtype) for v in outputs),
        suspect_biases=verdict.suspects(layers),
        warnings=tuple(verdict.warnings),
    )


# --------------------------------------------------------------------------------------------
# Tracing and its cache.


def _shape_dtype(x: Any) -> jax.ShapeDtypeStruct:
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        x = jnp.asarray(x)
    return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)


def _make_jaxpr(apply_fn: Callable, param_treedef, input_treedef, avals: list) -> tuple[Any, Any]:
    """``jax.make_jaxpr`` of ``apply_fn`` over flat leaves, given as ``ShapeDtypeStruct``.

    Only shapes and dtypes reach ``apply_fn``: kfax never passes the user's own arrays or
    objects (nnx Variables are rebuilt around tracers by unflattening).
    """
    num_leaves = param_treedef.num_leaves
    out_tree_box = []

    def flat_fn(*args):
        p = jax.tree_util.tree_unflatten(param_treedef, args[:num_leaves])
        x = jax.tree_util.tree_unflatten(input_treedef, args[num_leaves:])
        flat, tree = jax.tree_util.tree_flatten(apply_fn(p, x))
        out_tree_box.append(tree)
        return flat

    try:
        closed = jax.make_jaxpr(flat_fn)(*avals)
    except Exception as error:
        if type(error).__name__ != "TraceContextError":
            raise
        raise ValueError(_NNX_MUTATION_MESSAGE.format(error=error)) from error
    return closed, out_tree_box[-1]


_NNX_MUTATION_MESSAGE = (
    "apply_fn writes to a Flax nnx Variable that was created outside it ({error}). In train "
    "mode BatchNorm writes its running statistics and Dropout advances its RNG count, and nnx "
    "refuses writes from inside kfax's trace of apply_fn (jax.make_jaxpr) to Variables made "
    "outside it. Merge the module inside apply_fn from its arguments: pass the non-parameter "
    "state with the inputs, `apply_fn = lambda params, inputs: nnx.merge(graphdef, params, "
    "inputs[1], copy=True)(inputs[0])` with `inputs=(x, nnx.as_pure(nnx.state(model, "
    "nnx.Not(nnx.Param))))` (nnx.pure in older flax) taken just before your gradient step, "
    "so that kfax sees the same dropout masks and batch statistics as your gradient; or at "
    "least merge copies: `nnx.merge(graphdef, params, rest, copy=True)`."
)


# --------------------------------------------------------------------------------------------
# The trace cache.


class TraceCache:
    """Bounded least-recently-used cache of :func:`trace`.

    An entry is found again for the same ``apply_fn`` *object* (identity, not equality), the
    same parameter and input tree structures, the same leaf shapes and dtypes (concrete
    arrays, tracers and ``jax.ShapeDtypeStruct`` alike) and the same ``jax_enable_x64``. Like
    ``jax.jit``, it assumes that ``apply_fn`` is a function of its arguments: values it closes
    over are read when it is first traced. Traces that close over tracers of an enclosing
    transformation are not kept; neither are those of unhashable tree structures.
    """

    def __init__(self, maxsize: int = 64):
        self.maxsize = maxsize
        self._entries: collections.OrderedDict[Any, tuple[Callable, Trace]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    @staticmethod
    def _key(apply_fn: Callable, params: Any, inputs: Any) -> Any:
        parts: list[Any] = [id(apply_fn), bool(jax.config.jax_enable_x64)]
        for tree in (params, inputs):
            leaves, treedef = jax.tree_util.tree_flatten(tree)
            avals = tuple((s.shape, s.dtype) for s in map(_shape_dtype, leaves))
            parts += [treedef, avals]
        key = tuple(parts)
        hash(key)
        return key

    def __call__(self, apply_fn: Callable, params: Any, inputs: Any) -> Trace:
        try:
            key = self._key(apply_fn, params, inputs)
        except TypeError:  # an unhashable tree structure: trace every time
            return trace(apply_fn, params, inputs)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] is apply_fn:
                self._entries.move_to_end(key)
                return entry[1]
        traced = trace(apply_fn, params, inputs)
        if not any(isinstance(c, jax.core.Tracer) for c in traced.closed_jaxpr.consts):
            with self._lock:
                self._entries[key] = (apply_fn, traced)  # holds apply_fn: its id stays unique
                while len(self._entries) > self.maxsize:
                    self._entries.popitem(last=False)
        return traced


cached_trace = TraceCache(maxsize=64)
