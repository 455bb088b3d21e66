"""Conformance of kfax's optax transforms with JAX and optax conventions.

The transform must behave as an ordinary optax ``GradientTransformationExtraArgs`` whatever its
options: be pure (``jit`` and ``lax.scan`` give the un-jitted result), keep a fixed state
structure, pass extra arguments through optax's combinators, keep dtypes, survive non-finite
batches, and reject bad arguments with a ``ValueError`` that names the argument.

The option sets (``CONFIGS``) cover every value of every option that changes the state or the
program (each set compiles its own programs, so orthogonal options share a set). The un-jitted
reference runs op by op under ``jax.disable_jit()``: the strictest "no jit", and for these tiny
models much cheaper than eager dispatch, which compiles every ``lax.cond`` anew.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfax
from tests import models

LOSS = kfax.losses.SoftmaxCrossEntropy()
LEARNING_RATE = 0.1
# Damping keeps every damped factor well conditioned (condition number ~10), so that agreement
# to RTOL is a statement about purity rather than about the conditioning of a tiny problem.
DAMPING = 0.1
STEPS = 4  # with stats_every=2, inverse_every=3: statistics at 0, 2; inverses at 0, 3
BATCH = 8
CLASSES = 3
EPS = float(jnp.finfo(jnp.float32).eps)
RTOL = 100 * EPS  # ~1.2e-5: a hundred float32 roundings.


@dataclasses.dataclass(frozen=True)
class Config:
    """One option set. ``adaptive`` means ``kfac(None, ...)``; ``extra_scalar`` adds a
    parameter outside any layer (an output temperature)."""

    name: str
    options: dict = dataclasses.field(default_factory=dict)
    adaptive: bool = False
    extra_scalar: bool = False

    def optimizer(self, problem: Problem) -> optax.GradientTransformation:
        """``kfax.kfac`` (the learning-rate alias, or the adaptive mode)."""
        learning_rate = None if self.adaptive else LEARNING_RATE
        return kfax.kfac(
            learning_rate,
            problem.apply_fn,
            LOSS,
            example_inputs=problem.xs[0],
            damping=DAMPING,
            **self.options,
        )

    def transform(self, problem: Problem) -> optax.GradientTransformation:
        """The bare ``scale_by_kfac`` with this option set (adaptive: as ``kfac(None)`` sets it)."""
        options = dict(self.options)
        if self.adaptive:
            options.update(adaptive=True, adaptive_damping=True)
        return kfax.scale_by_kfac(
            problem.apply_fn, LOSS, example_inputs=problem.xs[0], damping=DAMPING, **options
        )


CONFIGS = [
    Config("default"),  # factored damping, kind="mc", centered, exact bias update
    Config(
        "eigen-empirical",
        # stats_batch_size >= every layer's d_in + 1: the factors' eigenvalues stay simple, so
        # the eigenbases in the state are unique (up to a sign LAPACK fixes) and comparable.
        {"damping_method": "eigen", "kind": "empirical", "stats_batch_size": 6},
    ),
    Config(
        "ekfac-exact-adam",
        {"eigen_correction": True, "kind": "exact", "bias_update": "simple", "unmatched": "adam"},
        extra_scalar=True,
    ),
    Config(
        "homogeneous-cadence",
        {"centered": False, "stats_every": 2, "inverse_every": 3, "samples": 2},
    ),
    Config("adaptive", adaptive=True),
]


def config_named(name: str) -> Config:
    return next(c for c in CONFIGS if c.name == name)


class Problem(NamedTuple):
    params: Any
    apply_fn: Any
    xs: jax.Array  # (STEPS, BATCH, d_in): one batch per step
    ys: jax.Array  # (STEPS, BATCH) integer labels

    def loss(self, params, x, y):
        return LOSS(self.apply_fn(params, x), y)

    def grads(self, params, step=0):
        return jax.grad(self.loss)(params, self.xs[step], self.ys[step])

    def astype(self, dtype) -> Problem:
        cast = lambda t: jax.tree_util.tree_map(lambda v: v.astype(dtype), t)  # noqa: E731
        return self._replace(params=cast(self.params), xs=cast(self.xs))


def make_problem(extra_scalar: bool = False) -> Problem:
    params, base_apply, _, _ = models.mlp(sizes=(4, 5, CLASSES), batch=BATCH)
    keys = jax.random.split(jax.random.key(7), 2)
    xs = jax.random.normal(keys[0], (STEPS, BATCH, 4))
    ys = jax.random.randint(keys[1], (STEPS, BATCH), 0, CLASSES)
    if not extra_scalar:
        return Problem(params, base_apply, xs, ys)

    def apply_fn(p, x):
        return base_apply(p, x) * p["temperature"]

    return Problem({**params, "temperature": jnp.full((), 1.3, jnp.float32)}, apply_fn, xs, ys)


def make_step(opt, problem, on_trace=None):
    """``(params, state, x, y) -> (params, state, updates)``: one optimiser step on the batch."""

    def step(params, state, x, y):
        if on_trace is not None:
            on_trace()
        grads = jax.grad(problem.loss)(params, x, y)
        updates, state = opt.update(grads, state, params, inputs=x, targets=y)
        return optax.apply_updates(params, updates), state, updates

    return step


def find_kfac_state(state) -> kfax.KFACState:
    """The one KFACState inside a (chain / wrapper) optimiser state."""
    is_kfac = lambda s: isinstance(s, kfax.KFACState)  # noqa: E731
    found = [s for s in jax.tree_util.tree_leaves(state, is_leaf=is_kfac) if is_kfac(s)]
    assert len(found) == 1, f"expected one KFACState, found {len(found)}"
    return found[0]


def signature(tree):
    """Tree structure and each leaf's (shape, dtype, weak_type): what jit caches on."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, [(jnp.shape(x), jnp.result_type(x), _weak(x)) for x in leaves]


