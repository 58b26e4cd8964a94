"""Sweeps: a grid of runs of one spec, concurrent on one Ray cluster, resumable by run name, one table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from hetero_ray.errors import HeteroRayError, OutputError, SpecError
from hetero_ray.sweep import SweepRun, grid, run_name, run_sweep, sweep_specs
from tests.helpers import make_spec

ROOT = Path(__file__).resolve().parents[1]


def _spec_file(zoo, tmp: Path, **overrides) -> Path:
    """A tiny spec (Llama target <- Qwen2 source, 3 optimizer steps) as a YAML file, without output or name."""
    spec = make_spec(zoo, tmp / "unused", sources=("qwen2",), **{
        "training.epochs": 1, "training.grad_accum": 4, "method.num_projections": 16, **overrides})
    data = spec.model_dump(mode="json")
    data.pop("output"), data.pop("name")
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _tensors(path) -> dict:
    return load_file(str(Path(path) / "adapter_model.safetensors"))


def adapter_norm(spec, output: Path) -> dict:
    """An ``after`` hook: a metric computed in the run's own process."""
    return {"norm": float(sum(float(t.double().norm() ** 2) for t in _tensors(output).values()) ** 0.5),
            "seed": spec.seed}


def test_grid_order_and_names():
    runs = grid({"strategy": ["heterofusion", "zero_sources"], "seed": [0, 1], "training.lr": [1e-3]})
    assert [r.name for r in runs] == ["heterofusion-s0-lr0.001", "heterofusion-s1-lr0.001",
                                      "zero_sources-s0-lr0.001", "zero_sources-s1-lr0.001"]
    assert runs[1].overrides == {"strategy": "heterofusion", "seed": 1, "training.lr": 1e-3}
    assert run_name({"method.net": "paper", "params.density": 0.3}) == "net_paper-density_0.3"
    with pytest.raises(SpecError, match="axis 'seed'"):
        grid({"seed": []})
    with pytest.raises(SpecError, match="axis 'seed'"):
        grid({"seed": "0,1"})


def test_specs_are_validated_before_any_run(zoo, tmp_path):
    spec = _spec_file(zoo, tmp_path)
    out = tmp_path / "sweep"
    with pytest.raises(SpecError, match=r"sweep run bad.*training.lr"):
        sweep_specs(spec, [SweepRun("good", {"seed": 1}), SweepRun("bad", {"training.lr": -1})], out)
    with pytest.raises(SpecError, match="repeated"):
        sweep_specs(spec, [SweepRun("a"), SweepRun("a", {"seed": 1})], out)
    with pytest.raises(SpecError, match="unknown strategy"):
        run_sweep(spec, [SweepRun("x", {"strategy": "nope"})], out, use_ray=False)
    with pytest.raises(SpecError, match="output: set by the sweep"):
        sweep_specs(spec, [SweepRun("x", {"output": "elsewhere"})], out)
    # the sweep's own files never land on an input: here OUT/specs would hold the spec file itself
    inside = tmp_path / "o" / "specs" / "s0.yaml"
    inside.parent.mkdir(parents=True)
    inside.write_text(spec.read_text())
    with pytest.raises(OutputError, match="OUT/specs.*contains the input spec file"):
        sweep_specs(inside, grid({"seed": [0]}), tmp_path / "o")
    assert inside.read_text() == spec.read_text()
    assert not (out / "adapters").exists()  # nothing ran
    specs = sweep_specs(spec, grid({"seed": [0, 1]}), out)
    assert {s.output for s in specs.values()} == {out.resolve() / "adapters" / "s0", out.resolve() / "adapters" / "s1"}
    assert {s.cluster.storage for s in specs.values()} == {str(out.resolve() / "state")}


