"""The quadratic-model step and Levenberg-Marquardt damping (kfax.quadratic_model_step, kfac(None)).

References are dense float64 computations in this file: the Gauss-Newton matrix from
``jax.jacfwd`` of the model, losses written out by hand.
"""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import kfax
from tests import models

EXACT = dict(kind="exact", ema_decay=0.0, inverse_every=1)


def linear_problem(batch=16, key=1):
    params, apply_fn, inputs, _ = models.mlp(sizes=(3, 2), batch=batch)
    targets = jax.random.normal(jax.random.key(key), (batch, 2))
    return params, apply_fn, inputs, targets


def gauss_newton(apply_fn, params, inputs, variance=1.0):
    flat, unravel = ravel_pytree(params)
    jac = jax.jacfwd(lambda p: apply_fn(unravel(p), inputs).ravel())(flat)
    batch = apply_fn(params, inputs).shape[0]
    return jac.T @ jac / (variance * batch)


def test_step_size_and_momentum_solve_the_two_by_two_quadratic_model(x64):
    """At d = alpha Delta + mu d_prev, grad q(d) of the damped model is orthogonal to Delta and
    d_prev, and the predicted change is the undamped model's g.d + d^T G d / 2 (linear model
    and squared error: the Gauss-Newton matrix G is exact)."""
    params, apply_fn, inputs, targets = linear_problem()
    loss = kfax.losses.SquaredError()
    lam = 0.05
    opt = kfax.kfac(
        None, apply_fn, loss, example_inputs=inputs, damping=lam, adaptive_damping=False, **EXACT
    )
    state = opt.init(params)
    for step in range(3):
        grads = jax.grad(lambda p: loss(apply_fn(p, inputs), targets))(params)
        previous = state.previous_update
        updates, state = opt.update(grads, state, params, inputs=inputs, targets=targets)
        info = state.info
        g, d, prev = (ravel_pytree(t)[0] for t in (grads, updates, previous))
        gn = gauss_newton(apply_fn, params, inputs)
        residual = g + (gn + lam * jnp.eye(g.size)) @ d
        delta = (d - info.momentum * prev) / info.step_size
        np.testing.assert_allclose(delta @ residual, 0.0, atol=1e-10)
        if step == 0:
            assert float(info.momentum) == 0.0
        else:
            np.testing.assert_allclose(prev @ residual, 0.0, atol=1e-10)
            assert abs(float(info.momentum)) > 1e-6
        np.testing.assert_allclose(info.predicted_change, g @ d + 0.5 * d @ gn @ d, rtol=1e-9)
        params = optax.apply_updates(params, updates)


@pytest.mark.parametrize(
    ("stats_batch_size", "model_batch_size"), [(None, None), (8, None), (4, None), (4, 6)]
)
def test_reduction_ratio_is_one_on_an_exactly_quadratic_objective(
    x64, stats_batch_size, model_batch_size
):
    """Linear model, squared error: the loss is its own quadratic model, so rho = 1 whatever
    the statistics sub-batch (issue: -0.50 and -0.60 with 8 and 4 of 16 examples) and on the
    model's own sub-batch."""
    params, apply_fn, inputs, targets = linear_problem()
    loss = kfax.losses.SquaredError()
    opt = kfax.kfac(
        None,
        apply_fn,
        loss,
        example_inputs=inputs,
        damping=1e-3,
        kind="exact",
        stats_batch_size=stats_batch_size,
        model_batch_size=model_batch_size,
        damping_every=1,
    )
    state = opt.init(params)
    for step in range(3):
        grads = jax.grad(lambda p: loss(apply_fn(p, inputs), targets))(params)
        updates, state = opt.update(grads, state, params, inputs=inputs, targets=targets)
        assert int(state.info.ratio_step) == step
        np.testing.assert_allclose(state.info.reduction_ratio, 1.0, rtol=1e-8)
        params = optax.apply_updates(params, updates)
    assert float(state.damping) < 1e-3  # rho > 3/4 lowers the damping


