"""The walk over a jaxpr that records every parameter use and every candidate layer operation.

Rules, in the order an equation is tried:

* calls (``jit``, ``checkpoint``, custom derivatives) are walked inside; ``scan`` bodies too,
  with the parameters sliced by the scan (``xs``: a stack of layers) or closed over (a constant:
  shared over the steps);
* casts, copies and transposes keep a weight the same weight; broadcasts and reshapes make a
  parameter a broadcast one (:class:`~kfax._tracing.refs.BiasRef`);
* a matrix product of a parameter and data (dense ``dot_general``, convolution, embedding
  gather) is a layer operation: the rules are in :mod:`kfax._tracing.products`; casts, copies
  and transposes of its output keep it that operation's output;
* ``add`` and ``mul`` of a broadcast parameter and data (biases, shifts, scales): the rules are
  in :mod:`kfax._tracing.elementwise`, which also follows layer outputs through the operations
  below;
* anything else that reads a parameter is an *other use*, named by its primitive.

The matchers are mixins of :class:`Finder`, one module per layer kind; what they record
(:class:`~kfax._tracing.records.Site`, :class:`~kfax._tracing.records.TapSpec`) is defined in
:mod:`kfax._tracing.records` and importable from here too. Which operations become layers is
decided afterwards, from all uses together (:mod:`kfax._tracing.verdict`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from kfax._tracing import jaxprs
from kfax._tracing.elementwise import ElementwiseMatchers
from kfax._tracing.products import ProductMatchers
from kfax._tracing.records import Site, TapSpec, shape_of
from kfax._tracing.refs import BiasRef, WeightRef, stack_axes

__all__ = ["Finder", "Scope", "Site", "TapSpec"]

_WEIGHT_PASSTHROUGH = frozenset({"convert_element_type", "copy", "copy_p", "transpose"})
_BIAS_PASSTHROUGH = frozenset(
    {"convert_element_type", "copy", "copy_p", "reshape", "broadcast_in_dim", "expand_dims"}
)


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


class Finder(ProductMatchers, ElementwiseMatchers):
    """Walks a jaxpr (recursing into calls and scans) and records every parameter use.

    Each parameter leaf collects its uses: as the weight of layer operations
    (``weight_sites``), as their bias (``bias_sites``) and by any other primitive
    (``other_uses``). The matchers of layer operations come from the mixins
    (:class:`~kfax._tracing.products.ProductMatchers`,
    :class:`~kfax._tracing.elementwise.ElementwiseMatchers`), which use these attributes.
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
            moved = bias.moved(prim, eqn.params, shape_of(eqn.invars[0]), shape_of(eqn.outvars[0]))
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
