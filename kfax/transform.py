"""K-FAC as an optax gradient transformation: :func:`scale_by_kfac` and its state.

The preconditioner alone: it keeps per-layer curvature blocks (:mod:`kfax.blocks`) up to date on
its cadences and applies them to the gradient. Everything around it composes: the learning rate,
momentum and norm constraint (:mod:`kfax.alias`, :mod:`kfax.constraints`), the quadratic-model
step and Levenberg-Marquardt damping (:mod:`kfax.adaptive`, which owns the damping and passes it
in), any optax transform for the parameters outside the layers (``unmatched=``). Layer kinds and
block kinds are invisible here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from kfax._preconditioner import Preconditioner, ScalarOrSchedule
from kfax.blocks import BlockChoice
from kfax.losses import Loss

__all__ = ["ScalarOrSchedule", "scale_by_kfac"]


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
    batch_layers: bool = False,
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
      inverse_strategy: ``"replicated"`` (default: every device refreshes every layer) or
        ``"distributed"`` (each layer on one device, balanced by ``d^3``, shared in one
        all-reduce per refresh; Pauloski et al., SC 2021) over the devices of ``axis_name``
        or, without it, of the ``jax.set_mesh`` mesh (``ValueError`` at ``update`` with
        neither). Both give the same state; details in :mod:`kfax.distributed`.
      batch_layers: run layers with the same block and shapes as one ``jax.vmap``-ed
        computation (the same updates). Off by default: on XLA:CPU it measured level or slower
        (1.25x on a 32-layer MLP; benchmarks/README.md, "Batched against per-layer blocks").

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
    options = dict(locals())  # the arguments, checked by Preconditioner.from_options
    preconditioner = Preconditioner.from_options(**options)
    return optax.GradientTransformationExtraArgs(preconditioner.init, preconditioner.update)
