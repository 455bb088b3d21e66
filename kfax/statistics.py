"""The one statistics pass: a batch's layer inputs, output cotangents, and the rows that count.

Turns ``(apply_fn, params, inputs)``, a loss and a curvature kind into, per layer, what every
consumer of curvature statistics needs: the layer input, the cotangents of the layer output
pulled back from the output cotangents the kind prescribes, which rows count (masked positions
do not); :mod:`kfax._moments` turns them into the Kronecker moments ``E[h]``, ``Cov(h)`` and
``E[g g^T]``. :func:`kfax.kronecker_factors`, the optimiser's curvature blocks, EKFAC's scalings
and the benchmarks all call this module; it knows nothing of optimiser state.

Conventions (``docs/math.md``): with ``N`` examples, ``kappa`` the loss's position weights and
``K-FAC-expand`` over shared positions,

* ``mean = E[h]`` and ``covariance = E[(h - mean)(h - mean)^T]`` average over the rows (examples and
  shared positions) that count, i.e. whose position weight is non-zero;
* ``output = scale * sum_columns sum_rows g g^T``, ``scale = 1 / (N * samples)``: the mean over
  examples of the sum over positions (masked positions have zero cotangents).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kfax import _capture, _tracing, _validation, distributed
from kfax._moments import statistics_dtype
from kfax.losses import Loss

KINDS = ("mc", "exact", "empirical")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["inputs", "cotangents", "scale", "row_weights"],
    meta_fields=["batch", "axis_name"],
)
@dataclasses.dataclass(frozen=True)
class LayerCapture:
    """One layer's share of a statistics pass (a pytree: its arrays are the leaves).

    Attributes:
      inputs: the layer's input activation, as the model computed it.
      cotangents: cotangents of the layer output, one per output-cotangent column, stacked on a
        leading axis: shape ``(columns, *layer_output_shape)``.
      scale: ``1 / (N * samples)``: multiplies sums over columns and rows into the output factor.
      row_weights: ``None`` when every row counts, else one weight per row of ``h`` in ``[0, 1]``
        (1 for a position that counts, 0 for a masked one; the fraction of counted positions
        where a layer's positions do not map onto the output's).
      batch: ``N``, the number of examples (on this device).
      axis_name: the device axis (``pmap``, ``shard_map``) over which statistics are averaged;
        ``None`` on one device or under sharded ``jit``. Blocks pool their batch statistics with
        :func:`kfax._moments.pool_mean` (or, for means and covariances,
        :func:`kfax._moments.input_moments`).
    """

    inputs: jax.Array
    cotangents: jax.Array
    scale: jax.Array
    row_weights: jax.Array | None
    batch: int
    axis_name: Any = None


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["outputs", "layers"],
    meta_fields=["sites", "kind", "samples"],
)
@dataclasses.dataclass(frozen=True)
class Pass:
    """A statistics pass over one batch (a pytree, so it can be passed to ``update``).

    Attributes:
      outputs: the model outputs.
      layers: ``{layer_name: LayerCapture}``.
      sites: the layers found by tracing (static).
      kind, samples: the curvature kind and samples per input the cotangents were drawn with.
    """

    outputs: jax.Array
    layers: dict[str, LayerCapture]
    sites: tuple[_tracing.LayerSite, ...]
    kind: str
    samples: int


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(
            f"kind must be one of {KINDS}: 'mc' (true Fisher, targets sampled from the model), "
            f"'exact' (exact Gauss-Newton), 'empirical' (empirical Fisher, data targets); "
            f"got {kind!r}."
        )


def check_samples(samples: Any) -> int:
    """``samples`` as an int (``None`` means 1); a clear error for anything else."""
    if samples is None:
        return 1
    if isinstance(samples, jax.core.Tracer):
        raise ValueError(
            "samples sets array shapes and cannot be a traced value: pass it as a Python int "
            "(with optax.inject_hyperparams, list 'samples' in static_args)."
        )
    value = _validation.concrete(samples)
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not float(value).is_integer()
        or value < 1
    ):
        raise ValueError(f"samples must be a positive integer, got {samples!r}.")
    return int(value)


def output_cotangents(
    loss: Loss,
    kind: str,
    outputs: jax.Array,
    weights: jax.Array | None,
    *,
    targets: Any = None,
    where: Any = None,
    key: jax.Array | None = None,
    samples: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Output cotangents ``u`` for a curvature kind, stacked on a leading column axis.

    Returns ``(columns, scale)``, ``scale = 1 / (N * samples)`` (``samples = 1`` unless ``mc``):

    * ``mc``: ``u = sqrt(kappa) grad_f l(f, y~)``, ``y~ ~ p(y | f)``, one column per sample,
      drawn with ``jax.random.split(key, samples)``;
    * ``exact``: the columns of ``S`` with ``S S^T = kappa d^2 l / d f^2``;
    * ``empirical``: ``u = grad_f (kappa l(f, y))`` for the data targets.
    """
    check_kind(kind)
    batch = outputs.shape[0]
    outputs = jax.lax.stop_gradient(outputs)
    if kind == "mc":
        if key is None:
            raise ValueError(
                "kind='mc' samples targets from the model and needs a PRNG key: pass key=..."
            )
        keys = jax.random.split(key, samples)
        columns = jax.vmap(lambda k: loss.sampled_cotangent(k, outputs, weights))(keys)
        return columns, jnp.asarray(1.0 / (batch * samples), outputs.dtype)
    scale = jnp.asarray(1.0 / batch, outputs.dtype)
    if kind == "exact":
        return loss.curvature_sqrt(outputs, weights), scale
    if targets is None:
        raise ValueError(
            "kind='empirical' uses the data's own labels: pass targets=... (or use kind='mc' for "
            "the true Fisher, which samples targets from the model)."
        )
    return loss.output_gradient(outputs, targets, where)[None], scale


