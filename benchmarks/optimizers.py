"""Optimiser specifications and the runners that train a task with them, one step at a time.

A specification is written ``family[+option=value...][@learning_rate]``, for example ``adam``,
``kfac@0.03`` or ``kfac+stats_batch_size=125+inverse_every=20@0.03``. Options go to the
optimiser's constructor (``kfax.kfac`` or the kfac-jax adapter). A fixed-step family given
without a learning rate is expanded over the task's grid (see :func:`expand`).

Families:

* ``adam``; ``sgd`` (Nesterov momentum 0.9);
* ``kfac`` (``kfax.kfac`` defaults: centered, factored damping 1e-2, norm constraint 1e-2;
  momentum 0.9; ``kfac_centered`` is the same), ``kfac_homogeneous`` (``centered=False``),
  ``kfac_eigen`` (``damping_method="eigen"``), ``ekfac`` (``eigen_correction=True``),
  ``kfac_adaptive`` (``learning_rate=None``);
* ``kfac_jax`` (kfac-jax adaptive, as in its MNIST examples) and ``kfac_jax_fixed`` (fixed
  learning rate and momentum 0.9, with kfax.kfac's default damping and norm constraint).

Both kfac-jax families refresh inverses every 10 steps (kfax's default ``inverse_every``) unless
``+inverse_update_period=...`` is given.

Every runner keeps its own parameters and state, compiles before it is timed
(:attr:`Runner.compile_seconds`) and blocks until each step is done, so a caller can time
``step`` directly.
"""

from __future__ import annotations

import ast
import dataclasses
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
    "kfac_centered": {"centered": True},
    "kfac_homogeneous": {"centered": False},
    "kfac_eigen": {"damping_method": "eigen"},
    "ekfac": {"eigen_correction": True},
    "kfac_adaptive": {},
}
FAMILIES = ("adam", "sgd", *KFAX_FAMILIES, "kfac_jax", "kfac_jax_fixed")
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


def parse(text: str) -> Spec:
    """Parses ``family[+option=value...][@learning_rate]`` into a :class:`Spec`."""
    text, _, lr = text.strip().partition("@")
    family, *option_texts = text.split("+")
    if family not in FAMILIES:
        raise ValueError(f"unknown optimiser {family!r}; choose from {', '.join(FAMILIES)}")
    options = []
    for item in option_texts:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"option {item!r} of {text!r} is not key=value")
        options.append((key, _value(value)))
    learning_rate = float(lr) if lr else None
    if family in ADAPTIVE and learning_rate is not None:
        raise ValueError(f"{family} chooses its own learning rate; drop '@{lr}'")
    return Spec(family, tuple(options), learning_rate)


def grid_name(family: str) -> str:
    """The key of :attr:`Task.grids` a fixed-step family draws its learning rates from."""
    return family if family in ("adam", "sgd", "kfac_jax_fixed") else "kfac"


def expand(texts: str, task: Task, *, quick: bool = False) -> list[Spec]:
    """Parses a comma-separated list, expanding each fixed-step family without a learning rate
    over the task's grid (only the grid's middle value when ``quick``)."""
    specs = []
    for text in filter(None, (t.strip() for t in texts.split(","))):
        spec = parse(text)
        if spec.family in ADAPTIVE or spec.learning_rate is not None:
            specs.append(spec)
            continue
        grid = task.grids[grid_name(spec.family)]
        for lr in grid[len(grid) // 2 : len(grid) // 2 + 1] if quick else grid:
            specs.append(dataclasses.replace(spec, learning_rate=lr))
    return specs


def tree_bytes(tree: Any) -> int:
    """Total ``nbytes`` of the array leaves of a pytree."""
    return int(sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree_util.tree_leaves(tree)))


def copy_tree(tree: Any) -> Any:
    """A fresh copy of every array (runners donate their parameters)."""
    return jax.tree_util.tree_map(jnp.array, tree)