def _weak(x) -> bool:
    return bool(getattr(x, "weak_type", False))


def _step_size_and_momentum_as_one_vector(tree):
    """StepInfo's step size and momentum solve one 2x2 system, so their rounding error is
    bounded relative to the solution's norm, not to each entry: compare them as one vector."""
    is_info = lambda n: isinstance(n, kfax.StepInfo)  # noqa: E731
    return jax.tree_util.tree_map(
        lambda n: (jnp.stack(n[:2]), *n[2:]) if is_info(n) else n, tree, is_leaf=is_info
    )


def assert_trees_close(actual, expected, rtol=RTOL):
    """Same structure, shapes and dtypes; integers equal; floats within ``rtol`` (relative to
    each leaf's largest magnitude where entries are near zero); NaN matches NaN."""
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    actual, expected = map(_step_size_and_momentum_as_one_vector, (actual, expected))
    for a, e in zip(
        jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected), strict=True
    ):
        a, e = np.asarray(a), np.asarray(e)
        assert (a.shape, a.dtype) == (e.shape, e.dtype)
        if not np.issubdtype(e.dtype, np.floating) and e.dtype != jnp.bfloat16:
            np.testing.assert_array_equal(a, e)
            continue
        finite = np.abs(e[np.isfinite(e)])
        scale = float(finite.max()) if finite.size else 0.0
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * scale)


