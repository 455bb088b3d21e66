"""The walk over a jaxpr that records every parameter use and every candidate layer operation.

Rules, in the order an equation is tried:

* calls (``jit``, ``checkpoint``, custom derivatives) are walked inside; ``scan`` bodies too,
  with the parameters sliced by the scan (``xs``: a stack of layers) or closed over (a constant:
  shared over the steps);
* casts, copies and transposes keep a weight the same weight; broadcasts and reshapes make a
  parameter a broadcast one (:class:`~kfax._tracing.refs.BiasRef`);
* ``dot_general`` with a parameter and data (no batch dimensions): a dense operation;
  ``conv_general_dilated`` with one group: a convolution; ``gather`` of rows of a 2-D parameter
  at data-dependent ids: an embedding;
* ``add`` of a broadcast parameter to data: the bias of the dense operation or convolution whose
  output it is added to, else the shift of the scale whose (elementwise-scaled) output it is
  added to, else a shift of its own; ``mul`` of a broadcast parameter and data: a scale;
* anything else that reads a parameter is an *other use*, named by its primitive.

A parameter broadcast for a scale or a shift must not cover axis 0 (the batch axis) of the data,
whose axis 0 must be the batch. Which operations become layers is decided afterwards, from all
uses together (:mod:`kfax._tracing.verdict`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from kfax import layers
from kfax._tracing import jaxprs
from kfax._tracing.refs import BiasRef, Level, WeightRef, reduced_axis, stack_axes

_WEIGHT_PASSTHROUGH = frozenset({"convert_element_type", "copy", "copy_p", "transpose"})
_BIAS_PASSTHROUGH = frozenset(
    {"convert_element_type", "copy", "copy_p", "reshape", "broadcast_in_dim", "expand_dims"}
)
# Operations that keep a layer's output an affine function of it (for suspect biases): unary
# ones always, binary ones when the other operand does not depend on the inputs.
_AFFINE_UNARY = frozenset({"convert_element_type", "copy", "copy_p", "neg", "reduce_precision"})
_AFFINE_BINARY = frozenset({"add", "add_any", "sub", "mul", "div"})
# Operations through which a scale's output stays elementwise proportional to the scale.
_SCALED_UNARY = frozenset({"convert_element_type", "copy", "copy_p", "neg", "mul"})
KIND_WORDS = {
    "dense": "dense operation",
    "conv": "convolution",
    "embedding": "embedding gather",
    "scale_shift": "elementwise scale or shift",
}


@dataclasses.dataclass(frozen=True)
class TapSpec:
    """Where to tap an operation and how its values are laid out (inner, one scan step).

    ``out_features`` / ``in_features`` are the feature axes of the output and of the recorded
    input (rows layouts); ``conv_batch`` the (input, output) batch axes of a convolution, whose
    values keep their own layout.
    """

    eqn_path: tuple[int, ...]
    input_operand: int | None
    out_shape: tuple[int, ...]
    dtype: Any
    in_shape: tuple[int, ...] | None = None
    out_features: tuple[int, ...] | None = None
    in_features: tuple[int, ...] | None = None
    conv_batch: tuple[int, int] | None = None
    broadcast_input: bool = False


@dataclasses.dataclass
class Site:
    """A layer operation found in the walk (a layer if its parameters have no other use)."""

    kind: str
    geometry: Any  # one layer's geometry, in the coordinates of the leaf without stack axes
    weight_leaf: int
    levels: tuple[tuple[str, int], ...]  # (kind, length) per enclosing scan, outermost first
    weight_stack_axes: tuple[int, ...]
    tap: TapSpec
    feature_shape: tuple[int, ...]  # the shape a bias (or a paired shift) must have
    bias_leaf: int | None = None
    bias_tap: TapSpec | None = None  # the addition of the bias, tapped as a shift of its own

    @property
    def kind_word(self) -> str:
        return KIND_WORDS.get(self.kind, self.kind)


@dataclasses.dataclass
class Scope:
    """What the finder knows about the variables of one jaxpr (a sub-jaxpr gets its own)."""

    refs: dict[Any, WeightRef | BiasRef] = dataclasses.field(default_factory=dict)
    # var -> (site index, feature axes): a layer operation's output, possibly cast or transposed
    # (a bias added to it is the layer's bias).
    direct: dict[Any, tuple[int, tuple]] = dataclasses.field(default_factory=dict)
    # var -> (site index, feature axes): an affine function of a layer's output (a bias added
    # to it is a suspect bias).
    chained: dict[Any, tuple[int, tuple]] = dataclasses.field(default_factory=dict)
    # var -> (site index, feature axes): a scale's output times data (a shift added pairs).
    scaled: dict[Any, tuple[int, tuple]] = dataclasses.field(default_factory=dict)
    data: set[Any] = dataclasses.field(default_factory=set)  # vars that depend on the inputs
    lengths: tuple[int, ...] = ()  # lengths of the enclosing scans

    def tracked(self, atom: Any) -> tuple[int, tuple] | None:
        if not jaxprs.is_var(atom):
            return None
        return self.direct.get(atom) or self.chained.get(atom)

    def copy_var(self, source: Scope, src: Any, dst: Any, layer_outputs: bool) -> None:
        """Carry what is known of ``src`` (in ``source``) over to ``dst`` (in this scope)."""
        if src in source.refs:
            self.refs[dst] = source.refs[src]
        if src in source.data:
            self.data.add(dst)
        if layer_outputs:
            for mine, theirs in (
                (self.direct, source.direct),
                (self.chained, source.chained),
                (self.scaled, source.scaled),
            ):
                if src in theirs:
                    mine[dst] = theirs[src]


def _live_leaves(jaxpr: Any, num_leaves: int) -> set[int]:
    """The parameter leaves the outputs depend on (an equation's outputs are taken to depend on
    all its inputs): a batch statistic that is only read to update a running average is not."""
    live = {v for v in jaxpr.outvars if jaxprs.is_var(v)}
    for eqn in reversed(jaxpr.eqns):
        if any(jaxprs.is_var(v) and v in live for v in eqn.outvars):
            live.update(v for v in eqn.invars if jaxprs.is_var(v))
    return {i for i, v in enumerate(jaxpr.invars[:num_leaves]) if v in live}


def _shape(atom: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in atom.aval.shape)


class Finder:
    """Walks a jaxpr (recursing into calls and scans) and records every parameter use.

    Each parameter leaf collects its uses: as the weight of layer operations
    (``weight_sites``), as their bias (``bias_sites``) and by any other primitive
    (``other_uses``).
    """

    def __init__(self, leaf_avals: Sequence[Any], batch: int):
        self.leaf_avals = leaf_avals
        self.leaf_shapes = [tuple(int(s) for s in a.shape) for a in leaf_avals]
        self.batch = batch
        self.sites: list[Site] = []
        self.weight_sites: dict[int, list[int]] = {}
        self.bias_sites: dict[int, list[int]] = {}
        self.other_uses: dict[int, set[str]] = {}
        self.bias_candidates: dict[tuple[int, int], None] = {}  # ordered set of (leaf, site)
        self.live_leaves: set[int] = set()

    def run(self, jaxpr: Any, num_leaves: int) -> None:
        self.live_leaves = _live_leaves(jaxpr, num_leaves)
        scope = Scope()
        for i, var in enumerate(jaxpr.invars[:num_leaves]):
            scope.refs[var] = WeightRef(i, tuple(range(len(var.aval.shape))))
        scope.data.update(jaxpr.invars[num_leaves:])
        self.walk(jaxpr, scope, ())
        for var in jaxpr.outvars:
            if jaxprs.is_var(var) and var in scope.refs:
                self.use(scope.refs[var].leaf, "the model output")

    def walk(self, jaxpr: Any, scope: Scope, prefix: tuple[int, ...]) -> None:
        for index, eqn in enumerate(jaxpr.eqns):
            in_refs = [scope.refs.get(v) if jaxprs.is_var(v) else None for v in eqn.invars]
            if any(jaxprs.is_var(v) and v in scope.data for v in eqn.invars):
                scope.data.update(v for v in eqn.outvars if jaxprs.is_var(v))
            if not self._visit(eqn, in_refs, scope, prefix + (index,)):
                self.track(eqn, in_refs, scope)
                for ref in in_refs:
                    if ref is not None:
                        self.use(ref.leaf, jaxprs.use_name(eqn))

    def use(self, leaf: int, use: str) -> None:
        self.other_uses.setdefault(leaf, set()).add(use)

    def is_data(self, atom: Any, scope: Scope) -> bool:
        return jaxprs.is_var(atom) and atom in scope.data

    # ---------------------------------------------------------------- dispatch

    def _visit(self, eqn: Any, in_refs: list, scope: Scope, path: tuple[int, ...]) -> bool:
        """Handle an equation that moves a parameter or makes a layer; False for any other."""
        prim = eqn.primitive.name
        sub = jaxprs.subjaxpr(eqn)
        if sub is not None:
            self._visit_call(eqn, sub[0], scope, path)
            return True
        scan = jaxprs.scan_of(eqn)
        if scan is not None:
            self._visit_scan(eqn, scan, scope, path)
            return True
        first = in_refs[0] if in_refs else None
        if prim in _WEIGHT_PASSTHROUGH and isinstance(first, WeightRef):
            if prim == "transpose":
                first = first.permuted(eqn.params["permutation"])
            scope.refs[eqn.outvars[0]] = first
            return True
        bias = self.as_bias(first)
        if prim in _BIAS_PASSTHROUGH and bias is not None:
            moved = bias.moved(prim, eqn.params, _shape(eqn.invars[0]), _shape(eqn.outvars[0]))
            scope.refs[eqn.outvars[0]] = moved
            return True
        site = None
        if prim == "dot_general":
            site = self._match_dense(eqn, in_refs, scope, path)
        elif prim == "conv_general_dilated":
            site = self._match_conv(eqn, in_refs, scope, path)
        elif prim == "gather":
            site = self._match_embedding(eqn, in_refs, scope, path)
        if site is not None:
            scope.direct[eqn.outvars[0]] = (site, self.sites[site].tap.out_features)
            return True
        if prim in _WEIGHT_PASSTHROUGH and jaxprs.is_var(eqn.invars[0]):
            if eqn.invars[0] in scope.direct:
                site, axes = scope.direct[eqn.invars[0]]
                if prim == "transpose":
                    perm = tuple(eqn.params["permutation"])
                    axes = None if axes is None else tuple(perm.index(a) for a in axes)
                scope.direct[eqn.outvars[0]] = (site, axes)
                return True
        if prim == "add":
            return self._match_add(eqn, in_refs, scope, path)
        if prim == "mul":
            return self._match_scale(eqn, in_refs, scope, path)
        return False

    def as_bias(self, ref: Any) -> BiasRef | None:
        if isinstance(ref, BiasRef):
            return ref
        if isinstance(ref, WeightRef):
            return ref.as_bias()
        return None

    def _visit_call(self, eqn: Any, jaxpr: Any, scope: Scope, path: tuple[int, ...]) -> None:
        """Walk a call's body; an exact call also passes layer outputs in and everything out."""
        exact = eqn.primitive.name in jaxprs.EXACT_CALLS
        inner = Scope(lengths=scope.lengths)
        for outer_var, inner_var in zip(eqn.invars, jaxpr.invars, strict=True):
            if jaxprs.is_var(outer_var):
                inner.copy_var(scope, outer_var, inner_var, layer_outputs=exact)
        self.walk(jaxpr, inner, path)
        for outer_var, inner_var in zip(eqn.outvars, jaxpr.outvars, strict=True):
            if not (jaxprs.is_var(outer_var) and jaxprs.is_var(inner_var)):
                continue
            if exact:
                scope.copy_var(inner, inner_var, outer_var, layer_outputs=True)
            elif inner_var in inner.refs:
                self.use(inner.refs[inner_var].leaf, eqn.primitive.name)

    def _visit_scan(self, eqn: Any, scan: jaxprs.Scan, scope: Scope, path) -> None:
        """Walk a scan's body: parameters in ``xs`` are sliced (a stack), constants shared."""
        inner = Scope(lengths=scope.lengths + (scan.length,))
        any_data = any(self.is_data(v, scope) for v in eqn.invars)
        first_xs = scan.num_consts + scan.num_carry
        for i, (outer, var) in enumerate(zip(eqn.invars, scan.jaxpr.invars, strict=True)):
            if not jaxprs.is_var(outer):
                continue
            ref = scope.refs.get(outer)
            carry = scan.num_consts <= i < first_xs
            if ref is not None and carry:
                self.use(ref.leaf, "scan (as a loop carry)")
            elif ref is not None:
                inner.refs[var] = ref.entered(sliced=i >= first_xs)
            if self.is_data(outer, scope) or (carry and any_data):
                inner.data.add(var)
        self.walk(scan.jaxpr, inner, path)
        for var in scan.jaxpr.outvars:
            if jaxprs.is_var(var) and var in inner.refs:
                self.use(inner.refs[var].leaf, "scan (returned from the loop)")

    # ---------------------------------------------------------------- recording

    def _levels(self, ref: WeightRef | BiasRef, scope: Scope) -> tuple[tuple[str, int], ...]:
        return tuple(
            (kind, length) for (kind, _), length in zip(ref.levels, scope.lengths, strict=True)
        )

    def _reduced_shape(self, leaf: int, levels: Sequence[Level]) -> tuple[int, ...]:
        skip = set(stack_axes(levels))
        return tuple(s for a, s in enumerate(self.leaf_shapes[leaf]) if a not in skip)

    def _record(self, kind, geometry, ref, tap: TapSpec, feature_shape, scope: Scope) -> int:
        site = Site(
            kind,
            geometry,
            ref.leaf,
            self._levels(ref, scope),
            stack_axes(ref.levels),
            tap,
            tuple(feature_shape),
        )
        self.sites.append(site)
        self.weight_sites.setdefault(ref.leaf, []).append(len(self.sites) - 1)
        return len(self.sites) - 1

    # ---------------------------------------------------------------- layer operations

    def _match_dense(self, eqn, in_refs, scope, path) -> int | None:
        contract, batch_dims = eqn.params["dimension_numbers"]
        if any(len(b) for b in batch_dims):
            return None
        for w_side in (1, 0):
            weight, x_atom = in_refs[w_side], eqn.invars[1 - w_side]
            if not isinstance(weight, WeightRef) or in_refs[1 - w_side] is not None:
                continue
            if not self.is_data(x_atom, scope) or not contract[w_side]:
                continue
            w_shape, x_shape = _shape(eqn.invars[w_side]), _shape(x_atom)
            w_contract, x_contract = tuple(contract[w_side]), tuple(contract[1 - w_side])
            w_free = [a for a in range(len(w_shape)) if a not in w_contract]
            x_free = len(x_shape) - len(x_contract)
            out_rank = x_free + len(w_free)
            out_features = (
                tuple(range(x_free, out_rank)) if w_side == 1 else tuple(range(len(w_free)))
            )
            reduced = [reduced_axis(weight.axes[a], weight.levels) for a in range(len(w_shape))]
            geometry = layers.dense_from_axes(
                self._reduced_shape(weight.leaf, weight.levels),
                tuple(reduced[a] for a in w_contract),
                tuple(reduced[a] for a in w_free),
            )
            out = eqn.outvars[0].aval
            tap = TapSpec(
                path, 1 - w_side, _shape(eqn.outvars[0]), out.dtype, x_shape, out_features,
                x_contract,
            )  # fmt: skip
            features = tuple(w_shape[a] for a in w_free)
            return self._record("dense", geometry, weight, tap, features, scope)
        return None

    def _match_conv(self, eqn, in_refs, scope, path) -> int | None:
        weight = in_refs[1]
        if not isinstance(weight, WeightRef) or in_refs[0] is not None:
            return None
        if not self.is_data(eqn.invars[0], scope):
            return None
        p = eqn.params
        if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
            return None  # reported through the primitive's use name
        dn = p["dimension_numbers"]
        rhs_spec = tuple(dn.rhs_spec)
        w_shape = _shape(eqn.invars[1])
        spatial = tuple(int(w_shape[a]) for a in rhs_spec[2:])

        def leaf_axis(a):
            return reduced_axis(weight.axes[a], weight.levels)

        geometry = layers.Conv(
            d_in=int(w_shape[rhs_spec[1]]) * int(np.prod(spatial)),
            d_out=int(w_shape[rhs_spec[0]]),
            filter_shape=spatial,
            window_strides=tuple(p["window_strides"]),
            padding=tuple(tuple(q) for q in p["padding"]),
            lhs_dilation=tuple(p["lhs_dilation"]),
            rhs_dilation=tuple(p["rhs_dilation"]),
            dimension_numbers=dn,
            output_axis=int(dn.out_spec[1]),
            weight_in_axis=leaf_axis(rhs_spec[1]),
            weight_out_axis=leaf_axis(rhs_spec[0]),
            weight_spatial_axes=tuple(leaf_axis(a) for a in rhs_spec[2:]),
        )
        out = eqn.outvars[0].aval
        tap = TapSpec(
            path, 0, _shape(eqn.outvars[0]), out.dtype, _shape(eqn.invars[0]),
            out_features=(int(dn.out_spec[1]),),
            conv_batch=(int(dn.lhs_spec[0]), int(dn.out_spec[0])),
        )  # fmt: skip
        return self._record("conv", geometry, weight, tap, (geometry.d_out,), scope)

    def _match_embedding(self, eqn, in_refs, scope, path) -> int | None:
        """``table[ids]``: rows of a 2-D parameter gathered at data-dependent integer ids (also
        vmapped, where the index vectors hold the id and a start of 0 along the features)."""
        table = in_refs[0]
        if not isinstance(table, WeightRef) or in_refs[1] is not None:
            return None
        ids = eqn.invars[1]
        shape, ids_shape = _shape(eqn.invars[0]), _shape(ids)
        dn, sizes = eqn.params["dimension_numbers"], tuple(eqn.params["slice_sizes"])
        starts = tuple(dn.start_index_map)
        if (
            not self.is_data(ids, scope)
            or len(shape) != 2
            or tuple(getattr(dn, "operand_batching_dims", ()))
            or not ids_shape
            or ids_shape[-1] != len(starts)
        ):
            return None
        vocab = next((a for a in starts if sizes[a] == 1 and sizes[1 - a] == shape[1 - a]), None)
        collapsed = tuple(dn.collapsed_slice_dims)
        if vocab is None or set(starts) - {0, 1} or collapsed not in ((), (vocab,)):
            return None
        offsets = tuple(dn.offset_dims)  # output axes of the non-collapsed operand axes, in order
        kept = [a for a in (0, 1) if a not in collapsed]
        if len(offsets) != len(kept):
            return None
        feature_axis = offsets[kept.index(1 - vocab)]
        geometry = layers.Embedding(
            shape[vocab],
            shape[1 - vocab],
            reduced_axis(table.axes[vocab], table.levels),
            index_width=len(starts),
            index_column=starts.index(vocab),
        )
        out = eqn.outvars[0].aval
        tap = TapSpec(
            path, 1, _shape(eqn.outvars[0]), out.dtype, ids_shape,
            out_features=(int(feature_axis),), in_features=(len(ids_shape) - 1,),
        )  # fmt: skip
        return self._record("embedding", geometry, table, tap, (geometry.d_out,), scope)

    # ---------------------------------------------------------------- scales and shifts

    def shift_features(self, bias: BiasRef, out_shape: tuple[int, ...]) -> tuple | None:
        """The data axes a broadcast parameter runs along, if it is a per-feature parameter
        (never along the batch axis 0, whose size must be the batch's)."""
        leaf_shape = self.leaf_shapes[bias.leaf]
        axes = bias.feature_axes(leaf_shape)
        if axes is None or not out_shape or out_shape[0] != self.batch or 0 in axes:
            return None
        if len(set(axes)) != len(axes) or any(a >= len(out_shape) for a in axes):
            return None
        if math.prod(out_shape[a] for a in axes) != math.prod(bias.shape(leaf_shape)):
            return None
        return axes

    def _shift_tap(self, bias, eqn, target, path, scope) -> TapSpec | None:
        out_shape = _shape(eqn.outvars[0])
        if not self.is_data(target, scope) or _shape(target) != out_shape:
            return None
        features = self.shift_features(bias, out_shape)
        if features is None:
            return None
        return TapSpec(path, None, out_shape, eqn.outvars[0].aval.dtype, None, features)

    def _bias_levels_fit(self, bias: BiasRef, site: Site) -> bool:
        kinds = tuple(kind for kind, _ in bias.levels)
        stacked = stack_axes(bias.levels)
        return kinds == tuple(kind for kind, _ in site.levels) and stacked == tuple(
            range(len(stacked))
        )

    def _fits(self, bias: BiasRef, bias_atom: Any, target: Any, index: int, axes) -> bool:
        """Whether ``bias`` adds along the feature axes ``axes`` of site ``index``'s output."""
        site = self.sites[index]
        leaf_shape = self.leaf_shapes[bias.leaf]
        if bias.shape(leaf_shape) != site.feature_shape or not self._bias_levels_fit(bias, site):
            return False
        if math.prod(site.feature_shape) == 1:
            return True
        mapped = bias.feature_axes(leaf_shape)
        if mapped is None or axes is None:
            return False
        gap = len(target.aval.shape) - len(bias_atom.aval.shape)  # implicit broadcast
        wanted = tuple(a for a, s in zip(axes, site.feature_shape, strict=True) if s != 1)
        return tuple(a + gap for a in mapped) == wanted

    def _match_add(self, eqn, in_refs, scope, path) -> bool:
        for side in (0, 1):
            bias, target = self.as_bias(in_refs[side]), eqn.invars[1 - side]
            if bias is None or in_refs[1 - side] is not None or not jaxprs.is_var(target):
                continue
            if self._add_as_bias(eqn, bias, side, target, scope, path):
                return True
            tap = self._shift_tap(bias, eqn, target, path, scope)
            if tap is None:
                continue
            if not self._add_as_paired_shift(eqn, bias, target, tap, scope):
                geometry = layers.ScaleShift(bias.shape(self.leaf_shapes[bias.leaf]), False, True)
                self._record("scale_shift", geometry, bias, tap, geometry.param_shape, scope)
            self.track(eqn, in_refs, scope)
            return True
        return False

    def _add_as_bias(self, eqn, bias, side, target, scope, path) -> bool:
        if target not in scope.direct:
            return False
        index, axes = scope.direct[target]
        site = self.sites[index]
        if site.kind not in ("dense", "conv") or site.bias_leaf is not None:
            return False
        if not self._fits(bias, eqn.invars[side], target, index, axes):
            return False
        site.bias_leaf = bias.leaf
        site.bias_tap = self._shift_tap(bias, eqn, target, path, scope)
        self.bias_sites.setdefault(bias.leaf, []).append(index)
        self.bias_candidates[(bias.leaf, index)] = None
        scope.chained[eqn.outvars[0]] = (index, axes)
        return True

    def _add_as_paired_shift(self, eqn, bias, target, tap: TapSpec, scope) -> bool:
        if target not in scope.scaled:
            return False
        index, axes = scope.scaled[target]
        site = self.sites[index]
        shape = bias.shape(self.leaf_shapes[bias.leaf])
        if site.bias_leaf is not None or shape != site.feature_shape or axes != tap.out_features:
            return False
        if not self._bias_levels_fit(bias, site):
            return False
        site.bias_leaf = bias.leaf
        site.bias_tap = tap
        self.bias_sites.setdefault(bias.leaf, []).append(index)
        return True

    def _match_scale(self, eqn, in_refs, scope, path) -> bool:
        out_shape = _shape(eqn.outvars[0])
        for side in (0, 1):
            bias, x = self.as_bias(in_refs[side]), eqn.invars[1 - side]
            if bias is None or in_refs[1 - side] is not None or not self.is_data(x, scope):
                continue
            features = self.shift_features(bias, out_shape)
            if features is None:
                continue
            geometry = layers.ScaleShift(bias.shape(self.leaf_shapes[bias.leaf]), True, False)
            tap = TapSpec(
                path, 1 - side, out_shape, eqn.outvars[0].aval.dtype, _shape(x), features,
                features, broadcast_input=_shape(x) != out_shape,
            )  # fmt: skip
            index = self._record("scale_shift", geometry, bias, tap, geometry.param_shape, scope)
            self.track(eqn, in_refs, scope)
            scope.scaled[eqn.outvars[0]] = (index, features)
            return True
        return False

    # ---------------------------------------------------------------- following outputs

    def track(self, eqn: Any, in_refs: list, scope: Scope) -> None:
        self._track_affine(eqn, in_refs, scope)
        self._track_scaled(eqn, scope)

    def _track_affine(self, eqn: Any, in_refs: list, scope: Scope) -> None:
        """Follow a layer's output through affine operations; note biases added to it."""
        tracked = [(pos, scope.tracked(v)) for pos, v in enumerate(eqn.invars)]
        tracked = [(pos, t) for pos, t in tracked if t is not None]
        if len(tracked) != 1 or len(eqn.outvars) != 1:
            return
        prim = eqn.primitive.name
        pos, (index, axes) = tracked[0]
        if prim == "add" and len(eqn.invars) == 2:
            bias = self.as_bias(in_refs[1 - pos])
            if bias is not None and self._fits(
                bias, eqn.invars[1 - pos], eqn.invars[pos], index, axes
            ):
                self.bias_candidates[(bias.leaf, index)] = None
        if prim == "transpose":
            perm = tuple(eqn.params["permutation"])
            axes = None if axes is None else tuple(perm.index(a) for a in axes)
        elif prim in _AFFINE_BINARY and len(eqn.invars) == 2:
            other = eqn.invars[1 - pos]
            if (prim == "div" and pos == 1) or self.is_data(other, scope):
                return
            if _shape(eqn.outvars[0]) != _shape(eqn.invars[pos]):
                return
        elif prim not in _AFFINE_UNARY:
            return
        scope.chained[eqn.outvars[0]] = (index, axes)

    def _track_scaled(self, eqn: Any, scope: Scope) -> None:
        """Follow a scale's output through products with anything, casts and negation."""
        tracked = [
            (pos, scope.scaled[v])
            for pos, v in enumerate(eqn.invars)
            if jaxprs.is_var(v) and v in scope.scaled
        ]
        if len(tracked) != 1 or len(eqn.outvars) != 1:
            return
        pos, value = tracked[0]
        prim = eqn.primitive.name
        if _shape(eqn.outvars[0]) != _shape(eqn.invars[pos]):
            return
        if prim in _SCALED_UNARY or (prim == "div" and pos == 0):
            scope.scaled[eqn.outvars[0]] = value
