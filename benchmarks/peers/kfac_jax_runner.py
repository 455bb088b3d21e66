"""Adapter that drives DeepMind's kfac-jax as a benchmark peer of kfax.

Environment
-----------
kfac-jax 0.0.8 (the newest release on PyPI) only works with an older JAX.
It works with ``jax==0.9.0.1`` (the pinned reference) and with 0.9.1. With
jax 0.9.2 and 0.10.x, ``Optimizer.init`` still succeeds, but the first
``step`` fails with ``ValueError: too many values to unpack (expected 2)`` at
``kfac_jax/_src/tag_graph_matcher.py`` in ``eval_jaxpr_eqn``, which does
``subfuns, bind_params = eqn.primitive.get_bind_params(eqn.params)``. Newer
JAX changed what ``Primitive.get_bind_params`` returns. kfac-jax therefore
cannot share kfax's environment. Run this module in the benchmark
environment, ``.venv-bench`` (``make bench-venv``: jax 0.9.0.1, kfac-jax 0.0.8,
psgdax, kfax installed -e; flax >= 0.12.7 needs jax >= 0.10, so pip resolves
flax to 0.12.6 there; optax 0.2.8 works with jax 0.9.0.1). kfac-jax does not need dm-haiku. Only
its examples use it. ``kfac_jax`` is imported lazily inside
:func:`make_kfac_jax`, so importing this module never fails.

State
-----
kfac-jax is not an optax ``GradientTransformation``. Its ``kfac_jax.Optimizer``
keeps its own state (curvature factor EMAs, cached inverses, velocities,
damping, step counter and data seen). That state lives *outside* optax:
:class:`KfacJaxState` wraps it together with a PRNG key and a Python step
counter. kfac-jax compiles ``init`` and ``step`` itself with ``jax.jit`` in
single-device mode (``jax.pmap`` only when ``multi_device=True``), so callers
must NOT wrap :meth:`KfacJaxRunner.step` in ``jax.jit``.

Loss convention
---------------
All losses are a *mean over the batch* of a per-example loss summed over
all non-batch output dimensions. This is the normalisation that kfac-jax's loss
registrations assume when ``weight`` is 1:

* ``"sigmoid_xent"``: ``mean_b sum_d [softplus(z) - t * z]`` (Bernoulli
  NLL). For an autoencoder the targets are the inputs. If ``targets`` is
  ``None``, the inputs are used.
* ``"softmax_xent"``: ``mean_b [logsumexp(z) - z[label]]`` with integer labels
  and logits of shape ``(B, C)``; for logits ``(B, T, C)`` (a language model) the
  per-example loss is summed over the ``T`` positions, as in kfax. The logits are
  registered as ``B * T`` rows: kfac-jax sums the curvature over registered rows
  and divides by the data batch size ``B``, which gives the same normalisation.
* ``"squared"``: ``mean_b squared_error_scale * sum_d (y - t)^2``. The default
  scale is 0.5, the unit-variance Gaussian NLL without its constant. It is
  registered with ``weight=squared_error_scale``, because kfac-jax's
  ``register_squared_error_loss`` assumes the scale is 1.

The loss returned by :meth:`KfacJaxRunner.step` is kfac-jax's
``stats["loss"]``. That is the loss on the step's batch at the parameters
*before* the update, the same quantity that ``optax`` training loops usually
report.

Donation
--------
kfac-jax donates the ``params`` and optimizer-state buffers that it is given
in ``step``. After ``runner.step(params, state, batch)`` has run, do not read
the old ``params`` again. Use the returned ones, and copy them first if you
need a second copy (for example to start another optimizer from the same
initial point).
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

TESTED_JAX_VERSION = "0.9.0.1"
WORKING_JAX_VERSIONS = ("0.9.0.1", "0.9.1")  # 0.9.2 and 0.10.x are broken.
TESTED_KFAC_JAX_VERSION = "0.0.8"

LOSS_KINDS = ("sigmoid_xent", "softmax_xent", "squared")

# The settings that kfac-jax's own MNIST examples (autoencoder_mnist and
# classifier_mnist pipeline configs) use with the adaptive learning rate,
# momentum and damping. The examples also use l2_reg=1e-5. We use l2_reg=0,
# so that the loss we optimise is exactly the reported loss.
ADAPTIVE_DEFAULTS = dict(
    initial_damping=150.0,
    inverse_update_period=5,
    damping_adaptation_interval=5,
    num_burnin_steps=5,
    curvature_ema=0.95,
    damping_adaptation_decay=0.95,
    min_damping=1e-5,
    max_damping=1000.0,
)


def _sigmoid_xent(logits, targets):
    # Numerically stable softplus(z) - t*z, summed over non-batch dims.
    per = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return jnp.mean(jnp.sum(per.reshape(per.shape[0], -1), axis=1))


def _softmax_xent(logits, labels):
    log_z = jax.nn.logsumexp(logits, axis=-1)
    label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    per = (log_z - label_logits).reshape(logits.shape[0], -1)
    return jnp.mean(jnp.sum(per, axis=1))


def _squared(pred, targets, scale):
    err = (pred - targets).reshape(pred.shape[0], -1)
    return scale * jnp.mean(jnp.sum(err * err, axis=1))


def make_loss_fn(
    apply_fn: Callable[[Any, Any], jax.Array],
    loss_kind: str,
    *,
    register: bool = True,
    squared_error_scale: float = 0.5,
):
    """Returns ``loss(params, batch) -> scalar`` for a ``(inputs, targets)`` batch.

    When ``register`` is true, the output is tagged with the matching
    ``kfac_jax.register_*_loss`` call, which kfac-jax needs. Use
    ``register=False`` for plain optax baselines, so that the exact same loss
    runs without kfac-jax tags (they are identity ops, but this keeps the
    baseline free of kfac-jax).
    """
    if loss_kind not in LOSS_KINDS:
        raise ValueError(f"loss_kind must be one of {LOSS_KINDS}, got {loss_kind!r}")
    if register:
        import kfac_jax  # pylint: disable=g-import-not-at-top

    def loss_fn(params, batch):
        inputs, targets = batch
        out = apply_fn(params, inputs)
        if loss_kind == "sigmoid_xent":
            if register:
                kfac_jax.register_sigmoid_cross_entropy_loss(out, targets)
            return _sigmoid_xent(out, targets)
        if loss_kind == "softmax_xent":
            if out.shape[:-1] != targets.shape:
                raise ValueError(
                    "softmax_xent expects logits (B, ..., C) and int labels "
                    f"(B, ...); got {out.shape} and {targets.shape}"
                )
            if register:
                rows = out.reshape(-1, out.shape[-1])
                kfac_jax.register_softmax_cross_entropy_loss(rows, targets.reshape(-1))
            return _softmax_xent(out, targets)
        # squared
        if register:
            kfac_jax.register_squared_error_loss(out, targets, weight=squared_error_scale)
        return _squared(out, targets, squared_error_scale)

    return loss_fn


@dataclasses.dataclass
class KfacJaxState:
    """Adapter state. ``opt_state`` is kfac-jax's own ``Optimizer.State``."""

    opt_state: Any
    rng: jax.Array
    step: int = 0  # Python int, passed to kfac-jax as ``global_step_int``.
    last_stats: dict | None = None  # kfac-jax stats of the last step.


