"""Training benchmark: loss against wall time and steps for several optimisers on one task.

Usage (from the repository root; see benchmarks/README.md for the environments)::

    .venv-bench/bin/python -m benchmarks.run --task autoencoder \\
        --optimizers adam,muon,psgd,kfac,kfac_adaptive,kfac_jax --budget-seconds 120

Every optimiser (every point of a learning-rate grid) trains from the same initial parameters on
the same sequence of batches. The runs are interleaved in one process: each in turn takes
``--eval-every`` steps, so a change in machine load hits all of them alike. Each step is timed
after the parameters are ready; compilation, batch transfer and the periodic evaluation of the
reported loss are not timed. A run stops at ``--budget-seconds`` of timed steps, ``--steps``
steps, or when its loss diverges. When the best learning rate of a grid is at the grid's edge,
the grid is widened by one value beyond that edge and the new runs race in a further phase, up
to ``--widen`` times; an edge that remains is reported. The JSON record and a PNG figure are
written to ``--out`` (see benchmarks/README.md for their fields).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.optimizers import (
    ADAPTIVE,
    Runner,
    Spec,
    available,
    batch_stream,
    evaluator,
    expand,
    make_runner,
)
from benchmarks.tasks import TASKS, Task, make_task

DEFAULT_OPTIMIZERS = "adam,muon,psgd,kfac,kfac_adaptive,kfac_jax,kfac_jax_fixed"
DIVERGENCE_FACTOR = 100.0  # A loss this many times the first one counts as diverged.
RESULTS = Path(__file__).resolve().parent / "results"
# XLA:CPU's cheapest compilation (no LLVM optimisation, no fusion emitters): the smoke tests and
# ``gpu.sh --quick`` check the harness, not speed, and compiling is most of their time.
QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
PACKAGES = ("jax", "jaxlib", "optax", "kfax", "kfac-jax", "psgdax", "flax", "numpy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--task", choices=TASKS, default="autoencoder")
    parser.add_argument(
        "--optimizers",
        default=DEFAULT_OPTIMIZERS,
        help="comma-separated specs family[+option=value...][@lr]; a fixed-step family without "
        "@lr runs the task's learning-rate grid",
    )
    parser.add_argument("--budget-seconds", type=float, default=None, help="timed seconds per run")
    parser.add_argument("--steps", type=int, default=None, help="maximum steps per run")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the task's")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations")
    parser.add_argument("--target", type=float, default=None, help="reported loss to reach")
    parser.add_argument(
        "--widen",
        type=int,
        default=None,
        help="phases that widen a grid whose best learning rate is at its edge (default 2; 0 "
        "with --quick)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny model, data and budget")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--replot", type=Path, help="only redraw the figure of this JSON record")
    args = parser.parse_args(argv)
    quick = args.quick
    if args.budget_seconds is None:
        args.budget_seconds = 20.0 if quick else 120.0
    if args.steps is None:
        args.steps = 10 if quick else 1_000_000
    if args.widen is None:
        args.widen = 0 if quick else 2
    return args


class _Quiet:
    """A stand-in for ``tqdm`` where it is not installed."""

    def __init__(self, iterable: Any = None, **_: Any):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *_: Any) -> None:
        return None

    def update(self, _: float) -> None:
        return None


def progress_bar(*args: Any, **kwargs: Any) -> Any:
    """``tqdm(...)``, or a silent stand-in without tqdm."""
    try:
        from tqdm import tqdm  # noqa: PLC0415
    except ImportError:
        return _Quiet(*args, **kwargs)
    return tqdm(*args, **kwargs)


def task_defaults(args: argparse.Namespace, task: Task) -> None:
    """Fills the batch size and evaluation interval from the task where not given."""
    if args.batch_size is None:
        args.batch_size = task.quick_batch_size if args.quick else task.batch_size
    if args.eval_every is None:
        args.eval_every = task.quick_eval_every if args.quick else task.eval_every


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that matter here."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit() -> str | None:
    """The repository's commit, with ``-dirty`` if kfax has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "kfax"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return None
    return (commit + ("-dirty" if dirty else "")) or None


