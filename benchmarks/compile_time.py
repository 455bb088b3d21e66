"""Where the compile time of a train step goes (issue 10): tracing, lowering and XLA's compile.

Usage (repository root)::

    .venv-bench/bin/python -m benchmarks.compile_time            # depths 2, 8, 32, 64
    .venv/bin/python -m benchmarks.compile_time --quick          # width 32, depths 2, 4 (seconds)

The task is ``benchmarks.scaling``'s stack of ``depth`` square dense layers of ``--width``
(batch ``--batch-size``, squared error), written out layer by layer (``unrolled``) and as a
``lax.scan`` over stacked parameters (``scan``: kfax finds one stacked layer and preconditions
it with one stacked block, the layout a state stacked per group of equal layers would give). For
each, the benchmarks' train step (``benchmarks.optimizers.train_step``: ``jax.value_and_grad``
of the loss, the optimiser's ``update``, ``optax.apply_updates``) of Adam, ``kfax.kfac(lr)`` and
``kfax.kfac(None)`` is traced, lowered and
compiled once, each phase timed on its own, after ``jax.clear_caches()`` (JAX's traces and
compiled programs are not reused from one optimiser to the next; kfax's own trace of ``apply_fn``,
made by ``init`` before the timer starts, is, as in real use). Each cell is one measurement, in a
fixed order: differences of a tenth of a second are within its noise.

``--stages`` adds ``kfac(lr)`` with each stage of kfax's step (taking statistics, refreshing the
curvature, preconditioning) replaced by one that returns its input, and with all three replaced:
the compile time each stage adds. It patches private functions of ``kfax._step`` (a probe, not an
API), so it may need updating when those change; it supports blocks that merge no statistics in
their bases (the default blocks, not EKFAC), which is what it builds.

Writes ``<out>/compile_time[_quick]<tag>.json``: per layout and depth, per optimiser, the
seconds of each phase and the number of lines of XLA's optimised HLO.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.optimizers import init_state, make_transform, parse, train_step
from benchmarks.run import RESULTS, provenance
from benchmarks.scaling import scaling_task

STAGES = ("statistics", "refresh", "precondition")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_time", description=__doc__)
    parser.add_argument("--depths", default=None, help="comma-separated (default 2,8,32,64)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--layouts", default="unrolled,scan", help="unrolled, scan or both")
    parser.add_argument("--stages", action="store_true", help="kfac(lr) without each stage too")
    parser.add_argument("--quick", action="store_true", help="width 32, batch 16, depths 2,4")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.batch_size = 32, 16
    if args.depths is None:
        args.depths = "2,4" if args.quick else "2,8,32,64"
    return args


def phases(step: Callable, *args: Any) -> dict[str, float]:
    """Seconds to trace, lower and compile ``step`` for ``args`` in a fresh ``jax.jit``."""
    begin = time.perf_counter()
    traced = jax.jit(step).trace(*args)
    traced_at = time.perf_counter()
    lowered = traced.lower()
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return {
        "trace_s": round(traced_at - begin, 3),
        "lower_s": round(lowered_at - traced_at, 3),
        "compile_s": round(done - lowered_at, 3),
        "total_s": round(done - begin, 3),
        "hlo_lines": len(compiled.as_text().splitlines()),
    }


@contextlib.contextmanager
def without(stages: tuple[str, ...]) -> Iterator[None]:
    """kfax's step with ``stages`` replaced by functions that return their input."""
    from kfax import _step  # noqa: PLC0415  (a probe of private functions)

    def observe(plan, state, *args):
        if any(getattr(b, "observes_in_basis", True) for _, b in plan.blocks_in_order):
            raise ValueError("the statistics probe supports blocks that observe no bases only")
        return state.statistics, state.health, None

    def refresh(plan, stats, curvature, health, damping):
        return curvature, health

    def precondition(plan, stats, curvature, updates, lam):
        leaves, treedef = jax.tree.flatten(updates)
        return list(leaves), treedef

    stand_ins = {
        "statistics": ("_observe", observe),
        "refresh": ("_refresh", refresh),
        "precondition": ("_precondition", precondition),
    }
    saved = {name: getattr(_step, name) for name, _ in stand_ins.values()}
    try:
        for stage in stages:
            setattr(_step, *stand_ins[stage])
        yield
    finally:
        for name, fn in saved.items():
            setattr(_step, name, fn)


def measure(layout: str, depth: int, args: argparse.Namespace) -> dict:
    """The phases of each optimiser's train step (``benchmarks.optimizers.train_step``) on
    ``benchmarks.scaling``'s task."""
    task = scaling_task(args.width, depth, args.batch_size, seed=0, scan=layout == "scan")
    x, y = (jnp.asarray(a[: args.batch_size]) for a in (task.inputs, task.targets))
    configs = {"adam": ("adam@0.001", ()), "kfac(lr)": ("kfac@0.001", ())}
    configs["kfac(None)"] = ("kfac_adaptive", ())
    if args.stages:
        for stage in STAGES:
            configs[f"kfac(lr) without {stage}"] = ("kfac@0.001", (stage,))
        configs["kfac(lr) without all three"] = ("kfac@0.001", STAGES)
    jax.jit(task.loss_fn).trace(task.params, x, y)  # warm-up: the first trace imports
    results = {}
    for name, (text, removed) in configs.items():
        spec = parse(text)
        transform = make_transform(spec, task, x)
        state = init_state(spec, transform, task.params)
        jax.clear_caches()  # kfax's step is jitted with its plan static: no cached trace
        with without(removed):
            results[name] = phases(train_step(spec, task, transform), task.params, state, x, y)
        print(f"{layout:>9}{depth:>5}  {name:<30}{results[name]['total_s']:>8.2f} s", flush=True)
    return {"layout": layout, "depth": depth, "width": args.width, "configs": results}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    record: dict[str, Any] = {**provenance(args), "rows": []}
    for layout in (part for part in args.layouts.split(",") if part):
        for depth in (int(d) for d in args.depths.split(",") if d):
            record["rows"].append(measure(layout, depth, args))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"compile_time{'_quick' if args.quick else ''}{args.tag}.json"
    path.write_text(json.dumps(record, indent=1))
    print_table(record)
    return record


def print_table(record: dict) -> None:
    print(f"\n{'layout':>9}{'depth':>6} {'optimiser':<30}{'trace':>7}{'lower':>7}{'compile':>8}")
    for row in record["rows"]:
        for name, entry in row["configs"].items():
            print(
                f"{row['layout']:>9}{row['depth']:>6} {name:<30}{entry['trace_s']:>7.2f}"
                f"{entry['lower_s']:>7.2f}{entry['compile_s']:>8.2f}"
            )


if __name__ == "__main__":
    main()
