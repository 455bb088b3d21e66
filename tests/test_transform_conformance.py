"""Conformance of kfax's optax transforms with JAX and optax conventions.

Whatever its options, ``kfax.kfac`` must behave as an ordinary optax
``GradientTransformationExtraArgs``: be pure (``jit`` and ``lax.scan`` give the un-jitted result),
keep a fixed state structure that JAX traces once, pass extra arguments through optax's
combinators, keep dtypes, survive non-finite batches layer by layer, keep every leaf of its own
state finite (``jax_debug_nans`` raises nothing on a healthy run), and let
``optax.inject_hyperparams`` change its learning rate, momentum and damping.

The option sets (``CONFIGS``) cover every value of every option that changes the state or the
program; each set compiles its own programs, so orthogonal options share a set. There is one set
per block kind in :data:`kfax.blocks.BLOCKS` (a new block kind is covered automatically). The
un-jitted reference runs op by op under ``jax.disable_jit()``: the strictest "no jit", and for
these tiny models much cheaper than eager dispatch, which compiles every ``lax.cond`` anew.

Two float32 evaluations of one computation are compared through quantities that are unique
(updates, parameters, moments, and each block's damped curvature as the dense matrix it inverts,
never eigenvectors, whose signs and order are not), within tolerances derived from the condition
numbers of those matrices (see ``ROUNDINGS``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
import os
import subprocess
import sys
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfax
from kfax._plan import make_plan

# The model's temperature exp(t) is a whole parameter on purpose (the diagonal block's layer kind).
pytestmark = pytest.mark.filterwarnings("ignore:kfax. parameter 'log_temperature' is used by exp")

LOSS = kfax.losses.SoftmaxCrossEntropy()
LEARNING_RATE = 0.1
DAMPING = 0.1
STEPS = 4  # with stats_every=2, inverse_every=3: statistics at 0, 2; refreshes at 0, 3
BATCH = 8
POSITIONS = 2  # sequence positions that share the first layer's weight
D_IN = 4
HIDDEN = 5
VOCABULARY = 6
CLASSES = 3
MAX_SAMPLES = 2  # the largest `samples` of an option set
EPS = float(jnp.finfo(jnp.float32).eps)

# Tolerances. Two float32 evaluations of one computation (jit and op by op, scan and a loop, a
# block's own application and a dense solve) differ only in how they round. Each step's result
# is a solve with each layer's damped curvature D, whose inputs (the factors, the gradient) are
# sums of at most BATCH * POSITIONS * MAX_SAMPLES = 32 products: each carries a relative error of
# at most 32 EPS / 2 per evaluation (Higham's gamma_32), so two evaluations differ by at most
# 32 EPS, and the solve amplifies a relative perturbation of its inputs by at most
# kappa = cond_2(D) (computed from the reference in float64). A block whose dense matrix depends
# on an eigenbasis beyond the factors (EKFAC: its scalings are measured in the basis) adds the
# basis's own condition number max s / min gap (Davis-Kahan: an eigenvector moves by
# |dA| / gap). The adaptive step's reduction ratio (L_after - L_before) / q adds
# (|L_after| + |L_before|) / |L_after - L_before|. Over STEPS steps the per-step errors add:
#     tol = STEPS * 32 * EPS * kappa = ROUNDINGS * EPS * kappa,
# relative to each leaf's largest magnitude so far in the reference run (``running_scales``:
# normwise, so an entry near zero, or a parameter that the updates brought near zero, carries
# the absolute error of the magnitudes it was computed from). On this problem kappa is 7 to 41
# and the measured differences are 6 to 26 EPS: the bound holds by factors of 150 to 540.
ROUNDINGS_PER_STEP = BATCH * POSITIONS * MAX_SAMPLES
ROUNDINGS = STEPS * ROUNDINGS_PER_STEP
# The comparisons mean something only for well-conditioned problems: 128 EPS * 1000 = 1.5e-2.
MAX_CONDITION = 1000.0
# Blocks whose dense matrix depends on their eigenbasis beyond the factors it diagonalises.
BASIS_DEPENDENT_BLOCKS = ("ekfac",)


@dataclasses.dataclass(frozen=True)
class Config:
    """One option set of ``kfax.kfac``. ``adaptive``: ``kfac(None, ...)``; ``weighted``:
    per-example loss weights (``where=``) with two examples masked."""

    name: str
    options: dict = dataclasses.field(default_factory=dict)
    adaptive: bool = False
    weighted: bool = False

    def optimizer(self, problem: Problem, **overrides) -> optax.GradientTransformation:
        # Statistics every step unless the set gives a cadence (kfac's default is 4 or 5): the tests
        # below feed batches at chosen steps; the cadence's own set runs stats_every=2.
        options = {"damping": DAMPING, "stats_every": 1, **self.options, **overrides}
        learning_rate = None if self.adaptive else options.pop("learning_rate", LEARNING_RATE)
        return kfax.kfac(
            learning_rate, problem.apply_fn, LOSS, example_inputs=problem.batch(0)[0], **options
        )

    def blocks(self, problem: Problem) -> dict[str, Any]:
        """The curvature block of every preconditioned layer, as the optimiser builds them."""
        shaping = ("block", "centering", "weight_sharing", "max_factor_size")
        plan = make_plan(
            problem.apply_fn,
            LOSS,
            problem.params,
            problem.batch(0)[0],
            kind=self.options.get("kind", "mc"),
            samples=self.options.get("samples") or 1,
            others=optax.identity(),
            **{
                "block": "default",
                "centering": "exact",
                **{k: v for k, v in self.options.items() if k in shaping},
            },
        )
        return plan.blocks

    @property
    def stats_every(self) -> int:
        return self.options.get("stats_every", 1)


def _covered_by_default(name: str) -> bool:
    """A block that is the default of every layer kind it applies to."""
    kinds = kfax.blocks.BLOCKS[name].kinds
    return all(kfax.blocks.DEFAULT_BLOCKS.get(kind) == name for kind in kinds) or name in COVERED


# The diagonal block runs in every set on the model's "parameter" layer (log_temperature), its
# default; its own set (every layer diagonal) is left out to keep the suite's time.
COVERED = ("diagonal",)


def _ekfac_and_no_curvature_for_parameters(layer):
    """EKFAC for dense layers, the defaults elsewhere, no block for whole parameters (they go to
    ``unmatched``): the function form of ``block=``."""
    if layer.kind == "parameter":
        return None
    return "ekfac" if layer.kind in kfax.blocks.BLOCKS["ekfac"].kinds else "default"


# Every option set compiles its own programs (about 15 s each on two cores), so the options that
# must be covered ride along with the block sets: (name suffix, options, weighted).
BLOCK_OPTIONS = {
    "eigen": (
        "empirical-sub-batch-reduce",
        # batch_axes=0: every input leaf is batched (the prefix form of the option).
        {"kind": "empirical", "stats_batch_size": 6, "batch_axes": 0, "weight_sharing": "reduce"},
        False,
    ),
    "ekfac": (
        "exact-simple-adam-schedule",
        {
            "block": _ekfac_and_no_curvature_for_parameters,
            "kind": "exact",
            "centering": "simple",
            "unmatched": optax.scale_by_adam(),
            "damping": optax.linear_schedule(DAMPING, 2 * DAMPING, STEPS),
        },
        False,
    ),
    "one_sided": (
        "homogeneous-cadence-samples-weighted",
        {
            "max_factor_size": 4,  # dense_0's B and dense_1's A are diagonal
            "centering": "none",
            "stats_every": 2,
            "inverse_every": 3,
            "samples": MAX_SAMPLES,
            "norm_constraint": False,
            "momentum": 0.0,
        },
        True,
    ),
}


def _block_config(name: str) -> Config:
    suffix, options, weighted = BLOCK_OPTIONS.get(name, ("", {}, False))
    label = f"block={name}" + (f"+{suffix}" if suffix else "")
    return Config(label, {"block": name, **options}, weighted=weighted)


# One option set per block kind of the registry (a block that is the default of its layer kinds
# is covered by the default set), and the adaptive mode. Together they cover every value of every
# option that changes the state or the program: block (every kind; a name, a function), kind,
# centering, samples, stats_batch_size and batch_axes, weight_sharing, max_factor_size, cadences,
# unmatched, damping (number, schedule), norm constraint on and off, where, and the mode.
CONFIGS = [
    Config("block=default"),
    *[_block_config(name) for name in kfax.blocks.BLOCKS if not _covered_by_default(name)],
    Config("adaptive", adaptive=True),
]


def config_named(name: str) -> Config:
    return next(c for c in CONFIGS if c.name == name)


DEFAULT = config_named("block=default")
ADAPTIVE = config_named("adaptive")
CADENCE = next(c for c in CONFIGS if c.stats_every > 1)


class Problem(NamedTuple):
    """A model with a layer of every kind: a dense layer shared by POSITIONS positions, plus an
    embedding of ids at the same positions, a scale and shift, a mean over positions, a dense
    output layer and a temperature ``exp(t)`` (a whole parameter: an unknown primitive uses it).
    One batch per step: inputs ``{"x": (B, T, D_IN), "ids": (B, T)}``, labels, weights."""

    params: Any
    apply_fn: Any
    inputs: Any  # {"x": (STEPS, BATCH, POSITIONS, D_IN), "ids": (STEPS, BATCH, POSITIONS)}
    ys: jax.Array  # (STEPS, BATCH) integer labels
    ws: jax.Array  # (STEPS, BATCH) per-example loss weights (examples 0 and 4 masked)

    def batch(self, step):
        return jax.tree.map(operator.itemgetter(step), self.inputs), self.ys[step], self.ws[step]

    def loss(self, params, inputs, y, w=None):
        return LOSS(self.apply_fn(params, inputs), y, w)

    def grads(self, params, step=0, weighted=False):
        """The gradient of the mean loss on batch ``step`` (op by op: no compilation)."""
        inputs, y, w = self.batch(step)
        with jax.disable_jit():
            return jax.grad(self.loss)(params, inputs, y, w if weighted else None)

    def astype(self, dtype) -> Problem:
        cast = lambda t: jax.tree.map(lambda v: v.astype(dtype), t)  # noqa: E731
        return self._replace(
            params=cast(self.params), inputs={**self.inputs, "x": self.inputs["x"].astype(dtype)}
        )


def _apply(p, inputs):
    h = inputs["x"] @ p["dense_0"]["kernel"] + p["dense_0"]["bias"] + p["embed"][inputs["ids"]]
    h = jnp.tanh(h) * p["norm"]["scale"] + p["norm"]["shift"]
    out = jnp.mean(h, axis=1) @ p["dense_1"]["kernel"] + p["dense_1"]["bias"]
    return out * jnp.exp(p["log_temperature"])


def make_problem() -> Problem:
    """The model's parameters and STEPS batches, drawn with NumPy (no compilation; PCG64 draws
    the same numbers on every platform). Seed 4 keeps every option set's kappa below 50."""
    rng = np.random.default_rng(4)

    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    params = {
        "dense_0": {
            "kernel": normal(D_IN, HIDDEN, scale=D_IN**-0.5),
            "bias": normal(HIDDEN, scale=0.1),
        },
        "embed": normal(VOCABULARY, HIDDEN, scale=0.5),
        "norm": {"scale": 1 + normal(HIDDEN, scale=0.1), "shift": normal(HIDDEN, scale=0.1)},
        "dense_1": {
            "kernel": normal(HIDDEN, CLASSES, scale=HIDDEN**-0.5),
            "bias": normal(CLASSES, scale=0.1),
        },
        "log_temperature": jnp.asarray(0.2, jnp.float32),
    }
    inputs = {
        "x": normal(STEPS, BATCH, POSITIONS, D_IN),
        "ids": jnp.asarray(rng.integers(0, VOCABULARY, (STEPS, BATCH, POSITIONS)), jnp.int32),
    }
    ys = jnp.asarray(rng.integers(0, CLASSES, (STEPS, BATCH)), jnp.int32)
    ws = jnp.asarray(np.broadcast_to(np.arange(BATCH) % 4 != 0, (STEPS, BATCH)), jnp.float32)
    return Problem(params, _apply, inputs, ys, ws)


