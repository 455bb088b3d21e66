"""Optimiser specifications and the runners that train a task with them, one step at a time.

A specification is written ``family[+option=value...][@learning_rate]``, for example ``adam``,
``kfac@0.03`` or ``kfac+stats_batch_size=125+inverse_every=20@0.03``. Options go to the
optimiser's constructor (``kfax.kfac``, the optax or psgdax alias, or the kfac-jax adapter);
values are Python literals (``block={'head': None}``) or plain words. A fixed-step family given
without a learning rate is expanded over the task's grid (see :func:`expand`).

Families:

* ``adam``; ``sgd`` (Nesterov momentum 0.9);
* ``muon`` (``optax.contrib.muon``; the task sets the learning rate of Muon's Adam part and,
  for the transformer, which matrices are orthogonalised), ``psgd`` (PSGD-Kron,
  ``psgdax.kron``), ``sophia`` (``optax.contrib.sophia`` with its Hutchinson estimator);
* ``kfac`` (``kfax.kfac(lr, ...)`` defaults: factored blocks, exact centring, damping 1e-2,
  norm constraint 1e-2, momentum 0.9, statistics every 5 steps, refreshes every 10),
  ``kfac_homogeneous`` (``centering="none"``), ``kfac_eigen`` (``block="eigen"``), ``ekfac``
  (``block="ekfac"``), ``kfac_adaptive`` (``kfax.kfac(None, ...)``: quadratic-model step and
  Levenberg-Marquardt damping);
* ``kfac_jax`` (kfac-jax adaptive, as in its MNIST examples) and ``kfac_jax_fixed`` (fixed
  learning rate and momentum 0.9, with kfax.kfac's default damping and norm constraint).

kfax's ``unmatched=`` takes a word: ``identity`` (the default), ``adam`` (``optax.scale_by_adam()``)
or ``adam*0.1`` (Adam's direction scaled by 0.1, for a fixed learning rate tuned for K-FAC).
``+fused=True`` (kfax families; a harness option, not passed to ``kfax.kfac``) computes the loss,
the gradient and the statistics in one forward pass with ``kfax.value_and_grad`` and passes the
statistics to ``update``; it is skipped with a warning where kfax has no ``value_and_grad``.
Both kfac-jax families refresh inverses every 10 steps (kfax's default ``inverse_every``) unless
``+inverse_update_period=...`` is given.

Every runner keeps its own parameters and state, compiles before it is timed
(:attr:`Runner.compile_seconds`) and blocks until each step is done, so a caller can time
``step`` directly. ``step`` returns the batch loss times the task's ``loss_scale``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import statistics
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfax
from benchmarks.tasks import Task

KFAX_FAMILIES = {
    "kfac": {},
    "kfac_homogeneous": {"centering": "none"},
    "kfac_eigen": {"block": "eigen"},
    "ekfac": {"block": "ekfac"},
    "kfac_adaptive": {},
}
OPTAX_FAMILIES = ("adam", "sgd", "muon", "psgd", "sophia")
KFAC_JAX_FAMILIES = ("kfac_jax", "kfac_jax_fixed")
FAMILIES = (*OPTAX_FAMILIES, *KFAX_FAMILIES, *KFAC_JAX_FAMILIES)
ADAPTIVE = ("kfac_adaptive", "kfac_jax")
MOMENTUM = 0.9
PEER_WARMUP_STEPS = 12  # kfac-jax compiles new variants up to its first inverse refreshes.
PEER_INVERSE_PERIOD = 10  # kfac-jax's inverse_update_period; kfax's inverse_every is 10 too.
# kfac_jax_fixed uses kfax.kfac's defaults for a fixed learning rate (same meaning in both).
PEER_FIXED_DEFAULTS = {"damping": 1e-2, "norm_constraint": 1e-2}

Batch = tuple[jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class Spec:
    """One optimiser configuration: a family, constructor options and a learning rate."""

    family: str
    options: tuple[tuple[str, Any], ...] = ()
    learning_rate: float | None = None

    @property
    def group(self) -> str:
        """The label without the learning rate: runs of a grid share it."""
        return "".join([self.family, *(f"+{k}={v}" for k, v in self.options)])

    @property
    def label(self) -> str:
        lr = "" if self.learning_rate is None else f"@{self.learning_rate:g}"
        return self.group + lr


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def split_top_level(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` outside brackets and quotes (``block={'a': 1, 'b': 2}``)."""
    parts, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == separator and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse(text: str) -> Spec:
    """Parses ``family[+option=value...][@learning_rate]`` into a :class:`Spec`."""
    text = text.strip()
    body, lr = text, ""
    at = split_top_level(text, "@")
    if len(at) > 1:
        body, lr = "@".join(at[:-1]), at[-1]
    family, *option_texts = split_top_level(body, "+")
    if family not in FAMILIES:
        raise ValueError(f"unknown optimiser {family!r}; choose from {', '.join(FAMILIES)}")
    options = []
    for item in option_texts:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"option {item!r} of {text!r} is not key=value")
        options.append((key.strip(), _value(value.strip())))
    learning_rate = float(lr) if lr else None
    if "fused" in dict(options) and family not in KFAX_FAMILIES:
        raise ValueError(f"+fused is an option of the kfax families, not of {family!r}")
    if family in ADAPTIVE and learning_rate is not None:
        raise ValueError(f"{family} chooses its own learning rate; drop '@{lr}'")
    return Spec(family, tuple(options), learning_rate)


