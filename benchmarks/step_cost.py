"""Per-step cost of kfax and its peers against Adam, state memory, and a kfax step's breakdown.

Usage (repository root, benchmark environment)::

    .venv-bench/bin/python -m benchmarks.step_cost --batch-size 1000 --steps 40 --repeats 3

Part 1, step cost: every configuration (``--configs``, specs as in ``benchmarks.run``) is
compiled and warmed up, then the configurations take turns running ``--steps`` timed steps (or
the configuration's cadence period, the least common multiple of its cadences, where that is
longer, so that every kind of step is timed), for ``--repeats`` rounds, on the same batches.
Each step is classified by which periodic work it does (statistics, inverse refresh, damping
update, Sophia's Hessian estimate: ``count % period == 0``); the amortised cost is the sum over
classes of (class frequency) x (median time of the class), so that a refresh every 10 steps
counts for a tenth of its cost. The plain mean over each window is reported too (median over
rounds); it is the fairer figure for PSGD-Kron, whose preconditioner update is random. Compile
time and state bytes are recorded per configuration.

Part 2, breakdown: the pieces of one kfax K-FAC step (``kfax.kfac`` defaults), each a call of
the library's own functions jitted on its own and timed in turn (median over
``--breakdown-repeats`` rounds): forward+gradient, the statistics pass
(:func:`kfax.statistics.statistics_pass`: tapped forward and vjp of sampled cotangents), the
blocks' ``observe`` (moments and moving averages), ``refresh`` (factored blocks' Cholesky
inverses; eigen blocks' eigendecompositions for comparison) and ``precondition`` (the blocks
come from :func:`kfax._plan.make_plan`, and run through kfax's own ``map_layers``, layer by
layer unless ``batch_layers=True``: as in the optimiser's step), and the full jitted
training step without and with a refresh, for ``kfac(lr)`` and ``kfac(None)``. XLA's FLOP
estimate and the compile time of each piece are recorded. ``--quick`` leaves out the
eigendecompositions (slow on the quick autoencoder's 784-wide input layer) and the fused path.
Where kfax has ``kfax.value_and_grad`` (one forward pass for the loss, the gradient and the
statistics), the breakdown adds it and the fused ``kfac(lr)`` step.

Writes ``<out>/step_cost_<task>_b<batch>.json`` and prints tables.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfax
from benchmarks.optimizers import (
    KFAX_FAMILIES,
    KfacJaxRunner,
    Runner,
    Spec,
    available,
    batch_stream,
    expand,
    init_state,
    make_runner,
    make_transform,
    parse,
    split_specs,
    train_step,
)
from benchmarks.run import RESULTS, git_commit, machine, versions
from benchmarks.tasks import TASKS, Task, make_task

# kfax's defaults, then the same with statistics every step (and, adaptive, the model on the
# whole batch): the defaults before issue 10's cadence study.
DEFAULT_CONFIGS = (
    "adam,muon,psgd,kfac,kfac_adaptive,kfac+stats_every=1,"
    "kfac_adaptive+stats_every=1+model_batch_size=False+inverse_every=10,kfac+fused=True,kfac_adaptive+fused=True,"
    "kfac+inverse_every=20,kfac+stats_batch_size=125,kfac_homogeneous,ekfac,kfac_jax,kfac_jax_fixed"
)
WARMUP_STEPS = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_cost")
    parser.add_argument("--task", choices=TASKS, default="autoencoder")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the task's")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per round (at least each configuration's cadence period)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="rounds of timed steps")
    parser.add_argument("--breakdown-repeats", type=int, default=None, help="0 skips the breakdown")
    parser.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    defaults = (10, 2, 3) if args.quick else (40, 3, 15)
    for name, value in zip(("steps", "repeats", "breakdown_repeats"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# ------------------------------------------------------------------------------- step cost


def periods(spec: Spec) -> dict[str, int]:
    """The periodic pieces of work of a configuration and their periods, in steps."""
    options = dict(spec.options)
    if spec.family.startswith("kfac_jax"):
        found = {"inverse": options.get("inverse_update_period", 10)}
        if spec.family == "kfac_jax":
            found["damping"] = options.get("damping_adaptation_interval", 5)
        return found
    if spec.family == "sophia":
        return {"hessian": options.get("update_interval", 10)}
    if spec.family not in KFAX_FAMILIES:
        return {}
    adaptive = spec.family == "kfac_adaptive"
    found = {
        "stats": options.get("stats_every", kfac_default("stats_every", adaptive)),
        "inverse": options.get("inverse_every", kfac_default("inverse_every", adaptive)),
    }
    if adaptive:
        found["damping"] = options.get("damping_every", kfac_default("damping_every", adaptive))
    return found


def kfac_default(name: str, adaptive: bool) -> int:
    """``kfax.kfac``'s default of a cadence option in a mode (the ones left ``None`` in its
    signature are filled in by ``kfax.alias``)."""
    default = inspect.signature(kfax.kfac).parameters[name].default
    if default is not None:
        return default
    mode = "adaptive" if adaptive else "learning_rate"
    if name == "stats_every":
        return kfax.alias.DEFAULT_STATS_EVERY[mode]
    if name == "inverse_every":
        return kfax.alias.DEFAULT_INVERSE_EVERY[mode]
    return kfax.alias.DEFAULT_DAMPING_EVERY


def amortised(times: dict[tuple, list[float]], cycle: dict[str, int]) -> float:
    """Sum over step classes of (frequency of the class) x (median time of the class).

    NaN if some class was never timed (the windows were shorter than a period).
    """
    lcm = covering_window(cycle)
    total = 0.0
    for count in range(lcm):
        key = tuple(count % p == 0 for p in cycle.values())
        if key not in times:  # This kind of step never ran in the timed windows.
            return float("nan")
        total += statistics.median(times[key])
    return total / lcm


def covering_window(cycle: dict[str, int]) -> int:
    """The fewest consecutive steps that contain every class of step of ``cycle`` (its least
    common multiple: the pattern of which pieces run repeats with that period)."""
    return math.lcm(*cycle.values()) if cycle else 1


def measure_steps(
    specs: list[Spec], task: Task, args: argparse.Namespace
) -> tuple[dict[str, dict], list]:
    """Compiles every configuration, then times them in turn; returns per-config results."""
    first = tuple(jnp.asarray(a) for a in next(batch_stream(task, args.batch_size, args.seed)))
    runners: list[Runner] = []
    for spec in specs:
        runner = make_runner(spec, task, args.seed)
        runner.start(task.params, first)
        runners.append(runner)
        print(f"compiled {spec.label} in {runner.compile_seconds:.1f} s", flush=True)
    streams = [batch_stream(task, args.batch_size, args.seed) for _ in runners]
    counts = [0] * len(runners)

    def run(i: int, n: int) -> list[tuple[int, float, float]]:
        out = []
        for _ in range(n):
            batch = tuple(jnp.asarray(a) for a in next(streams[i]))
            begin = time.perf_counter()
            loss = runners[i].step(batch)
            out.append((counts[i], time.perf_counter() - begin, loss))
            counts[i] += 1
        return out

    for i, runner in enumerate(runners):
        if not isinstance(runner, KfacJaxRunner):  # kfac-jax warmed up in start().
            run(i, getattr(args, "warmup_steps", WARMUP_STEPS))
    rounds: list[list[list]] = [[] for _ in runners]
    load = []
    # A round covers every class of step at least once: the adaptive mode's cadences (4, 4, 5)
    # repeat every 20 steps, so 10 timed steps would leave its damping-and-refresh step out.
    cycles = [periods(spec) for spec in specs]
    window = [max(args.steps, covering_window(cycle)) for cycle in cycles]
    for r in range(args.repeats):
        for i in range(len(specs)):
            rounds[i].append(run(i, window[i]))
        load.append(list(os.getloadavg()))
        print(f"round {r + 1}/{args.repeats} done, load {load[-1][0]:.2f}", flush=True)

    results = {}
    for spec, runner, timed, cycle in zip(specs, runners, rounds, cycles, strict=True):
        by_class: dict[tuple, list[float]] = {}
        for count, seconds, _ in (step for window in timed for step in window):
            key = tuple(count % p == 0 for p in cycle.values())
            by_class.setdefault(key, []).append(seconds)
        losses = [loss for window in timed for _, _, loss in window]
        results[spec.label] = {
            "periods": cycle,
            "amortised_ms": round(1e3 * amortised(by_class, cycle), 2),
            "window_mean_ms": round(
                1e3 * statistics.median(statistics.mean(s for _, s, _ in w) for w in timed), 2
            ),
            "class_median_ms": {
                ",".join(f"{k}={v}" for k, v in zip(cycle, key, strict=True)) or "all": round(
                    1e3 * statistics.median(v), 2
                )
                for key, v in sorted(by_class.items())
            },
            "state_bytes": runner.state_bytes,
            "compile_seconds": round(runner.compile_seconds, 2),
            "last_loss": losses[-1],
            "finite": all(math.isfinite(v) for v in losses),
        }
    return results, load


# ------------------------------------------------------------------------------- breakdown


def _compiled(fn: Callable, *args: Any) -> tuple[Callable, dict]:
    """Compiles ``fn`` for ``args``; returns the executable and XLA's cost estimate."""
    begin = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    info = {"compile_s": round(time.perf_counter() - begin, 2)}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", float("nan")))
    except Exception:  # noqa: BLE001 - the estimate is optional and backend dependent.
        flops = float("nan")
    info["gflop"] = round(flops / 1e9, 3)
    return compiled, info