def make_step(opt, problem, weighted=False, on_trace=None):
    """``(params, state, inputs, y, w) -> (params, state, updates)``: one step on one batch."""

    def step(params, state, inputs, y, w):
        if on_trace is not None:
            on_trace()
        where = w if weighted else None
        grads = jax.grad(problem.loss)(params, inputs, y, where)
        updates, state = opt.update(grads, state, params, inputs=inputs, targets=y, where=where)
        return optax.apply_updates(params, updates), state, updates

    return step


def train(step, params, state, problem, steps=STEPS) -> list:
    """[(params, state, updates)] after each step, one batch per step."""
    out = []
    for i in range(steps):
        out.append(step(params, state, *problem.batch(i)))
        params, state, _ = out[-1]
    return out


def find(state, kind) -> list:
    """Every node of type ``kind`` inside a (chain / wrapper) optimiser state."""
    is_kind = lambda n: isinstance(n, kind)  # noqa: E731
    return [n for n in jax.tree.leaves(state, is_leaf=is_kind) if is_kind(n)]


def kfac_state(state) -> kfax.KFACState:
    (found,) = find(state, kfax.KFACState)
    return found


# kfax's own states: every leaf must stay finite whatever the batch (issue 13, item 4).
KFAX_STATES = (kfax.KFACState, kfax.QuadraticModelState, kfax.NormConstraintState)


