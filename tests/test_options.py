"""Options of kfax's transforms: validation at build time, the explicit ``kfac`` signature, and
the errors of ``init`` and ``update``.

Every invalid option is a ``ValueError`` raised when the transform is built, whose message names
the option and the value it got; a combination of options that cannot work names both options;
an ``update`` called with missing or mismatched arguments names what is wrong, with and without
``jax.jit`` (``chex.variants``). Options may be Python numbers, NumPy scalars or 0-d JAX arrays.
"""

from __future__ import annotations

import inspect
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import kfax
from tests import models

LOSS = kfax.losses.SoftmaxCrossEntropy()
LEARNING_RATE = 0.1
BATCH = 8
CLASSES = 3


def _tiny(extra_scalar=False):
    """``(params, apply_fn, x, y)``: the conformance suite's MLP (4 -> 5 -> 3); with
    ``extra_scalar``, an output temperature outside any layer."""
    params, apply_fn, x, _ = models.mlp(sizes=(4, 5, CLASSES), batch=BATCH)
    y = jax.random.randint(jax.random.key(3), (BATCH,), 0, CLASSES)
    if not extra_scalar:
        return params, apply_fn, x, y

    def with_temperature(p, z):
        return apply_fn(p, z) * p["temperature"]

    return {**params, "temperature": jnp.full((), 1.3)}, with_temperature, x, y


PARAMS, APPLY_FN, X, Y = _tiny()

# How each mode is built: the bare preconditioner, the fixed-rate alias, the adaptive alias.
MODES = {
    "scale_by_kfac": lambda apply_fn, x, **o: kfax.scale_by_kfac(
        apply_fn, LOSS, example_inputs=x, **o
    ),
    "kfac(lr)": lambda apply_fn, x, **o: kfax.kfac(
        LEARNING_RATE, apply_fn, LOSS, example_inputs=x, **o
    ),
    "kfac(None)": lambda apply_fn, x, **o: kfax.kfac(None, apply_fn, LOSS, example_inputs=x, **o),
}


def build(mode, apply_fn=APPLY_FN, x=X, **options):
    return MODES[mode](apply_fn, x, **options)


# ---------------------------------------------------------------- invalid values


def _assert_names(error: BaseException, *texts: str) -> None:
    message = str(error)
    for text in texts:
        assert re.search(rf"(?<![\w.]){re.escape(text)}(?![\w])", message), (text, message)


def _schedule(count):
    return 1e-2 * jnp.ones_like(count, jnp.float32)


# Options of the preconditioner: rejected by scale_by_kfac and by both modes of the alias.
# id: (options, option name, the value as the message must show it)
BAD_PRECONDITIONER_OPTIONS = {
    "damping=0": ({"damping": 0.0}, "damping", "0.0"),
    "damping<0": ({"damping": -1e-3}, "damping", "-0.001"),
    "damping=inf": ({"damping": float("inf")}, "damping", "inf"),
    "damping=nan": ({"damping": float("nan")}, "damping", "nan"),
    "damping=str": ({"damping": "1e-3"}, "damping", "'1e-3'"),
    "damping=None": ({"damping": None}, "damping", "None"),
    "kind": ({"kind": "fisher"}, "kind", "'fisher'"),
    "block-name": ({"block": "cholesky"}, "block", "'cholesky'"),
    "block-mapping": ({"block": {"dense_*": "cholesky"}}, "block", "'cholesky'"),
    "block-type": ({"block": 3}, "block", "3"),
    "centering": ({"centering": "yes"}, "centering", "'yes'"),
    "unmatched=str": ({"unmatched": "adam"}, "unmatched", "'adam'"),
    "stats_every=0": ({"stats_every": 0}, "stats_every", "0"),
    "stats_every=1.5": ({"stats_every": 1.5}, "stats_every", "1.5"),
    "inverse_every=0": ({"inverse_every": 0}, "inverse_every", "0"),
    "inverse_every=2.5": ({"inverse_every": 2.5}, "inverse_every", "2.5"),
    "samples=0": ({"samples": 0}, "samples", "0"),
    "samples=1.5": ({"samples": 1.5}, "samples", "1.5"),
    "samples=str": ({"samples": "x"}, "samples", "'x'"),
    "stats_batch_size=0": ({"stats_batch_size": 0}, "stats_batch_size", "0"),
    "stats_batch_size=1.5": ({"stats_batch_size": 1.5}, "stats_batch_size", "1.5"),
    "ema_decay=1": ({"ema_decay": 1}, "ema_decay", "1"),
    "ema_decay<0": ({"ema_decay": -0.1}, "ema_decay", "-0.1"),
    "ema_decay=nan": ({"ema_decay": float("nan")}, "ema_decay", "nan"),
    "seed=str": ({"seed": "x"}, "seed", "'x'"),
    "seed=1.5": ({"seed": 1.5}, "seed", "1.5"),
    "batch_axes=1": ({"batch_axes": 1}, "batch_axes", "1"),
    "batch_axes-entry": ({"batch_axes": {"images": 0, "labels": 1}}, "batch_axes", "1"),
    "axis_name": ({"axis_name": 3}, "axis_name", "3"),
    "batch_layers=str": ({"batch_layers": "yes"}, "batch_layers", "'yes'"),
    "batch_layers=1": ({"batch_layers": 1}, "batch_layers", "1"),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    ("options", "name", "value"),
    list(BAD_PRECONDITIONER_OPTIONS.values()),
    ids=list(BAD_PRECONDITIONER_OPTIONS),
)
def test_bad_preconditioner_option_is_a_value_error_at_build_naming_option_and_value(
    mode, options, name, value
):
    with pytest.raises(ValueError) as error:
        build(mode, **options)
    _assert_names(error.value, name, value)