class KfacJaxRunner:
    """Wraps a ``kfac_jax.Optimizer`` behind ``init`` and ``step`` methods."""

    def __init__(
        self,
        optimizer,
        loss_fn,
        loss_kind: str,
        *,
        adaptive: bool,
        adaptive_damping: bool,
        learning_rate,
        momentum,
        damping,
        num_burnin_steps: int,
        seed: int,
    ):
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.loss_kind = loss_kind
        self.adaptive = adaptive
        self.adaptive_damping = adaptive_damping
        self.num_burnin_steps = num_burnin_steps
        self._lr = None if adaptive else jnp.asarray(learning_rate, jnp.float32)
        self._mom = None if adaptive else jnp.asarray(momentum, jnp.float32)
        self._damping = None if adaptive_damping else jnp.asarray(damping, jnp.float32)
        self._seed = seed

    def _prep_batch(self, batch) -> tuple[jax.Array, jax.Array]:
        inputs, targets = batch
        inputs = jnp.asarray(inputs)
        if targets is None:
            if self.loss_kind != "sigmoid_xent":
                raise ValueError("targets=None is only allowed for sigmoid_xent")
            targets = inputs
        targets = jnp.asarray(targets)
        if self.loss_kind == "softmax_xent":
            targets = targets.astype(jnp.int32)
        return inputs, targets

    def init(self, params, batch) -> KfacJaxState:
        """Traces the model on ``batch`` (this fixes the batch shape) and builds state."""
        batch = self._prep_batch(batch)
        rng = jax.random.PRNGKey(self._seed)
        rng, init_rng = jax.random.split(rng)
        opt_state = self.optimizer.init(params, init_rng, batch)
        return KfacJaxState(opt_state=opt_state, rng=rng, step=0)

    def step(self, params, state: KfacJaxState, batch):
        """One K-FAC step. Returns ``(new_params, new_state, loss_before_update)``.

        The batch must have the same shapes as the one given to ``init``.
        ``params`` and ``state.opt_state`` are donated to kfac-jax's jitted step.
        At step 0, if ``num_burnin_steps > 0``, kfac-jax first updates the
        curvature estimate that many times on this same batch.
        """
        batch = self._prep_batch(batch)
        rng, step_rng = jax.random.split(state.rng)
        kwargs = dict(
            learning_rate=self._lr,
            momentum=self._mom,
            damping=self._damping,
            global_step_int=state.step,
        )
        if state.step == 0 and self.num_burnin_steps > 0:
            # kfac-jax only accepts burn-in through an iterator. It takes
            # num_burnin_steps batches for burn-in, then one more for the step.
            # Its jitted burn-in step donates the batch argument, so every burn-in
            # call gets a fresh copy of the batch.
            kwargs["data_iterator"] = (
                jax.tree_util.tree_map(jnp.array, batch) for _ in itertools.count()
            )
        else:
            kwargs["batch"] = batch
        new_params, opt_state, stats = self.optimizer.step(
            params, state.opt_state, step_rng, **kwargs
        )
        loss = float(stats["loss"])
        new_state = KfacJaxState(
            opt_state=opt_state, rng=rng, step=state.step + 1, last_stats=stats
        )
        return new_params, new_state, loss


