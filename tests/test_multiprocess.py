"""Two processes on localhost (``jax.distributed``, CPU collectives over Gloo) train the same
model as one process on the whole batch and end with the same parameters, under sharded
``jax.jit`` and under ``jax.shard_map`` with distributed inverses (tests/multiprocess_worker.py).

The test starts and stops its own processes: every process has a deadline, and when one fails
or runs late the others are killed, so the test ends by itself within ``DEADLINE`` seconds.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 300  # seconds for all processes together


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(n: int, out: Path) -> None:
    """Start ``n`` workers, wait for all; kill the rest as soon as one fails or time runs out."""
    # One CPU device each; the suite's compile flags (tests/conftest.py) are kept.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    port = free_port()
    command = [sys.executable, "-m", "tests.multiprocess_worker", "--processes", str(n)]
    procs = [
        subprocess.Popen(
            [*command, "--process-id", str(i), "--port", str(port), "--out", str(out)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]
    deadline = time.monotonic() + DEADLINE
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        logs = [p.communicate()[0] for p in procs]
    for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
        if p.returncode != 0:
            pytest.fail(f"process {i} of {n} ended with {p.returncode}:\n{log[-3000:]}")


def test_two_processes_end_with_the_parameters_of_one_process_on_the_whole_batch(tmp_path):
    run_processes(1, tmp_path / "one.npz")
    run_processes(2, tmp_path / "two.npz")
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert sorted(one.files) == sorted(two.files)
    assert {name.split()[0] for name in one.files} == {"jit", "shard_map"}
    for name in one.files:
        # float64; the two processes pool the moments in another order (measured ~1e-15)
        np.testing.assert_allclose(two[name], one[name], rtol=1e-9, atol=1e-12, err_msg=name)
