"""Dense curvature references for tiny models: the full matrix, and one layer's exact block.

Built independently of kfax's capture machinery, from ``jax.jacfwd`` of the model and the loss's
own autodiff derivatives, so that tests can compare K-FAC against them. The cost is
``O(batch * outputs * params)`` memory: for models with at most a few thousand parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from kfax import _tracing
from kfax.losses import Loss, check_loss
from kfax.statistics import check_kind, check_samples


def _per_example_loss(loss: Loss, f: jax.Array, y: Any, where: Any) -> jax.Array:
    w = None if where is None else where[None]
    return loss.per_example(f[None], y[None], w)[0]


def _output_matrices(loss, kind, outputs, targets, where, key, samples):
    """Per-example ``D`` (exact) or the outer products ``u u^T`` averaged over samples; masks
    and weights enter as in the loss (``kappa H``; ``u = sqrt(kappa) grad l`` when sampled)."""
    n = outputs.shape[0]
    flat = outputs.reshape(n, -1)
    vmapped_where = None if where is None else jnp.asarray(where)

    def loss_of_flat(f_flat, y, w):
        return _per_example_loss(loss, f_flat.reshape(outputs.shape[1:]), y, w)

    def over_batch(fn, y, w):
        return jax.vmap(fn, in_axes=(0, 0, None if w is None else 0))(flat, y, w)

    if kind == "exact":
        y = targets if targets is not None else loss.sample(jax.random.key(0), outputs)
        return over_batch(jax.hessian(loss_of_flat), y, vmapped_where)
    if kind == "empirical":
        if targets is None:
            raise ValueError("kind='empirical' needs targets=...")
        u = over_batch(jax.grad(loss_of_flat), targets, vmapped_where)
        return jnp.einsum("ni,nj->nij", u, u)
    if key is None:
        raise ValueError("kind='mc' needs key=...")
    keys = jax.random.split(key, samples)
    root = None if vmapped_where is None else jnp.sqrt(vmapped_where)

    def one_sample(k):
        u = over_batch(jax.grad(loss_of_flat), loss.sample(k, outputs), root)
        return jnp.einsum("ni,nj->nij", u, u)

    return jnp.mean(jax.vmap(one_sample)(keys), axis=0)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _dense_curvature(apply_fn, loss, kind, samples, params, inputs, targets, where, key):
    flat, unravel = ravel_pytree(params)

    def model(theta):
        return apply_fn(unravel(theta), inputs)

    outputs = model(flat)
    n = outputs.shape[0]
    jac = jax.jacfwd(model)(flat).reshape(n, -1, flat.size)
    d = _output_matrices(loss, kind, outputs, targets, where, key, samples)
    return jnp.einsum("noi,nop,npj->ij", jac, d, jac) / n


def curvature_matrix(
    apply_fn: Callable[[Any, Any], jax.Array],
    loss: Loss,
    params: Any,
    inputs: Any,
    *,
    kind: str = "exact",
    targets: jax.Array | None = None,
    where: jax.Array | None = None,
    key: jax.Array | None = None,
    samples: int = 1,
) -> jax.Array:
    """The dense curvature ``G = mean_n J_n^T D_n J_n`` of the mean loss over flat parameters.

    ``J_n`` is the Jacobian of example ``n``'s outputs with respect to
    ``jax.flatten_util.ravel_pytree(params)[0]``. ``D_n`` is the loss Hessian in output space
    (``kind="exact"``: the Gauss-Newton matrix, equal to the Fisher for kfax's losses), the
    mean over ``samples`` targets drawn from the model of ``u u^T``, ``u = grad_f l(f, y~)``
    (``kind="mc"``, keys ``jax.random.split(key, samples)`` as in :func:`kfax.kronecker_factors`),
    or ``u u^T`` for the data targets (``kind="empirical"``). ``where`` (shape
    ``outputs.shape[:-1]``) weights positions as the loss does.

    Example:
      >>> import jax.numpy as jnp, kfax
      >>> params = {"w": jnp.eye(2)}
      >>> G = kfax.exact.curvature_matrix(
      ...     lambda p, x: x @ p["w"], kfax.losses.SquaredError(), params, jnp.ones((3, 2))
      ... )
      >>> G.shape
      (4, 4)
    """
    check_loss(loss)
    check_kind(kind)
    samples = check_samples(samples)
    if kind == "empirical" and targets is None:
        raise ValueError("kind='empirical' needs targets=...")
    if kind == "mc" and key is None:
        raise ValueError("kind='mc' needs key=...")
    return _dense_curvature(apply_fn, loss, kind, samples, params, inputs, targets, where, key)


def layer_indices(apply_fn: Callable, params: Any, inputs: Any, layer: str) -> np.ndarray:
    """Flat-parameter indices of a layer in K-FAC order: ``vec`` of the ``(d_in, d_out)`` weight
    matrix (row-major, so coordinates run as ``h (x) g``), then the bias if there is one."""
    traced = _tracing.trace(apply_fn, params, inputs)
    sites = {s.name: s for s in traced.layers}
    if layer not in sites:
        raise KeyError(f"no layer named {layer!r}; layers found: {sorted(sites)}")
    site = sites[layer]
    leaves = jax.tree_util.tree_leaves(params)
    offsets = np.cumsum([0] + [int(np.size(leaf)) for leaf in leaves])

    def leaf_index(i):
        return offsets[i] + np.arange(int(np.size(leaves[i]))).reshape(np.shape(leaves[i]))

    weight = np.asarray(site.geometry.weight_matrix(jnp.asarray(leaf_index(site.weight_leaf))))
    parts = [weight.reshape(-1)]
    if site.bias_leaf is not None:
        parts.append(leaf_index(site.bias_leaf).reshape(-1))
    return np.concatenate(parts)


def layer_block(
    apply_fn: Callable[[Any, Any], jax.Array],
    loss: Loss,
    params: Any,
    inputs: Any,
    layer: str,
    **kwargs: Any,
) -> jax.Array:
    """One layer's exact curvature block ``E[[h h^T, h; h^T, 1] (x) g g^T]``.

    Rows and columns follow :func:`layer_indices`, the order in which the K-FAC approximation
    reads ``kron(a, b)`` with ``a`` homogeneous (weight first, bias last). ``kwargs`` are those of
    :func:`curvature_matrix`.
    """
    full = curvature_matrix(apply_fn, loss, params, inputs, **kwargs)
    idx = layer_indices(apply_fn, params, inputs, layer)
    return full[np.ix_(idx, idx)]
