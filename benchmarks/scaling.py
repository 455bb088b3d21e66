"""Scaling study (issue 10): step cost, compile time and state memory against width and depth.

Usage (repository root; kfac-jax rows need ``.venv-bench``)::

    .venv-bench/bin/python -m benchmarks.scaling                 # the default sweeps
    .venv/bin/python -m benchmarks.scaling --quick               # a tiny sweep (seconds)

The model is a stack of ``depth`` square dense layers of ``width`` (``examples.models.
deep_linear`` with biases) trained with a squared error on random data, batch ``--batch-size``.
Two sweeps: widths ``--widths`` at depth ``--depth-for-widths``, and depths ``--depths`` at
width ``--width-for-depths``. For each size, the configurations (``--configs``, specs as in
``benchmarks.run``) are compiled and timed interleaved by ``benchmarks.step_cost``'s
``measure_steps`` (amortised over the refresh cadences). Each row also holds a rough FLOP model
of a kfax K-FAC step per layer, to compare with the measurement: gradient ``6 b d^2``,
statistics ``8 b d^2`` (tapped forward and pullback, then ``h^T h`` and ``g^T g``),
preconditioning ``4 d^3`` (two ``d x d`` products) and refresh ``2 d^3`` (two Cholesky inverses)
divided by ``inverse_every``; state memory is measured.

``--scan`` writes the same stack as a ``lax.scan`` over stacked parameters, which kfax
preconditions as one stacked block: compile time then stays flat in depth.

Writes ``<out>/scaling[_scan][_quick]<tag>.json`` and, with matplotlib, a PNG: step time
against width (log-log) and compile time against depth, per configuration.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import kfax
from benchmarks import step_cost
from benchmarks.optimizers import Spec, available, parse, split_specs
from benchmarks.run import RESULTS, provenance
from benchmarks.tasks import Task
from examples import models

DEFAULT_CONFIGS = "adam@0.001,kfac@0.001,kfac_adaptive,kfac_jax"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--widths", default=None, help="default 256,512,1024,2048,4096")
    parser.add_argument("--depth-for-widths", type=int, default=4)
    parser.add_argument("--depths", default=None, help="default 2,4,8,16,32,64")
    parser.add_argument("--width-for-depths", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--steps",
        type=int,
        default=10,
        help="timed steps per round (at least each configuration's cadence period)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="rounds of timed steps")
    parser.add_argument("--quick", action="store_true", help="widths 16,32 and depths 2,4")
    parser.add_argument(
        "--scan",
        action="store_true",
        help="the same stack written as a lax.scan over stacked parameters (one kfax block)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.widths is None:
        args.widths = "16,32" if args.quick else "256,512,1024,2048,4096"
    if args.depths is None:
        args.depths = "2,4" if args.quick else "2,4,8,16,32,64"
    if args.quick:
        args.batch_size, args.width_for_depths = min(args.batch_size, 32), 16
    return args


def scanned_deep_linear(params: dict) -> tuple[dict, Any]:
    """The layers of ``deep_linear`` stacked along a leading axis and applied by ``lax.scan``."""
    names = sorted(params, key=lambda name: int(name.split("_")[1]))
    stacked = {"stack": jax.tree.map(lambda *a: jnp.stack(a), *(params[n] for n in names))}

    def apply_fn(params: dict, inputs: jax.Array) -> jax.Array:
        def layer(x, p):
            return x @ p["kernel"] + p["bias"], None

        return jax.lax.scan(layer, inputs, params["stack"])[0]

    return stacked, apply_fn


def scaling_task(width: int, depth: int, batch: int, seed: int, scan: bool = False) -> Task:
    """A deep linear stack with biases on random Gaussian data (four batches of it); ``scan``:
    the same stack as a ``lax.scan`` over stacked parameters."""
    params, apply_fn = models.deep_linear(jax.random.key(seed), width, depth, bias=True)
    if scan:
        params, apply_fn = scanned_deep_linear(params)
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((4 * batch, width)).astype(np.float32)
    targets = rng.standard_normal((4 * batch, width)).astype(np.float32)
    grid = (1e-3,)
    return Task(
        name="scaling",
        params=params,
        apply_fn=apply_fn,
        loss=kfax.losses.SquaredError(),
        loss_kind="squared",
        inputs=inputs,
        targets=targets,
        grids={name: grid for name in ("adam", "sgd", "muon", "psgd", "sophia", "kfac")}
        | {"kfac_jax_fixed": grid},
        description=f"deep linear, {depth} layers of width {width}, squared error"
        + (", lax.scan over stacked layers" if scan else ""),
        batch_size=batch,
    )


def flop_model(width: int, depth: int, batch: int, inverse_every: int = 10) -> dict[str, float]:
    """Rough GFLOP per step of a kfax K-FAC step's parts (see the module docstring)."""
    bd2, d3 = batch * width**2 * depth, width**3 * depth
    return {
        "gradient": 6 * bd2 / 1e9,
        "statistics": 8 * bd2 / 1e9,
        "precondition": 4 * d3 / 1e9,
        "refresh_amortised": 2 * d3 / inverse_every / 1e9,
    }