def _train(apply_fn, loss, params, inputs, targets, steps, **options):
    """``(params, state)`` after ``steps`` steps of ``kfax.kfac(None, **options)`` on one batch."""
    opt = kfax.kfac(None, apply_fn, loss, example_inputs=inputs, **options)
    p, state = params, opt.init(params)
    for _ in range(steps):
        grads = jax.grad(lambda q: loss(apply_fn(q, inputs), targets))(p)
        updates, state = opt.update(grads, state, p, inputs=inputs, targets=targets)
        p = optax.apply_updates(p, updates)
    return p, state


def test_a_model_sub_batch_solves_the_quadratic_model_of_the_last_examples(x64):
    """With model_batch_size=n, Delta still comes from the whole batch, but alpha and mu solve
    the damped model of the loss on the last n examples: its residual g_n + (G_n + lam) d is
    orthogonal to Delta and d_prev, and the predicted change is that model's (linear model,
    squared error: G_n from jax.jacfwd is exact)."""
    params, apply_fn, inputs, targets = linear_problem()
    loss = kfax.losses.SquaredError()
    lam, n = 0.05, 5
    opt = kfax.kfac(
        None,
        apply_fn,
        loss,
        example_inputs=inputs,
        damping=lam,
        adaptive_damping=False,
        model_batch_size=n,
        **EXACT,
    )
    whole = kfax.kfac(
        None, apply_fn, loss, example_inputs=inputs, damping=lam, adaptive_damping=False, **EXACT
    )
    state, whole_state = opt.init(params), whole.init(params)
    for step in range(3):
        grads = jax.grad(lambda p: loss(apply_fn(p, inputs), targets))(params)
        sub_grads = jax.grad(lambda p: loss(apply_fn(p, inputs[-n:]), targets[-n:]))(params)
        previous = state.previous_update
        updates, state = opt.update(grads, state, params, inputs=inputs, targets=targets)
        # The direction is the whole batch's: the preconditioner's states agree.
        _, whole_state = whole.update(
            grads,
            whole_state._replace(previous_update=previous),
            params,
            inputs=inputs,
            targets=targets,
        )
        chex.assert_trees_all_close(state.inner, whole_state.inner, rtol=1e-12)
        info = state.info
        g, d, prev = (ravel_pytree(t)[0] for t in (sub_grads, updates, previous))
        gn = gauss_newton(apply_fn, params, inputs[-n:])
        residual = g + (gn + lam * jnp.eye(g.size)) @ d
        delta = (d - info.momentum * prev) / info.step_size
        np.testing.assert_allclose(delta @ residual, 0.0, atol=1e-10)
        if step > 0:
            np.testing.assert_allclose(prev @ residual, 0.0, atol=1e-10)
            assert abs(float(info.momentum)) > 1e-6
        np.testing.assert_allclose(info.predicted_change, g @ d + 0.5 * d @ gn @ d, rtol=1e-9)
        params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("model_batch_size", [16, 40])
def test_a_model_sub_batch_as_large_as_the_batch_is_the_whole_batch(model_batch_size):
    """model_batch_size >= the batch: the same steps and state as the default, bit for bit."""
    params, apply_fn, inputs, targets = linear_problem()
    loss = kfax.losses.SquaredError()
    runs = [
        _train(apply_fn, loss, params, inputs, targets, 3, model_batch_size=size)
        for size in (None, model_batch_size)
    ]
    chex.assert_trees_all_equal(runs[0], runs[1])


def test_a_model_sub_batch_cuts_only_the_batched_input_leaves(x64):
    """batch_axes says which input leaves the model's sub-batch cuts: a lookup table passed
    with the inputs stays whole, and the step equals one on the last examples' inputs."""
    params, apply_fn, inputs, targets = linear_problem()
    loss = kfax.losses.SquaredError()
    table = jnp.linspace(0.5, 1.5, 16)  # leading axis 16, like the batch: not batched
    scaled = lambda p, x: apply_fn(p, x["x"] * jnp.mean(x["table"]))  # noqa: E731
    both = {"x": inputs, "table": table}
    opt = kfax.kfac(
        None,
        scaled,
        loss,
        example_inputs=both,
        model_batch_size=4,
        batch_axes={"x": 0, "table": None},
        adaptive_damping=False,
        **EXACT,
    )
    state = opt.init(params)
    grads = jax.grad(lambda p: loss(scaled(p, both), targets))(params)
    updates, state = opt.update(grads, state, params, inputs=both, targets=targets)
    sub = {"x": inputs[-4:], "table": table}
    g = ravel_pytree(jax.grad(lambda p: loss(scaled(p, sub), targets[-4:]))(params))[0]
    gn = gauss_newton(scaled, params, sub)
    d = ravel_pytree(updates)[0]
    np.testing.assert_allclose(state.info.predicted_change, g @ d + 0.5 * d @ gn @ d, rtol=1e-9)