@contextlib.contextmanager
def debug_nans():
    previous = jax.config.jax_debug_nans
    jax.config.update("jax_debug_nans", True)
    try:
        yield
    finally:
        jax.config.update("jax_debug_nans", previous)


def tree_vdot(a, b) -> float:
    return sum(
        float(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def is_floating(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


# ---------------------------------------------------------------- unique quantities, tolerances


def unique_view(tree, blocks):
    """``tree`` with every quantity that is not unique replaced by one that is.

    A block's curvature (eigenvectors: signs and order are arbitrary) becomes the dense damped
    matrix it inverts, ``block.dense(curvature, damping)``; the adaptive step's step size and
    momentum, one solution of a 2x2 system (accurate relative to its norm, not entrywise),
    become one vector.
    """

    def view(node):
        if isinstance(node, kfax.KFACState):
            dense = {n: b.dense(node.curvature[n], node.damping) for n, b in blocks.items()}
            return node._replace(curvature=dense)
        if isinstance(node, kfax.StepInfo):
            return (jnp.stack([node.step_size, node.momentum]), *node[2:])
        return node

    is_node = lambda n: isinstance(n, (kfax.KFACState, kfax.StepInfo))  # noqa: E731
    with jax.disable_jit():  # op by op: reuses the un-jitted run's compiled primitives
        return jax.tree.map(view, tree, is_leaf=is_node)


def _magnitude(x) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64)), initial=0.0)) if is_floating(x) else 1.0


def running_scales(initial, trajectory, blocks) -> list:
    """Per step, every leaf's largest magnitude so far along ``[initial, *trajectory]`` (of
    ``unique_view``): a parameter is its initial value plus the updates so far, a moving average
    the sum of its batches, so the rounding errors they carry scale with the largest magnitude
    the leaf has had, not with its current value (which may have cancelled towards zero)."""
    running, out = None, []
    for entry in [initial, *trajectory]:
        magnitudes = jax.tree.map(_magnitude, unique_view(entry, blocks))
        running = magnitudes if running is None else jax.tree.map(max, running, magnitudes)
        out.append(running)
    return out[1:]


def _normalised(actual, expected, scale=None):
    """Both leaves as float64 divided by ``scale`` (default: the expected leaf's largest
    magnitude); integer leaves as they are."""
    if not is_floating(expected):
        return np.asarray(actual), np.asarray(expected)
    e = np.asarray(expected, np.float64)
    scale = (_magnitude(e) if scale is None else scale) or 1.0
    return np.asarray(np.asarray(actual, np.float64) / scale), np.asarray(e / scale)


def assert_trees_close(actual, expected, tol, scales=None):
    """Same structure, shapes and dtypes; integers (counts, keys) equal; every floating leaf
    within ``tol`` of the expected one relative to ``scales`` (a tree of floats; default: each
    expected leaf's largest magnitude)."""
    chex.assert_trees_all_equal_structs(actual, expected)
    chex.assert_trees_all_equal_shapes_and_dtypes(actual, expected)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(expected)]
    leaves = zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
    if scales is None:
        pairs = [_normalised(a, e) for a, e in leaves]
    else:
        pairs = [
            _normalised(a, e, c) for (a, e), c in zip(leaves, jax.tree.leaves(scales), strict=True)
        ]
    chex.assert_trees_all_close(
        {p: a for p, (a, _) in zip(paths, pairs, strict=True)},
        {p: e for p, (_, e) in zip(paths, pairs, strict=True)},
        rtol=0.0,
        atol=tol,
    )


def basis_condition(factors) -> float:
    """``max s / min gap`` over the eigenvalues ``s_a``, ``s_b`` an eigenbasis was built from."""
    worst = 1.0
    for field in ("s_a", "s_b"):
        if hasattr(factors, field):
            s = np.sort(np.asarray(getattr(factors, field), np.float64))
            gap = float(np.min(np.diff(s))) if s.size > 1 else math.inf
            worst = max(worst, float(s[-1]) / gap if gap > 0 else math.inf)
    return worst


