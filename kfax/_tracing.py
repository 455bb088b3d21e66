"""Find the layers of a JAX function from its jaxpr, and re-run it with taps on them.

This is the only module of kfax that reads jaxprs. It knows which primitives make a layer
(``dot_general`` for dense layers, ``conv_general_dilated`` for convolutions) and how parameters
flow into them (through ``jit``, ``checkpoint``, custom-derivative wrappers, casts and
transposes); it knows nothing of curvature or optimisers. Per-layer arithmetic lives in
:mod:`kfax._layers`; this module only builds the geometry objects defined there.

Everything it touches is public API (``jax.make_jaxpr`` and ``jax.extend.core``). Single equations
are evaluated through ``jax.extend.core.jaxpr_as_fun`` on a one-equation jaxpr, so that JAX's own
evaluator deals with binding details that change between releases.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from kfax import _layers

# Primitives whose single sub-jaxpr is a plain function of the equation's inputs: layers inside
# them are found and tapped by evaluating the sub-jaxpr inline. ``pjit`` is the pre-0.7 name of
# ``jit``; ``remat2`` is ``jax.checkpoint``.
_CALL_PRIMITIVES = frozenset(
    {
        "jit",
        "pjit",
        "closed_call",
        "core_call",
        "remat",
        "remat2",
        "checkpoint",
        "custom_jvp_call",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
    }
)
_SUBJAXPR_PARAM_NAMES = ("jaxpr", "call_jaxpr", "fun_jaxpr")
# Operations through which a weight stays "the same weight" (values and layout tracked).
_WEIGHT_PASSTHROUGH = frozenset({"convert_element_type", "copy", "copy_p", "transpose"})
# Operations through which a bias vector is broadcast before it is added.
_BIAS_PASSTHROUGH = frozenset(
    {"convert_element_type", "copy", "copy_p", "reshape", "broadcast_in_dim", "expand_dims"}
)


@dataclasses.dataclass(frozen=True)
class LayerSite:
    """One layer found in a traced function: what it is and where it sits in the jaxpr."""

    name: str
    geometry: _layers.Geometry
    weight_path: str
    bias_path: str | None
    weight_leaf: int
    bias_leaf: int | None
    eqn_path: tuple[int, ...]
    input_operand: int
    output_shape: tuple[int, ...]
    output_dtype: Any
    positions: int


@dataclasses.dataclass(frozen=True)
class Trace:
    """A traced ``apply_fn``: its jaxpr over flat parameter leaves and inputs, and its layers."""

    closed_jaxpr: Any
    param_treedef: Any
    input_treedef: Any
    output_treedef: Any
    leaf_paths: tuple[str, ...]
    layers: tuple[LayerSite, ...]
    unmatched: tuple[tuple[str, str], ...]
    num_leaves: int


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


# --------------------------------------------------------------------------------------------
# References: what a jaxpr variable holds, as far as layer finding is concerned.


@dataclasses.dataclass(frozen=True)
class _WeightRef:
    leaf: int
    axes: tuple[int, ...]  # axes[i] = the leaf axis that variable axis i holds


@dataclasses.dataclass(frozen=True)
class _BiasRef:
    leaf: int
    axis: int | None  # the variable axis carrying the bias entries (None: unknown / size 1)


def _is_var(atom: Any) -> bool:
    """A variable that holds a value (not a literal, not a dropped output ``_``).

    ``DropVar`` joined ``jax.extend.core`` after 0.9.0; it is recognised by name before that.
    """
    return isinstance(atom, jcore.Var) and type(atom).__name__ != "DropVar"


def _subjaxpr(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
    """The inlinable sub-jaxpr of a call-like equation as ``(jaxpr, consts)``, else ``None``."""
    if eqn.primitive.name not in _CALL_PRIMITIVES:
        return None
    for key in _SUBJAXPR_PARAM_NAMES:
        sub = eqn.params.get(key)
        if sub is None:
            continue
        if isinstance(sub, jcore.ClosedJaxpr):
            jaxpr, consts = sub.jaxpr, sub.consts
        elif isinstance(sub, jcore.Jaxpr):
            jaxpr, consts = sub, ()
        else:
            continue
        if len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(eqn.outvars):
            return jaxpr, consts
    return None


def _bias_axis_after(prim: str, params: Mapping[str, Any], ref: _BiasRef, out_shape) -> int | None:
    if ref.axis is None:
        return None
    if prim == "broadcast_in_dim":
        return params["broadcast_dimensions"][ref.axis]
    if prim in ("reshape", "expand_dims"):
        big = [i for i, s in enumerate(out_shape) if s != 1]
        return big[0] if len(big) == 1 else None
    return ref.axis


class _Finder:
    """Walks a jaxpr (recursing into call-like sub-jaxprs) and records layer sites."""

    def __init__(self, leaf_avals: Sequence[Any]):
        self.leaf_avals = leaf_avals
        self.found: list[dict[str, Any]] = []
        self.weight_uses: dict[int, int] = {}
        self.other_uses: dict[int, set[str]] = {}

    def walk(self, jaxpr: Any, refs: dict[Any, Any], prefix: tuple[int, ...]) -> None:
        producer: dict[Any, int] = {}
        for index, eqn in enumerate(jaxpr.eqns):
            prim = eqn.primitive.name
            in_refs = [refs.get(v) if _is_var(v) else None for v in eqn.invars]
            sub = _subjaxpr(eqn)
            if sub is not None:
                inner_refs = {
                    iv: r for iv, r in zip(sub[0].invars, in_refs, strict=True) if r is not None
                }
                self.walk(sub[0], inner_refs, prefix + (index,))
            elif prim in _WEIGHT_PASSTHROUGH and isinstance(in_refs[0], _WeightRef):
                ref = in_refs[0]
                if prim == "transpose":
                    ref = _WeightRef(
                        ref.leaf, tuple(ref.axes[p] for p in eqn.params["permutation"])
                    )
                refs[eqn.outvars[0]] = ref
            elif (
                prim in _BIAS_PASSTHROUGH
                and in_refs[0] is not None
                and _is_bias_leaf(in_refs[0], self.leaf_avals)
            ):
                ref = in_refs[0]
                if isinstance(ref, _WeightRef):
                    ref = _BiasRef(ref.leaf, 0)
                axis = _bias_axis_after(prim, eqn.params, ref, eqn.outvars[0].aval.shape)
                refs[eqn.outvars[0]] = _BiasRef(ref.leaf, axis)
            elif prim == "dot_general" and self._match_dense(eqn, in_refs, prefix + (index,)):
                site = len(self.found) - 1
                producer[eqn.outvars[0]] = (site, self.found[site]["geometry"].output_axis)
            elif prim == "conv_general_dilated" and self._match_conv(
                eqn, in_refs, prefix + (index,)
            ):
                site = len(self.found) - 1
                producer[eqn.outvars[0]] = (site, self.found[site]["geometry"].output_axis)
            elif (
                prim in _WEIGHT_PASSTHROUGH
                and _is_var(eqn.invars[0])
                and (eqn.invars[0] in producer)
            ):
                site, axis = producer[eqn.invars[0]]
                if prim == "transpose":
                    axis = tuple(eqn.params["permutation"]).index(axis)
                producer[eqn.outvars[0]] = (site, axis)
            elif prim == "add" and self._match_bias(eqn, in_refs, producer):
                pass
            else:
                use = prim
                if prim == "conv_general_dilated" and (
                    eqn.params["feature_group_count"] != 1 or eqn.params["batch_group_count"] != 1
                ):
                    use = "conv_general_dilated with feature or batch groups (not supported yet)"
                for ref in in_refs:
                    if ref is not None:
                        self.other_uses.setdefault(ref.leaf, set()).add(use)

    def _record(self, eqn, weight: _WeightRef, input_operand: int, geometry, path) -> bool:
        self.weight_uses[weight.leaf] = self.weight_uses.get(weight.leaf, 0) + 1
        out = eqn.outvars[0].aval
        self.found.append(
            dict(
                geometry=geometry,
                weight_leaf=weight.leaf,
                bias_leaf=None,
                eqn_path=path,
                input_operand=input_operand,
                output_shape=tuple(out.shape),
                output_dtype=out.dtype,
            )
        )
        return True

    def _match_dense(self, eqn, in_refs, path) -> bool:
        (contract, batch) = eqn.params["dimension_numbers"]
        if any(len(b) for b in batch):
            return False
        for w_side in (1, 0):
            weight, other = in_refs[w_side], in_refs[1 - w_side]
            if not isinstance(weight, _WeightRef) or other is not None:
                continue
            w_aval = eqn.invars[w_side].aval
            x_aval = eqn.invars[1 - w_side].aval
            if len(w_aval.shape) != 2 or len(contract[w_side]) != 1:
                continue
            w_contract = contract[w_side][0]
            x_contract = contract[1 - w_side][0]
            free_w_axis = 1 - w_contract
            x_free = len(x_aval.shape) - 1
            out_feature_axis = x_free if w_side == 1 else 0
            geometry = _layers.Dense(
                d_in=int(w_aval.shape[w_contract]),
                d_out=int(w_aval.shape[free_w_axis]),
                input_axis=x_contract,
                output_axis=out_feature_axis,
                weight_in_axis=weight.axes[w_contract],
                weight_out_axis=weight.axes[free_w_axis],
            )
            return self._record(eqn, weight, 1 - w_side, geometry, path)
        return False

    def _match_conv(self, eqn, in_refs, path) -> bool:
        weight, x_ref = in_refs[1], in_refs[0]
        if not isinstance(weight, _WeightRef) or x_ref is not None:
            return False
        p = eqn.params
        if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
            return False  # reported as unmatched, consumed by the primitive below

        dn = p["dimension_numbers"]
        rhs_spec = tuple(dn.rhs_spec)
        w_shape = eqn.invars[1].aval.shape
        spatial = tuple(int(w_shape[a]) for a in rhs_spec[2:])
        geometry = _layers.Conv(
            d_in=int(w_shape[rhs_spec[1]]) * int(np.prod(spatial)),
            d_out=int(w_shape[rhs_spec[0]]),
            filter_shape=spatial,
            window_strides=tuple(p["window_strides"]),
            padding=tuple(tuple(q) for q in p["padding"]),
            lhs_dilation=tuple(p["lhs_dilation"]),
            rhs_dilation=tuple(p["rhs_dilation"]),
            dimension_numbers=dn,
            output_axis=int(dn.out_spec[1]),
            weight_in_axis=weight.axes[rhs_spec[1]],
            weight_out_axis=weight.axes[rhs_spec[0]],
            weight_spatial_axes=tuple(weight.axes[a] for a in rhs_spec[2:]),
        )
        return self._record(eqn, weight, 0, geometry, path)

    def _match_bias(self, eqn, in_refs, producer) -> bool:
        for side in (0, 1):
            ref, var = in_refs[side], eqn.invars[1 - side]
            if not isinstance(ref, _BiasRef) or not _is_var(var) or var not in producer:
                continue
            site_index, feature_axis = producer[var]
            site = self.found[site_index]
            geometry = site["geometry"]
            bias_aval = self.leaf_avals[ref.leaf]
            out_rank = len(site["output_shape"])
            axis = ref.axis
            if axis is not None:
                axis += out_rank - len(eqn.invars[side].aval.shape)  # implicit rank broadcast
            if (
                site["bias_leaf"] is None
                and tuple(bias_aval.shape) == (geometry.d_out,)
                and (axis == feature_axis or geometry.d_out == 1)
            ):
                site["bias_leaf"] = ref.leaf
                self.weight_uses[ref.leaf] = self.weight_uses.get(ref.leaf, 0) + 1
                return True
        return False


def _is_bias_leaf(ref: Any, leaf_avals: Sequence[Any]) -> bool:
    if isinstance(ref, _BiasRef):
        return True
    return isinstance(ref, _WeightRef) and len(leaf_avals[ref.leaf].shape) == 1


def _layer_name(weight_path: str, taken: set[str]) -> str:
    parts = weight_path.split("/")
    name = "/".join(parts[:-1]) if len(parts) > 1 else parts[0]
    candidate, k = name, 1
    while candidate in taken:
        candidate, k = f"{name}#{k}", k + 1
    return candidate


def _shape_dtype(x: Any) -> jax.ShapeDtypeStruct:
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        x = jnp.asarray(x)
    return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)


def trace(apply_fn: Callable, params: Any, inputs: Any) -> Trace:
    """Trace ``apply_fn(params, inputs)`` and find its layers.

    Works on concrete arrays, tracers and ``jax.ShapeDtypeStruct`` alike (only shapes are used).
    """
    path_leaves, param_treedef = jax.tree_util.tree_flatten_with_path(params)
    leaf_paths = tuple(path_to_str(p) for p, _ in path_leaves)
    leaves = [leaf for _, leaf in path_leaves]
    input_leaves, input_treedef = jax.tree_util.tree_flatten(inputs)
    num_leaves = len(leaves)
    out_tree_box = []

    def flat_fn(*args):
        p = jax.tree_util.tree_unflatten(param_treedef, args[:num_leaves])
        x = jax.tree_util.tree_unflatten(input_treedef, args[num_leaves:])
        out = apply_fn(p, x)
        flat, tree = jax.tree_util.tree_flatten(out)
        out_tree_box.append(tree)
        return flat

    avals = [_shape_dtype(x) for x in leaves + input_leaves]
    closed = jax.make_jaxpr(flat_fn)(*avals)
    jaxpr = closed.jaxpr
    leaf_avals = [v.aval for v in jaxpr.invars[:num_leaves]]
    finder = _Finder(leaf_avals)
    refs = {
        v: _WeightRef(i, tuple(range(len(v.aval.shape))))
        for i, v in enumerate(jaxpr.invars[:num_leaves])
    }
    finder.walk(jaxpr, refs, ())

    layers, taken = [], set()
    unmatched: list[tuple[str, str]] = []
    shared = {leaf for leaf, n in finder.weight_uses.items() if n > 1}
    outputs = jaxpr.outvars
    batch = outputs[0].aval.shape[0] if outputs and len(outputs[0].aval.shape) else 1
    for site in finder.found:
        if site["weight_leaf"] in shared or (site["bias_leaf"] in shared):
            continue
        weight_path = leaf_paths[site["weight_leaf"]]
        name = _layer_name(weight_path, taken)
        taken.add(name)
        rows = int(np.prod(site["output_shape"])) // site["geometry"].d_out
        layers.append(
            LayerSite(
                name=name,
                weight_path=weight_path,
                bias_path=None if site["bias_leaf"] is None else leaf_paths[site["bias_leaf"]],
                positions=max(rows // max(batch, 1), 1),
                **site,
            )
        )
    covered = {s.weight_leaf for s in layers} | {s.bias_leaf for s in layers}
    for leaf, path in enumerate(leaf_paths):
        if leaf in covered:
            continue
        if leaf in shared:
            reason = "consumed by several layer operations (weight sharing is not supported yet)"
        elif leaf in finder.other_uses:
            reason = "consumed by " + ", ".join(sorted(finder.other_uses[leaf]))
        elif not jnp.issubdtype(leaf_avals[leaf].dtype, jnp.floating):
            reason = "not a floating-point array"
        else:
            reason = "not consumed by a dense or convolution operation"
        unmatched.append((path, reason))
    return Trace(
        closed_jaxpr=closed,
        param_treedef=param_treedef,
        input_treedef=input_treedef,
        output_treedef=out_tree_box[-1],
        leaf_paths=leaf_paths,
        layers=tuple(layers),
        unmatched=tuple(unmatched),
        num_leaves=num_leaves,
    )


# --------------------------------------------------------------------------------------------
# Tapped evaluation.


def _eval_equation(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    """Evaluate one equation with JAX's own evaluator (robust to binding changes)."""
    in_vars, values, seen = [], [], set()
    for var, val in zip(eqn.invars, invals, strict=True):
        if _is_var(var) and var not in seen:
            seen.add(var)
            in_vars.append(var)
            values.append(val)
    out_vars = [v for v in eqn.outvars if _is_var(v)]
    extra = {}
    if hasattr(jcore, "DebugInfo"):  # public from JAX 0.10; a missing one is deprecated there
        extra["debug_info"] = jcore.DebugInfo(
            "kfax",
            eqn.primitive.name,
            tuple(f"in{i}" for i in range(len(in_vars))),
            tuple(f"out{i}" for i in range(len(out_vars))),
        )
    jaxpr = jcore.Jaxpr(
        constvars=[], invars=in_vars, outvars=out_vars, eqns=[eqn], effects=eqn.effects, **extra
    )
    results = iter(jcore.jaxpr_as_fun(jcore.ClosedJaxpr(jaxpr, []))(*values))
    return [next(results) if _is_var(v) else None for v in eqn.outvars]