def assert_trees_equal(actual, expected):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(
        jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def tree_vdot(a, b) -> float:
    return sum(
        float(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


# ---------------------------------------------------------------- shared runs per option set


class Run(NamedTuple):
    opt: Any
    init: Any
    step: Any  # the jitted step (compiled once per option set)
    traces: int  # how often the jitted step was traced over STEPS steps
    jitted: list  # [(params, state, updates)] after each jitted step


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: c.name)
def config(request) -> Config:
    return request.param


@pytest.fixture(scope="module")
def problem(config) -> Problem:
    return make_problem(config.extra_scalar)


def train(step, params, state, problem) -> list:
    """[(params, state, updates)] after each of STEPS steps, one batch per step."""
    out = []
    for i in range(STEPS):
        out.append(step(params, state, problem.xs[i], problem.ys[i]))
        params, state, _ = out[-1]
    return out


@pytest.fixture(scope="module")
def run(config, problem) -> Run:
    opt = config.optimizer(problem)
    init = opt.init(problem.params)
    counter = []
    step = jax.jit(make_step(opt, problem, on_trace=lambda: counter.append(1)))
    jitted = train(step, problem.params, init, problem)
    return Run(opt, init, step, len(counter), jitted)


@pytest.fixture(scope="module")
def unjitted(problem, run) -> list:
    """The same steps op by op: [(params, state, updates)] after each step."""
    with jax.disable_jit():
        return train(make_step(run.opt, problem), problem.params, run.init, problem)


# ---------------------------------------------------------------- purity: jit, scan, structure


def test_jitted_train_step_matches_unjitted_step_at_every_step(run, unjitted):
    for step, (jitted, plain) in enumerate(zip(run.jitted, unjitted, strict=True)):
        try:
            assert_trees_close(jitted, plain)
        except AssertionError as error:
            raise AssertionError(f"step {step + 1}: {error}") from error


def test_state_structure_shapes_and_dtypes_are_those_of_init_after_every_step(run):
    expected_treedef, expected_leaves = signature(run.init)
    for _, state, _ in run.jitted:
        treedef, leaves = signature(state)
        assert treedef == expected_treedef
        assert leaves == expected_leaves


def test_jitted_step_is_traced_once_over_all_steps(run):
    """A state whose structure, dtypes or weak types drift would retrace (recompile) each step."""
    assert run.traces == 1


def test_lax_scan_over_steps_equals_a_python_loop_of_steps(problem, run):
    step = make_step(run.opt, problem)

    def body(carry, batch):
        params, state, updates = step(*carry, *batch)
        return (params, state), updates

    (params, state), updates = jax.jit(jax.lax.scan, static_argnums=0)(
        body, (problem.params, run.init), (problem.xs, problem.ys)
    )
    assert_trees_close((params, state), run.jitted[-1][:2])
    for i, (_, _, expected) in enumerate(run.jitted):
        assert_trees_close(jax.tree_util.tree_map(operator.itemgetter(i), updates), expected)


# ---------------------------------------------------------------- non-finite statistics


def test_nonfinite_statistics_leave_the_factors_untouched_and_are_counted(config, problem, run):
    params, state, _ = run.jitted[1]  # after two finite steps; count 2 is a statistics step
    before = find_kfac_state(state)
    assert int(before.count) % config.options.get("stats_every", 1) == 0
    x = problem.xs[2].at[0, 0].set(jnp.inf)
    _, new_state, _ = run.step(params, state, x, problem.ys[2])
    after = find_kfac_state(new_state)
    assert_trees_equal(after.moments, before.moments)
    assert_trees_equal(after.moments_weight, before.moments_weight)
    assert_trees_equal(after.scalings, before.scalings)
    assert_trees_equal(after.scalings_weight, before.scalings_weight)
    assert int(after.nonfinite_count) == int(before.nonfinite_count) + 1
    assert int(after.count) == int(before.count) + 1


def test_finite_steps_count_no_nonfinite_statistics(run):
    for _, state, _ in run.jitted:
        assert int(find_kfac_state(state).nonfinite_count) == 0


# ---------------------------------------------------------------- dtypes, first step


def test_float32_params_give_float32_updates_and_float32_state(run):
    float32 = jnp.dtype(jnp.float32)
    for _, state, updates in run.jitted:
        assert {u.dtype for u in jax.tree_util.tree_leaves(updates)} == {float32}
        floating = {
            leaf.dtype
            for leaf in jax.tree_util.tree_leaves(state)
            if jnp.issubdtype(leaf.dtype, jnp.floating)
        }
        assert floating == {float32}


def test_first_step_is_preconditioned_and_deterministic(problem, run):
    _, state, updates = run.jitted[0]
    initial = find_kfac_state(run.init).curvature
    first = find_kfac_state(state).curvature
    for layer in initial:  # the first step already refreshed every layer's curvature
        for before, after in zip(
            jax.tree_util.tree_leaves(initial[layer]),
            jax.tree_util.tree_leaves(first[layer]),
            strict=True,
        ):
            assert not np.allclose(before, after), layer
    fresh = run.opt.init(problem.params)
    _, _, again = run.step(problem.params, fresh, problem.xs[0], problem.ys[0])
    assert_trees_equal(again, updates)
    grads = problem.grads(problem.params)
    inner = tree_vdot(updates, grads)
    cosine = -inner / np.sqrt(tree_vdot(updates, updates) * tree_vdot(grads, grads))
    assert inner < 0, "the first update is not a descent direction"
    assert cosine < 0.99, f"the first update is (nearly) parallel to the gradient: cos={cosine}"


def test_sampled_statistics_depend_on_the_seed_only():
    problem = make_problem()
    grads = problem.grads(problem.params)

    def output_factors(seed):
        tx = kfax.scale_by_kfac(problem.apply_fn, LOSS, example_inputs=problem.xs[0], seed=seed)
        with jax.disable_jit():
            _, state = tx.update(
                grads, tx.init(problem.params), problem.params, inputs=problem.xs[0]
            )
        return {name: m.output for name, m in state.moments.items()}

    seed0, seed0_again, seed1 = output_factors(0), output_factors(0), output_factors(1)
    assert_trees_equal(seed0, seed0_again)
    for name in seed0:
        assert not np.allclose(seed0[name], seed1[name]), name


# ---------------------------------------------------------------- optax combinators


def test_chain_with_clip_and_scale_passes_extra_args_to_kfac(config, problem):
    kfac_tx = config.transform(problem)
    clip = optax.clip_by_global_norm(1.0)
    chained = optax.chain(kfac_tx, clip, optax.scale(-0.1))
    grads = problem.grads(problem.params)
    x, y = problem.xs[0], problem.ys[0]
    with jax.disable_jit():
        updates, state = chained.update(
            grads, chained.init(problem.params), problem.params, inputs=x, targets=y
        )
        direction, kfac_state = kfac_tx.update(
            grads, kfac_tx.init(problem.params), problem.params, inputs=x, targets=y
        )
        clipped, _ = clip.update(direction, clip.init(direction))
    assert_trees_equal(updates, jax.tree_util.tree_map(lambda c: -0.1 * c, clipped))
    assert_trees_equal(state[0], kfac_state)
    assert int(state[0].count) == 1


# The wrappers below see the transform only through its state pytree (whose stability every
# option set checks above) and the extra arguments. Each compiles new programs, so they run on
# the fixed-rate alias (a chain with momentum) and on the adaptive mode (previous update, step
# info, adaptive damping, a chain with scale(-1)), which fails without both inputs and targets.
WRAPPED = [config_named(name) for name in ("default", "adaptive")]


@pytest.mark.parametrize("config", WRAPPED, ids=lambda c: c.name)
def test_multisteps_accumulates_two_gradients_then_applies_kfac_with_the_last_extra_args(config):
    problem = make_problem(config.extra_scalar)
    opt = config.optimizer(problem)
    multi = optax.MultiSteps(opt, every_k_schedule=2)
    params = problem.params
    g0, g1 = problem.grads(params, 0), problem.grads(params, 1)

    @jax.jit
    def micro_step(grads, state, x, y):
        return multi.update(grads, state, params, inputs=x, targets=y)

    state0 = multi.init(params)
    updates0, state1 = micro_step(g0, state0, problem.xs[0], problem.ys[0])
    assert all(bool(jnp.all(u == 0)) for u in jax.tree_util.tree_leaves(updates0))
    assert_trees_equal(state1.inner_opt_state, state0.inner_opt_state)

    updates1, state2 = micro_step(g1, state1, problem.xs[1], problem.ys[1])
    mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, g0, g1)
    with jax.disable_jit():  # one K-FAC step on the mean gradient and the *last* batch
        expected, expected_state = opt.update(
            mean, opt.init(params), params, inputs=problem.xs[1], targets=problem.ys[1]
        )
    assert_trees_close(updates1, expected)
    assert_trees_close(state2.inner_opt_state, expected_state)
    assert int(find_kfac_state(state2).count) == 1


def test_apply_if_finite_skips_a_nan_gradient_leaving_params_and_inner_state_untouched():
    config = config_named("adaptive")  # needs inputs= and targets= to pass through
    problem = make_problem(config.extra_scalar)
    guarded = optax.apply_if_finite(config.optimizer(problem), max_consecutive_errors=3)
    x, y = problem.xs[1], problem.ys[1]

    @jax.jit
    def guarded_step(params, state, grads):
        updates, state = guarded.update(grads, state, params, inputs=x, targets=y)
        return optax.apply_updates(params, updates), state

    grads = problem.grads(problem.params)
    params, state = guarded_step(problem.params, guarded.init(problem.params), grads)
    assert int(state.notfinite_count) == 0
    assert int(find_kfac_state(state).count) == 1
    nan_grads = jax.tree_util.tree_map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
    new_params, new_state = guarded_step(params, state, nan_grads)
    assert_trees_equal(new_params, params)
    assert_trees_equal(new_state.inner_state, state.inner_state)
    assert int(new_state.notfinite_count) == 1
    assert int(new_state.total_notfinite) == 1


@pytest.mark.parametrize(
    "config", [config_named(n) for n in ("default", "adaptive")], ids=lambda c: c.name
)
def test_bfloat16_params_give_bfloat16_updates_and_float32_factors(config):
    low = make_problem(config.extra_scalar).astype(jnp.bfloat16)
    opt = config.optimizer(low)
    step = jax.jit(make_step(opt, low))
    params, state = low.params, opt.init(low.params)
    for i in range(2):
        before = params
        params, state, updates = step(params, state, low.xs[i], low.ys[i])
    assert {u.dtype for u in jax.tree_util.tree_leaves(updates)} == {jnp.dtype(jnp.bfloat16)}
    assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree_util.tree_leaves(updates))
    wide = jax.tree_util.tree_map(lambda v: v.astype(jnp.float32), before)
    assert tree_vdot(updates, make_problem(config.extra_scalar).grads(wide, 1)) < 0  # descent
    inner = find_kfac_state(state)
    for part in (inner.moments, inner.moments_weight, inner.curvature, inner.damping):
        for leaf in jax.tree_util.tree_leaves(part):
            assert jnp.finfo(leaf.dtype).bits >= 32, leaf.dtype