def measure(width: int, depth: int, specs: list[Spec], args: argparse.Namespace) -> dict:
    task = scaling_task(width, depth, args.batch_size, args.seed, scan=args.scan)
    settings = argparse.Namespace(
        batch_size=args.batch_size,
        seed=args.seed,
        steps=args.steps,
        repeats=args.repeats,
        warmup_steps=2,  # compiled already; the 10 timed steps then hold a refresh
    )
    measured, _ = step_cost.measure_steps(specs, task, settings)
    return {
        "width": width,
        "depth": depth,
        "param_bytes": sum(int(a.nbytes) for a in jax.tree_util.tree_leaves(task.params)),
        "model_gflop": flop_model(width, depth, args.batch_size),
        "configs": {
            spec.group: {
                key: measured[spec.label][key]
                for key in ("amortised_ms", "window_mean_ms", "compile_seconds", "state_bytes")
            }
            for spec in specs
        },
    }


def plot(record: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for sweep, ax, x, y in (
        ("widths", axes[0], "width", "amortised_ms"),
        ("depths", axes[1], "depth", "amortised_ms"),
        ("depths", axes[2], "depth", "compile_seconds"),
    ):
        rows = record[sweep]
        for k, name in enumerate(rows[0]["configs"] if rows else ()):
            values = [row["configs"][name][y] for row in rows]
            ax.plot([row[x] for row in rows], values, "o-", color=f"C{k}", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(y.replace("_", " "))
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"scaling, batch {record['settings']['batch_size']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    specs, skipped = available([parse(text) for text in split_specs(args.configs)])
    record: dict[str, Any] = {
        **provenance(args),
        "skipped": skipped,
        "widths": [],
        "depths": [],
    }
    for width in (int(w) for w in args.widths.split(",") if w):
        record["widths"].append(measure(width, args.depth_for_widths, specs, args))
    for depth in (int(d) for d in args.depths.split(",") if d):
        record["depths"].append(measure(args.width_for_depths, depth, specs, args))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"scaling{'_scan' if args.scan else ''}{'_quick' if args.quick else ''}{args.tag}"
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    if not args.no_plot:
        try:
            plot(record, args.out / f"{stem}.png")
        except ImportError as error:
            warnings.warn(f"no figure: {error}", stacklevel=2)
    print_table(record)
    return record


def print_table(record: dict) -> None:
    print(
        f"\n{'width':>6}{'depth':>6} {'config':<24}{'ms/step':>10}{'compile s':>10}{'state MB':>10}"
    )
    for row in record["widths"] + record["depths"]:
        for name, entry in row["configs"].items():
            print(
                f"{row['width']:>6}{row['depth']:>6} {name:<24}{entry['amortised_ms']:>10.1f}"
                f"{entry['compile_seconds']:>10.1f}{entry['state_bytes'] / 2**20:>10.1f}"
            )


if __name__ == "__main__":
    main()
