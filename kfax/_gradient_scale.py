"""The adaptive step's check of the gradient it is given: ``<grad, Delta> / <grad_f L, J Delta>``.

1 when the gradient passed to ``update`` is that of kfax's mean loss on ``inputs``; a warning
(``StepInfo.gradient_scale`` reports the factor) when it is not, with a rule that depends on
whether the quadratic model saw the whole batch or a sub-batch (``model_batch_size``).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

# Gradient scales further than this from 1 are reported once (see StepInfo.gradient_scale).
SCALE_TOLERANCE = 0.1
# With the model on a sub-batch, its gradient term estimates the batch's: the scale is checked
# on the first step only, where the gradient's signal dominates its sampling noise, and only
# scales outside [1/2, 2] are reported (a sum instead of a mean is off by the batch size).
# Later in training the estimate's noise alone moved it to -24.9 and 62 (8 of 32 examples).
_SUB_BATCH_SCALE_BAND = 2.0
# ... and only from this many examples: with 8 of 64 the correct gradient's first-step estimate
# left the band on 6 of 20 seeds (up to 7.07); with 32, on none.
_SUB_BATCH_MIN_TO_WARN = 32


def check(along: jax.Array, model_term: jax.Array, count: jax.Array, model_batch) -> jax.Array:
    """The scale ``along / model_term``, warning (through a host callback) when it is off:
    beyond 10% of 1 on any step when the model saw the whole batch (``model_batch=None``); on a
    sub-batch of ``model_batch`` examples, outside ``[1/2, 2]`` on the first step only and from
    32 examples. A zero gradient (optax.MultiSteps between its applying steps) says nothing."""
    scale = along / jnp.where(model_term != 0, model_term, 1.0)
    if model_batch is None:
        off = jnp.abs(scale - 1) > SCALE_TOLERANCE
    elif model_batch >= _SUB_BATCH_MIN_TO_WARN:
        band = (scale < 1 / _SUB_BATCH_SCALE_BAND) | (scale > _SUB_BATCH_SCALE_BAND)
        off = (count == 0) & band
    else:
        off = jnp.asarray(False)
    warn = (along != 0) & off
    jax.lax.cond(warn, lambda: jax.debug.callback(_warn, scale, warn), lambda: None)
    return scale


def _warn(scale, warn) -> None:
    # `warn` is checked here too: under jax.vmap the lax.cond around this callback becomes a
    # select, which runs the callback whatever the condition.
    if not np.any(np.asarray(warn)):
        return
    scale = np.asarray(scale)[np.asarray(warn)].ravel()[0] if np.ndim(scale) else scale
    warnings.warn(
        "kfax.quadratic_model_step: the gradient passed to update is not the gradient of kfax's "
        "mean loss on inputs (its directional derivative differs by a factor "
        f"{float(scale):.3g}). The adaptive step uses kfax's own loss, so training is unaffected "
        "if that factor is only a scale (a sum over the batch, a per-token mean) or a "
        "regulariser you add; otherwise check that loss, targets and where match your loss.",
        stacklevel=2,
    )
