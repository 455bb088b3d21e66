"""The K-FAC preconditioner (kfax.scale_by_kfac) against exact identities, on every step.

Exactness tests run in float64 with ``ema_decay=0`` unless a test is about the moving averages;
the damping is tiny where an identity holds at zero damping, and tolerances follow from it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import kfax
from tests import models

EXACT = dict(kind="exact", ema_decay=0.0, inverse_every=1)


def mean_loss_grad(apply_fn, loss, params, inputs, targets):
    return jax.grad(lambda p: loss(apply_fn(p, inputs), targets))(params)


def one_direction(opt, params, inputs, grads, targets=None):
    state = opt.init(params)
    return opt.update(grads, state, params, inputs=inputs, targets=targets)


@pytest.mark.parametrize("block", ["factored", "eigen"])
def test_centred_update_equals_homogeneous_update_at_zero_damping_on_every_step(x64, block):
    """Between refreshes the centred update must use the mean its inverse was built with: with
    drifting inputs, moving averages and inverses every 3 steps, the identity holds at each of
    7 steps, not only on refresh steps."""
    params, apply_fn, _, _ = models.mlp(sizes=(3, 4, 2), batch=12)
    loss = kfax.losses.SigmoidCrossEntropy()  # full-rank D: B is invertible at zero damping
    keys = jax.random.split(jax.random.key(5), 7)
    options = dict(kind="exact", damping=1e-24, block=block, inverse_every=3, ema_decay=0.5)
    txs = {
        c: kfax.scale_by_kfac(
            apply_fn, loss, example_inputs=jnp.ones((12, 3)), centering=c, **options
        )
        for c in ("exact", "none")
    }
    states = {c: tx.init(params) for c, tx in txs.items()}
    for step, key in enumerate(keys):
        x = jax.random.normal(key, (12, 3)) + 2.0 * step  # the mean drifts every step
        y = jax.random.uniform(jax.random.fold_in(key, 1), (12, 2))
        grads = mean_loss_grad(apply_fn, loss, params, x, y)
        directions = {}
        for c, tx in txs.items():
            directions[c], states[c] = tx.update(grads, states[c], params, inputs=x)
        for a, b in zip(
            jax.tree.leaves(directions["exact"]), jax.tree.leaves(directions["none"]), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9, err_msg=f"step {step}")


def test_simple_centring_changes_only_the_bias_update(x64):
    params, apply_fn, inputs, _ = models.mlp(sizes=(3, 4, 2), batch=12)
    loss = kfax.losses.SigmoidCrossEntropy()
    targets = jax.random.uniform(jax.random.key(5), (12, 2))
    grads = mean_loss_grad(apply_fn, loss, params, inputs, targets)
    out = {}
    for centering in ("exact", "simple"):
        tx = kfax.scale_by_kfac(
            apply_fn, loss, example_inputs=inputs, centering=centering, damping=1e-3, **EXACT
        )
        out[centering], _ = one_direction(tx, params, inputs, grads)
    np.testing.assert_array_equal(
        out["simple"]["dense_0"]["kernel"], out["exact"]["dense_0"]["kernel"]
    )
    assert not np.allclose(out["simple"]["dense_0"]["bias"], out["exact"]["dense_0"]["bias"])


@pytest.mark.parametrize("centering", ["exact", "none"])
def test_one_step_of_linear_regression_lands_on_least_squares(x64, centering):
    key = jax.random.key(0)
    x = jax.random.normal(key, (20, 3)) + 5.0
    y = jax.random.normal(jax.random.fold_in(key, 1), (20, 2))
    params = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}

    def apply_fn(p, z):
        return z @ p["dense"]["kernel"] + p["dense"]["bias"]

    loss = kfax.losses.SquaredError()
    opt = optax.chain(
        kfax.scale_by_kfac(
            apply_fn, loss, example_inputs=x, damping=1e-20, centering=centering, **EXACT
        ),
        optax.scale(-1.0),
    )
    updates, _ = one_direction(opt, params, x, mean_loss_grad(apply_fn, loss, params, x, y))
    new = optax.apply_updates(params, updates)
    design = jnp.concatenate([x, jnp.ones((20, 1))], axis=1)
    solution = jnp.linalg.lstsq(design, y)[0]
    np.testing.assert_allclose(new["dense"]["kernel"], solution[:3], atol=1e-8)
    np.testing.assert_allclose(new["dense"]["bias"], solution[3], atol=1e-8)


def test_deep_linear_kfac_step_is_depth_times_the_exact_natural_gradient_in_function_space(x64):
    """Bernacchia et al. 2018: block-diagonal K-FAC moves the outputs L times the exact NG step."""
    depth = 3
    params, apply_fn, inputs, _ = models.deep_linear(width=3, depth=depth, batch=10)
    loss = kfax.losses.SquaredError()
    targets = jax.random.normal(jax.random.key(3), (10, 3))
    grads = mean_loss_grad(apply_fn, loss, params, inputs, targets)
    tx = kfax.scale_by_kfac(apply_fn, loss, example_inputs=inputs, damping=1e-24, **EXACT)
    direction, _ = one_direction(tx, params, inputs, grads)
    flat_grad, unravel = ravel_pytree(grads)
    jac = jax.jacfwd(lambda p: apply_fn(unravel(p), inputs).ravel())(ravel_pytree(params)[0])
    fisher = jac.T @ jac / 10  # squared error of variance 1: D = I
    natural = unravel(jnp.linalg.pinv(fisher, hermitian=True, rtol=1e-10) @ flat_grad)

    def output_change(step):
        return jax.jvp(lambda p: apply_fn(p, inputs), (params,), (step,))[1].ravel()

    kfac_move, ng_move = output_change(direction), output_change(natural)
    cosine = kfac_move @ ng_move / (jnp.linalg.norm(kfac_move) * jnp.linalg.norm(ng_move))
    np.testing.assert_allclose(cosine, 1.0, atol=1e-8)
    np.testing.assert_allclose(
        jnp.linalg.norm(kfac_move) / jnp.linalg.norm(ng_move), depth, rtol=1e-8
    )


def test_float32_centring_keeps_the_covariance_when_the_mean_dwarfs_the_spread(x64):
    """Inputs of mean 30 and spread 0.03: raw moments E[h h^T] - m m^T cancel in float32. The
    state's covariance and the update after one step and after 20 moving-average steps stay
    within 1e-2 of float64."""
    params, apply_fn, _, _ = models.mlp(sizes=(3, 4, 2), batch=64)
    loss = kfax.losses.SquaredError()
    keys = jax.random.split(jax.random.key(11), 20)
    xs = [30.0 + 0.03 * jax.random.normal(k, (64, 3)) for k in keys]
    ys = [jax.random.normal(jax.random.fold_in(k, 1), (64, 2)) for k in keys]

    def run(dtype, steps):
        p = jax.tree.map(lambda a: a.astype(dtype), params)
        tx = kfax.scale_by_kfac(
            apply_fn,
            loss,
            example_inputs=xs[0].astype(dtype),
            damping=1e-6,
            kind="exact",
            block="factored",
        )
        state = tx.init(p)
        for x, y in zip(xs[:steps], ys[:steps], strict=True):
            x, y = x.astype(dtype), y.astype(dtype)
            update, state = tx.update(mean_loss_grad(apply_fn, loss, p, x, y), state, p, inputs=x)
        return update["dense_0"]["kernel"], state.statistics["dense_0"].covariance

    for steps in (1, 20):
        update64, cov64 = run(jnp.float64, steps)
        update32, cov32 = run(jnp.float32, steps)
        cov_error = np.linalg.norm(cov32 - cov64) / np.linalg.norm(cov64)
        update_error = np.linalg.norm(update32 - update64) / np.linalg.norm(update64)
        assert cov_error < 1e-2, (steps, cov_error)
        assert update_error < 1e-2, (steps, update_error)


def test_bfloat16_params_keep_float32_statistics_and_bfloat16_updates():
    params, apply_fn, inputs, _ = models.mlp(sizes=(4, 5, 3))
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    inputs = inputs.astype(jnp.bfloat16)
    loss = kfax.losses.SoftmaxCrossEntropy()
    targets = jnp.arange(6) % 3
    grads = mean_loss_grad(apply_fn, loss, params, inputs, targets)
    tx = kfax.scale_by_kfac(apply_fn, loss, example_inputs=inputs)
    direction, state = one_direction(tx, params, inputs, grads)
    assert {d.dtype for d in jax.tree.leaves(direction)} == {jnp.dtype(jnp.bfloat16)}
    assert {m.dtype for m in jax.tree.leaves(state.statistics)} == {jnp.dtype(jnp.float32)}
    assert all(np.isfinite(np.asarray(d, np.float32)).all() for d in jax.tree.leaves(direction))


# -------------------------------------------------------------------------- statistics sub-batches


def test_stats_batch_size_cuts_only_the_batched_input_leaves(x64):
    """A lookup table and a (T, T) mask in the inputs are not batched: the statistics on the
    first 4 of 16 examples equal the factors of the model on those 4 examples, whole table and
    mask included; a PRNG key in the inputs passes through whole."""
    t, vocab, width = 5, 7, 3
    keys = jax.random.split(jax.random.key(2), 4)
    inputs = {
        "ids": jax.random.randint(keys[0], (16, t), 0, vocab),
        "table": jax.random.normal(keys[1], (vocab, width)),
        "mask": jnp.tril(jnp.ones((t, t))),
        "key": jax.random.key_data(keys[3]),
    }
    params = {"dense": {"kernel": jax.random.normal(keys[2], (width, 2)), "bias": jnp.zeros(2)}}

    def apply_fn(p, z):
        h = z["table"][z["ids"]]  # (N, T, width)
        h = jnp.einsum("qt,ntw->nqw", z["mask"], h)
        noise = 0.0 * jax.random.normal(jax.random.wrap_key_data(z["key"]), h.shape[-1:])
        return (h + noise) @ p["dense"]["kernel"] + p["dense"]["bias"]

    loss = kfax.losses.SquaredError()
    targets = jnp.zeros((16, t, 2))
    grads = mean_loss_grad(apply_fn, loss, params, inputs, targets)
    tx = kfax.scale_by_kfac(apply_fn, loss, example_inputs=inputs, stats_batch_size=4, **EXACT)
    _, state = one_direction(tx, params, inputs, grads)
    first = {**inputs, "ids": inputs["ids"][:4]}
    expected = kfax.kronecker_factors(apply_fn, loss, kind="exact")(params, first)["dense"]
    stats = state.statistics["dense"]
    np.testing.assert_allclose(stats.covariance, expected.a, atol=1e-12)
    np.testing.assert_allclose(stats.output, expected.b, atol=1e-12)


def test_batch_axes_marks_which_input_leaves_are_batched(x64):
    """A non-batched leaf whose leading axis happens to equal the batch size is left whole when
    batch_axes says so."""
    params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    x = jax.random.normal(jax.random.key(0), (8, 3))
    scale = jnp.linspace(1.0, 2.0, 8)[:, None] * jnp.ones((8, 3))  # (8, 3): not batched

    def apply_fn(p, z):
        h = z["x"] * jnp.mean(z["scale"], axis=0)
        return h @ p["dense"]["kernel"] + p["dense"]["bias"]

    inputs = {"x": x, "scale": scale}
    loss = kfax.losses.SquaredError()
    grads = mean_loss_grad(apply_fn, loss, params, inputs, jnp.zeros((8, 2)))
    tx = kfax.scale_by_kfac(
        apply_fn,
        loss,
        example_inputs=inputs,
        stats_batch_size=4,
        batch_axes={"x": 0, "scale": None},
        **EXACT,
    )
    _, state = one_direction(tx, params, inputs, grads)
    h = x[:4] * jnp.mean(scale, axis=0)
    np.testing.assert_allclose(state.statistics["dense"].mean, h.mean(0), atol=1e-12)


@pytest.mark.parametrize(
    "model, options",
    [
        ("transformer", {"learning_rate": 0.1}),
        ("transformer", {"max_factor_size": 8}),  # one-sided blocks, adaptive  # one-sided blocks
        ("transformer", {"learning_rate": 0.1, "block": {"*Dense*": "diagonal"}}),
        ("transformer", {"learning_rate": 0.1, "block": {"*Dense*": "ekfac"}}),
        ("stacked", {"block": "eigen"}),
    ],
)
def test_every_state_leaf_is_its_own_buffer_so_the_state_can_be_donated(model, options):
    """``jax.jit(step, donate_argnums=...)`` fails ("donate the same buffer twice") on a state
    whose leaves share a buffer; users donate states to halve their memory."""
    if model == "transformer":
        params, apply_fn, x = models.transformer_lm(depth=1)
        loss, y = kfax.losses.SoftmaxCrossEntropy(), x
    else:
        params, apply_fn, *_, x = models.stacked_tanh()
        loss = kfax.losses.SquaredError()
        y = jnp.zeros_like(apply_fn(params, x))
    options = {"learning_rate": None, **options}
    opt = kfax.kfac(options.pop("learning_rate"), apply_fn, loss, example_inputs=x, **options)
    state = opt.init(params)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    owners: dict[int, list[str]] = {}
    for path, leaf in leaves:
        owners.setdefault(leaf.unsafe_buffer_pointer(), []).append(jax.tree_util.keystr(path))
    assert [paths for paths in owners.values() if len(paths) > 1] == []
    if model != "stacked":
        return  # distinct buffers are what donation needs; one (cheap) donated step below

    def step(p, s):
        g = jax.grad(lambda q: loss(apply_fn(q, x), y))(p)
        u, s = opt.update(g, s, p, inputs=x, targets=y)
        return optax.apply_updates(p, u), s

    p, s = jax.jit(step, donate_argnums=(0, 1))(params, state)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves((p, s)))


def test_an_injected_hyperparameter_state_can_be_donated_through_multisteps():
    """optax.inject_hyperparams keeps the damping it passes to kfac in its own state: kfax's
    state must hold a copy, or donating the whole state frees one buffer twice."""
    params, apply_fn, x, _ = models.mlp()
    loss = kfax.losses.SoftmaxCrossEntropy()
    y = jnp.arange(x.shape[0]) % 3
    static = ("apply_fn", "loss", "example_inputs")
    opt = optax.MultiSteps(
        optax.inject_hyperparams(kfax.kfac, static_args=static)(
            learning_rate=0.1, apply_fn=apply_fn, loss=loss, example_inputs=x
        ),
        every_k_schedule=2,
    )
    state = opt.init(params)
    pointers = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(state)]
    assert len(set(pointers)) == len(pointers)

    def step(p, s):
        g = jax.grad(lambda q: loss(apply_fn(q, x), y))(p)
        u, s = opt.update(g, s, p, inputs=x, targets=y)
        return optax.apply_updates(p, u), s

    p, s = jax.jit(step, donate_argnums=(0, 1))(params, state)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(p))