def kfax_transform(spec: Spec, task: Task, example_inputs: Any) -> optax.GradientTransformation:
    """The optax transformation of an Adam, SGD or kfax specification."""
    options = dict(spec.options)
    if spec.family == "adam":
        return optax.adam(spec.learning_rate, **options)
    if spec.family == "sgd":
        return optax.sgd(spec.learning_rate, momentum=MOMENTUM, nesterov=True, **options)
    options = {**KFAX_FAMILIES[spec.family], **options}
    return kfax.kfac(
        spec.learning_rate,
        task.apply_fn,
        task.loss,
        momentum=MOMENTUM,
        example_inputs=example_inputs,
        **options,
    )


class Runner:
    """Trains one task with one optimiser: ``start`` once, then ``step`` per batch."""

    spec: Spec
    params: Any
    state: Any
    compile_seconds: float = float("nan")

    def start(self, params: Any, batch: Batch) -> None:
        """Copies ``params``, builds the state and compiles (untimed by callers)."""
        raise NotImplementedError

    def step(self, batch: Batch) -> float:
        """One training step; returns the batch loss before the update, after blocking."""
        raise NotImplementedError

    @property
    def state_bytes(self) -> int:
        """Bytes of the optimiser state."""
        return tree_bytes(self.state)


class OptaxRunner(Runner):
    """Adam, SGD and kfax: ``value_and_grad``, ``update`` and ``apply_updates`` in one jit."""

    def __init__(self, spec: Spec, task: Task):
        self.spec, self.task = spec, task

    def start(self, params: Any, batch: Batch) -> None:
        transform = optax.with_extra_args_support(kfax_transform(self.spec, self.task, batch[0]))
        loss_fn = self.task.loss_fn

        def step(params, state, inputs, targets):
            loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
            updates, state = transform.update(grads, state, params, inputs=inputs, targets=targets)
            return optax.apply_updates(params, updates), state, loss

        self.params = copy_tree(params)
        self.state = transform.init(self.params)
        begin = time.perf_counter()
        jitted = jax.jit(step, donate_argnums=(0, 1))
        self._step = jitted.lower(self.params, self.state, *batch).compile()
        self.compile_seconds = time.perf_counter() - begin

    def step(self, batch: Batch) -> float:
        self.params, self.state, loss = self._step(self.params, self.state, *batch)
        jax.block_until_ready((self.params, self.state))
        return float(loss)


class KfacJaxRunner(Runner):
    """kfac-jax through ``benchmarks.peers.kfac_jax_runner``; warmed up on a throw-away state."""

    def __init__(self, spec: Spec, task: Task, seed: int = 0):
        from benchmarks.peers.kfac_jax_runner import make_kfac_jax

        self.spec = spec
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
        return loss

    @property
    def state_bytes(self) -> int:
        return tree_bytes(self.state.opt_state)


def make_runner(spec: Spec, task: Task, seed: int = 0) -> Runner:
    """The runner of ``spec`` on ``task``."""
    if spec.family.startswith("kfac_jax"):
        return KfacJaxRunner(spec, task, seed)
    return OptaxRunner(spec, task)


def kfac_jax_available() -> bool:
    """Whether kfac-jax can be imported here (it is only installed in ``.venv-bench``)."""
    try:
        import kfac_jax  # noqa: F401
    except ImportError:
        return False
    return True


def batch_stream(task: Task, batch_size: int, seed: int):
    """The endless stream of shuffled ``(inputs, targets)`` numpy batches for ``seed``."""
    from examples.data import batches

    return batches((task.inputs, task.targets), batch_size, key_or_seed=seed)


def evaluator(task: Task, batch_size: int):
    """``evaluate(params) -> float``: the mean loss over the whole training set, in batches."""
    loss_fn = jax.jit(task.loss_fn)
    n = len(task.inputs) // batch_size * batch_size
    chunks = [
        (
            jnp.asarray(task.inputs[i : i + batch_size]),
            jnp.asarray(task.targets[i : i + batch_size]),
        )
        for i in range(0, n, batch_size)
    ]

    def evaluate(params: Any) -> float:
        return float(np.mean([float(loss_fn(params, x, y)) for x, y in chunks]))

    return evaluate
