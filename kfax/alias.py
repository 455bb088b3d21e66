"""``kfax.kfac``: K-FAC with a learning rate (or the adaptive step), in optax's style.

A named-argument alias that composes the parts: the preconditioner (:func:`kfax.scale_by_kfac`),
then either the norm constraint, heavy-ball momentum and the learning rate, or the quadratic-model
step with Levenberg-Marquardt damping (:func:`kfax.quadratic_model_step`). Every argument is
named, so ``optax.inject_hyperparams(kfax.kfac, static_args=("apply_fn", "loss",
"example_inputs"))`` can inject the learning rate, momentum and damping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from kfax import _validation
from kfax._quadratic_model import AtMost
from kfax.adaptive import quadratic_model_step
from kfax.blocks import BlockChoice
from kfax.constraints import norm_constrained
from kfax.losses import Loss
from kfax.transform import ScalarOrSchedule, scale_by_kfac

DEFAULT_MOMENTUM = 0.9
DEFAULT_NORM_CONSTRAINT = 1e-2
DEFAULT_DAMPING_EVERY = 5
# Floor of the adaptive damping. At 1e-8 the digits autoencoder of `make demo` (one batch of
# 1000 images, statistics on 250) drove the damping to the floor within 300 steps and then
# diverged (loss 14 -> 129 at step 499, momentum -4); floors of 1e-4 and 1e-3 trained stably
# for 1200 steps and ended lower (13.77).
DEFAULT_MIN_DAMPING = 1e-4
# The adaptive step's quadratic model and reduction ratio on at most this many examples. On the
# MNIST autoencoder (batch 1000, 60-second races, seeds 0 and 1) a model on 256 examples followed
# the whole batch's trajectory and reached Adam's 120-second loss in 29.3-30.4 s against
# 36.3-36.6 s (benchmarks/README.md, "Sub-batches and cadences"); smaller batches are unaffected.
DEFAULT_MODEL_BATCH_SIZE = 256
# Statistics every 5 steps with a learning rate, every 4 in the adaptive mode (scale_by_kfac's own
# default is every step). On the MNIST autoencoder (batch 1000, refreshes every 10 steps, seeds 0
# and 1) the adaptive mode reached Adam's 120-second loss in 21.3-21.6 s with statistics every 5
# steps, 22.5-23.9 s every 3, 29.3-30.4 s every step, in the same 50 steps: a refresh sees two
# batches' statistics, and the moving average still spans about 100 steps. With a learning rate,
# kfac(0.01) ended at 75.7 / 99.8 after 60 s with statistics every 3 steps against 129.8 / 108.4
# every step (benchmarks/README.md, "Sub-batches and cadences").
# Refreshes every 10 steps with a learning rate (scale_by_kfac's own default); in the adaptive
# mode on each statistics step. There, statistics and refreshes every 4 steps reached the same
# target in 34 and 34 steps (16.4 and 14.4 s; 60-second races, seeds 0 and 1, evaluated every
# 2 steps) against 38 and 36 (17.2 and 15.5 s) every 5 and 42 and 42 (19.4 and 16.9 s) with
# statistics every 5 and refreshes every 10; in two 120-second races 36 and 40 steps (16.3 and
# 18.8 s) against 40 and 45 (18.6 and 19.3 s) every 5 (benchmarks/README.md, "Refresh cadence").
# With a learning rate, refreshes every 5 ended higher (93.7 and 86.9 against 79.0 and 67.9 after
# 60 s), and every 20 higher still.
DEFAULT_STATS_EVERY = {"adaptive": 4, "learning_rate": 5}
DEFAULT_INVERSE_EVERY = {"adaptive": 4, "learning_rate": 10}


def _check_mode(
    adaptive: bool,
    momentum,
    norm_constraint,
    adaptive_damping,
    extra,
    damping=None,
    model_batch_size=None,
) -> None:
    """Options that only one mode uses are errors in the other, naming both options."""
    if adaptive_damping is not None and not isinstance(adaptive_damping, bool):
        raise ValueError(f"adaptive_damping must be True, False or None, got {adaptive_damping!r}.")
    if adaptive:
        if callable(damping):
            raise ValueError(
                f"damping={damping!r} is a schedule, but with learning_rate=None the adaptive "
                "step sets the damping itself (Levenberg-Marquardt, starting from a number). "
                "Pass a number as damping, or pass a learning rate to follow a damping schedule."
            )
        for name, value in (("momentum", momentum), ("norm_constraint", norm_constraint)):
            if value is not None:
                raise ValueError(
                    f"{name}={value!r} has no effect with learning_rate=None: the adaptive step "
                    f"chooses its step size and momentum itself. Leave {name} unset, or pass a "
                    "learning rate."
                )
        if adaptive_damping is False:
            for name, value in extra.items():
                if value is not None:
                    raise ValueError(
                        f"{name}={value!r} has no effect with adaptive_damping=False; leave it "
                        "unset."
                    )
        return
    if model_batch_size is not None:
        raise ValueError(
            f"model_batch_size={model_batch_size!r} sizes the quadratic model of the adaptive "
            "step, which needs learning_rate=None; leave it unset with a fixed learning rate."
        )
    if adaptive_damping:
        raise ValueError(
            "adaptive_damping=True needs the adaptive step (learning_rate=None): with a fixed "
            "learning rate nothing measures the reduction ratio that adapts the damping. Pass "
            "learning_rate=None, or a damping schedule."
        )
    for name, value in extra.items():
        if value is not None:
            raise ValueError(
                f"{name}={value!r} is an option of adaptive damping, which needs "
                "learning_rate=None; leave it unset with a fixed learning rate."
            )


def kfac(
    learning_rate: optax.ScalarOrSchedule | None,
    apply_fn: Callable[[Any, Any], jax.Array],
    loss: Loss,
    *,
    example_inputs: Any = None,
    momentum: float | None = None,
    damping: ScalarOrSchedule = 1e-2,
    norm_constraint: float | bool | None = None,
    adaptive_damping: bool | None = None,
    damping_every: int | None = None,
    min_damping: float | None = None,
    block: BlockChoice = "default",
    centering: str = "exact",
    kind: str = "mc",
    samples: int | None = None,
    ema_decay: float = 0.95,
    stats_every: int | None = None,
    inverse_every: int | None = None,
    stats_batch_size: int | None = None,
    model_batch_size: int | bool | None = None,
    batch_axes: Any = None,
    unmatched: optax.GradientTransformation | None = None,
    seed: int = 0,
    axis_name: str | None = None,
    weight_sharing: str = "expand",
    max_factor_size: int | None = None,
    inverse_strategy: str = "replicated",
    batch_layers: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """K-FAC with a learning rate and momentum, or with the adaptive step of Martens & Grosse.

    * ``learning_rate`` a float or schedule: ``chain(norm_constrained(scale_by_kfac(...),
      norm_constraint, learning_rate), trace(momentum), scale_by_learning_rate(learning_rate))``:
      the preconditioned gradient, scaled so that ``lr^2 <Delta, grad> <= norm_constraint``
      (default ``1e-2``; ``False`` turns it off), with heavy-ball momentum (default 0.9; 0 for
      none), descending at ``learning_rate``.
    * ``learning_rate=None``: ``quadratic_model_step(scale_by_kfac(...))``: step size and
      momentum from the quadratic model every step, and Levenberg-Marquardt damping starting from
      ``damping`` (``adaptive_damping`` defaults to True; ``damping_every`` to 5, ``min_damping``
      to 1e-4), the model evaluated on at most 256 examples of each batch (``model_batch_size``).
      ``update`` then needs ``targets``.

    An option that a mode does not use is an error in that mode, never silently ignored.

    Args:
      learning_rate: a float, an optax schedule, or ``None`` for the adaptive mode.
      apply_fn, loss, example_inputs: as in :func:`kfax.scale_by_kfac`.
      momentum: heavy-ball momentum for a fixed learning rate (default 0.9).
      damping: the damping (fixed learning rate: a float, array or schedule; adaptive: the
        initial value of the Levenberg-Marquardt rule). Default ``1e-2``.
      norm_constraint: the bound ``c`` of the norm constraint (fixed learning rate only).
      adaptive_damping, damping_every, min_damping: the Levenberg-Marquardt rule (adaptive only).
      model_batch_size: the quadratic model and the reduction ratio on at most this many last
        examples of each batch (adaptive only; default 256; ``False``: the whole batch);
        ``stats_batch_size`` takes the first, so the model checks the step on other examples.
      stats_every: steps between statistics (default: 4 in the adaptive mode, 5 with a learning
        rate, where :func:`kfax.scale_by_kfac` takes every step): measured faster to a target
        loss, in fewer or the same number of steps.
      inverse_every: steps between refreshes of the inverses (default: 4, each statistics
        step, in the adaptive mode; 10, :func:`kfax.scale_by_kfac`'s, with a learning rate):
        each measured fastest to a target loss in its mode.
      block, centering, kind, samples, ema_decay, stats_batch_size,
        batch_axes, unmatched, seed, axis_name, weight_sharing, max_factor_size,
        inverse_strategy, batch_layers: passed to :func:`kfax.scale_by_kfac`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update(grads, state, params, *, inputs,
      targets=None, where=None)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, kfax
      >>> params = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
      >>> apply_fn = lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"]
      >>> loss = kfax.losses.SquaredError()
      >>> x, y = jnp.ones((8, 3)), jnp.ones((8, 2))
      >>> opt = kfax.kfac(None, apply_fn, loss, example_inputs=x)
      >>> state = opt.init(params)
      >>> grads = jax.grad(lambda p: loss(apply_fn(p, x), y))(params)
      >>> updates, state = opt.update(grads, state, params, inputs=x, targets=y)
      >>> params = optax.apply_updates(params, updates)

    References:
      Martens & Grosse, ICML 2015. Ba, Grosse & Martens, ICLR 2017 (norm constraint).
    """
    adaptive = learning_rate is None
    mode = "adaptive" if adaptive else "learning_rate"
    extra = {"damping_every": damping_every, "min_damping": min_damping}
    _check_mode(
        adaptive, momentum, norm_constraint, adaptive_damping, extra, damping, model_batch_size
    )
    preconditioner = scale_by_kfac(
        apply_fn,
        loss,
        example_inputs=example_inputs,
        damping=damping,
        block=block,
        centering=centering,
        kind=kind,
        samples=samples,
        ema_decay=ema_decay,
        stats_every=DEFAULT_STATS_EVERY[mode] if stats_every is None else stats_every,
        inverse_every=DEFAULT_INVERSE_EVERY[mode] if inverse_every is None else inverse_every,
        stats_batch_size=stats_batch_size,
        batch_axes=batch_axes,
        unmatched=unmatched,
        seed=seed,
        axis_name=axis_name,
        weight_sharing=weight_sharing,
        max_factor_size=max_factor_size,
        inverse_strategy=inverse_strategy,
        batch_layers=batch_layers,
    )
    if adaptive:
        rule = (damping, adaptive_damping, damping_every, min_damping)
        return _with_quadratic_model(
            preconditioner, apply_fn, loss, rule, model_batch_size, axis_name, batch_axes
        )
    return _with_learning_rate(preconditioner, learning_rate, momentum, norm_constraint)


def _with_quadratic_model(
    preconditioner, apply_fn, loss, rule, model_batch_size, axis_name, batch_axes
):
    """The adaptive mode: the quadratic-model step with kfac's defaults filled in."""
    damping, adaptive_damping, damping_every, min_damping = rule
    if model_batch_size is None:
        model_batch_size = AtMost(DEFAULT_MODEL_BATCH_SIZE)
    elif _validation.concrete(model_batch_size) is False:  # also NumPy's and a 0-d array's
        model_batch_size = None
    return quadratic_model_step(
        preconditioner,
        apply_fn,
        loss,
        damping=damping,
        adaptive_damping=adaptive_damping is not False,
        damping_every=DEFAULT_DAMPING_EVERY if damping_every is None else damping_every,
        min_damping=DEFAULT_MIN_DAMPING if min_damping is None else min_damping,
        axis_name=axis_name,
        model_batch_size=model_batch_size,
        batch_axes=batch_axes,
    )


def _with_learning_rate(preconditioner, learning_rate, momentum, norm_constraint):
    """The fixed-rate mode: norm constraint, heavy-ball momentum, descent at the rate."""
    _validation.positive("learning_rate", learning_rate, schedule=True)
    momentum = DEFAULT_MOMENTUM if momentum is None else momentum
    _validation.in_unit_interval("momentum", momentum)
    if norm_constraint is None or norm_constraint is True:
        norm_constraint = DEFAULT_NORM_CONSTRAINT
    if norm_constraint is not False:
        _validation.positive("norm_constraint", norm_constraint)
        preconditioner = norm_constrained(preconditioner, norm_constraint, learning_rate)
    return optax.chain(
        preconditioner,
        optax.trace(decay=momentum),
        optax.scale_by_learning_rate(learning_rate),
    )