def curvature_condition(blocks, states) -> float:
    """The largest condition number of a damped block (plus its basis's) in these states."""
    worst = 1.0
    for state in states:
        for inner in find(state, kfax.KFACState):
            for name, block in blocks.items():
                curvature = inner.curvature[name]
                with jax.disable_jit():
                    dense = np.asarray(block.dense(curvature, inner.damping), np.float64)
                kappa = float(np.linalg.cond(dense))
                if block.name in BASIS_DEPENDENT_BLOCKS:
                    kappa += basis_condition(getattr(curvature, "factors", curvature))
                worst = max(worst, kappa)
    return worst


def reduction_ratio_condition(problem, config, reference) -> float:
    """Condition number of the reduction ratios the adaptive step measured on the reference
    run; also checks that no Levenberg-Marquardt decision is within rounding of a threshold
    (otherwise the two runs could legitimately take different dampings)."""
    worst, params = 1.0, problem.params
    for step, (new_params, state, _) in enumerate(reference):
        for info in (q.info for q in find(state, kfax.QuadraticModelState)):
            if int(info.ratio_step) != step:
                continue
            inputs, y, w = problem.batch(step)
            w = w if config.weighted else None
            with jax.disable_jit():
                before = float(problem.loss(params, inputs, y, w))
                after = float(problem.loss(new_params, inputs, y, w))
            kappa = (abs(before) + abs(after)) / abs(after - before)
            rho = float(info.reduction_ratio)
            margin = min(abs(rho - 0.25), abs(rho - 0.75))
            assert margin > ROUNDINGS * EPS * kappa * max(1.0, abs(rho)), (step, rho, kappa)
            worst = max(worst, kappa)
        params = new_params
    return worst


# ---------------------------------------------------------------- shared runs per option set


class Run(NamedTuple):
    opt: Any
    init: Any
    step: Any  # the jitted step (compiled once per option set; chex fails a second trace)
    traces: int  # how often the jitted step was traced over STEPS steps
    jitted: list  # [(params, state, updates)] after each jitted step


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: c.name)
def config(request) -> Config:
    return request.param


@pytest.fixture(scope="module")
def problem() -> Problem:
    return make_problem()


@pytest.fixture(scope="module")
def blocks(config, problem) -> dict:
    return config.blocks(problem)


@pytest.fixture(scope="module")
def run(config, problem) -> Run:
    opt = config.optimizer(problem)
    init = opt.init(problem.params)
    counter = []
    chex.clear_trace_counter()  # this option set's step is a new function with the same source
    step = make_step(opt, problem, config.weighted, on_trace=lambda: counter.append(1))
    step = jax.jit(chex.assert_max_traces(step, n=1))
    jitted = train(step, problem.params, init, problem)
    return Run(opt, init, step, len(counter), jitted)


@pytest.fixture(scope="module")
def unjitted(config, problem, run) -> list:
    """The same steps op by op: [(params, state, updates)] after each step."""
    with jax.disable_jit():
        step = make_step(run.opt, problem, config.weighted)
        return train(step, problem.params, run.init, problem)


@pytest.fixture(scope="module")
def scales(problem, run, unjitted, blocks) -> list:
    """Per step, the running largest magnitude of every leaf of the reference run."""
    zeros = jax.tree.map(jnp.zeros_like, problem.params)
    return running_scales((problem.params, run.init, zeros), unjitted, blocks)


@pytest.fixture(scope="module")
def tolerance(config, problem, blocks, unjitted) -> float:
    states = [state for _, state, _ in unjitted]
    kappa = curvature_condition(blocks, states)
    kappa += reduction_ratio_condition(problem, config, unjitted)
    assert kappa < MAX_CONDITION, f"the test problem is ill-conditioned: kappa = {kappa}"
    return ROUNDINGS * EPS * kappa


def test_every_block_kind_of_the_registry_is_used_by_an_option_set(problem):
    """A block kind whose layer kind the conformance model lacks fails here: add such a layer
    to ``make_problem`` (or options that show the block to ``BLOCK_OPTIONS``)."""
    used = {block.name for config in CONFIGS for block in config.blocks(problem).values()}
    assert set(kfax.blocks.BLOCKS) <= used, sorted(set(kfax.blocks.BLOCKS) - used)


# ---------------------------------------------------------------- purity: jit, scan, structure


def test_jitted_train_step_matches_unjitted_step_at_every_step(
    run, unjitted, blocks, tolerance, scales
):
    steps = zip(run.jitted, unjitted, scales, strict=True)
    for step, (jitted, plain, scale) in enumerate(steps, start=1):
        try:
            actual, expected = unique_view(jitted, blocks), unique_view(plain, blocks)
            assert_trees_close(actual, expected, tolerance, scale)
        except AssertionError as error:
            raise AssertionError(f"step {step} (tol {tolerance:.2e}): {error}") from error


def test_state_structure_shapes_and_dtypes_are_those_of_init_after_every_step(run):
    weak = lambda tree: [bool(getattr(x, "weak_type", False)) for x in jax.tree.leaves(tree)]  # noqa: E731
    for _, state, _ in run.jitted:
        chex.assert_trees_all_equal_structs(state, run.init)
        chex.assert_trees_all_equal_shapes_and_dtypes(state, run.init)
        assert weak(state) == weak(run.init)


def test_jitted_step_is_traced_once_over_all_steps(problem, run):
    """A state whose structure, dtypes or weak types drift would retrace (recompile) each step:
    the step was traced once over STEPS steps, and neither a fresh ``init`` state nor the last
    state traces it again (``chex.assert_max_traces`` raises on a second trace)."""
    assert run.traces == 1
    params, state, _ = run.jitted[-1]
    run.step(problem.params, run.opt.init(problem.params), *problem.batch(0))
    run.step(params, state, *problem.batch(0))
    assert run.traces == 1


# A scan compiles a new program (about 15 s on two cores): it runs on the plain default set, the
# set whose cadences put lax.cond on the step count, and the adaptive mode.
SCANNED = [DEFAULT.name, CADENCE.name, ADAPTIVE.name]