def with_count(state: Any, count: int) -> Any:
    """``state`` with every kfax step counter set to ``count`` (0: the step refreshes the
    curvature and adapts the damping; 1: it does neither)."""
    counted = (kfax.KFACState, kfax.QuadraticModelState, kfax.NormConstraintState)
    if isinstance(state, counted):
        new = state._replace(count=jnp.asarray(count, state.count.dtype))
        if hasattr(state, "inner"):
            new = new._replace(inner=with_count(state.inner, count))
        return new
    if type(state) is tuple:
        return tuple(with_count(s, count) for s in state)
    return state


def plan_of(task: Task, inputs: Any, block: str) -> Any:
    """The plan ``kfax.kfac`` makes on this task with ``block`` (other options at defaults)."""
    from kfax._plan import make_plan  # noqa: PLC0415

    return make_plan(
        task.apply_fn,
        task.loss,
        task.params,
        inputs,
        kind="mc",
        samples=1,
        block=block,
        centering="exact",
        others=optax.identity(),
    )


def each_layer(plan: Any, fn: Callable, *per_layer: dict) -> dict:
    """``{name: fn(block, *args)}`` as the optimiser's step runs it: kfax's ``map_layers``
    (layers of identical shapes batched into one computation) where kfax has it, else a loop."""
    try:
        from kfax._groups import map_layers  # noqa: PLC0415
    except ImportError:
        return {
            name: fn(block, *(tree[name] for tree in per_layer))
            for name, block in plan.blocks_in_order
        }
    return map_layers(plan, fn, *per_layer)


