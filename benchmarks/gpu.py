"""The prepared accelerator run: step cost and time to target, one JSON record (issue 16).

Run it through ``benchmarks/gpu.sh`` (which sets the environment and a hard time limit)::

    benchmarks / gpu.sh  # on the GPU machine: under 8 minutes on one H200
    benchmarks / gpu.sh - -quick  # tiny CPU check of the same path (tests/test_benchmarks.py)

Parts, in order of priority (each is skipped with a note once the deadline is near):

1. autoencoder time to target: Adam (two learning rates), Muon, PSGD-Kron, ``kfac(lr)``,
   ``kfac(None)`` and kfac-jax, interleaved (``benchmarks.run``); the target is the best Adam's
   loss at the end of its budget;
2. autoencoder step cost and the breakdown of a kfax step (``benchmarks.step_cost``);
3. transformer time to target, as in 1;
4. transformer step cost (no breakdown).

Peers that are not installed (psgdax and kfac-jax on the GPU machine) are skipped with a note.
The record (``<out>/gpu_<device>_<date>.json``) names the device, the JAX version and every
package version, and holds each part's full record; it is rewritten after every part, so a run
cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax

from benchmarks import run, step_cost

# (part name, module, arguments, seconds it is expected to take on an H200 at most)
FULL_PARTS = (
    (
        "autoencoder_race",
        run,
        [
            "--task=autoencoder",
            "--optimizers=adam@0.001,adam@0.003,muon@0.1,psgd@0.001,kfac@0.01,kfac_adaptive,"
            "kfac_adaptive+fused=True,kfac_jax",
            "--budget-seconds=10",
            "--eval-every=50",
            "--widen=0",
        ],
        150,
    ),
    (
        "autoencoder_step_cost",
        step_cost,
        [
            "--task=autoencoder",
            "--configs=adam,muon@0.1,psgd@0.001,kfac,kfac_adaptive,kfac+fused=True,"
            "kfac_adaptive+fused=True,kfac+stats_batch_size=125,kfac+batch_layers=True",
            "--steps=50",
            "--repeats=3",
            "--breakdown-repeats=10",
        ],
        90,
    ),
    (
        "transformer_race",
        run,
        [
            "--task=transformer",
            "--optimizers=adam@0.001,adam@0.003,muon@0.03,psgd@0.001,kfac@0.03,kfac_adaptive",
            "--budget-seconds=15",
            "--eval-every=50",
            "--widen=0",
        ],
        160,
    ),
    (
        "transformer_step_cost",
        step_cost,
        [
            "--task=transformer",
            "--configs=adam,muon@0.03,kfac,kfac_adaptive,kfac+batch_layers=True",
            "--steps=30",
            "--repeats=2",
            "--breakdown-repeats=0",
        ],
        60,
    ),
)

# The same path at a tiny size, for the CPU test: quick tasks, a few steps, one breakdown round.
QUICK_OPTIMIZERS = "--optimizers=adam,muon,kfac_adaptive"
QUICK_PARTS = (
    (
        "autoencoder_race",
        run,
        ["--task=autoencoder", QUICK_OPTIMIZERS, "--steps=4", "--eval-every=2"],
        60,
    ),
    (
        "autoencoder_step_cost",
        step_cost,
        ["--task=autoencoder", "--configs=adam", "--steps=2", "--repeats=1"]
        + ["--breakdown-repeats=1"],
        60,
    ),
    (
        "transformer_race",
        run,
        ["--task=transformer", QUICK_OPTIMIZERS, "--steps=4", "--eval-every=2"],
        60,
    ),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU check)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where the record goes (default benchmarks/results; a temporary folder with --quick)",
    )
    parser.add_argument("--also-to", type=Path, default=None, help="copy the record here too")
    parser.add_argument(
        "--deadline-seconds",
        type=float,
        default=None,
        help="skip a part that would not end before this (default 420; 240 with --quick)",
    )
    parser.add_argument("--only", default=None, help="comma-separated part names to run")
    args = parser.parse_args(argv)
    if args.deadline_seconds is None:
        args.deadline_seconds = 240.0 if args.quick else 420.0
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "kfax_gpu_quick" if args.quick else run.RESULTS
    return args


def device_record() -> dict[str, Any]:
    """The device, JAX and its backend, as JAX reports them."""
    device = jax.devices()[0]
    info = {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
    }
    with contextlib.suppress(Exception):  # Memory statistics are backend dependent.
        stats = device.memory_stats() or {}
        info["memory_bytes_limit"] = stats.get("bytes_limit")
    return info


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "device"


def _compact(part: dict) -> dict:
    """A part's record without what the top level already says."""
    return {k: v for k, v in part.items() if k not in ("versions", "git_commit")}


