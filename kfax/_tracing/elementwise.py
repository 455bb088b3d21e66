"""Elementwise layer operations: biases, shifts and scales, and following layer outputs.

Rules, tried by the walk (:mod:`kfax._tracing.finder`) on an equation that reads a parameter
broadcast over other axes (:class:`~kfax._tracing.refs.BiasRef`):

* ``add`` of a broadcast parameter to data: the bias of the dense operation or convolution whose
  output it is added to, else the shift of the scale whose (elementwise-scaled) output it is
  added to, else a shift of its own;
* ``mul`` of a broadcast parameter and data: a scale.

A parameter broadcast for a scale or a shift must not cover axis 0 (the batch axis) of the data,
whose axis 0 must be the batch. A layer's output is followed through operations that keep it an
affine function of the output (a bias added after them is a *suspect* bias, reported by
:mod:`kfax._tracing.verdict`), and a scale's output through products, casts and negation (a
shift added to it pairs with the scale).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from kfax import layers
from kfax._tracing import jaxprs
from kfax._tracing.records import Site, TapSpec, shape_of
from kfax._tracing.refs import BiasRef, WeightRef, stack_axes

if TYPE_CHECKING:
    from kfax._tracing.finder import Scope

# Operations that keep a layer's output an affine function of it (for suspect biases): unary
# ones always, binary ones when the other operand does not depend on the inputs.
_AFFINE_UNARY = frozenset({"convert_element_type", "copy", "copy_p", "neg", "reduce_precision"})
_AFFINE_BINARY = frozenset({"add", "add_any", "sub", "mul", "div"})
# Operations through which a scale's output stays elementwise proportional to the scale.
_SCALED_UNARY = frozenset({"convert_element_type", "copy", "copy_p", "neg", "mul"})


class ElementwiseMatchers:
    """The matchers of biases, shifts and scales, a mixin of :class:`~kfax._tracing.finder.Finder`:
    the methods read and extend the finder's ``sites``, ``bias_sites`` and ``bias_candidates``,
    read its ``leaf_shapes`` and ``batch``, and call its ``is_data`` and ``_record``.
    """

    def as_bias(self, ref: Any) -> BiasRef | None:
        if isinstance(ref, BiasRef):
            return ref
        if isinstance(ref, WeightRef):
            return ref.as_bias()
        return None

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
        out_shape = shape_of(eqn.outvars[0])
        if not self.is_data(target, scope) or shape_of(target) != out_shape:
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
        out_shape = shape_of(eqn.outvars[0])
        for side in (0, 1):
            bias, x = self.as_bias(in_refs[side]), eqn.invars[1 - side]
            if bias is None or in_refs[1 - side] is not None or not self.is_data(x, scope):
                continue
            features = self.shift_features(bias, out_shape)
            if features is None:
                continue
            geometry = layers.ScaleShift(bias.shape(self.leaf_shapes[bias.leaf]), True, False)
            tap = TapSpec(
                path, 1 - side, out_shape, eqn.outvars[0].aval.dtype, shape_of(x), features,
                features, broadcast_input=shape_of(x) != out_shape,
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
            if shape_of(eqn.outvars[0]) != shape_of(eqn.invars[pos]):
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
        if shape_of(eqn.outvars[0]) != shape_of(eqn.invars[pos]):
            return
        if prim in _SCALED_UNARY or (prim == "div" and pos == 0):
            scope.scaled[eqn.outvars[0]] = value
