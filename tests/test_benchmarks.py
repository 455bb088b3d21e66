"""Smoke tests of the benchmark suite: ``benchmarks.run --quick`` end to end, in-process."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import optimizers, run


def test_spec_parsing_and_grid_expansion():
    spec = optimizers.parse("kfac+stats_batch_size=125+centered=False@0.03")
    assert spec.family == "kfac" and spec.learning_rate == 0.03
    assert dict(spec.options) == {"stats_batch_size": 125, "centered": False}
    assert spec.label == "kfac+stats_batch_size=125+centered=False@0.03"
    with pytest.raises(ValueError, match="chooses its own"):
        optimizers.parse("kfac_adaptive@0.1")
    with pytest.raises(ValueError, match="unknown optimiser"):
        optimizers.parse("lbfgs")


def test_quick_run_writes_a_record_with_finite_losses(tmp_path):
    names = ["adam", "kfac"]
    if optimizers.kfac_jax_available():
        names.append("kfac_jax")
    argv = ["--quick", "--task", "deep_linear", "--optimizers", ",".join(names)]
    record = run.main([*argv, "--steps", "6", "--eval-every", "3", "--out", str(tmp_path)])

    files = {p.name for p in tmp_path.iterdir()}
    assert files == {"deep_linear_quick_b64.json", "deep_linear_quick_b64.png"}
    saved = json.loads((tmp_path / "deep_linear_quick_b64.json").read_text())
    assert saved["summary"].keys() == record["summary"].keys() == set(names)
    for key in ("machine", "versions", "settings", "summary", "runs", "target"):
        assert key in saved
    assert len(saved["machine"]["loadavg_start"]) == 3
    assert saved["versions"]["jax"] and saved["versions"]["kfax"]
    for entry in saved["runs"]:
        assert entry["steps"] == 6 and entry["stop"] == "steps"
        assert len(entry["loss"]) == len(entry["time"]) == 6
        assert all(v is not None and math.isfinite(v) for v in entry["loss"])
        assert entry["eval_step"] == [0, 3, 6]
        assert entry["time"] == sorted(entry["time"]) and entry["compile_seconds"] > 0
        assert entry["state_bytes"] > 0
    assert saved["summary"]["adam"]["to_target"] is not None  # The target is Adam's own loss.