# Options of one mode of the alias: (learning_rate, options, option name, value text).
BAD_ALIAS_OPTIONS = {
    "learning_rate=0": (0.0, {}, "learning_rate", "0.0"),
    "learning_rate<0": (-0.1, {}, "learning_rate", "-0.1"),
    "learning_rate=nan": (float("nan"), {}, "learning_rate", "nan"),
    "learning_rate=str": ("x", {}, "learning_rate", "'x'"),
    "momentum=1.5": (LEARNING_RATE, {"momentum": 1.5}, "momentum", "1.5"),
    "momentum<0": (LEARNING_RATE, {"momentum": -0.1}, "momentum", "-0.1"),
    "momentum=1": (LEARNING_RATE, {"momentum": 1.0}, "momentum", "1.0"),
    "momentum=nan": (LEARNING_RATE, {"momentum": float("nan")}, "momentum", "nan"),
    "norm_constraint=0": (LEARNING_RATE, {"norm_constraint": 0.0}, "norm_constraint", "0.0"),
    "norm_constraint<0": (LEARNING_RATE, {"norm_constraint": -1.0}, "norm_constraint", "-1.0"),
    "norm_constraint=inf": (
        LEARNING_RATE,
        {"norm_constraint": float("inf")},
        "norm_constraint",
        "inf",
    ),
    "min_damping=str": (None, {"min_damping": "x"}, "min_damping", "'x'"),
    "min_damping=0": (None, {"min_damping": 0.0}, "min_damping", "0.0"),
    "damping_every=0": (None, {"damping_every": 0}, "damping_every", "0"),
    "damping_every=1.5": (None, {"damping_every": 1.5}, "damping_every", "1.5"),
    "adaptive_damping=str": (None, {"adaptive_damping": "yes"}, "adaptive_damping", "'yes'"),
    "adaptive-damping=0": (None, {"damping": 0.0}, "damping", "0.0"),
    "adaptive-damping=inf": (None, {"damping": float("inf")}, "damping", "inf"),
    "model_batch_size=0": (None, {"model_batch_size": 0}, "model_batch_size", "0"),
    "model_batch_size=1.5": (None, {"model_batch_size": 1.5}, "model_batch_size", "1.5"),
    "model_batch_size=True": (None, {"model_batch_size": True}, "model_batch_size", "True"),
    "model-batch_axes": (
        None,
        {"model_batch_size": 4, "batch_axes": 1},
        "batch_axes",
        "1",
    ),
}