def test_sweep_in_process_resumes_by_run_name(zoo, tmp_path, capsys):
    spec = _spec_file(zoo, tmp_path)
    out = tmp_path / "sweep"
    runs = grid({"strategy": ["heterofusion", "zero_sources"], "seed": [0]})
    first = run_sweep(spec, runs, out, use_ray=False, after=adapter_norm)
    assert [r["status"] for r in first.rows] == ["trained", "trained"]
    table = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in table["rows"]] == ["heterofusion-s0", "zero_sources-s0"]
    for row in table["rows"]:
        assert row["steps"] == 3 and row["final_loss"] > 0 and row["metrics"]["norm"] > 0
        assert Path(row["output"]).is_dir() and len(row["spec_hash"]) == 12
    assert "| heterofusion-s0 | trained |" in (out / "sweep.md").read_text()
    # the controls change the result: the rows are not copies of each other
    assert first.rows[0]["metrics"]["norm"] != first.rows[1]["metrics"]["norm"]
    stamp = (out / "adapters" / "heterofusion-s0" / "adapter_model.safetensors").stat().st_mtime_ns

    again = run_sweep(spec, runs, out, use_ray=False, after=adapter_norm)
    assert [r["status"] for r in again.rows] == ["reused", "reused"]
    assert again.rows[0]["metrics"] == first.rows[0]["metrics"]
    assert (out / "adapters" / "heterofusion-s0" / "adapter_model.safetensors").stat().st_mtime_ns == stamp

    # train=False gathers the table from finished runs and trains none: a run not finished is `missing`
    more = runs + grid({"strategy": ["heterofusion"], "seed": [1]})
    gathered = run_sweep(spec, more, out, use_ray=False, after=adapter_norm, train=False)
    assert [r["status"] for r in gathered.rows] == ["reused", "reused", "missing"]
    assert [r["name"] for r in gathered.missing] == ["heterofusion-s1"] and not gathered.failed
    assert gathered.rows[0]["metrics"] == first.rows[0]["metrics"] and gathered.rows[2]["metrics"] == {}
    assert not (out / "adapters" / "heterofusion-s1").exists()
    assert "| heterofusion-s1 | missing |" in (out / "sweep.md").read_text()
    with pytest.raises(ValueError, match="needs resume=True"):
        run_sweep(spec, more, out, use_ray=False, resume=False, train=False)
    from hetero_ray.cli import main

    cli = ["sweep", str(spec), "--set", "strategy=heterofusion", "--out", str(out), "--no-train"]
    assert main([*cli, "--set", "seed=0"]) == 0
    assert main([*cli, "--set", "seed=0,1"]) == 1
    assert "not finished with these settings: heterofusion-s1" in capsys.readouterr().err
    assert not (out / "adapters" / "heterofusion-s1").exists()

    # same run names, a changed setting: redone, not reused
    changed = run_sweep(_spec_file(zoo, tmp_path, **{"training.lr": 1e-3}), runs[:1], out, use_ray=False)
    assert changed.rows[0]["status"] == "trained"
    assert changed.rows[0]["spec_hash"] != first.rows[0]["spec_hash"]


@pytest.mark.slow
def test_concurrent_runs_on_ray_match_runs_alone(zoo, tmp_path):
    """Two runs side by side on a 2-CPU Ray instance: their intervals overlap, and each adapter equals the one
    the same run gives alone in this process."""
    import ray

    from hetero_ray.runners.ray.driver import ensure_ray

    spec = _spec_file(zoo, tmp_path, **{"training.epochs": 3})
    runs = grid({"strategy": ["heterofusion", "random_sources"], "seed": [3]})
    ray.shutdown()
    ensure_ray(num_cpus=2)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # `after` is defined here, not in the package
    try:
        together = run_sweep(spec, runs, tmp_path / "together", after=adapter_norm)
        with pytest.raises(HeteroRayError, match="no node of the cluster has that much"):  # not a silent wait
            run_sweep(spec, runs, tmp_path / "too-big", cpus_per_run=3)
    finally:
        ray.shutdown()
    assert [r["status"] for r in together.rows] == ["trained", "trained"], together.rows
    a, b = together.rows
    assert a["pid"] != b["pid"] and a["pid"] != os.getpid()
    assert max(a["started"], b["started"]) < min(a["ended"], b["ended"]), "the runs did not overlap"
    alone = run_sweep(spec, runs, tmp_path / "alone", use_ray=False)
    for x, y in zip(together.rows, alone.rows, strict=True):
        assert x["spec_hash"] != y["spec_hash"]  # outputs differ by path only
        tx, ty = _tensors(x["output"]), _tensors(y["output"])
        assert tx.keys() == ty.keys()
        assert all(bool((tx[k] == ty[k]).all()) for k in tx), f"{x['name']}: differs from the run alone"


@pytest.mark.slow
def test_killed_sweep_resumes_without_redoing_finished_runs(zoo, tmp_path):
    spec = _spec_file(zoo, tmp_path, **{"training.epochs": 6})
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "hetero_ray.cli", "sweep", str(spec), "--set", "seed=0,1,2", "--out", str(out),
           "--no-ray"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        table = out / "sweep.json"
        if table.is_file() and len(json.loads(table.read_text())["rows"]) >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [r["name"] for r in json.loads((out / "sweep.json").read_text())["rows"]]
    stamps = {n: (out / "adapters" / n / "adapter_model.safetensors").stat().st_mtime_ns for n in done}
    assert "s2" not in done

    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    rows = {r["name"]: r for r in json.loads((out / "sweep.json").read_text())["rows"]}
    assert set(rows) == {"s0", "s1", "s2"}
    for name in done:
        assert rows[name]["status"] == "reused"
        assert (out / "adapters" / name / "adapter_model.safetensors").stat().st_mtime_ns == stamps[name]
    assert rows["s2"]["status"] == "trained"
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["s0", "s1", "s2"]  # nothing half-written
    assert "| s2 | trained |" in resumed.stdout


def test_cli_sweep_rejects_a_bad_axis(zoo, tmp_path):
    from hetero_ray.cli import main

    spec = _spec_file(zoo, tmp_path)
    assert main(["sweep", str(spec), "--set", "seed", "--out", str(tmp_path / "o"), "--no-ray"]) == 2
    assert not (tmp_path / "o").exists()
