"""Smoke tests of the benchmark suite: specs, grid widening, ``--quick`` runs, ``gpu.sh --quick``.

The autoencoder and the transformer race ``--quick`` with Adam, Muon and ``kfac(None)`` inside
``gpu.sh --quick`` (which also runs the step cost and its breakdown; the step cost's own quick
run covers ``kfac(lr)``); every other task is built at its quick size. The subprocesses use
XLA:CPU's cheapest compilation (``benchmarks.run.QUICK_XLA_FLAGS``): they check the harness's
plumbing and records, not speed; compiling is most of their time.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import optax
import pytest

from benchmarks import optimizers, run, tasks

ROOT = Path(__file__).resolve().parent.parent
QUICK_OPTIMIZERS = ["adam", "muon", "kfac_adaptive"]  # gpu.sh --quick's races


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("XLA_FLAGS", run.QUICK_XLA_FLAGS)
    env["TQDM_DISABLE"] = "1"
    return env


def test_spec_parsing_and_grid_expansion():
    spec = optimizers.parse("kfac+stats_batch_size=125+centering='none'@0.03")
    assert spec.family == "kfac" and spec.learning_rate == 0.03
    assert dict(spec.options) == {"stats_batch_size": 125, "centering": "none"}
    assert spec.label == "kfac+stats_batch_size=125+centering=none@0.03"
    spec = optimizers.parse("kfac+block={'head': None, 'block_*': 'eigen'}+unmatched=adam*0.1@0.1")
    assert dict(spec.options)["block"] == {"head": None, "block_*": "eigen"}
    assert dict(spec.options)["unmatched"] == "adam*0.1"
    texts = optimizers.split_specs("adam, kfac+block={'a': None, 'b': 'ekfac'}@0.1,muon")
    assert texts == ["adam", "kfac+block={'a': None, 'b': 'ekfac'}@0.1", "muon"]
    for text in ("muon@0.03", "psgd@1e-3", "sophia@1e-3", "ekfac@0.1", "kfac_homogeneous@0.1"):
        assert optimizers.parse(text).label == text.replace("1e-3", "0.001")
    with pytest.raises(ValueError, match="chooses its own"):
        optimizers.parse("kfac_adaptive@0.1")
    with pytest.raises(ValueError, match="unknown optimiser"):
        optimizers.parse("lbfgs")
    with pytest.raises(ValueError, match="key=value"):
        optimizers.parse("kfac+damping")


def test_families_map_to_the_kfax_options():
    def options(text):
        return optimizers.kfax_options(optimizers.parse(text))

    assert options("kfac@0.1") == {}
    assert options("kfac_homogeneous@0.1") == {"centering": "none"}
    assert options("kfac_eigen@0.1") == {"block": "eigen"}
    assert options("ekfac@0.1") == {"block": "ekfac"}
    assert options("kfac+unmatched=identity@0.1") == {"unmatched": None}
    adam = options("kfac_adaptive+unmatched=adam")["unmatched"]
    assert isinstance(adam, optax.GradientTransformation)
    with pytest.raises(ValueError, match="unmatched"):
        options("kfac+unmatched=lion@0.1")


def test_grid_widening_moves_past_the_edge_that_holds_the_best():
    def runs(losses):
        return [
            {"learning_rate": lr, "final_eval_loss": loss, "stop": "budget"}
            for lr, loss in losses.items()
        ]

    inside = runs({1e-3: 3.0, 3e-3: 2.0, 1e-2: 2.5})
    assert run.grid_edge(inside) is None and run.widened(inside) is None
    high = runs({1e-3: 3.0, 3e-3: 2.0, 1e-2: 1.5})
    assert run.grid_edge(high) == "high" and run.widened(high) == pytest.approx(1e-2 * 1e-2 / 3e-3)
    low = runs({1e-3: 1.0, 3e-3: 2.0})
    assert run.grid_edge(low) == "low" and run.widened(low) == pytest.approx(1e-3 / 3)
    diverged = [{**r, "stop": "diverged"} if r["learning_rate"] > 1e-3 else r for r in high]
    assert run.grid_edge(diverged) == "low"  # a diverged run is never the best
    assert run.grid_edge([{**r, "stop": "diverged"} for r in high]) == "low"
    assert run.grid_edge(runs({1e-3: 1.0})) is None


def check_race(saved: dict, names: set[str], steps: int, eval_every: int) -> None:
    """A ``benchmarks.run`` record: every optimiser ran ``steps`` finite steps, fields present."""
    assert set(saved["summary"]) == names
    for key in ("machine", "versions", "settings", "summary", "runs", "target", "date", "command"):
        assert key in saved
    assert len(saved["machine"]["loadavg_start"]) == 3
    assert saved["versions"]["jax"] and saved["versions"]["kfax"]
    for entry in saved["runs"]:
        assert entry["steps"] == steps and entry["stop"] == "steps", entry["label"]
        assert len(entry["loss"]) == len(entry["time"]) == steps
        assert all(v is not None and math.isfinite(v) for v in entry["loss"]), entry["label"]
        assert entry["eval_step"] == list(range(0, steps + 1, eval_every))
        assert entry["time"] == sorted(entry["time"]) and entry["compile_seconds"] > 0
        assert entry["state_bytes"] > 0
    for entry in saved["summary"].values():
        assert entry["jax"] == saved["versions"]["jax"] and entry["best_at_edge"] is None
    assert saved["summary"]["adam"]["to_target"] is not None  # The target is Adam's own loss.


@pytest.mark.parametrize("name", tasks.TASKS)
def test_every_task_builds_at_its_quick_size_with_a_finite_initial_loss(name):
    """The races themselves run in ``gpu.sh --quick`` (the autoencoder and the transformer);
    the other tasks share that harness and differ only here, in how they are built."""
    task = tasks.make_task(name, quick=True)
    batch = task.quick_batch_size
    outputs = task.apply_fn(task.params, task.inputs[:batch])
    loss = float(task.loss(outputs, task.targets[:batch]))
    assert math.isfinite(loss) and loss > 0, (name, loss)
    assert set(task.grids) >= {"adam"}, task.grids


def test_gpu_script_runs_at_a_tiny_size_on_the_cpu(tmp_path):
    env = {**_env(), "PYTHON": sys.executable}
    env.pop("OUT", None)
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("gpu_*_quick.json")
    record = json.loads(path.read_text())
    assert record["device"]["backend"] == "cpu" and record["device"]["jax"]
    assert record["versions"]["jax"] == record["device"]["jax"] and record["quick"]
    assert set(record["parts"]) == {"autoencoder_race", "autoencoder_step_cost", "transformer_race"}
    assert not record["notes"], record["notes"]
    for part in ("autoencoder_race", "transformer_race"):
        race = {**record["parts"][part], "versions": record["versions"]}
        check_race(race, set(QUICK_OPTIMIZERS), steps=4, eval_every=2)
        run.plot(race, tmp_path / f"{part}.png")
        assert (tmp_path / f"{part}.png").stat().st_size > 0
    transformer = record["parts"]["transformer_race"]
    assert transformer["loss_unit"].startswith("nats per token")
    assert 0.0 < transformer["target"] < math.log(256) + 1.0  # per token, not per window
    cost = record["parts"]["autoencoder_step_cost"]
    assert cost["steps"]["adam"]["amortised_ms"] > 0
    pieces = cost["breakdown"]["pieces"]
    for name in (
        "statistics_pass",
        "observe",
        "refresh_factored",
        "precondition",
        "kfac_step_plain",
    ):
        assert pieces[name]["ms"] > 0, name


def test_step_cost_classes_kfax_steps_by_kfacs_own_cadence_defaults():
    """The amortised step cost classes steps by kfax.kfac's cadences: statistics every 5 steps
    and refreshes every 10 with a learning rate, both every 4 (damping every 5) in the adaptive
    mode, and an option given in the specification wins."""
    from benchmarks import step_cost  # noqa: PLC0415

    assert step_cost.periods(optimizers.parse("kfac@0.01")) == {"stats": 5, "inverse": 10}
    adaptive = step_cost.periods(optimizers.parse("kfac_adaptive"))
    assert adaptive == {"stats": 4, "inverse": 4, "damping": 5}
    given = step_cost.periods(optimizers.parse("kfac+stats_every=1+inverse_every=20@0.01"))
    assert given == {"stats": 1, "inverse": 20}


def test_the_compile_time_probe_removes_each_stage_it_names(tmp_path):
    """benchmarks.compile_time times trace, lowering and compile of each train step; its stage
    probe really removes the stage (kfax's step is jitted with its plan static, so a cached
    trace would hide the removal): every program without a stage is smaller than the full one,
    and the one without all three is the smallest."""
    from benchmarks import compile_time  # noqa: PLC0415  (in a subprocess: it clears JAX's caches)

    command = ["-m", "benchmarks.compile_time", "--quick", "--depths", "2", "--stages"]
    done = subprocess.run(
        [sys.executable, *command, "--out", str(tmp_path)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "compile_time_quick.json").read_text())
    rows = [(row["layout"], row["depth"]) for row in record["rows"]]
    assert rows == [("unrolled", 2), ("scan", 2)]
    for row in record["rows"]:
        configs = row["configs"]
        for entry in configs.values():
            assert entry["total_s"] > 0 and entry["compile_s"] > 0
        full = configs["kfac(lr)"]["hlo_lines"]
        bare = configs["kfac(lr) without all three"]["hlo_lines"]
        for stage in compile_time.STAGES:
            assert bare < configs[f"kfac(lr) without {stage}"]["hlo_lines"] < full, stage


def test_the_scaling_study_times_every_kind_of_step_of_each_configuration(tmp_path):
    """benchmarks.scaling amortises each configuration over its cadences; a round must contain
    every kind of step, or the amortised cost is NaN: the adaptive mode's cadences (statistics
    and refreshes every 4 steps, damping every 5) repeat every 20 steps, twice the default
    round of 10 timed steps."""
    from benchmarks import scaling, step_cost  # noqa: PLC0415

    assert step_cost.covering_window(step_cost.periods(optimizers.parse("kfac_adaptive"))) == 20
    record = scaling.main(
        [
            "--widths=8",
            "--depths=",
            "--batch-size=8",
            "--steps=3",
            "--configs=adam@0.001,kfac@0.001,kfac_adaptive",
            "--no-plot",
            f"--out={tmp_path}",
        ]
    )
    (row,) = record["widths"]
    assert set(row["configs"]) == {"adam", "kfac", "kfac_adaptive"}
    for name, entry in row["configs"].items():
        assert math.isfinite(entry["amortised_ms"]) and entry["amortised_ms"] > 0, name