@pytest.mark.parametrize(
    ("batch", "model_batch_size"), [(32, False), (64, 32)], ids=["whole-batch", "model-on-32"]
)
def test_a_gradient_of_another_scale_gives_the_same_steps_and_is_reported(batch, model_batch_size):
    """Fed the gradient of the *sum* over the batch (32x the mean's), the adaptive mode takes
    the steps of the mean's gradient (its quadratic model uses kfax's own loss), reports the
    factor in StepInfo.gradient_scale, and warns (issue: it diverged, 1.5 -> 181). With the model
    on 32 of 64 examples the scale is a sub-batch estimate: the warning is for the first step's
    scale outside [1/2, 2], which the mean's gradient stays inside and the 32x one does not."""
    params, apply_fn, inputs, _ = models.mlp(sizes=(4, 8, 3), batch=batch)
    targets = jnp.arange(batch) % 3
    loss = kfax.losses.SoftmaxCrossEntropy()
    runs = {}
    for factor in (1.0, 32.0):
        opt = kfax.kfac(
            None, apply_fn, loss, example_inputs=inputs, model_batch_size=model_batch_size
        )
        p, state = params, opt.init(params)
        step = jax.jit(
            lambda p, s, f=factor, o=opt: _scaled_step(o, loss, apply_fn, p, s, inputs, targets, f)
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(8):
                p, state = step(p, state)
            jax.effects_barrier()
        runs[factor] = (p, state, caught)
    (p1, s1, w1), (p32, s32, w32) = runs[1.0], runs[32.0]
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p32), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)
    if model_batch_size is False:
        np.testing.assert_allclose(s32.info.gradient_scale, 32.0, rtol=1e-3)
        np.testing.assert_allclose(s1.info.gradient_scale, 1.0, rtol=1e-3)
    else:
        np.testing.assert_allclose(s32.info.gradient_scale / s1.info.gradient_scale, 32.0, 1e-2)
    assert any("not the gradient of kfax's" in str(w.message) for w in w32)
    assert not any("not the gradient of kfax's" in str(w.message) for w in w1)
    if model_batch_size is False:  # the case: training is not derailed by the scale
        assert float(loss(apply_fn(p32, inputs), targets)) < 0.5 * float(
            loss(apply_fn(params, inputs), targets)
        )


def _scaled_step(opt, loss, apply_fn, params, state, inputs, targets, factor, where=None):
    grads = jax.grad(lambda p: loss(apply_fn(p, inputs), targets, where))(params)
    grads = jax.tree.map(lambda g: factor * g, grads)
    updates, state = opt.update(grads, state, params, inputs=inputs, targets=targets, where=where)
    return optax.apply_updates(params, updates), state


def _masked_steps(opt, loss, apply_fn, params, inputs, targets, where, steps, factor=1.0):
    """``steps`` jitted updates on one batch with its mask; the gradient is ``factor`` times
    that of the masked mean loss. Returns the StepInfos and the warnings given."""
    step = jax.jit(
        lambda p, s: _scaled_step(opt, loss, apply_fn, p, s, inputs, targets, factor, where)
    )
    p, state, infos = params, opt.init(params), []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            p, state = step(p, state)
            infos.append(state.info)
        jax.effects_barrier()
    return infos, [str(w.message) for w in caught]


