"""Distributed against replicated inverses across devices: work per device and bytes per step.

Usage (repository root; the script asks for 8 simulated CPU devices itself, in its own
process)::

    .venv/bin/python -m benchmarks.distributed            # MNIST autoencoder, batch 1000
    .venv/bin/python -m benchmarks.distributed --quick    # a small autoencoder, seconds

The MNIST autoencoder (784-1000-500-250-30-250-500-1000-784, eight dense layers, float32) is
trained data-parallel under ``jax.pmap`` with ``kfax.scale_by_kfac(axis_name=...)`` on
``--devices`` devices (the batch split among them), once per ``inverse_strategy``:

* **Work per device**: the refresh cost model (``d^3`` per factor, :mod:`kfax.distributed`) of
  what each device refreshes: everything (``replicated``), or its share (``distributed``, the
  balanced assignment), against the total.
* **Bytes per step**: the all-reduce and all-gather results in the compiled HLO of one step
  that takes statistics (``stats_every=1``) minus the gradient's all-reduce (``pmean`` of the
  gradient, compiled on its own): the statistics' collectives, the same for both strategies;
  and the bytes of the layers' curvature and health, which the distributed refresh shares in
  one psum per refresh (amortised over ``inverse_every=10`` as well).
* **Time per step** with a refresh every step and without refreshes, on the simulated devices:
  they share this machine's cores, so the time measures the *total* work of all devices (the
  replicated strategy does each inverse ``n_devices`` times), not the speed of a real cluster.

Writes ``<out>/distributed_<model>_b<batch>.json`` and prints a table.
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:  # simulated devices must be requested before JAX starts
    count = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), "8")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
    )

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kfax  # noqa: E402
from benchmarks.run import git_commit, machine, versions  # noqa: E402
from examples.models import MNIST_AUTOENCODER_SIZES, autoencoder  # noqa: E402

QUICK_SIZES = (64, 128, 64, 32, 8, 32, 64, 128, 64)
AXIS = "devices"
BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s64": 8, "pred": 1}
COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-reduce|all-gather)(-start)?\(")
SHAPE = re.compile(r"\b(f64|f32|bf16|f16|s32|u32|s64|pred)\[([\d,]*)\]")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--devices", type=int, default=8, help="as --devices=N (read at start)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tag", default="")
    return parser.parse_args(argv)


def collective_bytes(hlo: str) -> int:
    """Bytes of the results of every all-reduce / all-gather in an HLO module's text (each op
    once; ops inside a conditional's branches are counted as if their branch runs)."""
    total = 0
    for line in hlo.splitlines():
        match = COLLECTIVE.search(line)
        if match is None:
            continue
        for dtype, dims in SHAPE.findall(match.group(1)):
            size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            total += BYTES[dtype] * size
    return total


def build(sizes, batch: int, devices: int, strategy: str, inverse_every: int):
    params, apply_fn = autoencoder(jax.random.key(0), sizes)
    loss = kfax.losses.SigmoidCrossEntropy()
    x = jax.random.uniform(jax.random.key(1), (devices, batch // devices, sizes[0]))
    tx = kfax.scale_by_kfac(
        apply_fn,
        loss,
        example_inputs=x[0],
        axis_name=AXIS,
        inverse_strategy=strategy,
        inverse_every=inverse_every,
    )

    def step(p, s, xb):
        g = jax.lax.pmean(jax.grad(lambda q: loss(apply_fn(q, xb), xb))(p), AXIS)
        u, s = tx.update(g, s, p, inputs=xb)
        return jax.tree.map(lambda a, b: a - 1e-3 * b, p, u), s

    def gradient(p, xb):
        return jax.lax.pmean(jax.grad(lambda q: loss(apply_fn(q, xb), xb))(p), AXIS)

    replicate = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (devices, *a.shape)), t)  # noqa: E731
    return tx, params, apply_fn, x, replicate, jax.pmap(step, AXIS), jax.pmap(gradient, AXIS)


