"""The preconditioner behind :func:`kfax.scale_by_kfac`: its checked options, ``init`` and
``update``. Each ``update`` checks its arguments, finds the layers (a cached trace), cuts the
statistics sub-batch and runs one compiled step (:func:`kfax._step.preconditioner_step`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kfax import _arguments, _capture, _sub_batches, _validation, distributed
from kfax import statistics as _statistics
from kfax._plan import Plan, make_plan
from kfax._step import KFACState, LayerHealth, preconditioner_step
from kfax.blocks import (
    CENTERINGS,
    DEFAULT_MAX_FACTOR_SIZE,
    WEIGHT_SHARINGS,
    check_block_choice,
)
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


def _check_wiring(example_inputs, batch_axes, unmatched, seed, weight_sharing, batch_layers):
    _sub_batches.check_batch_axes_entries(batch_axes)
    if example_inputs is not None:
        _sub_batches.check_batch_axes(batch_axes, example_inputs)
    if unmatched is not None and not isinstance(unmatched, optax.GradientTransformation):
        raise ValueError(f"unmatched must be an optax GradientTransformation, got {unmatched!r}.")
    _validation.integer("seed", seed)
    _validation.choice("weight_sharing", weight_sharing, WEIGHT_SHARINGS)
    if not isinstance(batch_layers, bool):
        raise ValueError(f"batch_layers must be True or False, got {batch_layers!r}.")


@dataclasses.dataclass(frozen=True, eq=False)
class Preconditioner:
    """The checked options of one :func:`scale_by_kfac`, and its ``init`` and ``update``."""

    apply_fn: Callable[[Any, Any], jax.Array]
    loss: Loss
    example_inputs: Any
    damping: ScalarOrSchedule
    cadence: tuple  # (ema_decay, stats_every, inverse_every)
    stats_batch_size: int | None
    batch_axes: Any
    others: optax.GradientTransformation
    seed: int
    plan_options: dict

    @classmethod
    def from_options(
        cls,
        apply_fn,
        loss,
        *,
        example_inputs,
        damping,
        block,
        centering,
        kind,
        samples,
        ema_decay,
        stats_every,
        inverse_every,
        stats_batch_size,
        batch_axes,
        unmatched,
        seed,
        axis_name,
        weight_sharing,
        max_factor_size,
        inverse_strategy,
        batch_layers,
    ) -> Preconditioner:
        """Checks every option of :func:`kfax.scale_by_kfac` (a ``ValueError`` naming the first
        invalid one) and builds the preconditioner."""
        _check_options(loss, kind, damping, block, centering, ema_decay, stats_every, inverse_every)
        _check_wiring(example_inputs, batch_axes, unmatched, seed, weight_sharing, batch_layers)
        distributed.check_device_options(axis_name, inverse_strategy)
        max_factor_size = _validation.static_count("max_factor_size", max_factor_size)
        if max_factor_size is None:
            max_factor_size = DEFAULT_MAX_FACTOR_SIZE
        return cls(
            apply_fn,
            loss,
            example_inputs,
            damping,
            (ema_decay, stats_every, inverse_every),
            _validation.static_count("stats_batch_size", stats_batch_size),
            batch_axes,
            IDENTITY if unmatched is None else unmatched,
            seed,
            plan_options=dict(
                kind=kind,
                samples=_statistics.check_samples(samples),
                block=block,
                centering=centering,
                axis_name=axis_name,
                weight_sharing=weight_sharing,
                max_factor_size=max_factor_size,
                inverse_strategy=inverse_strategy,
                batch_layers=batch_layers,
            ),
        )

    def plan(self, params, inputs) -> Plan:
        return make_plan(
            self.apply_fn, self.loss, params, inputs, others=self.others, **self.plan_options
        )

    def init(self, params) -> KFACState:
        if self.example_inputs is None:
            raise ValueError(
                "scale_by_kfac needs example_inputs=... (an array or jax.ShapeDtypeStruct shaped "
                "like a batch of inputs, any batch size) when it is built: optax's init(params) "
                "sees no inputs, and kfax finds the layers by tracing apply_fn on them."
            )
        _arguments.check_not_masked(params)
        _arguments.check_floating(params)
        _sub_batches.check_batch_axes(self.batch_axes, self.example_inputs)
        layers = self.plan(params, self.example_inputs)
        layers.warn_about_suspect_biases(warnings.warn)
        dtype = layers.statistics_dtype(params)
        initial = self.damping(0) if callable(self.damping) else self.damping
        return KFACState(
            count=jnp.zeros((), jnp.int32),
            key=jax.random.PRNGKey(self.seed),
            statistics={n: b.init(dtype)[0] for n, b in layers.blocks.items()},
            curvature={n: b.init(dtype)[1] for n, b in layers.blocks.items()},
            health={
                n: LayerHealth(*(jnp.zeros((), jnp.int32) for _ in range(3))) for n in layers.blocks
            },
            unmatched=self.others.init(layers.unmatched_leaves(params)),
            damping=jnp.array(initial, dtype),  # a copy: donating the state must not free
            # the caller's array (optax.inject_hyperparams keeps it in its own state)
        )

    def update(
        self,
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
        kind, samples = self.plan_options["kind"], self.plan_options["samples"]
        _arguments.check_not_masked(params)
        _arguments.check_update_arguments(params, inputs, targets, kind)
        distributed.check_axis_bound(self.plan_options["axis_name"])
        _arguments.check_same_structure(updates, params)
        _arguments.check_precomputed(statistics, kind, samples, self.stats_batch_size)
        traced = _capture.trace_layers(self.apply_fn, params, inputs)
        _statistics.check_targets(self.loss, traced, targets)
        if self.stats_batch_size is not None:
            inputs, targets, where = _sub_batches.cut_to_sub_batch(
                self.apply_fn,
                params,
                inputs,
                targets,
                where,
                self.stats_batch_size,
                self.batch_axes,
            )
        layers = self.plan(params, inputs)
        layers.check_state(state, params)
        lam = _current_damping(damping, state, self.damping)
        return preconditioner_step(
            layers, updates, state, params, inputs, targets, where, lam, *self.cadence, statistics
        )


def _current_damping(passed, state, option):
    if passed is not None:
        return jnp.asarray(passed, state.damping.dtype)
    value = option(state.count) if callable(option) else option
    return jnp.asarray(value, state.damping.dtype)