# ---------------------------------------------------------------- learning rates


def _rate_factory(problem, **options):
    def kfac_with_rate(learning_rate):
        return kfax.kfac(
            learning_rate, problem.apply_fn, LOSS, example_inputs=problem.xs[0], **options
        )

    return kfac_with_rate


def test_injected_learning_rate_scales_the_update_proportionally():
    """Working pattern: inject_hyperparams over a factory whose only parameter is the rate
    (and without the norm constraint, which needs a concrete rate: see the xfail below)."""
    problem = make_problem()
    factory = _rate_factory(problem, damping=DAMPING, norm_constraint=None)
    opt = optax.inject_hyperparams(factory)(learning_rate=LEARNING_RATE)
    x, y, grads = problem.xs[0], problem.ys[0], problem.grads(problem.params)
    update = jax.jit(lambda s: opt.update(grads, s, problem.params, inputs=x, targets=y))
    state = opt.init(problem.params)
    full, _ = update(state)
    state.hyperparams["learning_rate"] = jnp.asarray(LEARNING_RATE / 4, jnp.float32)
    quarter, _ = update(state)
    # Dividing by a power of two is exact in floating point.
    assert_trees_equal(quarter, jax.tree_util.tree_map(lambda u: u / 4, full))
    assert all(bool(jnp.all(u != 0)) for u in jax.tree_util.tree_leaves(full))
    with jax.disable_jit():
        direct, _ = factory(LEARNING_RATE).update(
            grads, factory(LEARNING_RATE).init(problem.params), problem.params, inputs=x
        )
    assert_trees_close(full, direct)