def provenance(args: Any) -> dict[str, Any]:
    """What every record starts with: the machine, the versions, the commit, the date and the
    command's settings (``argparse`` values; paths as strings)."""
    return {
        "machine": machine(),
        "versions": versions(),
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


def machine() -> dict[str, Any]:
    """Platform, CPU count, devices and the current load average."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "loadavg_start": list(os.getloadavg()),
        "env": {
            k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "XLA_FLAGS")
        },
    }


def _round(values: list[float], digits: int = 5) -> list[float | None]:
    return [float(f"{v:.{digits}g}") if math.isfinite(v) else None for v in values]


def _device(batch: tuple) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(a) for a in batch)


def train(
    runners: list[Runner], streams: list, evaluate, args: argparse.Namespace, progress
) -> tuple[list[dict], list[list[float]]]:
    """Interleaves the runners in chunks of ``eval_every`` steps until each stops."""
    initial = evaluate(runners[0].params)
    records = [
        {"loss": [], "time": [], "eval_step": [0], "eval_time": [0.0], "eval_loss": [initial]}
        for _ in runners
    ]
    stopped: list[str | None] = [None] * len(runners)
    load = []
    start = time.perf_counter()
    while not all(stopped):
        for i, runner in enumerate(runners):
            if stopped[i]:
                continue
            rec = records[i]
            elapsed = rec["time"][-1] if rec["time"] else 0.0
            for _ in range(args.eval_every):
                batch = _device(next(streams[i]))
                begin = time.perf_counter()
                loss = runner.step(batch)
                took = time.perf_counter() - begin
                progress.update(min(took, max(0.0, args.budget_seconds - elapsed)))
                elapsed += took
                rec["loss"].append(loss)
                rec["time"].append(elapsed)
                if not math.isfinite(loss) or loss > DIVERGENCE_FACTOR * abs(rec["loss"][0]):
                    stopped[i] = "diverged"
                elif elapsed >= args.budget_seconds:
                    stopped[i] = "budget"
                elif len(rec["loss"]) >= args.steps:
                    stopped[i] = "steps"
                if stopped[i]:
                    break
            if stopped[i] != "diverged":
                rec["eval_step"].append(len(rec["loss"]))
                rec["eval_time"].append(elapsed)
                rec["eval_loss"].append(evaluate(runner.params))
        load.append([round(time.perf_counter() - start, 1), *os.getloadavg()])
    for rec, reason in zip(records, stopped, strict=True):
        rec["stop"] = reason
    return records, load


def final_loss(run: dict) -> float:
    """A run's last reported loss; infinite if it diverged or never evaluated."""
    value = run["final_eval_loss"]
    return math.inf if value is None or run["stop"] == "diverged" else value


def grid_edge(members: list[dict]) -> str | None:
    """``"low"`` or ``"high"`` when the best learning rate of a grid is at its edge, else None."""
    rates = sorted({m["learning_rate"] for m in members if m["learning_rate"] is not None})
    if len(rates) < 2:
        return None
    if all(math.isinf(final_loss(m)) for m in members):
        return "low"  # every run diverged: look below the grid
    best = min(members, key=final_loss)["learning_rate"]
    return "low" if best == rates[0] else "high" if best == rates[-1] else None


def widened(members: list[dict]) -> float | None:
    """The next learning rate beyond the edge that holds a grid's best, or None."""
    edge = grid_edge(members)
    if edge is None:
        return None
    rates = sorted({m["learning_rate"] for m in members})
    if edge == "low":
        return rates[0] * rates[0] / rates[1]
    return rates[-1] * rates[-1] / rates[-2]


def summarise(runs: list[dict]) -> dict[str, dict]:
    """Best run of each optimiser (lowest final reported loss) and its time to target."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["group"], []).append(run)
    best = {group: min(members, key=final_loss) for group, members in groups.items()}
    base = {name: best[name]["median_step_ms"] for name in ("adam", "kfac_jax") if name in best}
    summary = {}
    for group, run in best.items():
        rates = sorted(m["learning_rate"] for m in groups[group] if m["learning_rate"])
        entry = {
            "label": run["label"],
            "learning_rate": run["learning_rate"],
            "grid": rates,
            "best_at_edge": grid_edge(groups[group]),
            "final_eval_loss": run["final_eval_loss"],
            "steps": run["steps"],
            "median_step_ms": run["median_step_ms"],
            "compile_seconds": run["compile_seconds"],
            "state_bytes": run["state_bytes"],
            "to_target": run["to_target"],
            "jax": jax.__version__,
        }
        for name, ms in base.items():
            entry[f"step_ratio_vs_{name}"] = round(run["median_step_ms"] / ms, 3)
        summary[group] = entry
    return summary


def time_to_target(run: dict, target: float | None) -> dict | None:
    """Steps and timed seconds at the first evaluation with a training loss <= ``target``."""
    if target is None:
        return None
    for step, seconds, loss in zip(
        run["eval_step"], run["eval_time"], run["eval_loss"], strict=True
    ):
        if loss is not None and loss <= target:
            return {"steps": step, "seconds": seconds}
    return None


def plot(record: dict, path: Path) -> None:
    """Training loss of the best run of each optimiser against wall time and against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    runs = {run["label"]: run for run in record["runs"]}
    for k, (_, entry) in enumerate(sorted(record["summary"].items())):
        run = runs[entry["label"]]
        color, style = f"C{k % 10}", ("-", "--", ":")[k // 10 % 3]
        for ax, x_batch, x_eval in (
            (axes[0], run["time"], run["eval_time"]),
            (axes[1], range(1, run["steps"] + 1), run["eval_step"]),
        ):
            ax.plot(list(x_batch), run["loss"], color=color, alpha=0.2, linewidth=0.7)
            ax.plot(x_eval, run["eval_loss"], color=color, linestyle=style, label=entry["label"])
    target = record["target"]
    for ax, xlabel in zip(axes, ("timed seconds (compilation excluded)", "steps"), strict=True):
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(
        f"loss, {record.get('loss_unit', '')}\n(thick: evaluation set; faint: batch)"
    )
    axes[1].legend(fontsize=7)
    s = record["settings"]
    load = record["machine"]["loadavg_start"][0], record["machine"]["loadavg_end"][0]
    fig.suptitle(
        f"{s['task']} ({record['task_description']}), batch {s['batch_size']}, "
        f"budget {s['budget_seconds']:g} s; load {load[0]:.1f}->{load[1]:.1f}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def race(
    specs: list[Spec], task: Task, args: argparse.Namespace, evaluate, phase: int
) -> tuple[list[dict], list[list[float]], dict[str, str]]:
    """Compiles the specs' runners and races them interleaved: one entry per run, the load
    averages ``[phase, seconds, 1-, 5-, 15-minute]`` after every round, and ``{label: why}`` for
    each runner that failed to start (reported under "skipped")."""
    first_batch = _device(next(batch_stream(task, args.batch_size, args.seed)))
    runners, started, failed = [], [], {}
    for spec in progress_bar(specs, desc="compiling", leave=False):
        runner = make_runner(spec, task, args.seed)
        try:
            runner.start(task.params, first_batch)
        except Exception as error:  # a peer that cannot build or compile on this task
            reason = f"failed to start: {type(error).__name__}: {str(error).splitlines()[0]}"
            warnings.warn(f"{spec.label}: {reason}", stacklevel=2)
            failed[spec.label] = reason
            continue
        runners.append(runner)
        started.append(spec)
    specs = started
    if not runners:
        raise RuntimeError(f"no optimiser started: {failed}")
    streams = [batch_stream(task, args.batch_size, args.seed) for _ in runners]
    total = len(runners) * args.budget_seconds
    bar = "{l_bar}{bar}| {n:.0f}/{total:.0f} timed s [{elapsed}<{remaining}]"
    desc = args.task if phase == 0 else f"{args.task} (widened grids, phase {phase})"
    with progress_bar(total=total, desc=desc, bar_format=bar) as progress:
        records, load = train(runners, streams, evaluate, args, progress)
    runs = []
    for spec, runner, rec in zip(specs, runners, records, strict=True):
        steps = len(rec["loss"])
        eval_loss = _round(rec["eval_loss"], 6)
        durations = [b - a for a, b in itertools.pairwise([0.0, *rec["time"]])]
        runs.append(
            {
                "label": spec.label,
                "group": spec.group,
                "family": spec.family,
                "learning_rate": spec.learning_rate,
                "options": {k: repr(v) if callable(v) else v for k, v in spec.options},
                "phase": phase,
                "steps": steps,
                "stop": rec["stop"],
                "compile_seconds": round(runner.compile_seconds, 3),
                "state_bytes": runner.state_bytes,
                "median_step_ms": round(1e3 * statistics.median(durations), 3),
                "mean_step_ms": round(1e3 * rec["time"][-1] / steps, 3),
                "final_eval_loss": eval_loss[-1] if len(eval_loss) > 1 else None,
                "loss": _round(rec["loss"]),
                "time": [round(t, 4) for t in rec["time"]],
                "eval_step": rec["eval_step"],
                "eval_time": [round(t, 4) for t in rec["eval_time"]],
                "eval_loss": eval_loss,
            }
        )
    return runs, [[phase, *entry] for entry in load], failed


def widen_grids(
    runs: list[dict], specs: list[Spec], args: argparse.Namespace, task: Task, evaluate
) -> tuple[list[dict], list[list[float]], dict[str, str]]:
    """Phases of extra runs beyond the edge of every grid whose best value sits there."""
    load: list[list[float]] = []
    failed: dict[str, str] = {}
    for phase in range(1, args.widen + 1):
        new = []
        for group in dict.fromkeys(s.group for s in specs):
            members = [r for r in runs if r["group"] == group]
            family = members[0]["family"] if members else None
            lr = None if family in ADAPTIVE else widened(members)
            if lr is not None:
                template = next(s for s in specs if s.group == group)
                new.append(dataclasses.replace(template, learning_rate=float(f"{lr:.3g}")))
        if not new:
            break
        print(f"widening: {', '.join(s.label for s in new)}", flush=True)
        more, more_load, more_failed = race(new, task, args, evaluate, phase)
        runs, load, failed = runs + more, load + more_load, {**failed, **more_failed}
    return runs, load, failed


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark; returns the record it writes to ``<out>/<task>...json``."""
    args = parse_args(argv)
    if args.replot:
        record = json.loads(args.replot.read_text())
        plot(record, args.replot.with_suffix(".png"))
        return record
    info = machine()
    task = make_task(args.task, quick=args.quick, seed=args.seed)
    task_defaults(args, task)
    specs, skipped = available(expand(args.optimizers, task, quick=args.quick))
    if not specs:
        raise ValueError(f"no optimiser to run (skipped: {skipped})")
    evaluate = evaluator(task, args.batch_size)
    runs, load, failed = race(specs, task, args, evaluate, phase=0)
    runs, more_load, more_failed = widen_grids(runs, specs, args, task, evaluate)
    info["loadavg_end"] = list(os.getloadavg())
    info["loadavg_during"] = load + more_load  # [phase, seconds, 1-, 5-, 15-minute load]

    target = args.target
    adam = [r for r in runs if r["group"] == "adam" and r["stop"] != "diverged"]
    if target is None and adam:
        target = min(r["final_eval_loss"] for r in adam)  # What the best Adam reached.
    for run in runs:
        run["to_target"] = time_to_target(run, target)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    summary = summarise(runs)
    edges = {g: e["best_at_edge"] for g, e in summary.items() if e["best_at_edge"]}
    if edges:
        warnings.warn(
            f"best learning rate still at the grid's edge after widening: {edges}", stacklevel=2
        )
    record = {
        "machine": info,
        "versions": versions(),
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(
            ["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])]
        ),
        "settings": settings,
        "task_description": task.description,
        "loss_unit": task.loss_unit,
        "param_bytes": sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(task.params)),
        "skipped": {**skipped, **failed, **more_failed},
        "target": target,
        "target_rule": "--target" if args.target is not None else "best Adam final reported loss",
        "grid_edges": edges,
        "summary": summary,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.task}{'_quick' if args.quick else ''}_b{args.batch_size}{args.tag}"
    (args.out / f"{stem}.json").write_text(json.dumps(record, separators=(",", ":")))
    if not args.no_plot:
        try:
            plot(record, args.out / f"{stem}.png")
        except ImportError as error:  # matplotlib is optional
            warnings.warn(f"no figure: {error}", stacklevel=2)
    print_summary(record)
    return record


def print_summary(record: dict) -> None:
    """A table of the best run of each optimiser."""
    target = record["target"]
    unit = record.get("loss_unit", "")
    print(f"\n{record['settings']['task']}: target {target} ({unit})")
    w = max([40, *(len(e["label"]) + 2 for e in record["summary"].values())])
    print(
        f"{'optimiser':<{w}}{'final':>10}{'ms/step':>10}{'xAdam':>7}{'steps':>7}{'to target':>18}"
    )
    for e in sorted(record["summary"].values(), key=lambda e: e["median_step_ms"]):
        hit = e["to_target"]
        reach = f"{hit['seconds']:.1f} s/{hit['steps']} st" if hit else "-"
        ratio = e.get("step_ratio_vs_adam", float("nan"))
        final = e["final_eval_loss"]
        final_text = f"{final:.4g}" if final is not None else "-"
        print(
            f"{e['label']:<{w}}{final_text:>10}{e['median_step_ms']:>10.1f}{ratio:>7.2f}"
            f"{e['steps']:>7}{reach:>18}"
            + (f"  best lr at the grid's {e['best_at_edge']} edge" if e["best_at_edge"] else "")
        )
    for label, reason in record.get("skipped", {}).items():
        print(f"{label:<{w}}skipped: {reason}")


if __name__ == "__main__":
    main()
