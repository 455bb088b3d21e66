"""Per-step cost of kfax and kfac-jax against Adam, state memory, and a kfax step's breakdown.

Usage (repository root, benchmark environment)::

    .venv-bench/bin/python -m benchmarks.step_cost --batch-size 1000 --steps 40 --repeats 3

Part 1, step cost: every configuration (``--configs``, specs as in ``benchmarks.run``) is
compiled and warmed up, then the configurations take turns running ``--steps`` timed steps, for
``--repeats`` rounds, on the same batches. Each step is classified by which periodic work it
does (statistics, inverse refresh, damping update: ``count % period == 0``); the amortised cost
is the sum over classes of (class frequency) x (median time of the class), so that refreshes
every 50 steps are counted fairly from a 40-step window. The plain mean over each window is
reported too (median over rounds).

Part 2, breakdown: the pieces of one kfax K-FAC step, each jitted on its own with kfax's
internals and timed in turn (median over ``--breakdown-repeats`` rounds): forward+gradient,
statistics pass (tapped forward and vjp of sampled cotangents; outer products), inverse refresh
(Cholesky inverses; eigendecompositions for the eigen/EKFAC variants), preconditioning, and the
full step without and with an inverse refresh. XLA's FLOP estimate of each piece is recorded.

Writes ``<out>/step_cost_<task>_b<batch>.json`` and prints tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.optimizers import (
    KfacJaxRunner,
    Runner,
    Spec,
    batch_stream,
    expand,
    kfac_jax_available,
    kfax_transform,
    make_runner,
    parse,
)
from benchmarks.run import RESULTS, git_commit, machine, versions
from benchmarks.tasks import TASKS, Task, make_task

DEFAULT_CONFIGS = (
    "adam,kfac,kfac_adaptive,kfac+inverse_every=20,kfac+inverse_every=50,kfac+stats_every=2,"
    "kfac+stats_batch_size=125,kfac+stats_batch_size=125+inverse_every=20,kfac_homogeneous,ekfac,"
    "kfac_jax,kfac_jax_fixed"
)
WARMUP_STEPS = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_cost")
    parser.add_argument("--task", choices=TASKS, default="autoencoder")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=None, help="rounds of timed steps")
    parser.add_argument("--breakdown-repeats", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    defaults = (64, 10, 2, 3) if args.quick else (1000, 40, 3, 15)
    for name, value in zip(
        ("batch_size", "steps", "repeats", "breakdown_repeats"), defaults, strict=True
    ):
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
    if spec.family in ("adam", "sgd"):
        return {}
    found = {"stats": options.get("stats_every", 1), "inverse": options.get("inverse_every", 10)}
    if spec.family == "kfac_adaptive":
        found["damping"] = options.get("damping_every", 5)
    return found


def amortised(times: dict[tuple, list[float]], cycle: dict[str, int]) -> float:
    """Sum over step classes of (frequency of the class) x (median time of the class).

    NaN if some class was never timed (the windows were shorter than a period).
    """
    lcm = math.lcm(*cycle.values()) if cycle else 1
    total = 0.0
    for count in range(lcm):
        key = tuple(count % p == 0 for p in cycle.values())
        if key not in times:  # This kind of step never ran in the timed windows.
            return float("nan")
        total += statistics.median(times[key])
    return total / lcm


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
            run(i, WARMUP_STEPS)
    rounds: list[list[list]] = [[] for _ in runners]
    load = []
    for r in range(args.repeats):
        for i in range(len(specs)):
            rounds[i].append(run(i, args.steps))
        load.append(list(os.getloadavg()))
        print(f"round {r + 1}/{args.repeats} done, load {load[-1][0]:.2f}", flush=True)

    results = {}
    for spec, runner, timed in zip(specs, runners, rounds, strict=True):
        cycle = periods(spec)
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


def _timed(fn: Callable, *args: Any) -> tuple[Callable, dict]:
    """Compiles ``fn`` for ``args``; returns the executable and XLA's cost estimate."""
    compiled = jax.jit(fn).lower(*args).compile()
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", float("nan")))
    except Exception:  # noqa: BLE001 - the estimate is optional and backend dependent.
        flops = float("nan")
    return compiled, {"gflop": round(flops / 1e9, 3)}


