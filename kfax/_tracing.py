"""Find the layers of a JAX function from its jaxpr, and re-run it with taps on them.

This is the only module of kfax that reads jaxprs. It knows which primitives make a layer
(``dot_general`` for dense layers, ``conv_general_dilated`` for convolutions) and how parameters
flow into them (through ``jit``, ``checkpoint``, custom-derivative wrappers, casts and
transposes); it knows nothing of curvature or optimisers. Per-layer arithmetic lives in
:mod:`kfax._layers`; this module only builds the geometry objects defined there.

A parameter is a layer's weight (or bias) only when that layer operation is its *only* use: a
parameter that is also used anywhere else (a tied embedding's gather, a second application of
the same block, a bias shared by two layers) has a gradient that is not the layer's
``h^T g``, so it is reported as unmatched, with every use named.

Everything it touches is public API (``jax.make_jaxpr`` and ``jax.extend.core``). Single equations
are evaluated through ``jax.extend.core.jaxpr_as_fun`` on a one-equation jaxpr, so that JAX's own
evaluator deals with binding details that change between releases.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
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
# The calls that compute exactly their body (no custom derivative): parameters, layer outputs
# and biases are followed into them and out of them. A parameter that leaves a
# custom-derivative call is a use of its own (its gradient is whatever the rule says).
_EXACT_CALLS = frozenset(
    {"jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint"}
)
_SUBJAXPR_PARAM_NAMES = ("jaxpr", "call_jaxpr", "fun_jaxpr")
# Operations through which a weight stays "the same weight" (values and layout tracked).
_WEIGHT_PASSTHROUGH = frozenset({"convert_element_type", "copy", "copy_p", "transpose"})
# Operations through which a bias vector is broadcast before it is added.
_BIAS_PASSTHROUGH = frozenset(
    {"convert_element_type", "copy", "copy_p", "reshape", "broadcast_in_dim", "expand_dims"}
)
# Operations that keep a layer's output an affine function of it (for suspect biases): unary
# ones always, binary ones when the other operand does not depend on the inputs.
_AFFINE_UNARY = frozenset({"convert_element_type", "copy", "copy_p", "neg", "reduce_precision"})
_AFFINE_BINARY = frozenset({"add", "add_any", "sub", "mul", "div"})
_KIND_WORDS = {"dense": "dense", "conv": "convolution"}


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
    """A traced ``apply_fn``: its jaxpr over flat parameter leaves and inputs, and what was found.

    Attributes:
      closed_jaxpr: the program over ``(*parameter leaves, *input leaves)``.
      param_treedef, input_treedef, output_treedef: the pytree structures around it.
      leaf_paths: the path of every parameter leaf (``"a/b/kernel"``), in flattening order.
      layers: the layers, in program order. A layer's weight (and bias, if any) is used by that
        layer operation and by nothing else.
      unmatched: ``(path, reason)`` for every parameter leaf that is neither a layer's weight nor
        its bias. Reasons: ``"not a floating-point array (uint32)"`` (integer and PRNG-key leaves,
        such as an nnx Dropout's RNG state); ``"complex (complex64): ..."``; for a parameter used
        by a layer operation and by anything else, every use (``"used by dense layer 'E' and by
        gather"``, ``"used by 2 dense layer operations (weight sharing)"``, ``"bias shared by
        layers 'a' and 'b'"`` (both layers are then bias-free), ``"bias of the dense
        operation on 'E' (not a layer)"`` (the bias of an operation whose weight is shared);
        ``"consumed by mul, ..."`` (used only outside layer operations); ``"not consumed by a
        dense or convolution operation"``.
      num_leaves: the number of parameter leaves.
      complex_leaves: paths of complex-valued parameter leaves (never layers; kfax refuses them
        in :func:`kfax._capture.trace_layers`).
      output_avals: ``(shape, dtype)`` of each flat output.
      suspect_biases: ``(bias_path, layer_name)`` for an unmatched 1-D floating leaf of size
        ``d_out`` that looks like the bias of a layer that has none: it is added, broadcast along
        the layer's feature axis, to that layer's output after operations that keep the output
        an affine function of it (casts, negation, transposes, and ``+ - * /`` with an operand
        that does not depend on the inputs: ``(x @ K + shift) + b``, ``(x @ K) * s + b``), or
        directly but not matched (for example a bias shared by two layers). A bias after
        anything that depends on the inputs again is not suspect: LayerNorm, RMSNorm and
        train-mode BatchNorm subtract or divide by statistics of the layer output itself, so
        their bias is not flagged; eval-mode BatchNorm (fixed running averages) is affine, and
        its bias is flagged.
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


@dataclasses.dataclass
class _Site:
    """A layer operation found in the walk (a layer if its weight has no other use)."""

    geometry: _layers.Geometry
    weight_leaf: int
    eqn_path: tuple[int, ...]
    input_operand: int
    output_shape: tuple[int, ...]
    output_dtype: Any
    bias_leaf: int | None = None

    @property
    def kind_word(self) -> str:
        return _KIND_WORDS.get(self.geometry.kind, self.geometry.kind)


@dataclasses.dataclass
class _Scope:
    """What the finder knows about the variables of one jaxpr (a sub-jaxpr gets its own)."""

    refs: dict[Any, _WeightRef | _BiasRef] = dataclasses.field(default_factory=dict)
    # var -> (site index, feature axis): a layer operation's output, possibly cast or transposed
    # (a bias added to it is the layer's bias).
    direct: dict[Any, tuple[int, int]] = dataclasses.field(default_factory=dict)
    # var -> (site index, feature axis): an affine function of a layer's output (a bias added to
    # it is a suspect bias).
    chained: dict[Any, tuple[int, int]] = dataclasses.field(default_factory=dict)
    data: set[Any] = dataclasses.field(default_factory=set)  # vars that depend on the inputs

    def tracked(self, atom: Any) -> tuple[int, int] | None:
        if not _is_var(atom):
            return None
        return self.direct.get(atom) or self.chained.get(atom)

    def copy_var(self, source: _Scope, src: Any, dst: Any, layer_outputs: bool) -> None:
        """Carry what is known of ``src`` (in ``source``) over to ``dst`` (in this scope)."""
        if src in source.refs:
            self.refs[dst] = source.refs[src]
        if src in source.data:
            self.data.add(dst)
        if layer_outputs:
            for mine, theirs in ((self.direct, source.direct), (self.chained, source.chained)):
                if src in theirs:
                    mine[dst] = theirs[src]


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


def _is_real(aval: Any) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.floating)


class _Finder:
    """Walks a jaxpr (recursing into call-like sub-jaxprs) and records every parameter use.

    Each parameter leaf collects its uses: as the weight of layer operations
    (``weight_sites``), as the bias of layer operations (``bias_sites``) and by any other
    primitive (``other_uses``). :class:`_Verdict` decides from them what is a layer.
    """

    def __init__(self, leaf_avals: Sequence[Any]):
        self.leaf_avals = leaf_avals
        self.sites: list[_Site] = []
        self.weight_sites: dict[int, list[int]] = {}
        self.bias_sites: dict[int, list[int]] = {}
        self.other_uses: dict[int, set[str]] = {}
        self.bias_candidates: dict[tuple[int, int], None] = {}  # ordered set of (leaf, site)

    def run(self, jaxpr: Any, num_leaves: int) -> None:
        scope = _Scope()
        for i, var in enumerate(jaxpr.invars[:num_leaves]):
            scope.refs[var] = _WeightRef(i, tuple(range(len(var.aval.shape))))
        scope.data.update(jaxpr.invars[num_leaves:])
        self.walk(jaxpr, scope, ())
        for var in jaxpr.outvars:
            if _is_var(var) and var in scope.refs:
                self._use(scope.refs[var].leaf, "the model output")

    def walk(self, jaxpr: Any, scope: _Scope, prefix: tuple[int, ...]) -> None:
        for index, eqn in enumerate(jaxpr.eqns):
            in_refs = [scope.refs.get(v) if _is_var(v) else None for v in eqn.invars]
            if any(_is_var(v) and v in scope.data for v in eqn.invars):
                scope.data.update(v for v in eqn.outvars if _is_var(v))
            if not self._visit(eqn, in_refs, scope, prefix + (index,)):
                self._track_affine(eqn, in_refs, scope)
                for ref in in_refs:
                    if ref is not None:
                        self._use(ref.leaf, _use_name(eqn))

    def _use(self, leaf: int, use: str) -> None:
        self.other_uses.setdefault(leaf, set()).add(use)

    def _visit(self, eqn: Any, in_refs: list, scope: _Scope, path: tuple[int, ...]) -> bool:
        """Handle an equation that moves a parameter or a layer output; False for any other."""
        prim = eqn.primitive.name
        sub = _subjaxpr(eqn)
        if sub is not None:
            self._visit_call(eqn, sub[0], scope, path)
            return True
        first = in_refs[0] if in_refs else None
        if prim in _WEIGHT_PASSTHROUGH and isinstance(first, _WeightRef):
            if prim == "transpose":
                first = _WeightRef(
                    first.leaf, tuple(first.axes[p] for p in eqn.params["permutation"])
                )
            scope.refs[eqn.outvars[0]] = first
            return True
        bias = self._as_bias(first)
        if prim in _BIAS_PASSTHROUGH and bias is not None:
            axis = _bias_axis_after(prim, eqn.params, bias, eqn.outvars[0].aval.shape)
            scope.refs[eqn.outvars[0]] = _BiasRef(bias.leaf, axis)
            return True
        site = None
        if prim == "dot_general":
            site = self._match_dense(eqn, in_refs, path)
        elif prim == "conv_general_dilated":
            site = self._match_conv(eqn, in_refs, path)
        if site is not None:
            scope.direct[eqn.outvars[0]] = (site, self.sites[site].geometry.output_axis)
            return True
        if prim in _WEIGHT_PASSTHROUGH and _is_var(eqn.invars[0]) and eqn.invars[0] in scope.direct:
            site, axis = scope.direct[eqn.invars[0]]
            if prim == "transpose":
                axis = tuple(eqn.params["permutation"]).index(axis)
            scope.direct[eqn.outvars[0]] = (site, axis)
            return True
        return prim == "add" and self._match_bias(eqn, in_refs, scope)

    def _visit_call(self, eqn: Any, jaxpr: Any, scope: _Scope, path: tuple[int, ...]) -> None:
        """Walk a call's body; an exact call also passes layer outputs in and everything out."""
        exact = eqn.primitive.name in _EXACT_CALLS
        inner = _Scope()
        for outer_var, inner_var in zip(eqn.invars, jaxpr.invars, strict=True):
            if _is_var(outer_var):
                inner.copy_var(scope, outer_var, inner_var, layer_outputs=exact)
        self.walk(jaxpr, inner, path)
        for outer_var, inner_var in zip(eqn.outvars, jaxpr.outvars, strict=True):
            if not (_is_var(outer_var) and _is_var(inner_var)):
                continue
            if exact:
                scope.copy_var(inner, inner_var, outer_var, layer_outputs=True)
            elif inner_var in inner.refs:
                self._use(inner.refs[inner_var].leaf, eqn.primitive.name)

    def _as_bias(self, ref: Any) -> _BiasRef | None:
        """``ref`` as a bias: a broadcast bias, or a 1-D parameter used as it is."""
        if isinstance(ref, _BiasRef):
            return ref
        if isinstance(ref, _WeightRef) and len(self.leaf_avals[ref.leaf].shape) == 1:
            return _BiasRef(ref.leaf, 0)
        return None

    def _record(self, eqn, weight: _WeightRef, input_operand: int, geometry, path) -> int:
        out = eqn.outvars[0].aval
        site = _Site(geometry, weight.leaf, path, input_operand, tuple(out.shape), out.dtype)
        self.sites.append(site)
        self.weight_sites.setdefault(weight.leaf, []).append(len(self.sites) - 1)
        return len(self.sites) - 1

    def _match_dense(self, eqn, in_refs, path) -> int | None:
        (contract, batch) = eqn.params["dimension_numbers"]
        if any(len(b) for b in batch):
            return None
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
        return None

    def _match_conv(self, eqn, in_refs, path) -> int | None:
        weight, x_ref = in_refs[1], in_refs[0]
        if not isinstance(weight, _WeightRef) or x_ref is not None:
            return None
        p = eqn.params
        if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
            return None  # reported as unmatched, consumed by the primitive (see _use_name)

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

    def _fits(self, bias: _BiasRef, bias_atom: Any, target_atom: Any, tracked) -> bool:
        """Whether ``bias`` (operand ``bias_atom``) adds along the feature axis of ``target``."""
        index, feature_axis = tracked
        d_out = self.sites[index].geometry.d_out
        if tuple(self.leaf_avals[bias.leaf].shape) != (d_out,):
            return False
        if d_out == 1:
            return True
        if bias.axis is None:
            return False
        rank_gap = len(target_atom.aval.shape) - len(bias_atom.aval.shape)  # implicit broadcast
        return bias.axis + rank_gap == feature_axis

    def _match_bias(self, eqn: Any, in_refs: list, scope: _Scope) -> bool:
        for side in (0, 1):
            bias, target = self._as_bias(in_refs[side]), eqn.invars[1 - side]
            if bias is None or not _is_var(target) or target not in scope.direct:
                continue
            index, axis = scope.direct[target]
            site = self.sites[index]
            if site.bias_leaf is None and self._fits(bias, eqn.invars[side], target, (index, axis)):
                site.bias_leaf = bias.leaf
                self.bias_sites.setdefault(bias.leaf, []).append(index)
                self.bias_candidates[(bias.leaf, index)] = None
                scope.chained[eqn.outvars[0]] = (index, axis)
                return True
        return False

    def _track_affine(self, eqn: Any, in_refs: list, scope: _Scope) -> None:
        """Follow a layer's output through affine operations; note biases added to it."""
        tracked = [(pos, scope.tracked(v)) for pos, v in enumerate(eqn.invars)]
        tracked = [(pos, t) for pos, t in tracked if t is not None]
        if len(tracked) != 1 or len(eqn.outvars) != 1:
            return
        prim = eqn.primitive.name
        pos, (index, axis) = tracked[0]
        if prim == "add" and len(eqn.invars) == 2:
            bias = self._as_bias(in_refs[1 - pos])
            if bias is not None and self._fits(
                bias, eqn.invars[1 - pos], eqn.invars[pos], tracked[0][1]
            ):
                self.bias_candidates[(bias.leaf, index)] = None
        if prim == "transpose":
            axis = tuple(eqn.params["permutation"]).index(axis)
        elif prim in _AFFINE_BINARY and len(eqn.invars) == 2:
            other = eqn.invars[1 - pos]
            if (prim == "div" and pos == 1) or (_is_var(other) and other in scope.data):
                return
            if tuple(eqn.outvars[0].aval.shape) != tuple(eqn.invars[pos].aval.shape):
                return
        elif prim not in _AFFINE_UNARY:
            return
        scope.chained[eqn.outvars[0]] = (index, axis)


def _use_name(eqn: Any) -> str:
    prim = eqn.primitive.name
    if prim == "conv_general_dilated" and (
        eqn.params["feature_group_count"] != 1 or eqn.params["batch_group_count"] != 1
    ):
        return "conv_general_dilated with feature or batch groups (not supported yet)"
    return prim


def _layer_name(weight_path: str, taken: set[str]) -> str:
    parts = weight_path.split("/")
    name = "/".join(parts[:-1]) if len(parts) > 1 else parts[0]
    candidate, k = name, 1
    while candidate in taken:
        candidate, k = f"{name}#{k}", k + 1
    return candidate


def _quoted(names: Sequence[str]) -> str:
    """``'a'``, ``'a' and 'b'``, ``'a', 'b' and 'c'``."""
    items = [f"'{n}'" for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class _Verdict:
    """Decides from a finished walk which sites are layers, and why every other leaf is not.

    A site is a layer when its weight is a real floating leaf used by that one layer operation
    and nothing else; it keeps its matched bias only when the bias, too, has no other use.
    """

    def __init__(self, finder: _Finder, leaf_paths: Sequence[str], batch: int):
        self.finder = finder
        self.leaf_paths = leaf_paths
        self.batch = batch
        self.is_layer = [self._sole_use(s.weight_leaf, weight=True) for s in finder.sites]
        self.names = self._site_names()

    def _sole_use(self, leaf: int, *, weight: bool) -> bool:
        f = self.finder
        uses = (len(f.weight_sites.get(leaf, ())), len(f.bias_sites.get(leaf, ())))
        return (
            _is_real(f.leaf_avals[leaf])
            and uses == ((1, 0) if weight else (0, 1))
            and leaf not in f.other_uses
        )

    def _site_names(self) -> list[str]:
        """Layers get unique names in program order; other sites their weight's plain name."""
        taken: set[str] = set()
        names = []
        for site, layer in zip(self.finder.sites, self.is_layer, strict=True):
            name = _layer_name(self.leaf_paths[site.weight_leaf], taken if layer else set())
            if layer:
                taken.add(name)
            names.append(name)
        return names

    def bias_of(self, index: int) -> int | None:
        leaf = self.finder.sites[index].bias_leaf
        if leaf is None or not self.is_layer[index] or not self._sole_use(leaf, weight=False):
            return None
        return leaf

    def layers(self) -> tuple[LayerSite, ...]:
        out = []
        for index, site in enumerate(self.finder.sites):
            if not self.is_layer[index]:
                continue
            bias = self.bias_of(index)
            rows = int(np.prod(site.output_shape)) // site.geometry.d_out
            out.append(
                LayerSite(
                    name=self.names[index],
                    geometry=site.geometry,
                    weight_path=self.leaf_paths[site.weight_leaf],
                    bias_path=None if bias is None else self.leaf_paths[bias],
                    weight_leaf=site.weight_leaf,
                    bias_leaf=bias,
                    eqn_path=site.eqn_path,
                    input_operand=site.input_operand,
                    output_shape=site.output_shape,
                    output_dtype=site.output_dtype,
                    positions=max(rows // max(self.batch, 1), 1),
                )
            )
        return tuple(out)

    def unmatched(self, layers: Sequence[LayerSite]) -> tuple[tuple[str, str], ...]:
        covered = {s.weight_leaf for s in layers} | {s.bias_leaf for s in layers}
        return tuple(
            (path, self.reason(leaf))
            for leaf, path in enumerate(self.leaf_paths)
            if leaf not in covered
        )

    def reason(self, leaf: int) -> str:
        f = self.finder
        dtype = f.leaf_avals[leaf].dtype
        if jnp.issubdtype(dtype, jnp.complexfloating):
            return f"complex ({dtype}): kfax supports real parameters only"
        if not jnp.issubdtype(dtype, jnp.floating):
            return f"not a floating-point array ({dtype})"
        if leaf in f.weight_sites or leaf in f.bias_sites:
            return self._shared_reason(leaf)
        if leaf in f.other_uses:
            return "consumed by " + ", ".join(sorted(f.other_uses[leaf]))
        return "not consumed by a dense or convolution operation"

    def _site_phrase(self, index: int) -> str:
        if self.is_layer[index]:
            return f"layer '{self.names[index]}'"
        site = self.finder.sites[index]
        path = self.leaf_paths[site.weight_leaf]
        return f"the {site.kind_word} operation on '{path}' (not a layer)"

    def _sites_phrase(self, indices: Sequence[int]) -> str:
        """Several sites: layers by name, other operations counted per weight."""
        counts = collections.Counter(
            i if self.is_layer[i] else self.finder.sites[i].weight_leaf for i in indices
        )
        phrases = []
        for index in dict.fromkeys(indices):
            key = index if self.is_layer[index] else self.finder.sites[index].weight_leaf
            n = counts.pop(key, 0)
            if n == 1:
                phrases.append(self._site_phrase(index))
            elif n > 1:
                site = self.finder.sites[index]
                path = self.leaf_paths[site.weight_leaf]
                phrases.append(f"{n} {site.kind_word} operations on '{path}' (not a layer)")
        return " and ".join(phrases)

    def _shared_reason(self, leaf: int) -> str:
        """Every use of a leaf that a layer operation uses but that is not a clean layer leaf."""
        f = self.finder
        weights = f.weight_sites.get(leaf, [])
        biases = f.bias_sites.get(leaf, [])
        others = sorted(f.other_uses.get(leaf, ()))
        kinds = {f.sites[i].kind_word for i in weights}
        kind = kinds.pop() + " " if len(kinds) == 1 else ""
        if len(weights) > 1 and not biases and not others:
            return f"used by {len(weights)} {kind}layer operations (weight sharing)"
        if biases and not weights and not others:
            if len(biases) > 1 and all(self.is_layer[i] for i in biases):
                return "bias shared by layers " + _quoted([self.names[i] for i in biases])
            if len(biases) == 1:
                return f"bias of {self._site_phrase(biases[0])}"
            return "bias shared by " + self._sites_phrase(biases)
        parts = []
        if len(weights) == 1:
            parts.append(f"by {kind}layer '{self.names[weights[0]]}'")
        elif weights:
            parts.append(f"by {len(weights)} {kind}layer operations")
        if biases:
            parts.append("as bias of " + self._sites_phrase(biases))
        if others:
            parts.append("by " + ", ".join(others))
        return "used " + " and ".join(parts) + (" (weight sharing)" if len(weights) > 1 else "")

    def suspects(self, layers: Sequence[LayerSite]) -> tuple[tuple[str, str], ...]:
        """``(bias_path, layer_name)`` of candidate biases left unmatched (see :class:`Trace`)."""
        covered = {s.weight_leaf for s in layers} | {s.bias_leaf for s in layers}
        bias_free = {s.name for s in layers if s.bias_leaf is None}
        found = []
        for leaf, index in self.finder.bias_candidates:
            name = self.names[index]
            if (
                self.is_layer[index]
                and name in bias_free
                and leaf not in covered
                and _is_real(self.finder.leaf_avals[leaf])
            ):
                found.append((self.leaf_paths[leaf], name))
        return tuple(dict.fromkeys(found))


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
    finder = _Finder(leaf_avals)
    finder.run(jaxpr, num_leaves)
    outputs = jaxpr.outvars
    batch = outputs[0].aval.shape[0] if outputs and len(outputs[0].aval.shape) else 1
    verdict = _Verdict(finder, leaf_paths, batch)
    layers = verdict.layers()
    return Trace(
        closed_jaxpr=closed,
        param_treedef=param_treedef,
        input_treedef=input_treedef,
        output_treedef=output_treedef,
        leaf_paths=leaf_paths,
        layers=layers,
        unmatched=verdict.unmatched(layers),
        num_leaves=num_leaves,
        complex_leaves=tuple(
            path
            for path, aval in zip(leaf_paths, leaf_avals, strict=True)
            if jnp.issubdtype(aval.dtype, jnp.complexfloating)
        ),
        output_avals=tuple((tuple(v.aval.shape), v.aval.dtype) for v in outputs),
        suspect_biases=verdict.suspects(layers),
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