def _leaves_only(capture: Any) -> Any:
    """A capture ``jit`` can return: a ``NamedTuple`` capture's int ``batch`` becomes 0 (a
    registered dataclass keeps it as static metadata)."""
    return capture._replace(batch=0) if hasattr(capture, "_replace") else capture


def _with_batch(capture: Any, batch: int) -> Any:
    return capture._replace(batch=batch) if hasattr(capture, "_replace") else capture


def block_pieces(
    task: Task, x: Any, y: Any, eigen: bool = True
) -> dict[str, tuple[Callable, tuple]]:
    """The statistics pass and the blocks' methods, each as ``(function, arguments)``; ``eigen``
    adds the eigen blocks' refresh (eigendecompositions) for comparison."""
    from kfax.blocks import LayerGradient  # noqa: PLC0415

    plan, eigen_plan = plan_of(task, x, "default"), plan_of(task, x, "eigen")
    params, key = task.params, jax.random.PRNGKey(0)
    lam, decay = jnp.asarray(1e-2, jnp.float32), jnp.asarray(0.95, jnp.float32)
    dtype = plan.statistics_dtype(params)

    def stats_pass(p, x, y, key):
        batch = kfax.statistics.statistics_pass(
            task.apply_fn, task.loss, p, x, kind="mc", targets=y, key=key, traced=plan.traced
        )
        return {name: _leaves_only(c) for name, c in batch.layers.items()}

    batch = jax.eval_shape(task.apply_fn, params, x).shape[0]  # LayerCapture.batch: N

    def observe(stats, captures, decay):
        def one(block, layer_stats, capture):
            return block.observe(layer_stats, _with_batch(capture, batch), decay)

        return each_layer(plan, one, stats, captures)

    def refresh(blocks_plan):
        def run(stats, lam):
            return each_layer(blocks_plan, lambda block, s: block.refresh(s, lam), stats)

        return run

    def precondition(stats, curvature, grads, lam):
        leaves = jax.tree.leaves(grads)
        layer_grads = {}
        for name, block in plan.blocks_in_order:
            site = block.site
            bias = None if site.bias_leaf is None else leaves[site.bias_leaf]
            weight = site.geometry.weight_matrix(leaves[site.weight_leaf])
            layer_grads[name] = LayerGradient(weight, bias)

        def one(block, layer_stats, layer_curvature, grad):
            return block.precondition(layer_stats, layer_curvature, grad, lam)

        return each_layer(plan, one, stats, curvature, layer_grads)

    initial = {name: block.init(dtype)[0] for name, block in plan.blocks_in_order}
    # Inputs of the later pieces, through wrappers: the pieces' own compile times stay honest.
    captures = jax.jit(lambda *a: stats_pass(*a))(params, x, y, key)
    stats = jax.jit(lambda *a: observe(*a))(initial, captures, decay)
    curvature = jax.jit(refresh(plan))(stats, lam)
    grads = jax.grad(task.loss_fn)(params, x, y)
    pieces = {
        "statistics_pass": (stats_pass, (params, x, y, key)),
        "observe": (observe, (initial, captures, decay)),
        "refresh_factored": (refresh(plan), (stats, lam)),
        "refresh_eigen": (refresh(eigen_plan), (stats, lam)),
        "precondition": (precondition, (stats, curvature, grads, lam)),
    }
    if not eigen:
        del pieces["refresh_eigen"]
    return pieces