def grid_name(family: str) -> str:
    """The key of :attr:`Task.grids` a fixed-step family draws its learning rates from."""
    return family if family in (*OPTAX_FAMILIES, "kfac_jax_fixed") else "kfac"


def split_specs(texts: str) -> list[str]:
    """The specifications of a comma-separated list (commas inside brackets are kept)."""
    return [t.strip() for t in split_top_level(texts, ",") if t.strip()]


def expand(texts: str, task: Task, *, quick: bool = False) -> list[Spec]:
    """Parses a comma-separated list, expanding each fixed-step family without a learning rate
    over the task's grid (only the grid's middle value when ``quick``)."""
    specs = []
    for text in split_specs(texts):
        spec = parse(text)
        if spec.family in ADAPTIVE or spec.learning_rate is not None:
            specs.append(spec)
            continue
        grid = task.grids[grid_name(spec.family)]
        for lr in grid[len(grid) // 2 : len(grid) // 2 + 1] if quick else grid:
            specs.append(dataclasses.replace(spec, learning_rate=lr))
    return specs


def missing(family: str) -> str | None:
    """Why ``family`` cannot run in this environment, or ``None`` if it can."""
    if family == "psgd" and importlib.util.find_spec("psgdax") is None:
        return "psgdax is not installed (pip install psgdax==0.1.1)"
    if family in ("muon", "sophia"):
        from optax import contrib  # noqa: PLC0415

        if not hasattr(contrib, family):
            return f"optax {optax.__version__} has no optax.contrib.{family}"
    if family in KFAC_JAX_FAMILIES:
        if importlib.util.find_spec("kfac_jax") is None:
            return "kfac-jax is not installed (it runs in .venv-bench: make bench-venv)"
        from benchmarks.peers.kfac_jax_runner import WORKING_JAX_VERSIONS  # noqa: PLC0415

        if jax.__version__ not in WORKING_JAX_VERSIONS:
            return (
                f"kfac-jax 0.0.8 does not run on jax {jax.__version__} (only on "
                f"{', '.join(WORKING_JAX_VERSIONS)}: use .venv-bench)"
            )
    return None


def is_fused(spec: Spec) -> bool:
    """Whether a kfax spec takes its statistics from ``kfax.value_and_grad`` (``+fused=True``)."""
    return spec.family in KFAX_FAMILIES and bool(dict(spec.options).get("fused", False))


def available(specs: list[Spec]) -> tuple[list[Spec], dict[str, str]]:
    """The specs that can run here, and ``{label: reason}`` for those that cannot (warned)."""
    kept, skipped = [], {}
    for spec in specs:
        reason = missing(spec.family)
        if reason is None and is_fused(spec) and not hasattr(kfax, "value_and_grad"):
            reason = f"kfax {kfax.__version__} has no value_and_grad (the fused path)"
        if reason is None:
            kept.append(spec)
        else:
            skipped[spec.label] = reason
    for reason in sorted(set(skipped.values())):
        labels = [label for label, r in skipped.items() if r == reason]
        warnings.warn(f"skipping {', '.join(labels)}: {reason}", stacklevel=2)
    return kept, skipped


def kfac_jax_available() -> bool:
    """Whether kfac-jax can run here (it is only installed in ``.venv-bench``)."""
    return missing("kfac_jax") is None


def tree_bytes(tree: Any) -> int:
    """Total ``nbytes`` of the array leaves of a pytree."""
    return int(sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree_util.tree_leaves(tree)))