def _site_tree(layers: Sequence[LayerSite]) -> dict:
    tree: dict = {}
    for site in layers:
        node = tree
        for index in site.eqn_path[:-1]:
            node = node.setdefault(index, {})
        node[site.eqn_path[-1]] = site
    return tree


def _run(jaxpr, consts, args, tree, perturbations, layer_inputs):
    env: dict[Any, Any] = {}

    def read(atom):
        return atom.val if isinstance(atom, jcore.Literal) else env[atom]

    for var, val in zip(jaxpr.constvars, consts, strict=True):
        env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
        env[var] = val
    for index, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        node = tree.get(index)
        if isinstance(node, LayerSite):
            layer_inputs[node.name] = invals[node.input_operand]
            (out,) = _eval_equation(eqn, invals)
            outvals = [out + perturbations[node.name].astype(out.dtype)]
        elif isinstance(node, dict):
            sub_jaxpr, sub_consts = _subjaxpr(eqn)
            outvals = _run(sub_jaxpr, sub_consts, invals, node, perturbations, layer_inputs)
        else:
            outvals = _eval_equation(eqn, invals)
        for var, val in zip(eqn.outvars, outvals, strict=True):
            if _is_var(var):
                env[var] = val
    return [read(v) for v in jaxpr.outvars]


def tapped_call(
    traced: Trace,
    leaves: Sequence[Any],
    input_leaves: Sequence[Any],
    perturbations: Mapping[str, Any],
) -> tuple[list[Any], dict[str, Any]]:
    """Evaluate the traced function with ``perturbations[name]`` added to each layer's output.

    Returns the flat outputs and each layer's input (the activation it multiplies).
    """
    layer_inputs: dict[str, Any] = {}
    closed = traced.closed_jaxpr
    outputs = _run(
        closed.jaxpr,
        closed.consts,
        list(leaves) + list(input_leaves),
        _site_tree(traced.layers),
        perturbations,
        layer_inputs,
    )
    return outputs, layer_inputs
