"""The loss, its gradient and kfax's statistics from one forward pass: :func:`value_and_grad`.

``jax.value_and_grad`` and kfax's statistics each run the model forward once; this runs it once,
with taps, and pulls back both the loss's gradient (giving the parameter gradient) and the
curvature kind's output cotangents (giving each layer's statistics). Pass the statistics to
``update(..., statistics=...)`` and the preconditioner skips its own forward pass. Knows
nothing of optimiser state: with a statistics cadence (``stats_every``; ``kfax.kfac``'s default
is 4 in the adaptive mode, 5 with a learning rate) ``update`` uses the statistics on statistics
steps only (``count % stats_every == 0``), so on the other steps ``jax.value_and_grad`` is the
cheaper call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from kfax import _capture, statistics
from kfax.losses import Loss, check_loss


def value_and_grad(
    apply_fn: Callable[[Any, Any], jax.Array],
    loss: Loss,
    *,
    kind: str = "mc",
    samples: int | None = None,
    axis_name: Any = None,
) -> Callable[..., tuple[tuple[jax.Array, Any], statistics.Pass]]:
    """Like ``jax.value_and_grad`` of ``loss(apply_fn(params, inputs), targets, where)``, plus the
    statistics a K-FAC step needs, from one forward pass.

    The gradient is the autodiff gradient of the same function (the loss's own cotangent pulled
    back through the same program; the taps add exact zeros), so it equals ``jax.grad``'s. The
    statistics cost one more backward pass per output-cotangent column (for ``kind="mc"``, one
    per sample), not another forward pass.

    Args:
      apply_fn, loss: as for :func:`kfax.scale_by_kfac`.
      kind, samples, axis_name: must be those of the preconditioner that receives the
        statistics (``update`` checks ``kind`` and ``samples``).

    Returns:
      ``fn(params, inputs, targets=None, *, where=None, key=None) -> ((value, grads),
      statistics)``; ``key`` samples the targets for ``kind="mc"``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, kfax
      >>> params = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
      >>> apply_fn = lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"]
      >>> loss = kfax.losses.SquaredError()
      >>> x, y = jnp.ones((8, 3)), jnp.ones((8, 2))
      >>> opt = kfax.kfac(None, apply_fn, loss, example_inputs=x)
      >>> state = opt.init(params)
      >>> (value, grads), stats = kfax.value_and_grad(apply_fn, loss)(
      ...     params, x, y, key=jax.random.key(0)
      ... )
      >>> updates, state = opt.update(grads, state, params, inputs=x, targets=y, statistics=stats)
    """
    check_loss(loss)
    statistics.check_kind(kind)
    samples = statistics.check_samples(samples)

    def fn(params, inputs, targets=None, *, where=None, key=None):
        tapped = _capture.capture(apply_fn, params, inputs, param_gradients=True)
        value, loss_vjp = jax.vjp(lambda f: loss(f, targets, where), tapped.outputs)
        (cotangent,) = loss_vjp(jnp.ones_like(value))
        grads, _ = tapped.pullback(cotangent)
        batch = statistics.pass_from_capture(
            tapped,
            loss,
            kind=kind,
            samples=samples,
            targets=targets,
            where=where,
            key=key,
            axis_name=axis_name,
        )
        return (value, grads), batch

    return fn