def make_kfac_jax(
    apply_fn: Callable[[Any, Any], jax.Array],
    loss_kind: str,
    *,
    adaptive: bool = True,
    learning_rate: float | None = None,
    momentum: float | None = None,
    damping: float | None = None,
    inverse_update_period: int = 5,
    seed: int = 0,
    adaptive_damping: bool | None = None,
    num_burnin_steps: int | None = None,
    curvature_ema: float = 0.95,
    squared_error_scale: float = 0.5,
    **optimizer_kwargs,
) -> KfacJaxRunner:
    """Builds a single-device ``kfac_jax.Optimizer`` for ``apply_fn``.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs`` in plain JAX. ``params``
        may be any pytree. kfac-jax's automatic layer registration finds the
        dense layers (``inputs @ kernel + bias``) by matching the graph.
      loss_kind: ``"sigmoid_xent"``, ``"softmax_xent"`` or ``"squared"``. See the
        module docstring for the exact scaling.
      adaptive: if true, use kfac-jax's adaptive learning rate, momentum and
        damping (``use_adaptive_learning_rate``, ``use_adaptive_momentum`` and
        ``use_adaptive_damping`` all True), with the settings of its MNIST
        examples (:data:`ADAPTIVE_DEFAULTS`) and ``l2_reg=0``. If false,
        ``learning_rate`` (required), ``momentum`` (default 0.0) and ``damping``
        (default 1e-3) stay fixed.
      learning_rate, momentum: used only when ``adaptive=False``.
      damping: the initial damping when damping is adaptive (default 150.0, as
        in the examples), otherwise the fixed damping.
      inverse_update_period: steps between recomputations of the inverses of the
        curvature factors.
      seed: seeds the PRNG key that kfac-jax uses for sampling in curvature
        estimation.
      adaptive_damping: overrides whether damping is adaptive (default:
        ``adaptive``).
      num_burnin_steps: curvature-only updates before the first step (default 5
        when adaptive, as in the examples, and 0 otherwise).
      curvature_ema: EMA decay of the curvature factors.
      squared_error_scale: the coefficient of the ``"squared"`` loss.
      **optimizer_kwargs: passed straight to ``kfac_jax.Optimizer`` (for
        example ``estimation_mode`` or ``damping_adaptation_interval``).
    """
    import kfac_jax  # pylint: disable=g-import-not-at-top

    if jax.__version__ not in WORKING_JAX_VERSIONS:
        warnings.warn(
            f"kfac-jax {kfac_jax.__version__} is run with jax {jax.__version__}. "
            f"It is only known to work with jax {WORKING_JAX_VERSIONS}: with jax "
            "0.9.2 and 0.10.x its first step raises 'ValueError: too many values "
            "to unpack (expected 2)' in tag_graph_matcher.eval_jaxpr_eqn.",
            RuntimeWarning,
            stacklevel=2,
        )
    if adaptive_damping is None:
        adaptive_damping = adaptive
    if not adaptive and learning_rate is None:
        raise ValueError("adaptive=False needs a learning_rate")
    if adaptive and (learning_rate is not None or momentum is not None):
        raise ValueError(
            "learning_rate/momentum are chosen by kfac-jax when "
            "adaptive=True; pass adaptive=False to fix them"
        )
    if momentum is None:
        momentum = 0.0
    if damping is None:
        damping = ADAPTIVE_DEFAULTS["initial_damping"] if adaptive_damping else 1e-3
    if num_burnin_steps is None:
        num_burnin_steps = ADAPTIVE_DEFAULTS["num_burnin_steps"] if adaptive else 0

    loss_fn = make_loss_fn(
        apply_fn, loss_kind, register=True, squared_error_scale=squared_error_scale
    )

    kw = dict(
        value_and_grad_func=jax.value_and_grad(loss_fn),
        l2_reg=0.0,
        value_func_has_aux=False,
        value_func_has_state=False,
        value_func_has_rng=False,
        use_adaptive_learning_rate=adaptive,
        use_adaptive_momentum=adaptive,
        use_adaptive_damping=adaptive_damping,
        inverse_update_period=inverse_update_period,
        curvature_ema=curvature_ema,
        num_burnin_steps=num_burnin_steps,
        multi_device=False,
    )
    if adaptive_damping:
        kw.update(
            initial_damping=damping,
            damping_adaptation_interval=ADAPTIVE_DEFAULTS["damping_adaptation_interval"],
            damping_adaptation_decay=ADAPTIVE_DEFAULTS["damping_adaptation_decay"],
            min_damping=ADAPTIVE_DEFAULTS["min_damping"],
            max_damping=ADAPTIVE_DEFAULTS["max_damping"],
        )
    kw.update(optimizer_kwargs)
    optimizer = kfac_jax.Optimizer(**kw)
    return KfacJaxRunner(
        optimizer,
        loss_fn,
        loss_kind,
        adaptive=adaptive,
        adaptive_damping=adaptive_damping,
        learning_rate=learning_rate,
        momentum=momentum,
        damping=damping,
        num_burnin_steps=num_burnin_steps,
        seed=seed,
    )