def timed(step, p, s, x, steps: int) -> tuple[float, float]:
    """(median seconds per step, compile seconds)."""
    begin = time.perf_counter()
    p, s = jax.block_until_ready(step(p, s, x))
    compile_seconds = time.perf_counter() - begin
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        p, s = jax.block_until_ready(step(p, s, x))
        times.append(time.perf_counter() - begin)
    return statistics.median(times), compile_seconds


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    devices = jax.device_count()
    if devices != args.devices:
        raise SystemExit(
            f"{devices} devices, asked for {args.devices}: run this script in a process of its "
            "own (it sets XLA_FLAGS before JAX starts), e.g. python -m benchmarks.distributed."
        )
    sizes = QUICK_SIZES if args.quick else MNIST_AUTOENCODER_SIZES
    batch = args.batch_size or (64 if args.quick else 1000)
    steps = args.steps if args.steps is not None else (3 if args.quick else 10)
    results = {}
    for strategy in kfax.distributed.INVERSE_STRATEGIES:
        tx, params, apply_fn, x, replicate, step, gradient = build(
            sizes, batch, devices, strategy, inverse_every=1
        )
        p, s = replicate(params), replicate(tx.init(params))
        hlo = step.lower(p, s, x).compile().as_text()
        grad_hlo = gradient.lower(p, x).compile().as_text()
        with_refresh = without_refresh = compile_seconds = None
        if steps:  # --steps 0: bytes and work only (the test's setting)
            with_refresh, compile_seconds = timed(step, p, s, x, steps)
            no_refresh_step = build(sizes, batch, devices, strategy, inverse_every=10**9)[5]
            without_refresh, _ = timed(no_refresh_step, p, s, x, steps)
        state = tx.init(params)
        costs = {n: kfax.distributed.refresh_cost(v) for n, v in state.statistics.items()}
        if strategy == "distributed":
            owners = kfax.distributed.assign_owners(costs, devices)
            loads = kfax.distributed.device_loads(costs, owners, devices)
        else:
            owners, loads = None, [sum(costs.values())] * devices
        results[strategy] = {
            "collective_bytes_per_step": collective_bytes(hlo),
            "gradient_allreduce_bytes": collective_bytes(grad_hlo),
            "refresh_cost_per_device": loads,
            "refresh_cost_total": sum(costs.values()),
            "owners": owners,
            "seconds_per_step_with_refresh": with_refresh and round(with_refresh, 5),
            "seconds_per_step_without_refresh": without_refresh and round(without_refresh, 5),
            "compile_seconds": compile_seconds and round(compile_seconds, 2),
        }
    replicated = results["replicated"]
    # What the distributed refresh's psum carries: every layer's curvature and health. (The
    # compiled step holds the refresh twice, in both branches of the statistics cadence, so the
    # HLO's collective bytes count that psum twice; only one branch runs per step.)
    sharing = sum(int(leaf.nbytes) for leaf in jax.tree.leaves((state.curvature, state.health)))
    summary = {
        "gradient_allreduce_bytes": replicated["gradient_allreduce_bytes"],
        "statistics_collective_bytes": replicated["collective_bytes_per_step"]
        - replicated["gradient_allreduce_bytes"],
        "inverse_sharing_bytes_per_refresh": sharing,
        "inverse_sharing_bytes_per_step_at_inverse_every_10": sharing / 10,
        "max_refresh_cost_per_device": {
            k: max(v["refresh_cost_per_device"]) for k, v in results.items()
        },
        "refresh_seconds_per_step_all_devices": {
            k: round(v["seconds_per_step_with_refresh"] - v["seconds_per_step_without_refresh"], 5)
            for k, v in results.items()
            if v["seconds_per_step_with_refresh"] is not None
        },
    }
    record = {
        "machine": machine(),
        "versions": versions(),
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python -m benchmarks.distributed", *(argv or sys.argv[1:])]),
        "model": {"sizes": list(sizes), "batch": batch, "devices": devices, "dtype": "float32"},
        "summary": summary,
        "strategies": results,
    }
    print_table(record)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"distributed_autoencoder{'_quick' if args.quick else ''}_b{batch}{args.tag}.json"
    (args.out / name).write_text(json.dumps(record, indent=1))
    return record


def print_table(record: dict) -> None:
    summary, model = record["summary"], record["model"]
    print(f"{model['devices']} devices, autoencoder {model['sizes']}, batch {model['batch']}")
    rows = [
        ("gradient all-reduce", summary["gradient_allreduce_bytes"], "step"),
        ("statistics collectives", summary["statistics_collective_bytes"], "step"),
        ("sharing the inverses", summary["inverse_sharing_bytes_per_refresh"], "refresh"),
    ]
    for label, value, per in rows:
        print(f"{label:<24}{value / 1e6:9.2f} MB/{per}")
    for name, entry in record["strategies"].items():
        total, most = entry["refresh_cost_total"], max(entry["refresh_cost_per_device"])
        if entry["seconds_per_step_with_refresh"] is None:
            print(f"{name:<12} refresh work per device (max) {most / total:6.3f} of the total")
            continue
        print(
            f"{name:<12} refresh work per device (max) {most / total:6.3f} of the total; "
            f"step {entry['seconds_per_step_with_refresh'] * 1e3:8.1f} ms with a refresh, "
            f"{entry['seconds_per_step_without_refresh'] * 1e3:8.1f} ms without (all devices on "
            "this machine's cores)"
        )


if __name__ == "__main__":
    main()