def step_pieces(
    task: Task, x: Any, y: Any, lr: float, fused: bool = True
) -> dict[str, tuple[Callable, tuple]]:
    """Adam's step, the forward passes, and kfax's full training steps (the runners' own);
    ``fused`` adds ``kfax.value_and_grad`` and the fused ``kfac(lr)`` step where kfax has them."""
    params = task.params
    pieces: dict[str, tuple[Callable, tuple]] = {}
    adam = Spec("adam", (), 1e-3)
    pieces["adam_step"] = (
        train_step(adam, task, make_transform(adam, task, x)),
        (params, optax.adam(1e-3).init(params), x, y),
    )
    pieces["forward"] = (task.apply_fn, (params, x))
    pieces["forward_grad"] = (jax.value_and_grad(task.loss_fn), (params, x, y))
    specs = [("kfac", Spec("kfac", (), lr)), ("kfac_adaptive", Spec("kfac_adaptive"))]
    if fused and hasattr(kfax, "value_and_grad"):
        fused_grad = kfax.value_and_grad(task.apply_fn, task.loss)
        key = jax.random.PRNGKey(0)

        def fused_value_and_grad(p, x, y, k):
            (value, grads), batch = fused_grad(p, x, y, key=k)
            return value, grads, {n: (c.inputs, c.cotangents) for n, c in batch.layers.items()}

        pieces["fused_value_and_grad"] = (fused_value_and_grad, (params, x, y, key))
        specs.append(("kfac_fused", Spec("kfac", (("fused", True),), lr)))
    for name, spec in specs:
        transform = make_transform(spec, task, x)
        state = init_state(spec, transform, params)
        step = train_step(spec, task, transform)
        pieces[f"{name}_step_plain"] = (step, (params, with_count(state, 1), x, y))
        pieces[f"{name}_step_refresh"] = (step, (params, with_count(state, 0), x, y))
        if name == "kfac":  # statistics without a refresh (kfac(lr): every 5 and every 10)
            stats_every = kfac_default("stats_every", adaptive=False)
            count = stats_every if stats_every % kfac_default("inverse_every", False) else 1
            pieces["kfac_step_statistics"] = (step, (params, with_count(state, count), x, y))
    return pieces


def breakdown(task: Task, args: argparse.Namespace, lr: float) -> dict[str, Any]:
    """Times each piece of a kfax K-FAC step (default options) as its own jitted function."""
    x, y = (jnp.asarray(a) for a in next(batch_stream(task, args.batch_size, args.seed)))
    pieces = step_pieces(task, x, y, lr, fused=not args.quick)
    pieces.update(block_pieces(task, x, y, eigen=not args.quick))
    compiled, times, by_function = {}, {}, {}
    for name, (fn, fn_args) in pieces.items():
        if id(fn) not in by_function:  # A step with and without refresh: one executable.
            by_function[id(fn)] = _compiled(fn, *fn_args)
        compiled[name], info = by_function[id(fn)]
        times[name] = dict(info)
        jax.block_until_ready(compiled[name](*fn_args))
    samples: dict[str, list[float]] = {name: [] for name in pieces}
    for _ in range(args.breakdown_repeats):
        for name, (_, fn_args) in pieces.items():
            begin = time.perf_counter()
            jax.block_until_ready(compiled[name](*fn_args))
            samples[name].append(time.perf_counter() - begin)
    for name, values in samples.items():
        times[name]["ms"] = round(1e3 * statistics.median(values), 3)
    ms = {name: entry["ms"] for name, entry in times.items()}
    # kfac(lr)'s cadences: a refresh step also takes statistics.
    stats_every = kfac_default("stats_every", adaptive=False)
    every = kfac_default("inverse_every", adaptive=False)
    pieces_sum = (
        ms["forward_grad"]
        + (ms["statistics_pass"] + ms["observe"]) / stats_every
        + ms["precondition"]
        + ms["refresh_factored"] / every
    )
    plain, with_stats = ms["kfac_step_plain"], ms["kfac_step_statistics"]
    full = (
        plain + (with_stats - plain) / stats_every + (ms["kfac_step_refresh"] - with_stats) / every
    )
    plan = plan_of(task, x, "default")
    return {
        "pieces": times,
        "inverse_every": every,
        "stats_every": stats_every,
        "sum_of_pieces_amortised_ms": round(pieces_sum, 2),
        "full_step_amortised_ms": round(full, 2),
        "unaccounted_ms": round(full - pieces_sum, 2),
        "layers": [f"{n}: {b.name} {b.site.geometry.describe()}" for n, b in plan.blocks_in_order],
        "unmatched": sorted(plan.unmatched_leaves(task.params)),
    }