@pytest.mark.xfail(
    strict=True,
    raises=ValueError,
    reason="kfax.kfac takes its options as **options: inject_hyperparams rejects "
    "static_args=('example_inputs', ...) as not a parameter of kfac (and would bind the "
    "var-keyword 'options' itself, which kfac passes on as scale_by_kfac(options={...})).",
)
def test_inject_hyperparams_wraps_kfac_with_its_own_static_arguments():
    problem = make_problem()
    opt = optax.inject_hyperparams(kfax.kfac, static_args=("apply_fn", "loss", "example_inputs"))(
        learning_rate=LEARNING_RATE,
        apply_fn=problem.apply_fn,
        loss=LOSS,
        example_inputs=problem.xs[0],
    )
    grads = problem.grads(problem.params)
    update = jax.jit(lambda s: opt.update(grads, s, problem.params, inputs=problem.xs[0]))
    state = opt.init(problem.params)
    full, _ = update(state)
    state.hyperparams["learning_rate"] = jnp.asarray(LEARNING_RATE / 4, jnp.float32)
    quarter, _ = update(state)
    assert_trees_equal(quarter, jax.tree_util.tree_map(lambda u: u / 4, full))


def test_injected_learning_rate_works_under_jit_with_the_default_norm_constraint():
    problem = make_problem()
    opt = optax.inject_hyperparams(_rate_factory(problem))(learning_rate=LEARNING_RATE)
    grads = problem.grads(problem.params)
    jax.jit(lambda s: opt.update(grads, s, problem.params, inputs=problem.xs[0]))(
        opt.init(problem.params)
    )