def test_lax_scan_over_steps_equals_a_python_loop_of_steps(
    config, problem, run, blocks, tolerance, scales
):
    if config.name not in SCANNED:
        pytest.skip(f"lax.scan runs on {SCANNED}")
    step = make_step(run.opt, problem, config.weighted)

    def body(carry, batch):
        params, state, updates = step(*carry, *batch)
        return (params, state), updates

    batches = (problem.inputs, problem.ys, problem.ws)
    (params, state), updates = jax.jit(jax.lax.scan, static_argnums=0)(
        body, (problem.params, run.init), batches
    )
    final = unique_view(run.jitted[-1][:2], blocks)
    scanned = unique_view((params, state), blocks)
    assert_trees_close(scanned, final, tolerance, scales[-1][:2])
    for i, (_, _, expected) in enumerate(run.jitted):
        actual = jax.tree.map(operator.itemgetter(i), updates)
        assert_trees_close(actual, expected, tolerance, scales[i][2])


# ---------------------------------------------------------------- non-finite statistics


def test_nonfinite_statistics_leave_that_layers_statistics_untouched_and_are_counted(
    config, problem, run
):
    """An infinite input entry makes the first dense layer's statistics non-finite; every other
    layer stays finite (the tanh saturates, its derivative there is 0, the outputs are finite).
    Each layer is validated on its own: the first keeps its statistics and curvature and counts a
    skipped batch, every other layer merges the batch, and no kfax state takes a non-finite
    value."""
    params, state, _ = run.jitted[1]  # after two finite steps; count 2 is a statistics step
    before = kfac_state(state)
    assert int(before.count) % config.stats_every == 0
    inputs, y, w = problem.batch(2)
    inputs = {**inputs, "x": inputs["x"].at[1, 0, 0].set(jnp.inf)}  # example 1: in the
    _, new_state, _ = run.step(params, state, inputs, y, w)  # sub-batch, not masked
    after = kfac_state(new_state)
    assert int(after.count) == int(before.count) + 1

    bad = "dense_0"
    chex.assert_trees_all_equal(after.statistics[bad], before.statistics[bad])
    chex.assert_trees_all_equal(after.curvature[bad], before.curvature[bad])
    assert after.health[bad] == before.health[bad]._replace(skipped=before.health[bad].skipped + 1)
    assert len(after.health) > 1
    for good in set(after.health) - {bad}:
        assert after.health[good] == before.health[good]._replace(
            batches=before.health[good].batches + 1
        ), good
        changed = jax.tree.map(
            lambda a, b: not np.array_equal(a, b), after.statistics[good], before.statistics[good]
        )
        assert any(jax.tree.leaves(changed)), good
    for node in find(new_state, KFAX_STATES):
        chex.assert_tree_all_finite(node)
    adaptive = kfax.QuadraticModelState
    for old, new in zip(find(state, adaptive), find(new_state, adaptive), strict=True):
        # the adaptive step's model is not finite on this batch: counted, not stored
        assert int(new.info.skipped_steps) == int(old.info.skipped_steps) + 1
        chex.assert_trees_all_equal(new.previous_update, old.previous_update)
        chex.assert_trees_all_equal(new.damping, old.damping)


def test_healthy_steps_count_every_statistics_batch_and_no_failure(config, run):
    for step, (_, state, _) in enumerate(run.jitted, start=1):
        inner = kfac_state(state)
        assert int(inner.count) == step
        batches = math.ceil(step / config.stats_every)  # statistics steps among counts 0..step-1
        for name, health in inner.health.items():
            assert (int(health.batches), int(health.skipped), int(health.failed_refreshes)) == (
                batches,
                0,
                0,
            ), name
        for adaptive in find(state, kfax.QuadraticModelState):
            assert int(adaptive.info.skipped_steps) == 0


# ---------------------------------------------------------------- finite states, jax_debug_nans


def test_no_nan_anywhere_in_any_state_after_healthy_steps(run):
    chex.assert_tree_all_finite(run.init)
    for _, state, updates in run.jitted:
        chex.assert_tree_all_finite(state)
        chex.assert_tree_all_finite(updates)


def test_step_info_before_any_step_holds_its_documented_values_not_placeholders(run):
    """StepInfo is always defined: step size, momentum, predicted change and gradient scale 0,
    reduction ratio 1, ratio step -1 (never measured), the initial damping, no skipped step."""
    for adaptive in find(run.init, kfax.QuadraticModelState):
        info = adaptive.info
        expected = kfax.StepInfo(0.0, 0.0, 0.0, 1.0, -1, DAMPING, 0.0, 0)
        dtypes = [jnp.int32 if isinstance(v, int) else info.damping.dtype for v in expected]
        chex.assert_trees_all_equal(
            info, kfax.StepInfo(*[jnp.asarray(v, d) for v, d in zip(expected, dtypes, strict=True)])
        )


def test_a_healthy_jitted_run_raises_nothing_under_debug_nans(problem, run):
    with debug_nans():
        again = train(run.step, problem.params, run.init, problem)
    chex.assert_trees_all_equal(again, run.jitted)  # the same compiled program


def test_a_healthy_unjitted_step_computes_no_nan_under_debug_nans(config, problem, run, unjitted):
    """Op by op, ``jax_debug_nans`` checks every intermediate value, not only the outputs of a
    compiled program: a healthy step must not compute a NaN anywhere, not even in a branch of a
    ``where`` that is then discarded. (Constants JAX materialised earlier in this process, here
    by the ``unjitted`` run, are not checked again: the fresh-process test below covers them.)"""
    del unjitted
    with jax.disable_jit(), debug_nans():
        step = make_step(run.opt, problem, config.weighted)
        train(step, problem.params, run.init, problem, steps=2)