def breakdown(task: Task, args: argparse.Namespace, lr: float) -> dict[str, Any]:
    """Times each piece of a kfax K-FAC step (default options) as its own jitted function."""
    from kfax import _capture, _linalg
    from kfax.curvature import layer_moments, output_cotangents

    params = task.params
    x, y = (jnp.asarray(a) for a in next(batch_stream(task, args.batch_size, args.seed)))
    key = jax.random.PRNGKey(0)
    lam = jnp.asarray(1e-2, jnp.float32)  # kfax.kfac's default damping.
    traced = _capture.trace_layers(task.apply_fn, params, x)
    layers = traced.layers

    def forward(p, x):
        return task.apply_fn(p, x)

    def forward_grad(p, x, y):
        return jax.value_and_grad(task.loss_fn)(p, x, y)

    def capture_vjp(p, x, key):
        tapped = _capture.capture(task.apply_fn, p, x, param_gradients=False, traced=traced)
        columns, scale = output_cotangents(task.loss, "mc", tapped.outputs, key=key)
        cotangents = jax.vmap(lambda u: tapped.pullback(u)[1])(columns)
        return tapped.layer_inputs, cotangents

    def outer_products(layer_inputs, cotangents):
        return layer_moments(layers, layer_inputs, cotangents, 1.0 / args.batch_size)

    def statistics_pass(p, x, key):
        return outer_products(*capture_vjp(p, x, key))

    def centered_a(m):
        return m.second - jnp.outer(m.mean, m.mean)

    def inverse_refresh(moments, lam):
        return {
            name: _linalg.factored_inverses(centered_a(m), m.output, lam)
            for name, m in moments.items()
        }

    def eigen_refresh(moments):
        return {
            name: (_linalg.eigh(centered_a(m)), _linalg.eigh(m.output))
            for name, m in moments.items()
        }

    def precondition(grads, inverses, moments):
        out = {}
        for site in layers:
            grad = jax.tree_util.tree_leaves(grads)
            dk, db = grad[site.weight_leaf], grad[site.bias_leaf]
            a_inv, b_inv = inverses[site.name]
            mean = moments[site.name].mean
            delta = _linalg.kron_apply(a_inv, dk - jnp.outer(mean, db), b_inv)
            out[site.name] = (delta, db @ b_inv - delta.T @ mean)
        return out

    spec = Spec("kfac", (), lr)
    transform = kfax_transform(spec, task, x)

    def kfac_step(p, state, x, y):
        loss, grads = jax.value_and_grad(task.loss_fn)(p, x, y)
        updates, state = transform.update(grads, state, p, inputs=x, targets=y)
        return optax.apply_updates(p, updates), state, loss

    adam = optax.adam(1e-3)

    def adam_step(p, state, x, y):
        loss, grads = jax.value_and_grad(task.loss_fn)(p, x, y)
        updates, state = adam.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    if any(site.bias_leaf is None for site in layers):
        raise ValueError("the breakdown assumes every layer has a bias (the autoencoder does)")
    moments = jax.jit(statistics_pass)(params, x, key)
    inverses = jax.jit(inverse_refresh)(moments, lam)
    _, grads = jax.jit(forward_grad)(params, x, y)
    captured = jax.jit(capture_vjp)(params, x, key)
    state = transform.init(params)
    plain_state = (state[0]._replace(count=jnp.ones((), jnp.int32)), *state[1:])
    pieces = {
        "adam_step": (adam_step, (params, adam.init(params), x, y)),
        "forward": (forward, (params, x)),
        "forward_grad": (forward_grad, (params, x, y)),
        "stats_capture_vjp": (capture_vjp, (params, x, key)),
        "stats_outer_products": (outer_products, captured),
        "stats_total": (statistics_pass, (params, x, key)),
        "inverse_refresh": (inverse_refresh, (moments, lam)),
        "eigh_refresh": (eigen_refresh, (moments,)),
        "precondition": (precondition, (grads, inverses, moments)),
        "kfac_step_plain": (kfac_step, (params, plain_state, x, y)),
        "kfac_step_refresh": (kfac_step, (params, state, x, y)),
    }
    compiled, times = {}, {}
    for name, (fn, fn_args) in pieces.items():
        compiled[name], times[name] = _timed(fn, *fn_args)
        jax.block_until_ready(compiled[name](*fn_args))
    samples: dict[str, list[float]] = {name: [] for name in pieces}
    for _ in range(args.breakdown_repeats):
        for name, (_, fn_args) in pieces.items():
            begin = time.perf_counter()
            jax.block_until_ready(compiled[name](*fn_args))
            samples[name].append(time.perf_counter() - begin)
    for name, values in samples.items():
        times[name]["ms"] = round(1e3 * statistics.median(values), 2)
    ms = {name: entry["ms"] for name, entry in times.items()}
    every = 10  # kfax's default inverse_every.
    pieces_sum = (
        ms["forward_grad"] + ms["stats_total"] + ms["precondition"] + ms["inverse_refresh"] / every
    )
    full = ms["kfac_step_plain"] + (ms["kfac_step_refresh"] - ms["kfac_step_plain"]) / every
    return {
        "pieces": times,
        "inverse_every": every,
        "sum_of_pieces_amortised_ms": round(pieces_sum, 2),
        "full_step_amortised_ms": round(full, 2),
        "unaccounted_ms": round(full - pieces_sum, 2),
        "layers": [f"{s.name}: {s.geometry.describe()}" for s in layers],
    }