def main(argv: list[str] | None = None) -> dict:
    """Runs both parts; returns the record written to ``<out>/step_cost_...json``."""
    args = parse_args(argv)
    info = machine()
    task = make_task(args.task, quick=args.quick, seed=args.seed)
    if args.batch_size is None:
        args.batch_size = task.quick_batch_size if args.quick else task.batch_size
    specs = []
    for text in split_specs(args.configs):
        spec = parse(text)
        if spec.learning_rate is None and spec.family not in ("kfac_adaptive", "kfac_jax"):
            # The grid's smallest learning rate: stable, and the cost does not depend on it.
            grid_spec = expand(spec.family, task)[0]
            spec = Spec(spec.family, spec.options, grid_spec.learning_rate)
        specs.append(spec)
    specs, skipped = available(specs)
    measured, load = measure_steps(specs, task, args)
    results = {}  # Keyed by the configuration without its learning rate.
    for spec in specs:
        results[spec.group] = {"learning_rate": spec.learning_rate, **measured[spec.label]}
    for base in ("adam", "kfac_jax", "kfac_jax_fixed"):
        if base in results:
            for result in results.values():
                ratio = result["amortised_ms"] / results[base]["amortised_ms"]
                result[f"ratio_vs_{base}"] = round(ratio, 3)
    parts = breakdown(task, args, task.grids["kfac"][0]) if args.breakdown_repeats else None
    info["loadavg_end"] = list(os.getloadavg())
    info["loadavg_rounds"] = load
    record = {
        "machine": info,
        "versions": versions(),
        "git_commit": git_commit(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "task_description": task.description,
        "param_bytes": sum(int(a.nbytes) for a in jax.tree_util.tree_leaves(task.params)),
        "date": time.strftime("%Y-%m-%d"),
        "skipped": skipped,
        "steps": results,
        "breakdown": parts,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"step_cost_{args.task}{'_quick' if args.quick else ''}_b{args.batch_size}{args.tag}"
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    print_tables(record)
    return record


def print_tables(record: dict) -> None:
    """Step costs and the breakdown as plain-text tables."""
    print(
        f"\n{'config':<44}{'ms/step':>9}{'window':>9}{'xAdam':>7}{'xKJ':>7}{'xKJfix':>7}"
        f"{'state MB':>10}{'compile s':>10}"
    )
    for label, r in record["steps"].items():
        ratios = [
            r.get(k, np.nan)
            for k in ("ratio_vs_adam", "ratio_vs_kfac_jax", "ratio_vs_kfac_jax_fixed")
        ]
        print(
            f"{label:<44}{r['amortised_ms']:>9.1f}{r['window_mean_ms']:>9.1f}{ratios[0]:>7.2f}"
            f"{ratios[1]:>7.2f}{ratios[2]:>7.2f}{r['state_bytes'] / 2**20:>10.1f}"
            f"{r['compile_seconds']:>10.1f}"
        )
    for label, reason in record.get("skipped", {}).items():
        print(f"{label:<44}skipped: {reason}")
    parts = record["breakdown"]
    if parts is None:
        return
    print(f"\n{'piece':<24}{'ms':>9}{'GFLOP':>9}{'compile s':>10}")
    for name, entry in parts["pieces"].items():
        print(f"{name:<24}{entry['ms']:>9.2f}{entry['gflop']:>9.2f}{entry['compile_s']:>10.1f}")
    print(
        f"sum of pieces (statistics / {parts.get('stats_every', 1)}, "
        f"inverse / {parts['inverse_every']}): "
        f"{parts['sum_of_pieces_amortised_ms']:.1f} ms; full step amortised "
        f"{parts['full_step_amortised_ms']:.1f} ms"
    )


if __name__ == "__main__":
    main()