LOSS_UNDER_DEBUG_NANS = """
import jax, jax.numpy as jnp, kfax
loss = kfax.losses.SoftmaxCrossEntropy()
f = jnp.linspace(-1.0, 1.0, 24).reshape(8, 3)
y = jnp.arange(8) % 3
jax.config.update("jax_debug_nans", True)
with jax.disable_jit():
    loss(f, y)
    jax.grad(lambda f: loss(f, y))(f)
    kappa = loss.position_weights(f, y)
    loss.output_gradient(f, y)
    loss.curvature_sqrt(f, kappa)
    loss.sampled_cotangent(jax.random.key(0), f, kappa)
print("ok")
"""


def test_the_loss_of_a_healthy_step_computes_no_nan_op_by_op_under_debug_nans():
    """What a step asks of the loss (value, gradient, weights, curvature root, samples) creates
    no NaN, not even a constant, for valid labels. A fresh process: JAX does not check constants
    it materialised before debug_nans was turned on."""
    result = subprocess.run(
        [sys.executable, "-c", LOSS_UNDER_DEBUG_NANS],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


# ---------------------------------------------------------------- dtypes, first step


def test_float32_params_give_float32_updates_and_float32_state(run):
    float32 = jnp.dtype(jnp.float32)
    for _, state, updates in run.jitted:
        assert {u.dtype for u in jax.tree.leaves(updates)} == {float32}
        assert {x.dtype for x in jax.tree.leaves(state) if is_floating(x)} == {float32}


def _layer_vector(block, tree):
    """A layer's weight and bias in K-FAC order: vec of the (d_in, d_out) matrix, then bias."""
    leaves = jax.tree.leaves(tree)
    site = block.site
    parts = [np.ravel(site.geometry.weight_matrix(leaves[site.weight_leaf]))]
    if site.bias_leaf is not None:
        parts.append(np.ravel(leaves[site.bias_leaf]))
    return np.concatenate(parts).astype(np.float64)


def test_first_step_is_the_damped_curvature_solve_and_deterministic(config, problem, run, blocks):
    """The first step already refreshed every layer's curvature, and each layer's update is
    ``-scale * D^{-1} g`` with ``D = block.dense(curvature, damping)`` (the matrix the block
    inverts), ``scale`` the learning rate times the norm-constraint coefficient (momentum has
    nothing to add yet) or the adaptive step size; the same step again gives the same bits."""
    _, state, updates = run.jitted[0]
    initial, first = kfac_state(run.init), kfac_state(state)
    for name in blocks:
        for before, after in zip(
            jax.tree.leaves(initial.curvature[name]),
            jax.tree.leaves(first.curvature[name]),
            strict=True,
        ):
            assert not np.allclose(before, after), name

    if config.adaptive:
        (adaptive,) = find(state, kfax.QuadraticModelState)
        assert float(adaptive.info.momentum) == 0.0
        scale = float(adaptive.info.step_size)
    else:
        coefficients = [float(n.coefficient) for n in find(state, kfax.NormConstraintState)]
        scale = LEARNING_RATE * math.prod(coefficients)
    grads = problem.grads(problem.params, 0, config.weighted)
    for name, block in blocks.items():
        with jax.disable_jit():
            dense = np.asarray(block.dense(first.curvature[name], first.damping), np.float64)
        expected = -scale * np.linalg.solve(dense, _layer_vector(block, grads))
        tol = ROUNDINGS_PER_STEP * EPS * float(np.linalg.cond(dense))
        actual = _layer_vector(block, updates)
        np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * np.max(np.abs(expected)))

    fresh = run.opt.init(problem.params)
    _, _, again = run.step(problem.params, fresh, *problem.batch(0))
    chex.assert_trees_all_equal(again, updates)
    inner = tree_vdot(updates, grads)
    cosine = -inner / np.sqrt(tree_vdot(updates, updates) * tree_vdot(grads, grads))
    assert inner < 0, "the first update is not a descent direction"
    assert cosine < 0.99, f"the first update is (nearly) parallel to the gradient: cos={cosine}"


def test_sampled_statistics_depend_on_the_seed_only():
    problem = make_problem()
    grads = problem.grads(problem.params)

    def output_factors(seed):
        inputs = problem.batch(0)[0]
        tx = kfax.scale_by_kfac(problem.apply_fn, LOSS, example_inputs=inputs, seed=seed)
        with jax.disable_jit():
            _, state = tx.update(grads, tx.init(problem.params), problem.params, inputs=inputs)
        return {name: state.statistics[name] for name in ("dense_0", "dense_1")}

    seed0, seed0_again, seed1 = output_factors(0), output_factors(0), output_factors(1)
    chex.assert_trees_all_equal(seed0, seed0_again)
    for name in seed0:  # the output factors of both dense layers depend on the sampled targets
        assert not np.allclose(seed0[name].output, seed1[name].output), name


# ---------------------------------------------------------------- optax combinators


def test_chain_with_clip_and_scale_passes_extra_args_to_kfac(config, problem):
    opt = config.optimizer(problem)
    clip = optax.clip_by_global_norm(1.0)
    chained = optax.chain(opt, clip, optax.scale(0.5))
    grads = problem.grads(problem.params, 0, config.weighted)
    inputs, y, w = problem.batch(0)
    extra = dict(inputs=inputs, targets=y, where=w if config.weighted else None)
    with jax.disable_jit():  # op by op: both orders of evaluation round alike
        updates, state = chained.update(
            grads, chained.init(problem.params), problem.params, **extra
        )
        direction, opt_state = opt.update(grads, opt.init(problem.params), problem.params, **extra)
        clipped, _ = clip.update(direction, clip.init(direction))
    chex.assert_trees_all_equal(updates, jax.tree.map(lambda c: 0.5 * c, clipped))
    chex.assert_trees_all_equal(state[0], opt_state)
    assert int(kfac_state(state).count) == 1