def row_weights(site: _tracing.LayerSite, kappa: jax.Array | None) -> jax.Array | None:
    """Which rows of a layer's ``h`` count, from the loss's position weights ``kappa``.

    A row counts where its position's weight is non-zero. When the layer's rows are the output's
    positions (same leading shape) the map is one to one; otherwise each row of example ``n`` gets
    the fraction of example ``n``'s output positions that count.
    """
    if kappa is None:
        return None
    counts = (kappa != 0).astype(statistics_dtype(kappa.dtype))
    shape = list(site.output_shape)
    del shape[site.geometry.output_axis]
    if tuple(shape) == tuple(counts.shape):
        return counts.reshape(-1)
    batch = counts.shape[0]
    rows = math.prod(shape)
    if rows % batch:
        return None  # no example-major row order to map onto: every row counts
    per_example = jnp.mean(counts.reshape(batch, -1), axis=1)
    return jnp.repeat(per_example, rows // batch)


def check_targets(loss: Loss, traced: _tracing.Trace, targets: Any) -> None:
    """Validate ``targets`` against the model's outputs (shapes always; label values when they
    are concrete, i.e. outside ``jit``), even where the curvature kind does not use them."""
    if targets is None:
        return
    shape, dtype = traced.output_avals[0]
    loss.check_targets(jnp.zeros(shape, dtype), targets)


def position_weights(loss: Loss, outputs: jax.Array, targets: Any, where: Any) -> jax.Array | None:
    """The loss's ``kappa`` when anything masks or weights positions, else ``None``."""
    if getattr(loss, "ignore_index", None) is not None and targets is None:
        raise ValueError(
            f"the loss declares ignore_index={loss.ignore_index}: pass targets=... so that the "
            "ignored positions are known (or kfax would count them in the curvature)."
        )
    if where is None and targets is None:
        return None
    return loss.position_weights(jax.lax.stop_gradient(outputs), targets, where)


def statistics_pass(
    apply_fn: Callable[[Any, Any], jax.Array],
    loss: Loss,
    params: Any,
    inputs: Any,
    *,
    kind: str,
    samples: int = 1,
    targets: Any = None,
    where: Any = None,
    key: jax.Array | None = None,
    traced: _tracing.Trace | None = None,
    axis_name: Any = None,
) -> Pass:
    """One tapped forward pass and one pullback per output-cotangent column.

    ``traced`` reuses an earlier trace of ``apply_fn`` at these shapes. With ``axis_name``
    (inside ``pmap`` or ``shard_map``) the sampling key is folded with the device's index, so
    that devices sample different targets, and the captures carry the axis for pooling.
    """
    tapped = _capture.capture(apply_fn, params, inputs, param_gradients=False, traced=traced)
    return pass_from_capture(
        tapped,
        loss,
        kind=kind,
        samples=samples,
        targets=targets,
        where=where,
        key=key,
        axis_name=axis_name,
    )


_SIGNS_STREAM = 0x5349  # folds the step's key into a stream of its own for the signs


def pass_from_capture(
    tapped: _capture.Capture,
    loss: Loss,
    *,
    kind: str,
    samples: int = 1,
    targets: Any = None,
    where: Any = None,
    key: jax.Array | None = None,
    axis_name: Any = None,
) -> Pass:
    """The statistics of a tapped forward pass that has already run (see :func:`statistics_pass`;
    :func:`kfax.value_and_grad` shares its forward pass with the gradient)."""
    distributed.check_not_explicitly_sharded(tapped.outputs)
    if axis_name is not None and key is not None:
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    kappa = position_weights(loss, tapped.outputs, targets, where)
    columns, scale = output_cotangents(
        loss, kind, tapped.outputs, kappa, targets=targets, where=where, key=key, samples=samples
    )
    # Per-column keys for the random signs of "parameter" layers (kfax._capture.example_signs).
    signs_keys = jax.random.split(
        jax.random.fold_in(jax.random.key(0) if key is None else key, _SIGNS_STREAM),
        columns.shape[0],
    )
    cotangents = jax.vmap(lambda u, k: tapped.pullback(u, k)[1])(columns, signs_keys)
    batch = tapped.outputs.shape[0]
    layers = {
        site.name: LayerCapture(
            tapped.layer_inputs[site.name],
            cotangents[site.name],
            scale,
            row_weights(site, kappa),
            batch,
            axis_name,
        )
        for site in tapped.layers
    }
    return Pass(tapped.outputs, layers, tapped.layers, kind, samples)