def main(argv: list[str] | None = None) -> dict:
    """Runs both parts; returns the record written to ``<out>/step_cost_...json``."""
    args = parse_args(argv)
    info = machine()
    task = make_task(args.task, quick=args.quick, seed=args.seed)
    specs = []
    for text in filter(None, args.configs.split(",")):
        spec = parse(text)
        if spec.family.startswith("kfac_jax") and not kfac_jax_available():
            warnings.warn(f"kfac-jax is not importable; skipping {spec.label}", stacklevel=2)
            continue
        if spec.learning_rate is None and spec.family not in ("kfac_adaptive", "kfac_jax"):
            # The grid's smallest learning rate: stable, and the cost does not depend on it.
            grid_spec = expand(spec.family, task)[0]
            spec = Spec(spec.family, spec.options, grid_spec.learning_rate)
        specs.append(spec)
    measured, load = measure_steps(specs, task, args)
    results = {}  # Keyed by the configuration without its learning rate.
    for spec in specs:
        results[spec.group] = {"learning_rate": spec.learning_rate, **measured[spec.label]}
    for base in ("adam", "kfac_jax", "kfac_jax_fixed"):
        if base in results:
            for result in results.values():
                ratio = result["amortised_ms"] / results[base]["amortised_ms"]
                result[f"ratio_vs_{base}"] = round(ratio, 3)
    parts = breakdown(task, args, task.grids["kfac"][0])
    info["loadavg_end"] = list(os.getloadavg())
    info["loadavg_rounds"] = load
    record = {
        "machine": info,
        "versions": versions(),
        "git_commit": git_commit(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "task_description": task.description,
        "param_bytes": sum(int(a.nbytes) for a in jax.tree_util.tree_leaves(task.params)),
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
    print(f"\n{'config':<44}{'ms/step':>9}{'xAdam':>7}{'xKJ':>7}{'xKJfix':>7}{'state MB':>10}")
    for label, r in record["steps"].items():
        ratios = [
            r.get(k, np.nan)
            for k in ("ratio_vs_adam", "ratio_vs_kfac_jax", "ratio_vs_kfac_jax_fixed")
        ]
        print(
            f"{label:<44}{r['amortised_ms']:>9.1f}{ratios[0]:>7.2f}{ratios[1]:>7.2f}"
            f"{ratios[2]:>7.2f}{r['state_bytes'] / 2**20:>10.1f}"
        )
    parts = record["breakdown"]
    print(f"\n{'piece':<24}{'ms':>9}{'GFLOP':>9}")
    for name, entry in parts["pieces"].items():
        print(f"{name:<24}{entry['ms']:>9.1f}{entry['gflop']:>9.2f}")
    print(
        f"sum of pieces (inverse / {parts['inverse_every']}): "
        f"{parts['sum_of_pieces_amortised_ms']:.1f} ms; full step amortised "
        f"{parts['full_step_amortised_ms']:.1f} ms"
    )


if __name__ == "__main__":
    main()