@pytest.mark.parametrize(
    ("learning_rate", "options", "name", "value"),
    list(BAD_ALIAS_OPTIONS.values()),
    ids=list(BAD_ALIAS_OPTIONS),
)
def test_bad_alias_option_is_a_value_error_at_build_naming_option_and_value(
    learning_rate, options, name, value
):
    with pytest.raises(ValueError) as error:
        kfax.kfac(learning_rate, APPLY_FN, LOSS, example_inputs=X, **options)
    _assert_names(error.value, name, value)


def test_a_loss_that_is_not_an_output_distribution_is_a_type_error_naming_loss():
    with pytest.raises(TypeError, match=r"^loss must be an output distribution"):
        kfax.scale_by_kfac(APPLY_FN, optax.softmax_cross_entropy, example_inputs=X)


# ---------------------------------------------------------------- mode conflicts

# (learning_rate, options, the options the message must name)
MODE_CONFLICTS = {
    "adaptive_damping-with-rate": (LEARNING_RATE, {"adaptive_damping": True}, "adaptive_damping"),
    "momentum-adaptive": (None, {"momentum": 0.9}, "momentum"),
    "zero-momentum-adaptive": (None, {"momentum": 0.0}, "momentum"),
    "norm_constraint-adaptive": (None, {"norm_constraint": 1e-2}, "norm_constraint"),
    "damping_every-with-rate": (LEARNING_RATE, {"damping_every": 5}, "damping_every"),
    "min_damping-with-rate": (LEARNING_RATE, {"min_damping": 1e-6}, "min_damping"),
    "model_batch_size-with-rate": (LEARNING_RATE, {"model_batch_size": 4}, "model_batch_size"),
    "damping-schedule-adaptive": (None, {"damping": _schedule}, "damping"),
}


@pytest.mark.parametrize(
    ("learning_rate", "options", "name"), list(MODE_CONFLICTS.values()), ids=list(MODE_CONFLICTS)
)
def test_an_option_the_mode_does_not_use_is_a_value_error_naming_it_and_learning_rate(
    learning_rate, options, name
):
    with pytest.raises(ValueError) as error:
        kfax.kfac(learning_rate, APPLY_FN, LOSS, example_inputs=X, **options)
    _assert_names(error.value, name, "learning_rate")


@pytest.mark.parametrize("name", ["damping_every", "min_damping"])
def test_a_damping_rule_option_without_adaptive_damping_names_both_options(name):
    value = {"damping_every": 5, "min_damping": 1e-6}[name]
    with pytest.raises(ValueError) as error:
        kfax.kfac(None, APPLY_FN, LOSS, example_inputs=X, adaptive_damping=False, **{name: value})
    _assert_names(error.value, name, "adaptive_damping")


# ---------------------------------------------------------------- numeric types of options


# option -> (mode, Python value); every one is accepted as a NumPy scalar or a 0-d JAX array.
NUMERIC_OPTIONS = {
    "damping": ("scale_by_kfac", 1e-3),
    "ema_decay": ("scale_by_kfac", 0.9),
    "stats_every": ("scale_by_kfac", 2),
    "inverse_every": ("scale_by_kfac", 3),
    "samples": ("scale_by_kfac", 2),
    "stats_batch_size": ("scale_by_kfac", 4),
    "seed": ("scale_by_kfac", 5),
    "momentum": ("kfac(lr)", 0.5),
    "norm_constraint": ("kfac(lr)", 1e-3),
    "damping_every": ("kfac(None)", 2),
    "min_damping": ("kfac(None)", 1e-6),
    "model_batch_size": ("kfac(None)", 4),
}
SCALAR_KINDS = {
    "numpy": lambda v: np.int64(v) if isinstance(v, int) else np.float32(v),
    "jax": lambda v: jnp.asarray(v, jnp.int32 if isinstance(v, int) else jnp.float32),
}


@pytest.mark.parametrize("kind", list(SCALAR_KINDS))
@pytest.mark.parametrize("name", list(NUMERIC_OPTIONS))
def test_numpy_scalars_and_0d_jax_arrays_are_accepted_as_options(name, kind):
    mode, value = NUMERIC_OPTIONS[name]
    python = build(mode, **{name: value}).init(PARAMS)
    converted = build(mode, **{name: SCALAR_KINDS[kind](value)}).init(PARAMS)
    chex.assert_trees_all_equal_structs(converted, python)
    chex.assert_trees_all_equal_shapes_and_dtypes(converted, python)
    chex.assert_trees_all_equal(converted, python)