# The wrappers below see the optimiser only through its state pytree (whose stability every
# option set checks above) and the extra arguments. Each compiles new programs, so they run on
# the fixed-rate alias (a chain with momentum and the norm constraint) and on the adaptive mode
# (a wrapper with previous update, step info and adaptive damping), which needs inputs and
# targets to pass through.
WRAPPED = [DEFAULT, ADAPTIVE]


@pytest.mark.parametrize("config", WRAPPED, ids=lambda c: c.name)
def test_multisteps_accumulates_two_gradients_then_applies_kfac_with_the_last_extra_args(config):
    """Micro-gradients 0 and 2g average to exactly g: MultiSteps must apply one K-FAC step to g
    with the second micro-batch's inputs and targets (the first micro-batch differs)."""
    problem = make_problem()
    opt = config.optimizer(problem)
    multi = optax.MultiSteps(opt, every_k_schedule=2)
    params = problem.params
    g = problem.grads(params, 1)

    @jax.jit
    def micro_step(grads, state, x, y):
        return multi.update(grads, state, params, inputs=x, targets=y)

    state0 = multi.init(params)
    zeros = jax.tree.map(jnp.zeros_like, g)
    (inputs0, y0, _), (inputs1, y1, _) = problem.batch(0), problem.batch(1)
    updates0, state1 = micro_step(zeros, state0, inputs0, y0)
    chex.assert_trees_all_equal(updates0, zeros)
    chex.assert_trees_all_equal(state1.inner_opt_state, state0.inner_opt_state)

    twice = jax.tree.map(lambda v: 2 * v, g)
    updates1, state2 = micro_step(twice, state1, inputs1, y1)
    with jax.disable_jit():
        expected, expected_state = opt.update(
            g, opt.init(params), params, inputs=inputs1, targets=y1
        )
    blocks = config.blocks(problem)
    kappa = curvature_condition(blocks, [expected_state])
    tol = ROUNDINGS_PER_STEP * EPS * kappa
    assert_trees_close(updates1, expected, tol)
    assert_trees_close(
        unique_view(state2.inner_opt_state, blocks), unique_view(expected_state, blocks), tol
    )
    assert int(kfac_state(state2).count) == 1


def test_apply_if_finite_skips_a_nan_gradient_leaving_params_and_inner_state_untouched():
    problem = make_problem()  # the adaptive mode needs inputs and targets to pass through
    guarded = optax.apply_if_finite(ADAPTIVE.optimizer(problem), max_consecutive_errors=3)
    x, y, _ = problem.batch(1)

    @jax.jit
    def guarded_step(params, state, grads):
        updates, state = guarded.update(grads, state, params, inputs=x, targets=y)
        return optax.apply_updates(params, updates), state

    grads = problem.grads(problem.params, 1)
    params, state = guarded_step(problem.params, guarded.init(problem.params), grads)
    assert int(state.notfinite_count) == 0
    assert int(kfac_state(state).count) == 1
    nan_grads = jax.tree.map(lambda v: v.at[(0,) * v.ndim].set(jnp.nan), grads)
    new_params, new_state = guarded_step(params, state, nan_grads)
    chex.assert_trees_all_equal(new_params, params)
    chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
    assert int(new_state.notfinite_count) == 1
    assert int(new_state.total_notfinite) == 1


@pytest.mark.parametrize("config", WRAPPED, ids=lambda c: c.name)
def test_bfloat16_params_give_bfloat16_updates_and_float32_statistics(config):
    low = make_problem().astype(jnp.bfloat16)
    opt = config.optimizer(low)
    step = jax.jit(make_step(opt, low))
    params, state = low.params, opt.init(low.params)
    for i in range(2):
        before = params
        params, state, updates = step(params, state, *low.batch(i))
    bfloat16 = jnp.dtype(jnp.bfloat16)
    assert {u.dtype for u in jax.tree.leaves(updates)} == {bfloat16}
    assert {p.dtype for p in jax.tree.leaves(params)} == {bfloat16}
    chex.assert_tree_all_finite(updates)
    wide = jax.tree.map(lambda v: v.astype(jnp.float32), before)
    assert tree_vdot(updates, make_problem().grads(wide, 1)) < 0  # descent
    inner = kfac_state(state)
    wide_parts = [inner.statistics, inner.curvature, inner.damping]
    wide_parts += [(q.damping, q.info) for q in find(state, kfax.QuadraticModelState)]
    wide_parts += [n.coefficient for n in find(state, kfax.NormConstraintState)]
    for leaf in jax.tree.leaves(wide_parts):
        if is_floating(leaf):
            assert jnp.finfo(leaf.dtype).bits >= 32, leaf.dtype


# ---------------------------------------------------------------- injected hyperparameters


INJECTED = optax.inject_hyperparams(kfax.kfac, static_args=("apply_fn", "loss", "example_inputs"))


def _injected(problem, **hyperparams):
    return INJECTED(
        apply_fn=problem.apply_fn, loss=LOSS, example_inputs=problem.batch(0)[0], **hyperparams
    )


def _update(opt, problem, grads, *, jit=True):
    """``state -> (updates, state)`` on batch 0: jitted (failing on a second trace), or op by
    op for a reference."""
    inputs, y, _ = problem.batch(0)

    def update(state):
        return opt.update(grads, state, problem.params, inputs=inputs, targets=y)

    def op_by_op(state):
        with jax.disable_jit():
            return update(state)

    if not jit:
        return op_by_op
    chex.clear_trace_counter()
    return jax.jit(chex.assert_max_traces(update, n=1))


def _with(state, **hyperparams):
    values = {k: jnp.asarray(v, state.hyperparams[k].dtype) for k, v in hyperparams.items()}
    return state._replace(hyperparams={**state.hyperparams, **values})