def copy_tree(tree: Any) -> Any:
    """A fresh copy of every array (runners donate their parameters)."""
    return jax.tree_util.tree_map(jnp.array, tree)


def unmatched_transform(value: Any) -> optax.GradientTransformation | None:
    """kfax's ``unmatched=`` from a word: ``identity``, ``adam`` or ``adam*<scale>``."""
    if value is None or isinstance(value, optax.GradientTransformation):
        return value
    name, _, scale = str(value).partition("*")
    if name in ("identity", "none", "None"):
        return None
    if name != "adam":
        raise ValueError(f"unmatched={value!r}: use identity, adam or adam*<scale>")
    adam = optax.scale_by_adam()
    return optax.chain(adam, optax.scale(float(scale))) if scale else adam


def kfax_options(spec: Spec) -> dict[str, Any]:
    """The keyword arguments of ``kfax.kfac`` for a kfax specification."""
    options = {**KFAX_FAMILIES[spec.family], **dict(spec.options)}
    options.pop("fused", None)  # the harness's option, not kfax.kfac's
    if "unmatched" in options:
        options["unmatched"] = unmatched_transform(options["unmatched"])
    return options


def make_transform(spec: Spec, task: Task, example_inputs: Any) -> optax.GradientTransformation:
    """The optax transformation of a specification (every family but kfac-jax's)."""
    options = dict(spec.options)
    lr = spec.learning_rate
    if spec.family == "adam":
        return optax.adam(lr, **options)
    if spec.family == "sgd":
        return optax.sgd(lr, momentum=MOMENTUM, nesterov=True, **options)
    if spec.family == "muon":
        from optax.contrib import muon  # noqa: PLC0415

        return muon(lr, **{**task.muon_options, **options})
    if spec.family == "psgd":
        import psgdax  # noqa: PLC0415

        return psgdax.kron(lr, **options)
    if spec.family == "sophia":
        from optax.contrib import sophia  # noqa: PLC0415

        return sophia(lr, **options)
    return kfax.kfac(
        lr, task.apply_fn, task.loss, example_inputs=example_inputs, **kfax_options(spec)
    )


def extra_arguments(spec: Spec, task: Task, params: Any, inputs: Any, targets: Any) -> dict:
    """What a family's ``update`` needs beyond ``(grads, state, params)``."""
    if spec.family in KFAX_FAMILIES:
        return {"inputs": inputs, "targets": targets}
    if spec.family == "sophia":
        return {"obj_fn": lambda p: task.loss_fn(p, inputs, targets)}
    return {}


def init_state(spec: Spec, transform: optax.GradientTransformation, params: Any) -> Any:
    """The state :func:`train_step`'s step takes (a fresh copy: no buffer appears twice)."""
    state = transform.init(params)
    if is_fused(spec):
        state = (state, jax.random.PRNGKey(0))
    return copy_tree(state)


class Runner:
    """Trains one task with one optimiser: ``start`` once, then ``step`` per batch."""

    spec: Spec
    params: Any
    state: Any
    compile_seconds: float = float("nan")
    loss_scale: float = 1.0

    def start(self, params: Any, batch: Batch) -> None:
        """Copies ``params``, builds the state and compiles (untimed by callers)."""
        raise NotImplementedError

    def step(self, batch: Batch) -> float:
        """One training step; returns the scaled batch loss before the update, after blocking."""
        raise NotImplementedError

    @property
    def state_bytes(self) -> int:
        """Bytes of the optimiser state."""
        return tree_bytes(self.state)