def test_a_constant_schedule_gives_the_updates_of_the_equal_float_learning_rate():
    problem = make_problem()
    grads = problem.grads(problem.params)
    updates = []
    for rate in (LEARNING_RATE, optax.constant_schedule(LEARNING_RATE)):
        opt = _rate_factory(problem)(rate)
        with jax.disable_jit():
            u, _ = opt.update(grads, opt.init(problem.params), problem.params, inputs=problem.xs[0])
        updates.append(u)
    assert_trees_close(updates[1], updates[0])


# ---------------------------------------------------------------- bad input


def _tiny():
    problem = make_problem()
    return problem.apply_fn, problem.params, problem.xs[0], problem.ys[0]


BAD_OPTIONS = {
    "damping=0": ({"damping": 0.0}, r"^damping must be > 0"),
    "damping<0": ({"damping": -1e-3}, r"^damping must be > 0"),
    "kind": ({"kind": "fisher"}, r"^kind must be one of"),
    "damping_method": ({"damping_method": "cholesky"}, r"^damping_method must be one of"),
    "bias_update": ({"bias_update": "approximate"}, r"^bias_update must be one of"),
    "unmatched": ({"unmatched": "sgd"}, r"^unmatched must be one of"),
    "stats_every=0": ({"stats_every": 0}, r"^stats_every must be a positive integer"),
    "stats_every=1.5": ({"stats_every": 1.5}, r"^stats_every must be a positive integer"),
    "inverse_every=0": ({"inverse_every": 0}, r"^inverse_every must be a positive integer"),
    "damping_every=0": ({"damping_every": 0}, r"^damping_every must be a positive integer"),
    "samples=0": ({"samples": 0}, r"^samples must be a positive integer"),
    "stats_batch_size=0": (
        {"stats_batch_size": 0},
        r"^stats_batch_size must be a positive integer",
    ),
    "ema_decay=1": ({"ema_decay": 1.0}, r"^ema_decay must be in \[0, 1\)"),
    "ema_decay<0": ({"ema_decay": -0.1}, r"^ema_decay must be in \[0, 1\)"),
    "norm_constraint=0": ({"norm_constraint": 0.0}, r"^norm_constraint must be > 0"),
    "adaptive_damping-with-schedule": (
        {"adaptive_damping": True, "damping": optax.constant_schedule(1e-3)},
        r"^adaptive_damping=True .* not a schedule",
    ),
}


@pytest.mark.parametrize(("options", "match"), list(BAD_OPTIONS.values()), ids=list(BAD_OPTIONS))
def test_bad_option_is_a_value_error_naming_the_option(options, match):
    apply_fn, _, x, _ = _tiny()
    with pytest.raises(ValueError, match=match):
        kfax.scale_by_kfac(apply_fn, LOSS, example_inputs=x, **options)


def test_bad_option_to_kfac_alias_is_the_same_value_error():
    apply_fn, _, x, _ = _tiny()
    with pytest.raises(ValueError, match=r"^kind must be one of"):
        kfax.kfac(LEARNING_RATE, apply_fn, LOSS, example_inputs=x, kind="fisher")
    with pytest.raises(ValueError, match=r"^adaptive_damping=True"):
        kfax.kfac(None, apply_fn, LOSS, example_inputs=x, damping=optax.constant_schedule(1.0))


