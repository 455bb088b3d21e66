"""kfax with the Flax training utilities (linen TrainState, nnx.Optimizer) and orbax checkpoints.

K-FAC's ``update`` needs the batch (``inputs=``, ``targets=``), so these tests pin down how each
utility forwards extra arguments to ``tx.update`` and show the pattern that works.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.training import train_state

import kfax
from tests import models

LOSS = kfax.losses.SoftmaxCrossEntropy()
CLASSES = 3
D_IN = 4
STEPS = 20


def blobs(n=48, key=3):
    """Three well separated Gaussian blobs in 4 dimensions, with integer labels."""
    k_centers, k_noise = jax.random.split(jax.random.key(key))
    centers = 2.0 * jax.random.normal(k_centers, (CLASSES, D_IN))
    labels = jnp.arange(n) % CLASSES
    x = centers[labels] + 0.5 * jax.random.normal(k_noise, (n, D_IN))
    return x, labels


def assert_substantial_decrease(losses):
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < 0.05 * losses[0], f"loss went from {losses[0]:.4f} to {losses[-1]:.4f}"


# ---------------------------------------------------------------- flax.linen TrainState


def linen_state(x):
    params, apply_fn, _ = models.linen_mlp(d_in=D_IN, features=(8, CLASSES), batch=x.shape[0])
    tx = kfax.kfac(0.5, apply_fn, LOSS, example_inputs=x)
    return train_state.TrainState.create(apply_fn=apply_fn, params=params, tx=tx)


def test_train_state_apply_gradients_does_not_forward_the_batch_to_kfac():
    """``TrainState.apply_gradients(grads=..., **kwargs)`` calls ``tx.update(grads, opt_state,
    params)`` and uses ``kwargs`` for ``.replace``: kfax never sees ``inputs``."""
    x, y = blobs()
    state = linen_state(x)
    grads = jax.grad(lambda p: LOSS(state.apply_fn(p, x), y))(state.params)
    with pytest.raises(ValueError, match="needs inputs="):
        state.apply_gradients(grads=grads, inputs=x, targets=y)


def test_train_state_with_kfac_learns_a_tiny_classification_problem():
    """The working pattern (``train_step`` below): call ``state.tx.update`` with the batch,
    then ``state.replace`` with the new step, params and optimiser state."""
    x, y = blobs()
    state = linen_state(x)

    @jax.jit
    def train_step(state, x, y):
        loss, grads = jax.value_and_grad(lambda p: LOSS(state.apply_fn(p, x), y))(state.params)
        updates, opt_state = state.tx.update(
            grads, state.opt_state, state.params, inputs=x, targets=y
        )
        state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
        )
        return state, loss

    losses = []
    for _ in range(STEPS):
        state, loss = train_step(state, x, y)
        losses.append(float(loss))
    assert int(state.step) == STEPS
    assert int(kfax_state(state.opt_state).count) == STEPS
    assert_substantial_decrease(losses)


# ---------------------------------------------------------------- flax.nnx Optimizer


def test_nnx_optimizer_forwards_the_batch_to_kfac_and_learns():
    """``nnx.Optimizer.update(model, grads, **kwargs)`` passes ``kwargs`` on to ``tx.update``.

    kfax traces ``apply_fn(params, x)`` to find the layers, so it must be a pure function of the
    parameter ``State`` (what ``nnx.Optimizer`` hands to the transform): split the model once
    and merge the graph definition with the given state::

        graphdef, _ = nnx.split(model)
        apply_fn = lambda params, x: nnx.merge(graphdef, params)(x)
        optimizer = nnx.Optimizer(
            model, kfax.kfac(0.5, apply_fn, loss, example_inputs=x), wrt=nnx.Param
        )
        optimizer.update(model, grads, inputs=x, targets=y)
    """
    x, y = blobs()
    model = models.NNXMLP(D_IN, 8, CLASSES, nnx.Rngs(0))
    graphdef, _ = nnx.split(model)

    def apply_fn(params, inputs):
        return nnx.merge(graphdef, params)(inputs)

    optimizer = nnx.Optimizer(
        model, kfax.kfac(0.5, apply_fn, LOSS, example_inputs=x), wrt=nnx.Param
    )

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: LOSS(m(x), y))(model)
        optimizer.update(model, grads, inputs=x, targets=y)
        return loss

    losses = [float(train_step(model, optimizer, x, y)) for _ in range(STEPS)]
    assert int(optimizer.step[...]) == STEPS
    assert int(kfax_state(nnx.as_pure(optimizer.opt_state)).count) == STEPS
    assert_substantial_decrease(losses)


# ---------------------------------------------------------------- orbax checkpoints


def kfax_state(opt_state) -> kfax.KFACState:
    is_kfac = lambda s: isinstance(s, kfax.KFACState)  # noqa: E731
    found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_kfac) if is_kfac(s)]
    assert len(found) == 1
    return found[0]


CHECKPOINTED = {
    "kfac": dict(learning_rate=0.5),
    "adaptive": dict(learning_rate=None),
    "ekfac-adam": dict(learning_rate=0.5, block="ekfac", unmatched=optax.scale_by_adam()),
}


@pytest.mark.parametrize("name", list(CHECKPOINTED))
def test_orbax_round_trip_resumes_training_bit_identically(tmp_path, name):
    options = dict(CHECKPOINTED[name])
    learning_rate = options.pop("learning_rate")
    x, y = blobs()
    base, base_apply, _, _ = models.mlp(sizes=(D_IN, 8, CLASSES), batch=x.shape[0])
    params = {**base, "temperature": jnp.ones((), jnp.float32)}

    def apply_fn(p, inputs):  # "temperature" lies outside any layer
        return base_apply(p, inputs) * p["temperature"]

    opt = kfax.kfac(learning_rate, apply_fn, LOSS, example_inputs=x, **options)

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(lambda p: LOSS(apply_fn(p, x), y))(params)
        updates, opt_state = opt.update(grads, opt_state, params, inputs=x, targets=y)
        return optax.apply_updates(params, updates), opt_state

    def train(params, opt_state, steps):
        for _ in range(steps):
            params, opt_state = step(params, opt_state)
        return params, opt_state

    straight = train(params, opt.init(params), 6)
    halfway = train(params, opt.init(params), 3)

    leaves = jax.tree_util.tree_leaves(halfway)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves), {type(v) for v in leaves}

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "step3", halfway)
        checkpointer.wait_until_finished()
        fresh = (params, opt.init(params))
        target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, fresh)
        restored = checkpointer.restore(tmp_path / "step3", target)

    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(halfway)
    assert isinstance(kfax_state(restored[1]), kfax.KFACState)
    for got, saved in zip(
        jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(halfway), strict=True
    ):
        assert isinstance(got, (jax.Array, np.ndarray))
        assert (got.shape, got.dtype) == (saved.shape, saved.dtype)
        np.testing.assert_array_equal(got, saved)

    resumed = train(*restored, 3)
    for got, want in zip(
        jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(straight), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    assert int(kfax_state(resumed[1]).count) == 6


def test_optimizer_state_holds_only_arrays():
    """No Python scalars, strings or callables in the state: it is a plain pytree of arrays
    that orbax (or any pytree serialiser) can store."""
    x, _ = blobs()
    params, apply_fn, _, _ = models.mlp(sizes=(D_IN, 8, CLASSES), batch=x.shape[0])
    for learning_rate, options in [
        (0.5, {}),
        (None, {}),
        (0.5, {"block": "ekfac", "unmatched": optax.scale_by_adam()}),
    ]:
        state = kfax.kfac(learning_rate, apply_fn, LOSS, example_inputs=x, **options).init(params)
        leaves = jax.tree_util.tree_leaves(state)
        assert leaves
        assert all(isinstance(leaf, jax.Array) for leaf in leaves), {type(v) for v in leaves}


# ---------------------------------------------------------------- other optimisers beside kfax


def _two_groups():
    x, y = blobs()
    params, apply_fn, _, _ = models.mlp(sizes=(D_IN, 8, CLASSES), batch=x.shape[0])
    labels = {
        "dense_0": {"kernel": "adam", "bias": "adam"},
        "dense_1": {"kernel": "kfac", "bias": "kfac"},
    }
    grads = jax.grad(lambda p: LOSS(apply_fn(p, x), y))(params)
    return x, y, params, apply_fn, labels, grads


@pytest.mark.parametrize("wrapper", ["partition", "multi_transform", "masked"])
def test_optax_partitions_around_kfac_are_refused_with_the_patterns_that_work(wrapper):
    """optax hides the other groups' parameters from an inner transform, and kfax needs them
    all to run the model: a clear error naming the working patterns, not a crash in the model."""
    x, _, params, apply_fn, labels, _ = _two_groups()
    kfac = kfax.kfac(0.1, apply_fn, LOSS, example_inputs=x)
    tx = {
        "partition": lambda: optax.partition({"kfac": kfac, "adam": optax.adam(1e-3)}, labels),
        "multi_transform": lambda: optax.multi_transform(
            {"kfac": kfac, "adam": optax.adam(1e-3)}, labels
        ),
        "masked": lambda: optax.masked(kfac, jax.tree.map(lambda lab: lab == "kfac", labels)),
    }[wrapper]()
    with pytest.raises(ValueError, match=r"masked entries.*block=.*unmatched="):
        tx.init(params)


def test_kfac_for_some_layers_and_adam_for_the_rest_through_block_and_unmatched():
    """block={"dense_0": None} leaves a layer to `unmatched`: with scale_by_adam there, its
    first update is -lr times Adam's direction; the K-FAC layer's update is the one it gets when
    every layer is preconditioned (blocks are per layer)."""
    x, y, params, apply_fn, _, grads = _two_groups()
    options = dict(example_inputs=x, norm_constraint=False, momentum=0.0)
    mixed = kfax.kfac(
        0.1, apply_fn, LOSS, block={"dense_0": None}, unmatched=optax.scale_by_adam(), **options
    )
    everything = kfax.kfac(0.1, apply_fn, LOSS, **options)
    with jax.disable_jit():
        got, _ = mixed.update(grads, mixed.init(params), params, inputs=x, targets=y)
        want, _ = everything.update(grads, everything.init(params), params, inputs=x, targets=y)
    adam = optax.scale_by_adam()
    adam_direction, _ = adam.update(grads["dense_0"], adam.init(params["dense_0"]))
    chex_close(got["dense_0"], jax.tree.map(lambda a: -0.1 * a, adam_direction))
    chex_close(got["dense_1"], want["dense_1"])


def test_kfax_first_then_optax_partition_gives_each_group_its_own_optimiser():
    """chain(scale_by_kfac(block=...), partition(...)): kfax sees every parameter, passes the
    unpreconditioned layer through unchanged, and each group gets its own learning rate."""
    x, y, params, apply_fn, labels, grads = _two_groups()
    tx = optax.chain(
        kfax.scale_by_kfac(apply_fn, LOSS, example_inputs=x, block={"dense_0": None}),
        optax.partition({"kfac": optax.scale(-0.1), "adam": optax.adam(1e-3)}, labels),
    )
    with jax.disable_jit():
        updates, _ = tx.update(grads, tx.init(params), params, inputs=x, targets=y)
        bare = kfax.scale_by_kfac(apply_fn, LOSS, example_inputs=x)
        direction, _ = bare.update(grads, bare.init(params), params, inputs=x, targets=y)
    adam = optax.adam(1e-3)
    adam_update, _ = adam.update(grads["dense_0"], adam.init(params["dense_0"]))
    chex_close(updates["dense_0"], adam_update)
    chex_close(updates["dense_1"], jax.tree.map(lambda d: -0.1 * d, direction["dense_1"]))


def chex_close(actual, expected):
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
