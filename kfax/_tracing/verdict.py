"""From a finished walk to the layers: which operations are layers, and why every other
parameter is not.

A site is a layer when its weight is a real floating leaf used by that one operation and
nothing else; it keeps its bias (or paired shift) only when that leaf, too, has no other use.
A bias whose only use is a site that is not a layer becomes a shift of its own. Every other
real floating parameter that ``apply_fn`` reads becomes a ``"parameter"`` layer (tied weights, a
block applied twice, a primitive kfax does not know), its note naming every use; when a use is
not a layer operation, a warning names the primitive and the parameter. Unmatched are only the
parameters with no gradient to precondition: non-floating, complex, or unused.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

import jax.numpy as jnp

from kfax import layers
from kfax._tracing.finder import Finder, Site, TapSpec
from kfax._tracing.sites import LayerSite, Tap, positions_of
from kfax.layers import layout


def _is_real(aval) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.floating)


def _layer_name(path: str, taken: set[str]) -> str:
    parts = path.split("/")
    candidate = "/".join(parts[:-1]) if len(parts) > 1 else parts[0]
    if candidate in taken:
        candidate = path
    name, k = candidate, 1
    while name in taken:
        name, k = f"{candidate}#{k}", k + 1
    taken.add(name)
    return name


def quoted(names: Sequence[str]) -> str:
    """``'a'``, ``'a' and 'b'``, ``'a', 'b' and 'c'``."""
    items = [f"'{n}'" for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _make_tap(spec: TapSpec, levels) -> Tap:
    if spec.conv_batch is not None:
        output = layout.merged_layout(levels, spec.out_shape, spec.conv_batch[1])
        inputs = layout.merged_layout(levels, spec.in_shape, spec.conv_batch[0])
    else:
        output = layout.rows_layout(levels, spec.out_shape, spec.out_features)
        inputs = None
        if spec.input_operand is not None and spec.broadcast_input:
            inputs = layout.rows_layout(levels, spec.out_shape, spec.in_features, spec.in_shape)
        elif spec.input_operand is not None:
            inputs = layout.rows_layout(levels, spec.in_shape, spec.in_features)
    return Tap(
        spec.eqn_path, spec.input_operand, output, inputs, output.canonical_shape, spec.dtype
    )


class Verdict:
    """Decides which sites are layers, names them, and builds the reported layers."""

    def __init__(self, finder: Finder, leaf_paths: Sequence[str], batch: int):
        self.finder = finder
        self.leaf_paths = leaf_paths
        self.batch = batch
        sites = finder.sites
        self.is_layer = [self._sole_use(s.weight_leaf, weight=True) for s in sites]
        self.bias_kept = [
            s.bias_leaf
            if layer and s.bias_leaf is not None and self._sole_use(s.bias_leaf, weight=False)
            else None
            for s, layer in zip(sites, self.is_layer, strict=True)
        ]
        self.lone_shift = [
            s.bias_leaf is not None
            and kept is None
            and s.bias_tap is not None
            and self._sole_use(s.bias_leaf, weight=False)
            for s, kept in zip(sites, self.bias_kept, strict=True)
        ]
        self.names: list[str] = []
        self.layers = self._build_layers()
        self.warnings: list[str] = []

    def _sole_use(self, leaf: int, *, weight: bool) -> bool:
        f = self.finder
        uses = (len(f.weight_sites.get(leaf, ())), len(f.bias_sites.get(leaf, ())))
        return (
            _is_real(f.leaf_avals[leaf])
            and uses == ((1, 0) if weight else (0, 1))
            and leaf not in f.other_uses
        )

    # ---------------------------------------------------------------- layers

    def _site(self, name, geometry, weight, bias, specs, site: Site, stack_axes, note=""):
        levels = site.levels
        taps = tuple(_make_tap(spec, levels) for spec in specs)
        stack = tuple(length for kind, length in levels if kind == layers.STACK)
        output_shape = taps[0].shape[len(stack) :]
        positions = positions_of(output_shape, geometry, self.batch)
        if stack:
            geometry = layers.Stacked(geometry, stack, tuple(stack_axes))
        return LayerSite(
            name=name,
            geometry=geometry,
            weight_path=self.leaf_paths[weight],
            bias_path=None if bias is None else self.leaf_paths[bias],
            weight_leaf=weight,
            bias_leaf=bias,
            eqn_path=taps[0].eqn_path,
            input_operand=taps[0].input_operand,
            output_shape=output_shape,
            output_dtype=taps[0].dtype,
            positions=positions,
            taps=taps,
            levels=levels,
            note=note,
        )

    def _build_layers(self) -> list[LayerSite]:
        taken: set[str] = set()
        out = []
        for index, site in enumerate(self.finder.sites):
            if self.is_layer[index]:
                bias = self.bias_kept[index]
                specs = [site.tap]
                geometry = site.geometry
                if site.kind == "scale_shift" and bias is not None:
                    specs.append(site.bias_tap)
                    geometry = layers.ScaleShift(geometry.param_shape, True, True)
                name = _layer_name(self.leaf_paths[site.weight_leaf], taken)
                out.append(
                    self._site(name, geometry, site.weight_leaf, bias, specs, site,
                               site.weight_stack_axes)
                )  # fmt: skip
            if self.lone_shift[index]:
                leaf = site.bias_leaf
                shape = tuple(site.feature_shape)
                geometry = layers.ScaleShift(shape, False, True)
                name = _layer_name(self.leaf_paths[leaf], taken)
                stack = sum(1 for kind, _ in site.levels if kind == layers.STACK)
                out.append(
                    self._site(name, geometry, leaf, None, [site.bias_tap], site, range(stack))
                )
        self._taken = taken
        return out

    def fallback_layers(self) -> list[LayerSite]:
        """A ``"parameter"`` layer for every real floating parameter read but not covered."""
        covered = self.covered()
        out = []
        for leaf, path in enumerate(self.leaf_paths):
            if leaf in covered or not self._used(leaf):
                continue
            aval = self.finder.leaf_avals[leaf]
            if not _is_real(aval):
                continue
            shape = tuple(int(s) for s in aval.shape)
            note = self.uses_phrase(leaf)
            others = sorted(self.finder.other_uses.get(leaf, ()))
            if others:
                self.warnings.append(
                    f"kfax: parameter {path!r} is used by {', '.join(others)}, which kfax does "
                    "not recognise as a layer operation; it gets the 'diagonal' block (its "
                    "diagonal curvature, from its gradient per output-cotangent column). See "
                    "kfax.describe."
                )
            tap = Tap((), None, None, None, shape, aval.dtype, leaf=leaf)
            out.append(
                LayerSite(
                    name=_layer_name(path, self._taken),
                    geometry=layers.Parameter(shape),
                    weight_path=path,
                    bias_path=None,
                    weight_leaf=leaf,
                    bias_leaf=None,
                    eqn_path=(),
                    input_operand=None,
                    output_shape=(max(self.batch, 1), max(math.prod(shape), 1)),
                    output_dtype=aval.dtype,
                    positions=1,
                    taps=(tap,),
                    note=note,
                )
            )
        return out

    def covered(self) -> set[int]:
        leaves = set()
        for site in self.layers:
            leaves.add(site.weight_leaf)
            if site.bias_leaf is not None:
                leaves.add(site.bias_leaf)
        return leaves

    def _used(self, leaf: int) -> bool:
        f = self.finder
        read = leaf in f.weight_sites or leaf in f.bias_sites or leaf in f.other_uses
        return read and leaf in f.live_leaves

    # ---------------------------------------------------------------- reasons

    def uses_phrase(self, leaf: int) -> str:
        """Every use of a parameter: ``"used by an embedding gather and a dense operation"``."""
        f = self.finder
        parts = []
        kinds = collections.Counter(f.sites[i].kind_word for i in f.weight_sites.get(leaf, ()))
        for word, n in kinds.items():
            parts.append(f"{_article(word)} {word}" if n == 1 else f"{n} {_plural(word)}")
        biases = collections.Counter(f.sites[i].kind_word for i in f.bias_sites.get(leaf, ()))
        for word, n in biases.items():
            of = f"{_article(word)} {word}" if n == 1 else f"{n} {_plural(word)}"
            parts.append(f"the bias of {of}")
        parts.extend(sorted(f.other_uses.get(leaf, ())))
        uses = sum(kinds.values()) + sum(biases.values()) + len(f.other_uses.get(leaf, ()))
        shared = " (shared: tied or reused)" if uses > 1 else ""
        return "used by " + " and ".join(parts) + shared

    def unmatched(self, covered: set[int]) -> tuple[tuple[str, str], ...]:
        return tuple(
            (path, self.reason(leaf))
            for leaf, path in enumerate(self.leaf_paths)
            if leaf not in covered
        )

    def reason(self, leaf: int) -> str:
        dtype = self.finder.leaf_avals[leaf].dtype
        if jnp.issubdtype(dtype, jnp.complexfloating):
            return f"complex ({dtype}): kfax supports real parameters only"
        if not jnp.issubdtype(dtype, jnp.floating):
            return f"not a floating-point array ({dtype})"
        if leaf not in self.finder.live_leaves and (
            leaf in self.finder.other_uses or leaf in self.finder.weight_sites
        ):
            return "read by apply_fn but without effect on its outputs (no gradient)"
        return "not used by apply_fn (no gradient)"

    def suspects(self, all_layers: Sequence[LayerSite]) -> tuple[tuple[str, str], ...]:
        """``(bias_path, layer_name)`` of bias-like parameters of a bias-free layer that are
        not its bias (see :class:`kfax._tracing.Trace`)."""
        biases = {s.bias_leaf for s in all_layers if s.bias_leaf is not None}
        names = {}
        for layer in self.layers:
            names[(layer.weight_leaf, layer.eqn_path)] = layer
        found = []
        for leaf, index in self.finder.bias_candidates:
            site = self.finder.sites[index]
            layer = names.get((site.weight_leaf, site.tap.eqn_path))
            if (
                layer is not None
                and layer.bias_leaf is None
                and leaf not in biases
                and _is_real(self.finder.leaf_avals[leaf])
            ):
                found.append((self.leaf_paths[leaf], layer.name))
        return tuple(dict.fromkeys(found))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(word: str) -> str:
    return word[:-1] + "ies" if word.endswith("y") else word + "s"