def test_a_model_sub_batch_where_nothing_counts_takes_the_whole_batch(x64):
    """Padding at the batch's end: where the last 8 of 16 examples are masked and the model takes
    the last 4, none of its positions counts, so each step's model and reduction ratio are the
    whole batch's (alpha, mu, predicted change, rho as with model_batch_size=False), not a zero
    step; with the last 12 examples, 4 counted ones among them, the sub-batch is kept."""
    params, apply_fn, inputs, targets = linear_problem()
    loss = kfax.losses.SquaredError()
    where = jnp.arange(16) < 8

    def train(size):
        opt = kfax.kfac(None, apply_fn, loss, example_inputs=inputs, model_batch_size=size)
        return _masked_steps(opt, loss, apply_fn, params, inputs, targets, where, steps=3)[0]

    padded, whole, partial = train(4), train(False), train(12)
    for step, (a, b) in enumerate(zip(padded, whole, strict=True)):
        for name in ("step_size", "momentum", "predicted_change", "reduction_ratio", "damping"):
            np.testing.assert_allclose(
                getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-15, err_msg=f"{step} {name}"
            )
    assert float(padded[0].step_size) > 0 and float(padded[0].reduction_ratio) > 0
    assert abs(float(partial[0].predicted_change) - float(whole[0].predicted_change)) > 1e-6


def test_kfac_adaptive_evaluates_its_model_on_at_most_256_examples_by_default():
    """kfac(None) is kfac(None, model_batch_size=256): on a batch of 300 its steps are those of
    the model on the last 256 examples, and model_batch_size=False (a NumPy or 0-d JAX False
    too) is the whole batch's."""
    params, apply_fn, inputs, targets = linear_problem(batch=300)
    loss = kfax.losses.SquaredError()
    sizes = {"default": None, "256": 256, "False": False}
    sizes |= {"np.False_": np.False_, "jnp False": jnp.asarray(False)}
    results = {
        name: _train(apply_fn, loss, params, inputs, targets, 2, model_batch_size=size)[1].info
        for name, size in sizes.items()
    }
    chex.assert_trees_all_equal(results["default"], results["256"])
    assert float(results["default"].predicted_change) != float(results["False"].predicted_change)
    chex.assert_trees_all_equal(results["np.False_"], results["False"])
    chex.assert_trees_all_equal(results["jnp False"], results["False"])


def test_the_default_model_sub_batch_keeps_the_whole_batch_check_on_small_batches():
    """On a batch of 32 the default model (at most 256 examples) is the whole batch's, so a
    gradient 1.5x kfax's warns as with model_batch_size=False."""
    params, apply_fn, inputs, _ = models.mlp(sizes=(4, 8, 3), batch=32)
    targets = jnp.arange(32) % 3
    loss = kfax.losses.SoftmaxCrossEntropy()
    opt = kfax.kfac(None, apply_fn, loss, example_inputs=inputs)
    state = opt.init(params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _scaled_step(opt, loss, apply_fn, params, state, inputs, targets, 1.5)
        jax.effects_barrier()
    assert any("differs by a factor 1.5" in str(w.message) for w in caught)


def _flattening_model(batch):
    """Inputs (N, 40, 3), outputs (N * 40, 4): positions flattened into the outputs' rows."""
    params, apply_fn, _, _ = models.mlp(sizes=(3, 4), batch=1)
    inputs = jax.random.normal(jax.random.key(3), (batch, 40, 3))
    flat = lambda p, x: apply_fn(p, x.reshape(-1, x.shape[-1]))  # noqa: E731
    targets = jnp.arange(batch * 40) % 4
    return params, flat, inputs, targets


def test_kfac_default_model_takes_the_whole_batch_when_outputs_flatten_positions():
    """Outputs of 320 rows from 8 examples: the last 256 rows are not a cut of the inputs, so
    kfac(None)'s default model uses the whole batch (the steps of model_batch_size=False), and
    an explicit model_batch_size=256 is an error naming it."""
    params, flat, inputs, targets = _flattening_model(8)
    loss = kfax.losses.SoftmaxCrossEntropy()
    results = []
    for size in (None, False):
        opt = kfax.kfac(None, flat, loss, example_inputs=inputs, model_batch_size=size)
        state = opt.init(params)
        grads = jax.grad(lambda p: loss(flat(p, inputs), targets))(params)
        results.append(opt.update(grads, state, params, inputs=inputs, targets=targets))
    chex.assert_trees_all_equal(results[0], results[1])
    opt = kfax.kfac(None, flat, loss, example_inputs=inputs, model_batch_size=256)
    with pytest.raises(ValueError, match="model_batch_size=256"):
        opt.update(grads, opt.init(params), params, inputs=inputs, targets=targets)


def test_one_non_finite_batch_leaves_every_part_of_the_state_finite():
    """Statistics of a NaN batch are skipped and counted; the step it produced is not stored;
    once the user drops that step, training continues with finite updates (issue: every later
    update was NaN)."""
    params, apply_fn, inputs, _ = models.mlp(sizes=(4, 8, 3), batch=16)
    targets = jnp.arange(16) % 3
    loss = kfax.losses.SoftmaxCrossEntropy()
    opt = kfax.kfac(None, apply_fn, loss, example_inputs=inputs)

    @jax.jit
    def step(p, s, x):
        grads = jax.grad(lambda q: loss(apply_fn(q, x), targets))(p)
        updates, s = opt.update(grads, s, p, inputs=x, targets=targets)
        return updates, s

    state = opt.init(params)
    every = kfax.alias.DEFAULT_STATS_EVERY["adaptive"]
    for _ in range(every):  # the bad batch comes on kfac(None)'s second statistics step
        updates, state = step(params, state, inputs)
        params = optax.apply_updates(params, updates)
    bad, state = step(params, state, inputs.at[0, 0].set(jnp.nan))
    assert not all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(bad))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state))
    assert int(state.info.skipped_steps) == 1
    assert all(int(h.skipped) == 1 for h in state.inner.health.values())
    for _ in range(3):  # the bad update was thrown away: params unchanged by it
        updates, state = step(params, state, inputs)
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
        params = optax.apply_updates(params, updates)