@pytest.mark.parametrize("damping", ["1e-3", None])
def test_non_numeric_damping_is_a_value_error_naming_damping(damping):
    apply_fn, _, x, _ = _tiny()
    with pytest.raises(ValueError, match=r"^damping\b"):
        kfax.scale_by_kfac(apply_fn, LOSS, example_inputs=x, damping=damping)


@pytest.mark.parametrize(
    "options",
    [
        {"damping": np.float32(1e-3)},
        {"ema_decay": np.float32(0.9)},
        {"stats_every": np.int64(2)},
    ],
    ids=["damping", "ema_decay", "stats_every"],
)
def test_numpy_scalar_options_are_accepted(options):
    apply_fn, _, x, _ = _tiny()
    kfax.scale_by_kfac(apply_fn, LOSS, example_inputs=x, **options)


def test_axis_name_is_not_implemented_yet():
    apply_fn, _, x, _ = _tiny()
    with pytest.raises(NotImplementedError, match="axis_name"):
        kfax.scale_by_kfac(apply_fn, LOSS, example_inputs=x, axis_name="batch")


def test_a_loss_that_is_not_an_output_distribution_is_a_type_error_naming_loss():
    apply_fn, _, x, _ = _tiny()
    with pytest.raises(TypeError, match=r"^loss must be an output distribution"):
        kfax.scale_by_kfac(apply_fn, optax.softmax_cross_entropy, example_inputs=x)


def test_init_without_example_inputs_is_a_value_error_naming_example_inputs():
    apply_fn, params, _, _ = _tiny()
    tx = kfax.scale_by_kfac(apply_fn, LOSS)
    with pytest.raises(ValueError, match="needs example_inputs="):
        tx.init(params)


def test_update_without_inputs_is_a_value_error_naming_inputs():
    apply_fn, params, x, _ = _tiny()
    tx = kfax.scale_by_kfac(apply_fn, LOSS, example_inputs=x)
    with pytest.raises(ValueError, match="needs inputs="):
        tx.update(params, tx.init(params), params)


def test_update_without_params_is_a_value_error_naming_params():
    apply_fn, params, x, _ = _tiny()
    tx = kfax.scale_by_kfac(apply_fn, LOSS, example_inputs=x)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params), inputs=x)


@pytest.mark.parametrize(
    "options",
    [{"kind": "empirical"}, {"adaptive": True, "adaptive_damping": True}],
    ids=["empirical", "adaptive_damping"],
)
def test_update_without_targets_when_they_are_needed_is_a_value_error_naming_targets(options):
    apply_fn, params, x, _ = _tiny()
    tx = kfax.scale_by_kfac(apply_fn, LOSS, example_inputs=x, **options)
    with pytest.raises(ValueError, match="needs targets="):
        tx.update(params, tx.init(params), params, inputs=x)


def test_params_of_another_model_are_a_value_error_naming_params():
    apply_fn, params, x, _ = _tiny()
    tx = kfax.scale_by_kfac(apply_fn, LOSS, example_inputs=x)
    wider, _, _, _ = models.mlp(sizes=(4, 6, CLASSES), batch=BATCH)
    with pytest.raises(ValueError, match=r"^params do not match the K-FAC state"):
        tx.update(wider, tx.init(params), wider, inputs=x)


@pytest.mark.parametrize(
    "options", [{"unmatched": "adam"}, {"adaptive": True}], ids=["adam", "adaptive"]
)
def test_params_whose_non_layer_leaf_changed_shape_are_a_value_error_naming_params(options):
    problem = make_problem(extra_scalar=True)
    tx = kfax.scale_by_kfac(problem.apply_fn, LOSS, example_inputs=problem.xs[0], **options)
    state = tx.init(problem.params)  # temperature: shape ()
    per_class = {**problem.params, "temperature": jnp.full((CLASSES,), 1.3)}
    grads = problem.grads(per_class)

    def update(grads, state, params):
        return tx.update(grads, state, params, inputs=problem.xs[0], targets=problem.ys[0])

    with pytest.raises(ValueError, match="params do not match the K-FAC state"):
        jax.eval_shape(update, grads, state, per_class)
