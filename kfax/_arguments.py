"""Checks of what a K-FAC transform receives in ``init`` and ``update``: the parameters, the
gradients, the batch and precomputed statistics, with errors that say what to pass instead."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from kfax import statistics as _statistics


def check_not_masked(params) -> None:
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


def check_floating(params) -> None:
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


def check_precomputed(batch, kind, samples, stats_batch_size) -> None:
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


def check_update_arguments(params, inputs, targets, kind) -> None:
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


def check_same_structure(updates, params) -> None:
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


def check_same_shapes_as_state(previous_update, params) -> None:
    """The adaptive step's stored previous update has the shapes of the parameters at
    ``init``."""
    old, old_tree = jax.tree_util.tree_flatten_with_path(previous_update)
    new, new_tree = jax.tree_util.tree_flatten_with_path(params)
    if old_tree != new_tree:
        raise ValueError(
            "params do not match the K-FAC state (the adaptive step's): the parameter tree "
            "changed since "
            f"init (state built for {old_tree}, params are {new_tree})."
        )
    for (path, a), (_, b) in zip(old, new, strict=True):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(
                f"params do not match the K-FAC state (the adaptive step's): parameter "
                f"{jax.tree_util.keystr(path)!r} has shape {jnp.shape(b)}, but the state was "
                f"built for shape {jnp.shape(a)}."
            )