def test_step_info_has_documented_values_before_anything_is_measured():
    params, apply_fn, inputs, targets = linear_problem()
    opt = kfax.kfac(None, apply_fn, kfax.losses.SquaredError(), example_inputs=inputs, damping=0.5)
    info = opt.init(params).info
    assert float(info.reduction_ratio) == 1.0 and int(info.ratio_step) == -1
    assert float(info.step_size) == 0.0 and float(info.momentum) == 0.0
    assert float(info.damping) == 0.5 and int(info.skipped_steps) == 0
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(info))


def test_damping_moves_only_on_measurement_steps_by_the_levenberg_marquardt_factor(x64):
    params, apply_fn, inputs, targets = linear_problem()
    loss = kfax.losses.SquaredError()
    opt = kfax.kfac(
        None, apply_fn, loss, example_inputs=inputs, damping=1e-2, damping_every=3, **EXACT
    )
    state = opt.init(params)
    lam = 1e-2
    for step in range(7):
        grads = jax.grad(lambda p: loss(apply_fn(p, inputs), targets))(params)
        updates, state = opt.update(grads, state, params, inputs=inputs, targets=targets)
        if step % 3 == 0:
            assert int(state.info.ratio_step) == step
            rho = float(state.info.reduction_ratio)
            factor = (19 / 20) ** 3
            lam = lam * factor if rho > 0.75 else lam / factor if rho < 0.25 else lam
        np.testing.assert_allclose(state.damping, lam, rtol=1e-12)
        params = optax.apply_updates(params, updates)


def test_under_vmap_only_the_replicas_with_another_gradient_scale_warn():
    """jax.vmap turns the lax.cond around the warning into a select, which runs the callback
    for every replica: the callback itself checks the condition. Replica 0 gets the mean
    loss's gradient, replica 1 the sum's (32x): one warning, naming 32."""
    params, apply_fn, inputs, _ = models.mlp(sizes=(4, 8, 3), batch=32)
    targets = jnp.arange(32) % 3
    loss = kfax.losses.SoftmaxCrossEntropy()
    opt = kfax.kfac(None, apply_fn, loss, example_inputs=inputs)

    def step(p, s, factor):
        return _scaled_step(opt, loss, apply_fn, p, s, inputs, targets, factor)

    pair = lambda t: jax.tree.map(lambda a: jnp.stack([a, a]), t)  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jax.block_until_ready(
            jax.jit(jax.vmap(step))(pair(params), pair(opt.init(params)), jnp.array([1.0, 32.0]))
        )
        jax.effects_barrier()
    scale = [str(w.message) for w in caught if "not the gradient of kfax's" in str(w.message)]
    assert len(scale) == 1 and "factor 32" in scale[0], scale