def main(argv: list[str] | None = None) -> dict:
    """Runs the parts; returns the record written to ``<out>/gpu_<device>_<date>[_quick].json``."""
    args = parse_args(argv)
    begin = time.perf_counter()
    device = device_record()
    stamp = time.strftime("%Y-%m-%d")
    name = f"gpu_{_slug(device['device_kind'])}_{stamp}{'_quick' if args.quick else ''}.json"
    record: dict[str, Any] = {
        "device": device,
        "versions": run.versions(),
        "git_commit": run.git_commit(),
        "date": stamp,
        "command": " ".join(["benchmarks/gpu.sh", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "parts": {},
        "notes": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / name
    scratch = args.out / "gpu_parts.tmp"
    parts = QUICK_PARTS if args.quick else FULL_PARTS
    wanted = None if args.only is None else set(args.only.split(","))
    for part, module, part_args, expected in parts:
        if wanted is not None and part not in wanted:
            continue
        elapsed = time.perf_counter() - begin
        if elapsed + expected > args.deadline_seconds:
            note = f"{part} skipped: {elapsed:.0f} s elapsed, it needs up to {expected} s"
            record["notes"].append(note)
            print(note, flush=True)
            continue
        extra = ["--quick"] if args.quick else []
        if module is run:
            extra.append("--no-plot")
        print(f"\n=== {part} ({elapsed:.0f} s elapsed)", flush=True)
        started = time.perf_counter()
        try:
            result = module.main([*part_args, *extra, f"--out={scratch}"])
        except Exception as error:  # noqa: BLE001 - a failed part must not lose the others.
            record["notes"].append(f"{part} failed: {type(error).__name__}: {error}")
            print(record["notes"][-1], flush=True)
            continue
        result = _compact(result)
        result["part_seconds"] = round(time.perf_counter() - started, 1)
        record["parts"][part] = result
        for label, reason in result.get("skipped", {}).items():
            record["notes"].append(f"{part}: {label} skipped ({reason})")
        save(record, path, begin, args.also_to)
    save(record, path, begin, args.also_to)
    for leftover in scratch.glob("*") if scratch.exists() else ():
        leftover.unlink()
    if scratch.exists():
        scratch.rmdir()
    print(summary(record), flush=True)
    print(f"record: {path}", flush=True)
    return record


def save(record: dict, path: Path, begin: float, also_to: Path | None) -> None:
    """Writes the record (and its copy), with the time so far."""
    record["total_seconds"] = round(time.perf_counter() - begin, 1)
    path.write_text(json.dumps(record, separators=(",", ":")))
    if also_to is not None:
        also_to.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, also_to / path.name)


def summary(record: dict) -> str:
    """A short text summary of the record (the parts print their own tables as they run)."""
    out = io.StringIO()
    device = record["device"]
    out.write(
        f"\n{device['device_kind']} ({device['backend']}), jax {device['jax']}, "
        f"{record['total_seconds']} s\n"
    )
    for part, result in record["parts"].items():
        if "summary" in result:
            out.write(f"{part}: target {result['target']} ({result.get('loss_unit', '')})\n")
            for entry in result["summary"].values():
                hit = entry["to_target"]
                reach = f"{hit['seconds']:.1f} s / {hit['steps']} steps" if hit else "not reached"
                out.write(
                    f"  {entry['label']:<34} final {entry['final_eval_loss']}  "
                    f"{entry['median_step_ms']:.2f} ms/step  to target: {reach}\n"
                )
        else:
            out.write(f"{part}:\n")
            for label, entry in result["steps"].items():
                out.write(
                    f"  {label:<34} {entry['amortised_ms']:.2f} ms/step  "
                    f"x{entry.get('ratio_vs_adam', float('nan')):.2f} Adam\n"
                )
    for note in record["notes"]:
        out.write(f"note: {note}\n")
    return out.getvalue()


if __name__ == "__main__":
    main()