@pytest.fixture(scope="module")
def injected_run():
    """kfac under inject_hyperparams (fixed rate, momentum 0.9, no norm constraint): its jitted
    update, the initial state, and two steps."""
    problem = make_problem()
    opt = _injected(
        problem,
        learning_rate=LEARNING_RATE,
        momentum=0.9,
        damping=DAMPING,
        norm_constraint=False,
    )
    grads = problem.grads(problem.params)
    update = _update(opt, problem, grads)
    state0 = opt.init(problem.params)
    updates1, state1 = update(state0)
    updates2, state2 = update(state1)
    return problem, grads, update, state0, (updates1, state1), (updates2, state2)


def test_inject_hyperparams_wraps_kfac_and_matches_kfac_under_jit(injected_run):
    problem, grads, _, state0, (updates1, _), _ = injected_run
    assert {"learning_rate", "momentum", "damping"} <= set(state0.hyperparams)
    direct = DEFAULT.optimizer(problem, momentum=0.9, norm_constraint=False)
    expected, expected_state = _update(direct, problem, grads, jit=False)(
        direct.init(problem.params)
    )
    blocks = DEFAULT.blocks(problem)
    tol = ROUNDINGS_PER_STEP * EPS * curvature_condition(blocks, [expected_state])
    assert_trees_close(updates1, expected, tol)


def test_injected_learning_rate_scales_the_update_exactly(injected_run):
    _, _, update, state0, (updates1, _), _ = injected_run
    quarter, _ = update(_with(state0, learning_rate=jnp.float32(LEARNING_RATE) / 4))
    # The rate enters only as the last factor, and dividing by a power of two is exact.
    chex.assert_trees_all_equal(quarter, jax.tree.map(lambda u: u / 4, updates1))
    assert all(bool(jnp.all(u != 0)) for u in jax.tree.leaves(updates1))


def test_injected_momentum_adds_momentum_times_the_trace_to_the_update(injected_run):
    """``trace(momentum)`` then ``scale(-lr)``: ``u(mu) = -lr (d + mu t)`` with ``t`` the trace
    after step 1 and ``d`` the second step's direction (independent of mu)."""
    _, _, update, _, (_, state1), _ = injected_run
    (trace,) = find(state1, optax.TraceState)
    without, _ = update(_with(state1, momentum=0.0))
    half, _ = update(_with(state1, momentum=0.5))
    expected = jax.tree.map(lambda u, t: u - LEARNING_RATE * 0.5 * t, without, trace.trace)
    # One rounding on each side of u(0) and of the momentum term: normwise within 4 EPS.
    for actual, want, term in zip(
        jax.tree.leaves(half), jax.tree.leaves(expected), jax.tree.leaves(trace.trace), strict=True
    ):
        scale = float(jnp.max(jnp.abs(want))) + LEARNING_RATE * 0.5 * float(jnp.max(jnp.abs(term)))
        np.testing.assert_allclose(actual, want, rtol=0, atol=4 * EPS * scale)
    assert not np.allclose(
        np.concatenate([np.ravel(u) for u in jax.tree.leaves(half)]),
        np.concatenate([np.ravel(u) for u in jax.tree.leaves(without)]),
    )


def test_injected_damping_gives_the_update_of_kfac_built_with_that_damping(injected_run):
    problem, grads, update, state0, (updates1, _), _ = injected_run
    damping = 4 * DAMPING
    injected, _ = update(_with(state0, damping=damping))
    direct = DEFAULT.optimizer(problem, momentum=0.9, norm_constraint=False, damping=damping)
    expected, expected_state = _update(direct, problem, grads, jit=False)(
        direct.init(problem.params)
    )
    blocks = DEFAULT.blocks(problem)
    tol = ROUNDINGS_PER_STEP * EPS * curvature_condition(blocks, [expected_state])
    assert_trees_close(injected, expected, tol)
    assert float(kfac_state(expected_state).damping) == np.float32(damping)
    differs = [
        float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        for a, b in zip(jax.tree.leaves(injected), jax.tree.leaves(updates1), strict=True)
    ]
    assert max(differs) > 100 * tol  # the new damping took effect


@pytest.mark.parametrize(
    ("adaptive_damping", "damping"),
    [(None, DAMPING), (False, 4 * DAMPING)],
    ids=["levenberg-marquardt", "fixed-damping-injected"],
)
def test_adaptive_mode_under_inject_hyperparams_matches_kfac_none(adaptive_damping, damping):
    """kfac(None) under inject_hyperparams: jitted, traced once over two steps, with the updates
    of kfac(None) built directly. With ``adaptive_damping=False`` the damping is a fixed option,
    so the damping injected (here before the first step) is the damping used."""
    problem = make_problem()
    options = {} if adaptive_damping is None else {"adaptive_damping": adaptive_damping}
    opt = _injected(problem, learning_rate=None, damping=DAMPING, **options)
    grads = problem.grads(problem.params)
    update = _update(opt, problem, grads)
    updates1, state1 = update(_with(opt.init(problem.params), damping=damping))
    updates2, _ = update(state1)
    direct = ADAPTIVE.optimizer(problem, damping=damping, **options)
    direct_update = _update(direct, problem, grads, jit=False)
    expected1, expected_state1 = direct_update(direct.init(problem.params))
    expected2, expected_state2 = direct_update(expected_state1)
    blocks = ADAPTIVE.blocks(problem)
    kappa = curvature_condition(blocks, [expected_state1, expected_state2])
    assert_trees_close(updates1, expected1, ROUNDINGS_PER_STEP * EPS * kappa)
    assert_trees_close(updates2, expected2, 2 * ROUNDINGS_PER_STEP * EPS * kappa)


def test_a_constant_schedule_gives_the_updates_of_the_equal_float_learning_rate():
    problem = make_problem()
    grads = problem.grads(problem.params)
    updates = []
    for rate in (LEARNING_RATE, optax.constant_schedule(LEARNING_RATE)):
        opt = DEFAULT.optimizer(problem, learning_rate=rate)
        with jax.disable_jit():
            u, _ = opt.update(
                grads, opt.init(problem.params), problem.params, inputs=problem.batch(0)[0]
            )
        updates.append(u)
    chex.assert_trees_all_equal(updates[1], updates[0])
