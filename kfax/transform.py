"""K-FAC as an optax gradient transformation: :func:`scale_by_kfac` and its state.

The preconditioner alone: it keeps per-layer curvature blocks (:mod:`kfax.blocks`) up to date on
its cadences and applies them to the gradient. Everything around it composes: the learning rate,
momentum and norm constraint (:mod:`kfax.alias`, :mod:`kfax.constraints`), the quadratic-model
step and Levenberg-Marquardt damping (:mod:`kfax.adaptive`, which owns the damping and passes it
in), any optax transform for the parameters outside the layers (``unmatched=``). Layer kinds and
block kinds are invisible here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kfax import _capture, _validation
from kfax import statistics as _statistics
from kfax._plan import Plan, make_plan
from kfax._step import KFACState, LayerHealth, preconditioner_step
from kfax.blocks import (
    CENTERINGS,
    DEFAULT_MAX_FACTOR_SIZE,
    WEIGHT_SHARINGS,
    BlockChoice,
    check_block_choice,
)
from kfax.distributed import INVERSE_STRATEGIES
from kfax.losses import Loss, check_loss

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]
IDENTITY = optax.identity()


def _check_options(loss, kind, damping, block, centering, ema_decay, stats_every, inverse_every):
    check_loss(loss)
    _statistics.check_kind(kind)
    _validation.positive("damping", damping, schedule=True)
    check_block_choice(block)
    _validation.choice("centering", centering, CENTERINGS)
    _validation.in_unit_interval("ema_decay", ema_decay)
    _validation.count("stats_every", stats_every)
    _validation.count("inverse_every", inverse_every)


def scale_by_kfac(
    apply_fn: Callable[[Any, Any], jax.Array],
    loss: Loss,
    *,
    example_inputs: Any = None,
    damping: ScalarOrSchedule = 1e-2,
    block: BlockChoice = "default",
    centering: str = "exact",
    kind: str = "mc",
    samples: int | None = None,
    ema_decay: float = 0.95,
    stats_every: int = 1,
    inverse_every: int = 10,
    stats_batch_size: int | None = None,
    batch_axes: Any = None,
    unmatched: optax.GradientTransformation | None = None,
    seed: int = 0,
    axis_name: str | None = None,
    weight_sharing: str = "expand",
    max_factor_size: int | None = None,
    inverse_strategy: str = "replicated",
) -> optax.GradientTransformationExtraArgs:
    """Precondition gradients with K-FAC: per layer, ``(A (x) B + damping)^{-1} grad``.

    For each layer found in ``apply_fn`` (dense, convolution), the curvature block of the mean
    loss is approximated by ``A (x) B`` with moving averages of ``A = E[[h;1][h;1]^T]`` (or the
    centred covariance) and ``B = E[g g^T]`` (:func:`kfax.kronecker_factors`). The block (per
    layer, ``block=``) decides how the damping enters:

    * ``"factored"`` (default): ``(A + pi sqrt(lam) I)^{-1} M (B + sqrt(lam)/pi I)^{-1}``;
    * ``"eigen"``: exact Tikhonov ``(A (x) B + lam I)^{-1}`` through eigenbases;
    * ``"ekfac"``: EKFAC's re-estimated diagonal in K-FAC's eigenbasis (George et al. 2018).

    With ``centering="exact"`` (default) a layer with a bias is preconditioned with the centred
    covariance ``C``: ``Delta_K = C^{-1} (dK - m db^T) B^{-1}``, ``Delta_b = B^{-1} db -
    Delta_K^T m``, equal to homogeneous K-FAC (``centering="none"``) at zero damping;
    ``"simple"`` drops the ``- Delta_K^T m`` term. The output is the preconditioned gradient:
    scale it by ``-learning_rate`` (:func:`kfax.kfac` does).

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs``, unmodified; layers are found by tracing.
      loss: an output distribution from :mod:`kfax.losses`.
      example_inputs: an array, pytree or ``jax.ShapeDtypeStruct`` shaped like a batch of
        inputs (any batch size); ``init`` traces ``apply_fn`` on it.
      damping: ``lam > 0``: a float, a scalar array or an optax schedule of the step count. A
        wrapper that owns the damping (:func:`kfax.quadratic_model_step`) passes its own as
        ``update(..., damping=...)``.
      block: a block name for every layer (``"default"``: each layer kind's default, see
        :data:`kfax.blocks.DEFAULT_BLOCKS`), a mapping from ``fnmatch`` patterns of layer names
        to block names, or a function of a :class:`kfax.Layer`; ``None`` leaves a layer to
        ``unmatched``.
      centering: ``"exact"``, ``"simple"`` or ``"none"`` (homogeneous K-FAC), as above.
      kind: ``"mc"`` (true Fisher, targets sampled from the model), ``"exact"`` (Gauss-Newton)
        or ``"empirical"`` (empirical Fisher; needs ``targets``).
      samples: targets sampled per input for ``kind="mc"`` (default 1).
      ema_decay: decay of the bias-corrected moving averages, in ``[0, 1)`` (0: this batch only).
      stats_every, inverse_every: cadences in steps of statistics and of refreshes.
      stats_batch_size: take statistics on the first examples of each batch only.
      batch_axes: which input leaves are batched (a pytree prefix of the inputs with ``0`` or
        ``None``); by default the leaves whose leading axis has the outputs' batch size.
      unmatched: an optax transform for the parameters that no block preconditions (default
        ``optax.identity()``), e.g. ``optax.scale_by_adam()``.
      seed: seed of the PRNG key that samples targets.
      axis_name: the device axis (or tuple of axes) of ``pmap`` / ``shard_map`` over which the
        batch is split: statistics are pooled across it (every device then holds the same
        factors, inverses and updates) and devices sample different targets. Pass gradients
        already averaged across the axis (``jax.lax.pmean``). Not needed under sharded ``jit``.
      weight_sharing: how Kronecker factors treat positions that share a weight (sequence
        axes, attention, convolution locations; Eschenhagen et al. 2023): ``"expand"``
        (positions are extra examples) or ``"reduce"`` (each example's mean input and summed
        output cotangent).
      max_factor_size: a Kronecker factor wider than this becomes diagonal (the one-sided block,
        shown by :func:`kfax.describe`); ``None`` means 4096 (a 64 MiB float32 factor). A
        Python int: it sets array shapes, so ``optax.inject_hyperparams`` must list it in
        ``static_args``.
      inverse_strategy: with ``axis_name``, where refreshes run: ``"replicated"`` (default:
        every device refreshes every layer; no communication) or ``"distributed"`` (each layer
        on one device, layers balanced by their ``d^3`` cost, results shared in one all-reduce
        per refresh: ``1/n_devices`` of the inverse work per device for the inverses' bytes;
        Pauloski et al., SC 2021). Both give the same state.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state, params, *,
      inputs, targets=None, where=None, damping=None, statistics=None)`` takes the gradient of
      the mean loss on ``inputs`` (``where``: per-position weights of the loss, shape
      ``outputs.shape[:-1]``; ``statistics``: the batch's statistics from
      :func:`kfax.value_and_grad`, which then spares the preconditioner its own forward pass).

    Raises:
      ValueError: at build time for an invalid option (naming it); in ``init`` without
        ``example_inputs`` or for a model without layers; in ``update`` for missing ``params``,
        ``inputs`` or needed ``targets``, gradients or parameters that do not match the state.

    Example:
      >>> import jax, jax.numpy as jnp, optax, kfax
      >>> params = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
      >>> apply_fn = lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"]
      >>> loss = kfax.losses.SquaredError()
      >>> x, y = jnp.ones((8, 3)), jnp.ones((8, 2))
      >>> opt = optax.chain(kfax.scale_by_kfac(apply_fn, loss, example_inputs=x), optax.scale(-0.5))
      >>> state = opt.init(params)
      >>> grads = jax.grad(lambda p: loss(apply_fn(p, x), y))(params)
      >>> updates, state = opt.update(grads, state, params, inputs=x, targets=y)

    References:
      Martens & Grosse, ICML 2015 (K-FAC). Grosse & Martens, ICML 2016 (KFC). George et al.,
      NeurIPS 2018 (EKFAC). George, "The algebra of second order methods" (centring).
    """
    _check_options(loss, kind, damping, block, centering, ema_decay, stats_every, inverse_every)
    samples = _statistics.check_samples(samples)
    stats_batch_size = _validation.static_count("stats_batch_size", stats_batch_size)
    _validation.integer("seed", seed)
    _statistics.check_batch_axes_entries(batch_axes)
    if example_inputs is not None:
        _statistics.check_batch_axes(batch_axes, example_inputs)
    if unmatched is not None and not isinstance(unmatched, optax.GradientTransformation):
        raise ValueError(f"unmatched must be an optax GradientTransformation, got {unmatched!r}.")
    if axis_name is not None and not _is_axis_name(axis_name):
        raise ValueError(
            f"axis_name must be a non-empty string or a non-empty tuple of them, got {axis_name!r}."
        )
    _validation.choice("weight_sharing", weight_sharing, WEIGHT_SHARINGS)
    _validation.choice("inverse_strategy", inverse_strategy, INVERSE_STRATEGIES)
    if inverse_strategy == "distributed" and axis_name is None:
        raise ValueError(
            'inverse_strategy="distributed" shares refreshes across the devices of axis_name '
            "(pmap / shard_map), but axis_name is None. Under sharded jax.jit (no axis_name) "
            'every device refreshes every layer; use inverse_strategy="replicated".'
        )
    max_factor_size = _validation.static_count("max_factor_size", max_factor_size)
    max_factor_size = DEFAULT_MAX_FACTOR_SIZE if max_factor_size is None else max_factor_size
    options = dict(
        kind=kind,
        samples=samples,
        block=block,
        centering=centering,
        axis_name=axis_name,
        weight_sharing=weight_sharing,
        max_factor_size=max_factor_size,
        inverse_strategy=inverse_strategy,
    )
    others = IDENTITY if unmatched is None else unmatched

    def plan(params, inputs) -> Plan:
        return make_plan(apply_fn, loss, params, inputs, others=others, **options)

    def init_fn(params):
        if example_inputs is None:
            raise ValueError(
                "scale_by_kfac needs example_inputs=... (an array or jax.ShapeDtypeStruct shaped "
                "like a batch of inputs, any batch size) when it is built: optax's init(params) "
                "sees no inputs, and kfax finds the layers by tracing apply_fn on them."
            )
        _check_not_masked(params)
        _check_floating(params)
        _statistics.check_batch_axes(batch_axes, example_inputs)
        layers = plan(params, example_inputs)
        layers.warn_about_suspect_biases(warnings.warn)
        dtype = layers.statistics_dtype(params)
        initial = damping(0) if callable(damping) else damping
        return KFACState(
            count=jnp.zeros((), jnp.int32),
            key=jax.random.PRNGKey(seed),
            statistics={n: b.init(dtype)[0] for n, b in layers.blocks.items()},
            curvature={n: b.init(dtype)[1] for n, b in layers.blocks.items()},
            health={
                n: LayerHealth(*(jnp.zeros((), jnp.int32) for _ in range(3))) for n in layers.blocks
            },
            unmatched=others.init(layers.unmatched_leaves(params)),
            damping=jnp.array(initial, dtype),  # a copy: donating the state must not free
            # the caller's array (optax.inject_hyperparams keeps it in its own state)
        )

    def update_fn(
        updates,
        state,
        params=None,
        *,
        inputs=None,
        targets=None,
        where=None,
        damping=None,
        statistics=None,
        **extra,
    ):
        del extra
        _check_not_masked(params)
        _check_update_arguments(params, inputs, targets, kind)
        _check_axis_bound(axis_name)
        _check_same_structure(updates, params)
        _check_precomputed(statistics, kind, samples, stats_batch_size)
        _statistics.check_targets(loss, _capture.trace_layers(apply_fn, params, inputs), targets)
        if stats_batch_size is not None:
            inputs, targets, where = _sub_batch(
                apply_fn, params, inputs, targets, where, stats_batch_size, batch_axes
            )
        layers = plan(params, inputs)
        layers.check_state(state, params)
        lam = _current_damping(damping, state, options_damping)
        return preconditioner_step(
            layers, updates, state, params, inputs, targets, where, lam, *cadence, statistics
        )

    options_damping = damping
    cadence = (ema_decay, stats_every, inverse_every)
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_not_masked(params) -> None:
    """optax.masked / partition / multi_transform hide the other groups' parameters, which the
    model needs: say how to combine kfax with other optimisers instead."""
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    if any(is_masked(x) for x in jax.tree.leaves(params, is_leaf=is_masked)):
        raise ValueError(
            "kfax received parameters with masked entries (optax.masked, optax.partition or "
            "optax.multi_transform around kfax hide the other groups' parameters, and kfax needs "
            "all of them to run apply_fn). Put kfax outside: choose its layers with block= "
            "(e.g. block={'embed*': None}) and give the rest an optax transform with "
            "unmatched= (e.g. unmatched=optax.scale_by_adam()), or chain "
            "kfax.scale_by_kfac(...) first and optax.partition(...) after it."
        )


def _check_floating(params) -> None:
    """Only floating-point parameters can be optimised; name the others."""
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    other = [
        f"{jax.tree_util.keystr(path)} ({leaf.dtype})"
        for path, leaf in paths
        if not jnp.issubdtype(getattr(leaf, "dtype", jnp.float32), jnp.floating)
    ]
    if other:
        raise ValueError(
            f"kfax optimises floating-point parameters; params also hold {other[:4]}. Pass only "
            "the trainable parameters (Flax nnx: nnx.split(model, nnx.Param, ...), or "
            "nnx.Optimizer(model, tx, wrt=nnx.Param)) and feed the rest (batch statistics, RNG "
            "state) to apply_fn through the inputs; see the README's nnx section."
        )


def _is_axis_name(axis_name) -> bool:
    if isinstance(axis_name, tuple):
        return bool(axis_name) and all(_is_axis_name(a) for a in axis_name)
    return isinstance(axis_name, str) and bool(axis_name)


def _check_axis_bound(axis_name) -> None:
    if axis_name is None:
        return
    try:
        jax.lax.axis_index(axis_name)
    except NameError:
        raise ValueError(
            f"axis_name {axis_name!r} is not bound: call update inside jax.pmap(..., "
            f"axis_name={axis_name!r}) or jax.shard_map over a mesh with that axis (under "
            "sharded jax.jit leave axis_name=None: XLA inserts the collectives)."
        ) from None


def _check_precomputed(batch, kind, samples, stats_batch_size) -> None:
    """Statistics from :func:`kfax.value_and_grad` must be of this preconditioner's kind."""
    if batch is None:
        return
    if not isinstance(batch, _statistics.Pass):
        raise ValueError(
            f"statistics= must come from kfax.value_and_grad (a kfax.statistics.Pass), got "
            f"{type(batch).__name__}."
        )
    if (batch.kind, batch.samples) != (kind, samples):
        raise ValueError(
            f"statistics= were taken with kind={batch.kind!r}, samples={batch.samples}, but the "
            f"preconditioner uses kind={kind!r}, samples={samples}: build kfax.value_and_grad "
            "with the preconditioner's kind and samples."
        )
    if stats_batch_size is not None:
        raise ValueError(
            "statistics= (from kfax.value_and_grad) cover the whole batch; stats_batch_size "
            "asks for a sub-batch. Use one or the other."
        )