def test_numpy_scalar_and_0d_array_options_give_the_updates_of_python_numbers():
    options = {
        "damping": 1e-2,
        "momentum": 0.5,
        "norm_constraint": 1e-2,
        "ema_decay": 0.9,
        "stats_every": 1,
        "inverse_every": 2,
        "samples": 2,
        "stats_batch_size": 6,
        "seed": 3,
    }
    grads = jax.grad(lambda p: LOSS(APPLY_FN(p, X), Y))(PARAMS)
    results = {}
    for kind, convert in {"python": lambda v: v, **SCALAR_KINDS}.items():
        rate = convert(LEARNING_RATE)
        opt = kfax.kfac(
            rate, APPLY_FN, LOSS, example_inputs=X, **{k: convert(v) for k, v in options.items()}
        )
        results[kind] = opt.update(grads, opt.init(PARAMS), PARAMS, inputs=X, targets=Y)
    chex.assert_trees_all_equal(results["numpy"], results["python"])
    chex.assert_trees_all_equal(results["jax"], results["python"])


# ---------------------------------------------------------------- the kfac signature


def test_kfac_has_an_explicit_signature_with_keyword_only_options():
    parameters = inspect.signature(kfax.kfac).parameters
    kinds = {p.kind for p in parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds
    assert inspect.Parameter.VAR_POSITIONAL not in kinds
    names = list(parameters)
    assert names[:3] == ["learning_rate", "apply_fn", "loss"]
    for name in names[:3]:
        assert parameters[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert parameters[name].default is inspect.Parameter.empty
    for name in names[3:]:
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name


# kfac's own defaults, chosen by time to target (benchmarks/README.md, "Sub-batches and
# cadences"); every other option has scale_by_kfac's default.
ALIAS_OWN_DEFAULTS = {"stats_every": None, "inverse_every": None}


def test_kfac_takes_every_option_of_scale_by_kfac_with_the_same_default_but_its_cadence():
    alias = inspect.signature(kfax.kfac).parameters
    transform = inspect.signature(kfax.scale_by_kfac).parameters
    for name, parameter in transform.items():
        if name in ("apply_fn", "loss"):
            continue
        assert name in alias, name
        assert alias[name].default == ALIAS_OWN_DEFAULTS.get(name, parameter.default), name
    assert transform["stats_every"].default == 1


def _change_counts(learning_rate, steps, **options):
    """The counts at which kfac's K-FAC state took statistics and got new curvature, over
    ``steps`` updates: ``(statistics counts, refresh counts)``."""
    opt = kfax.kfac(learning_rate, APPLY_FN, LOSS, example_inputs=X, **options)
    params, state, observed, refreshed = PARAMS, opt.init(PARAMS), [], []
    is_kfac = lambda s: isinstance(s, kfax.KFACState)  # noqa: E731
    changed = lambda a, b: any(  # noqa: E731
        bool(jnp.any(x != y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    for count in range(steps):
        (before,) = [s for s in jax.tree.leaves(state, is_leaf=is_kfac) if is_kfac(s)]
        grads = jax.grad(lambda p: LOSS(APPLY_FN(p, X), Y))(params)
        updates, state = opt.update(grads, state, params, inputs=X, targets=Y)
        params = optax.apply_updates(params, updates)
        (after,) = [s for s in jax.tree.leaves(state, is_leaf=is_kfac) if is_kfac(s)]
        if changed(before.statistics, after.statistics):
            observed.append(count)
        if changed(before.curvature, after.curvature):
            refreshed.append(count)
    return tuple(observed), tuple(refreshed)


@pytest.mark.parametrize(
    "learning_rate, options, statistics, refreshes",
    [
        (None, {}, (0, 4, 8), (0, 4, 8)),  # adaptive: statistics and refreshes every 4 steps
        (LEARNING_RATE, {}, (0, 5, 10), (0, 10)),  # with a rate: every 5, scale_by_kfac's 10
        # an explicit value wins in either mode
        (None, {"stats_every": 5, "inverse_every": 10}, (0, 5, 10), (0, 10)),
        (None, {"inverse_every": 6}, (0, 4, 8), (0, 6)),
        (LEARNING_RATE, {"stats_every": 2, "inverse_every": 4}, (0, 2, 4, 6, 8, 10), (0, 4, 8)),
    ],
)
def test_kfac_observes_and_refreshes_every_4_steps_adaptive_every_5_and_10_with_a_rate(
    learning_rate, options, statistics, refreshes
):
    assert _change_counts(learning_rate, 12, **options) == (statistics, refreshes)


def test_kronecker_factors_and_the_optimiser_agree_on_defaults():
    factors = inspect.signature(kfax.kronecker_factors).parameters
    transform = inspect.signature(kfax.scale_by_kfac).parameters
    for name in ("kind", "samples", "centering"):
        assert factors[name].default == transform[name].default, name


def test_the_alias_defaults_of_the_damping_rule_are_those_of_quadratic_model_step():
    rule = inspect.signature(kfax.quadratic_model_step).parameters
    from kfax import alias  # noqa: PLC0415

    assert alias.DEFAULT_DAMPING_EVERY == rule["damping_every"].default
    assert alias.DEFAULT_MIN_DAMPING == rule["min_damping"].default
    assert inspect.signature(kfax.kfac).parameters["damping"].default == rule["damping"].default


def test_inject_hyperparams_accepts_kfac_with_its_static_arguments():
    injected = optax.inject_hyperparams(
        kfax.kfac, static_args=("apply_fn", "loss", "example_inputs")
    )(learning_rate=LEARNING_RATE, apply_fn=APPLY_FN, loss=LOSS, example_inputs=X, momentum=0.9)
    state = injected.init(PARAMS)
    assert {"learning_rate", "momentum", "damping"} <= set(state.hyperparams)
    for name in ("apply_fn", "loss", "example_inputs"):
        assert name not in state.hyperparams


def _numeric_defaults(function) -> list[str]:
    """The parameters ``optax.inject_hyperparams`` injects unless listed in ``static_args``: those
    whose default is a number (it binds the defaults too)."""
    parameters = inspect.signature(function).parameters.values()
    numeric = (int, float)
    return [
        p.name
        for p in parameters
        if isinstance(p.default, numeric) and not isinstance(p.default, bool)
    ]


@pytest.mark.parametrize("name", _numeric_defaults(kfax.kfac))
def test_every_option_inject_hyperparams_injects_by_default_may_be_traced(name):
    """With ``static_args=("apply_fn", "loss", "example_inputs")`` every option with a numeric
    default reaches kfac as a traced array under jit: kfac must build and update with it."""
    default = inspect.signature(kfax.kfac).parameters[name].default
    grads = _grads(PARAMS, APPLY_FN)
    state = kfax.kfac(LEARNING_RATE, APPLY_FN, LOSS, example_inputs=X).init(PARAMS)

    def update(value):
        opt = kfax.kfac(LEARNING_RATE, APPLY_FN, LOSS, example_inputs=X, **{name: value})
        return opt.update(grads, state, PARAMS, inputs=X, targets=Y)

    jax.eval_shape(update, jnp.asarray(default))  # traces, compiles nothing


# ---------------------------------------------------------------- init and update errors


def _grads(params, apply_fn, x=X, y=Y):
    return jax.grad(lambda p: LOSS(apply_fn(p, x), y))(params)


def test_init_without_example_inputs_is_a_value_error_naming_example_inputs():
    for mode in MODES:
        opt = build(mode, x=None)
        with pytest.raises(ValueError) as error:
            opt.init(PARAMS)
        _assert_names(error.value, "example_inputs")


class UpdateErrorTest(chex.TestCase):
    """``update`` errors name what is wrong, eagerly and under ``jax.jit`` alike."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*MODES)
    def test_update_without_params_is_a_value_error_naming_params(self, mode):
        opt = build(mode)
        state = opt.init(PARAMS)
        update = self.variant(lambda g, s: opt.update(g, s, inputs=X, targets=Y))
        with pytest.raises(ValueError, match=r"\bparams\b"):
            update(_grads(PARAMS, APPLY_FN), state)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*MODES)
    def test_update_without_inputs_is_a_value_error_naming_inputs(self, mode):
        opt = build(mode)
        state = opt.init(PARAMS)
        update = self.variant(lambda g, s, p: opt.update(g, s, p, targets=Y))
        with pytest.raises(ValueError, match=r"\binputs\b"):
            update(_grads(PARAMS, APPLY_FN), state, PARAMS)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("empirical", "scale_by_kfac", {"kind": "empirical"}),
        ("empirical_alias", "kfac(lr)", {"kind": "empirical"}),
        ("adaptive", "kfac(None)", {}),
    )
    def test_update_without_needed_targets_is_a_value_error_naming_targets(self, mode, options):
        opt = build(mode, **options)
        state = opt.init(PARAMS)
        update = self.variant(lambda g, s, p, x: opt.update(g, s, p, inputs=x))
        with pytest.raises(ValueError, match=r"\btargets\b"):
            update(_grads(PARAMS, APPLY_FN), state, PARAMS, X)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*MODES)
    def test_gradients_missing_a_subtree_are_a_value_error_naming_the_missing_path(self, mode):
        opt = build(mode)
        state = opt.init(PARAMS)
        grads = _grads(PARAMS, APPLY_FN)
        partial = {"dense_0": grads["dense_0"]}  # no gradient for dense_1
        update = self.variant(lambda g, s, p: opt.update(g, s, p, inputs=X, targets=Y))
        with pytest.raises(ValueError) as error:
            update(partial, state, PARAMS)
        _assert_names(error.value, "['dense_1']['kernel']")

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*MODES)
    def test_params_of_another_model_are_a_value_error_naming_params(self, mode):
        opt = build(mode)
        state = opt.init(PARAMS)
        wider, _, _, _ = models.mlp(sizes=(4, 6, CLASSES), batch=BATCH)
        update = self.variant(lambda g, s, p: opt.update(g, s, p, inputs=X, targets=Y))
        with pytest.raises(ValueError, match=r"params do not match the K-FAC state"):
            update(_grads(wider, APPLY_FN), state, wider)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("adam", "scale_by_kfac", {"unmatched": optax.scale_by_adam()}),
        ("adam_alias", "kfac(lr)", {"unmatched": optax.scale_by_adam()}),
        ("adaptive", "kfac(None)", {}),
    )
    def test_a_parameter_outside_the_layers_that_changed_shape_is_a_value_error(
        self, mode, options
    ):
        """Its state (Adam's moments, the adaptive step's previous update) has the old shape."""
        params, apply_fn, x, y = _tiny(extra_scalar=True)
        # block=None for the temperature: it is outside every block, in `unmatched`
        opt = build(mode, apply_fn=apply_fn, x=x, block={"temperature": None}, **options)
        state = opt.init(params)  # temperature: shape ()
        per_class = {**params, "temperature": jnp.full((CLASSES,), 1.3)}
        update = self.variant(lambda g, s, p: opt.update(g, s, p, inputs=x, targets=y))
        with pytest.raises(ValueError) as error:
            update(_grads(per_class, apply_fn, x, y), state, per_class)
        _assert_names(error.value, "params", "temperature")

    def test_a_stateless_unmatched_transform_follows_a_parameter_that_changed_shape(self):
        """With the default identity nothing is stored for it: its update is its gradient."""
        params, apply_fn, x, y = _tiny(extra_scalar=True)
        opt = build("scale_by_kfac", apply_fn=apply_fn, x=x, block={"temperature": None})
        state = opt.init(params)
        per_class = {**params, "temperature": jnp.full((CLASSES,), 1.3)}
        grads = _grads(per_class, apply_fn, x, y)
        updates, _ = opt.update(grads, state, per_class, inputs=x, targets=y)
        chex.assert_trees_all_equal(updates["temperature"], grads["temperature"])

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*MODES)
    def test_an_axis_name_not_bound_at_update_is_a_value_error_naming_it(self, mode):
        opt = build(mode, axis_name="devices")
        state = opt.init(PARAMS)
        update = self.variant(lambda g, s, p: opt.update(g, s, p, inputs=X, targets=Y))
        with pytest.raises(ValueError) as error:
            update(_grads(PARAMS, APPLY_FN), state, PARAMS)
        _assert_names(error.value, "axis_name", "'devices'")
