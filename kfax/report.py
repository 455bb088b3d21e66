"""What kfax found in a model: layers as data (:func:`find_layers`) and a table (:func:`describe`).

A thin public view over :mod:`kfax._tracing` and the blocks the optimiser assigns; it computes
nothing of its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from kfax import _capture, _tracing, _validation
from kfax.blocks import (
    CENTERINGS,
    DEFAULT_MAX_FACTOR_SIZE,
    WEIGHT_SHARINGS,
    check_block_choice,
)


class Layer(NamedTuple):
    """A layer found by tracing.

    Attributes:
      name: taken from the weight's parameter path (the path without its last key, or the
        whole path when that name is taken).
      kind: ``"dense"`` (any ``dot_general`` with a weight, ``DenseGeneral`` included),
        ``"conv"``, ``"embedding"`` (rows gathered at data-dependent ids), ``"scale_shift"``
        (elementwise scale and/or shift: norm layers, gates, positional tables) or
        ``"parameter"`` (a whole parameter: tied, reused, or used by an unknown primitive).
      weight_path, bias_path: parameter paths (``"a/b/kernel"``); ``bias_path`` is ``None`` when
        the layer has no bias. A scale-and-shift layer's weight is its scale (its shift when
        alone) and its bias its shift.
      d_in, d_out: input and output widths of the Kronecker factors (for a convolution ``d_in``
        is the patch size; for an embedding the vocabulary; for a scale and shift the
        parameters per feature and the features; for a parameter 1 and its size).
      positions: how many positions share the weight in one example (sequence positions,
        convolution output locations, steps of a scan; 1 for a plain dense layer).
      stack: the stack shape of a layer repeated by a scan over layers (one block per layer of
        the stack), else ``()``.
      note: for a ``"parameter"`` layer, every use of the parameter.
    """

    name: str
    kind: str
    weight_path: str
    bias_path: str | None
    d_in: int
    d_out: int
    positions: int
    stack: tuple[int, ...] = ()
    note: str = ""


class LayerReport(NamedTuple):
    """What tracing found.

    Attributes:
      layers: the layers, in program order, then the ``"parameter"`` layers. A layer's weight
        (and bias) is used by that layer operation and by nothing else; a parameter used by
        anything else too (a tied embedding, a block applied twice, a bias shared by two
        layers, a primitive kfax does not know) is a ``"parameter"`` layer whose note names
        every use.
      unmatched: ``(path, reason)`` for every parameter without a gradient: non-floating,
        complex, or unused.
      suspect_biases: ``(bias_path, layer_name)``: a parameter of a bias-free layer's output
        width, added to that layer's output after an affine operation (such as ``(x @ K +
        shift) + b``) or shared with another layer; K-FAC treats the layer as bias-free and the
        parameter gets a block of its own. Biases after a normalisation of the layer output
        (LayerNorm, RMSNorm, train-mode BatchNorm) are not suspect (the rule is in
        :class:`kfax._tracing.Trace`).
    """

    layers: tuple[Layer, ...]
    unmatched: tuple[tuple[str, str], ...]
    suspect_biases: tuple[tuple[str, str], ...] = ()


def layer_of(site: _tracing.LayerSite) -> Layer:
    """The public :class:`Layer` of a traced layer site."""
    g = site.geometry
    return Layer(
        site.name,
        g.kind,
        site.weight_path,
        site.bias_path,
        g.d_in,
        g.d_out,
        site.positions,
        site.stack_shape,
        site.note,
    )


def find_layers(apply_fn: Callable[[Any, Any], Any], params: Any, inputs: Any) -> LayerReport:
    """Trace ``apply_fn(params, inputs)`` and report its layers (see :class:`Layer`).

    ``inputs`` may be arrays or ``jax.ShapeDtypeStruct`` of any batch size; nothing is computed.

    Example:
      >>> import jax.numpy as jnp, kfax
      >>> params = {"w": jnp.ones((3, 2)), "scale": jnp.ones(())}
      >>> report = kfax.find_layers(
      ...     lambda p, x: p["scale"] * (x @ p["w"]), params, jnp.ones((4, 3))
      ... )
      >>> [(layer.name, layer.d_in, layer.d_out) for layer in report.layers]
      [('w', 3, 2), ('scale', 1, 1)]
      >>> [(layer.name, layer.kind) for layer in report.layers]
      [('w', 'dense'), ('scale', 'scale_shift')]
    """
    traced = _tracing.trace(apply_fn, params, inputs)
    return LayerReport(
        tuple(layer_of(s) for s in traced.layers), traced.unmatched, traced.suspect_biases
    )


def describe(
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    inputs: Any,
    *,
    block: Any = "default",
    centering: str = "exact",
    weight_sharing: str = "expand",
    max_factor_size: int | None = None,
) -> str:
    """A readable table of :func:`find_layers`: one row per layer with the curvature block the
    optimiser gives it and the sizes of its factors, then what every other parameter is.

    ``block``, ``centering``, ``weight_sharing`` and ``max_factor_size`` are those of
    :func:`kfax.scale_by_kfac` (the defaults are its defaults), so the table shows what that
    optimiser will use: ``A`` is ``d_in`` wide for a centred layer or a layer without a bias,
    ``d_in + 1`` for homogeneous K-FAC; ``n(diag)`` is a diagonal factor (an embedding's
    frequencies, the narrow side of a one-sided block); ``d x k^2`` are per-feature blocks. A
    block ``name[n]`` is repeated for each of the ``n`` layers of a stack (a scan over layers). A
    layer whose block is ``None`` is left to the ``unmatched`` transform. Notes say why a
    ``"parameter"`` layer is one; each suspect bias (see :class:`LayerReport`) gets a line.

    Example:
      >>> import jax.numpy as jnp, kfax
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> print(kfax.describe(lambda p, x: x @ p["w"] + p["b"], params, jnp.ones((4, 3))))
      layer  kind   d_in  d_out  positions  bias  block     A size  B size
      -----  -----  ----  -----  ---------  ----  --------  ------  ------
      w      dense  3     2      1          yes   factored  3^2     2^2
      1 layers found.
      Every parameter belongs to a layer.
    """
    from kfax import _plan  # noqa: PLC0415  (_plan imports this module's layer_of)

    _validation.choice("centering", centering, CENTERINGS)
    _validation.choice("weight_sharing", weight_sharing, WEIGHT_SHARINGS)
    check_block_choice(block)
    traced = _capture.trace_layers(apply_fn, params, inputs)
    report = find_layers(apply_fn, params, inputs)
    header = ("layer", "kind", "d_in", "d_out", "positions", "bias", "block", "A size", "B size")
    if max_factor_size is None:
        max_factor_size = DEFAULT_MAX_FACTOR_SIZE
    options = dict(weight_sharing=weight_sharing, max_factor_size=max_factor_size)
    rows = []
    for (_, chosen), layer in zip(
        _plan.assign_blocks(traced, block, centering, **options), report.layers, strict=True
    ):
        sizes = ("-", "-") if chosen is None else chosen.factor_sizes()
        name = "none" if chosen is None else chosen.name
        if chosen is not None and layer.stack:
            name = f"{name}[{math.prod(layer.stack)}]"
        rows.append(
            (
                layer.name,
                layer.kind,
                str(layer.d_in),
                str(layer.d_out),
                str(layer.positions),
                "yes" if layer.bias_path else "no",
                name,
                *sizes,
            )
        )
    lines = _table(header, rows, report)
    skipped = [row[0] for row in rows if row[6] == "none"]
    if skipped:
        lines.append(
            f"Layers without curvature (block None; the unmatched transform updates them): "
            f"{', '.join(skipped)}."
        )
    return "\n".join(lines)


def _table(header, rows, report: LayerReport) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"{len(report.layers)} layers found.")
    notes = [layer for layer in report.layers if layer.note]
    if notes:
        lines.append("Parameters with a block of their own (kind 'parameter'):")
        lines.extend(f"  {layer.weight_path}: {layer.note}" for layer in notes)
    if report.unmatched:
        lines.append("Unmatched parameters (no gradient to precondition):")
        lines.extend(f"  {path}: {reason}" for path, reason in report.unmatched)
    else:
        lines.append("Every parameter belongs to a layer.")
    lines.extend(
        f"Suspect bias: {path} looks like a bias of layer '{layer}' but is not matched as one "
        "(added after another operation, or shared); K-FAC treats the layer as bias-free and "
        f"{path} gets a block of its own."
        for path, layer in report.suspect_biases
    )
    return lines