def train_step(spec: Spec, task: Task, transform: optax.GradientTransformation):
    """``step(params, state, inputs, targets) -> (params, state, loss)``, not yet jitted.

    With ``+fused=True`` the state is ``(optimiser state, PRNG key)`` (see :func:`init_state`).
    """
    loss_fn = task.loss_fn
    if is_fused(spec):
        options = kfax_options(spec)
        fused = kfax.value_and_grad(
            task.apply_fn, task.loss, kind=options.get("kind", "mc"), samples=options.get("samples")
        )

        def fused_step(params, state, inputs, targets):
            opt_state, key = state
            key, sample_key = jax.random.split(key)
            (loss, grads), stats = fused(params, inputs, targets, key=sample_key)
            updates, opt_state = transform.update(
                grads, opt_state, params, inputs=inputs, targets=targets, statistics=stats
            )
            return optax.apply_updates(params, updates), (opt_state, key), loss

        return fused_step

    def step(params, state, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
        extra = extra_arguments(spec, task, params, inputs, targets)
        updates, state = transform.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state, loss

    return step


class OptaxRunner(Runner):
    """Every optax-style family: ``value_and_grad``, ``update`` and ``apply_updates`` in one jit."""

    def __init__(self, spec: Spec, task: Task):
        self.spec, self.task = spec, task
        self.loss_scale = task.loss_scale

    def start(self, params: Any, batch: Batch) -> None:
        transform = make_transform(self.spec, self.task, batch[0])
        step = train_step(self.spec, self.task, transform)
        self.params = copy_tree(params)
        self.state = init_state(self.spec, transform, self.params)
        begin = time.perf_counter()
        jitted = jax.jit(step, donate_argnums=(0, 1))
        self._step = jitted.lower(self.params, self.state, *batch).compile()
        self.compile_seconds = time.perf_counter() - begin

    def step(self, batch: Batch) -> float:
        self.params, self.state, loss = self._step(self.params, self.state, *batch)
        jax.block_until_ready((self.params, self.state))
        return float(loss) * self.loss_scale


class KfacJaxRunner(Runner):
    """kfac-jax through ``benchmarks.peers.kfac_jax_runner``; warmed up on a throw-away state."""

    def __init__(self, spec: Spec, task: Task, seed: int = 0):
        from benchmarks.peers.kfac_jax_runner import make_kfac_jax  # noqa: PLC0415

        self.spec = spec
        self.loss_scale = task.loss_scale
        options = {"inverse_update_period": PEER_INVERSE_PERIOD, **dict(spec.options)}
        if spec.family == "kfac_jax":
            self.peer = make_kfac_jax(task.apply_fn, task.loss_kind, seed=seed, **options)
        else:
            options = {**PEER_FIXED_DEFAULTS, **options}
            self.peer = make_kfac_jax(
                task.apply_fn,
                task.loss_kind,
                adaptive=False,
                learning_rate=spec.learning_rate,
                momentum=MOMENTUM,
                seed=seed,
                **options,
            )

    def start(self, params: Any, batch: Batch) -> None:
        # kfac-jax compiles inside its first steps (burn-in, then new variants at the first
        # inverse refresh and damping update). Run them on a copy, then start afresh: the
        # compiled functions are cached on the optimizer. Compile time is estimated as the
        # warm-up time in excess of the median warm-up step.
        warm_params = copy_tree(params)
        warm_state = self.peer.init(warm_params, batch)
        times = []
        with warnings.catch_warnings():  # kfac-jax's burn-in cannot reuse the donated batch.
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            for _ in range(PEER_WARMUP_STEPS):
                begin = time.perf_counter()
                warm_params, warm_state, _ = self.peer.step(warm_params, warm_state, batch)
                jax.block_until_ready(warm_params)
                times.append(time.perf_counter() - begin)
        median = statistics.median(times)
        self.compile_seconds = float(sum(max(0.0, t - median) for t in times))
        del warm_params, warm_state
        self.params = copy_tree(params)
        self.state = self.peer.init(self.params, batch)

    def step(self, batch: Batch) -> float:
        self.params, self.state, loss = self.peer.step(self.params, self.state, batch)
        jax.block_until_ready(self.params)
        return loss * self.loss_scale

    @property
    def state_bytes(self) -> int:
        return tree_bytes(self.state.opt_state)


def make_runner(spec: Spec, task: Task, seed: int = 0) -> Runner:
    """The runner of ``spec`` on ``task``."""
    if spec.family in KFAC_JAX_FAMILIES:
        return KfacJaxRunner(spec, task, seed)
    return OptaxRunner(spec, task)


def batch_stream(task: Task, batch_size: int, seed: int):
    """The endless stream of shuffled ``(inputs, targets)`` numpy batches for ``seed``."""
    from examples.data import batches  # noqa: PLC0415

    return batches((task.inputs, task.targets), batch_size, key_or_seed=seed)


def evaluator(task: Task, batch_size: int):
    """``evaluate(params) -> float``: the scaled mean loss over the task's evaluation set."""
    loss_fn = jax.jit(task.loss_fn)
    inputs, targets = task.eval_set()
    size = task.eval_batch_size or batch_size
    n = len(inputs) // size * size
    chunks = [
        (jnp.asarray(inputs[i : i + size]), jnp.asarray(targets[i : i + size]))
        for i in range(0, n, size)
    ]

    def evaluate(params: Any) -> float:
        values = [float(loss_fn(params, x, y)) for x, y in chunks]
        return float(np.mean(values)) * task.loss_scale

    return evaluate