def _check_update_arguments(params, inputs, targets, kind) -> None:
    if params is None:
        raise ValueError(
            "scale_by_kfac.update needs params (optax: update(grads, state, params, ...))."
        )
    if inputs is None:
        raise ValueError(
            "scale_by_kfac.update needs inputs=... , the batch the gradient was computed on: "
            "opt.update(grads, state, params, inputs=x, targets=y)."
        )
    if kind == "empirical" and targets is None:
        raise ValueError("kind='empirical' needs targets=... in update (the data labels).")


def _check_same_structure(updates, params) -> None:
    """Gradients must have the parameters' tree structure (a missing subtree is named)."""
    if jax.tree.structure(updates) == jax.tree.structure(params):
        return
    have = {p for p, _ in jax.tree_util.tree_flatten_with_path(updates)[0]}
    need = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    missing = [jax.tree_util.keystr(p) for p in need if p not in have]
    raise ValueError(
        "the gradients passed to update do not have the structure of params"
        + (f": missing {missing[:5]}" if missing else f": {jax.tree.structure(updates)}")
        + ". Pass the gradient of the loss with respect to all of params."
    )


def _sub_batch(apply_fn, params, inputs, targets, where, size, batch_axes):
    batch = _capture.trace_layers(apply_fn, params, inputs).output_avals[0][0][0]
    take = _statistics.take_sub_batch
    return (
        take(inputs, size, batch, batch_axes),
        take(targets, size, batch),
        take(where, size, batch),
    )


def _current_damping(passed, state, option):
    if passed is not None:
        return jnp.asarray(passed, state.damping.dtype)
    value = option(state.count) if callable(option) else option
    return jnp.asarray(value, state.damping.dtype)