def test_float32_parameters_with_float64_outputs_under_x64_take_adaptive_steps(x64):
    """A model whose outputs are promoted to float64 (a float64 constant in its forward pass,
    as nnx's BatchNorm gives under jax_enable_x64) while its parameters and kfac's state are
    float32: the reduction ratio is float64 and the state's float32; every step of the
    damping cadence (measured or not) keeps the state's dtypes and moves the parameters."""
    params = {"w": jnp.ones((3, 2), jnp.float32) / 3}
    x = jnp.linspace(-1.0, 1.0, 24, dtype=jnp.float32).reshape(8, 3)
    y = jnp.arange(8) % 2

    def apply_fn(p, inputs):
        return inputs @ p["w"] + jnp.asarray(0.5, jnp.float64)

    loss = kfax.losses.SoftmaxCrossEntropy()
    opt = kfax.kfac(None, apply_fn, loss, example_inputs=x, damping_every=2)
    state = opt.init(params)
    dtypes = jax.tree.map(lambda a: a.dtype, state)
    p = params
    for _ in range(3):
        grads = jax.grad(lambda q: loss(apply_fn(q, x), y))(p)
        updates, state = jax.jit(opt.update)(grads, state, p, inputs=x, targets=y)
        assert jax.tree.map(lambda a: a.dtype, state) == dtypes
        assert updates["w"].dtype == jnp.float32 and bool(jnp.any(updates["w"] != 0))
        p = optax.apply_updates(p, updates)
    assert state.info.reduction_ratio.dtype == jnp.float32
    assert np.isfinite(float(state.info.reduction_ratio)) and int(state.info.ratio_step) == 2


@pytest.mark.parametrize("model_batch_size", [4, False])
def test_a_batch_where_nothing_counts_measures_nothing_and_leaves_the_damping(model_batch_size):
    """Every position masked: the model predicts no change, so no reduction ratio is measured
    (ratio_step stays -1) and the Levenberg-Marquardt damping stays at its initial value on
    every damping step, instead of rising by (20/19)^k on a ratio of 0 / -tiny."""
    params, apply_fn, inputs, _ = models.mlp(sizes=(4, 8, 3), batch=16)
    targets = jnp.arange(16) % 3
    loss = kfax.losses.SoftmaxCrossEntropy()
    opt = kfax.kfac(
        None,
        apply_fn,
        loss,
        example_inputs=inputs,
        damping=1e-2,
        damping_every=1,
        model_batch_size=model_batch_size,
    )
    where = jnp.zeros(16, bool)
    infos, _ = _masked_steps(opt, loss, apply_fn, params, inputs, targets, where, steps=4)
    for info in infos:
        assert float(info.damping) == pytest.approx(1e-2, rel=1e-6)
        assert int(info.ratio_step) == -1
        assert float(info.step_size) == 0.0 and float(info.predicted_change) == 0.0


def test_a_step_that_falls_back_to_the_whole_batch_checks_the_gradient_by_the_whole_batch_rule():
    """With the model on the last 32 of 64 examples, a gradient 1.5x kfax's loss is inside the
    sub-batch band [1/2, 2] and gives no warning; where those 32 are padding, the step falls
    back to the whole batch, whose rule (beyond 10% of 1, on any step) warns, as with
    model_batch_size=False, and StepInfo.gradient_scale is the whole batch's 1.5."""
    params, apply_fn, inputs, _ = models.mlp(sizes=(4, 8, 3), batch=64)
    targets = jnp.arange(64) % 3
    loss = kfax.losses.SoftmaxCrossEntropy()
    message = "not the gradient of kfax's"
    runs = {}
    for name, size, where in [
        ("sub-batch", 32, jnp.ones(64, bool)),
        ("padded", 32, jnp.arange(64) < 32),
        ("whole", False, jnp.arange(64) < 32),
    ]:
        opt = kfax.kfac(None, apply_fn, loss, example_inputs=inputs, model_batch_size=size)
        runs[name] = _masked_steps(
            opt, loss, apply_fn, params, inputs, targets, where, steps=2, factor=1.5
        )
    assert not any(message in w for w in runs["sub-batch"][1])
    for name in ("padded", "whole"):
        infos, caught = runs[name]
        assert sum(message in w for w in caught) == 2, name
        for info in infos:
            np.testing.assert_allclose(info.gradient_scale, 1.5, rtol=1e-4)
