"""jobs/benchmark_quality.py end to end on tiny local models (its real models are benchmark-only)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hetero_ray.contrib import tiny

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["target_only", "ties", "heterofusion", "replay_only"]


@pytest.fixture(scope="module")
def bench_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    tok = tiny.build_tokenizer(texts=tiny.task_corpus())
    target = tiny.build_tiny_model("llama", root / "llama", seed=0, tokenizer=tok)
    source = tiny.build_tiny_model("gemma3", root / "gemma3", seed=1, tokenizer=tok)
    data = root / "uie"
    data.mkdir()
    for name, task in (("mit-movie", "movie"), ("mit-restaurant", "restaurant")):
        (data / f"{name}_sample300.json").write_text(json.dumps(tiny.task_records(task, 110, seed=3)))
    return root, target, source, data


def _run(bench_inputs, out, *extra):
    root, target, source, data = bench_inputs
    cmd = [sys.executable, "jobs/benchmark_quality.py", "--data", str(data), "--out", str(out), "--size", "smoke",
           "--target", str(target), "--source", str(source), "--device", "cpu", "--methods", *METHODS, *extra]
    env = {**os.environ, "HETERO_RAY_CACHE": str(root / "cache")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.timeout(1200)
def test_benchmark_job_runs_every_stage_and_resumes(bench_inputs, tmp_path):
    out = tmp_path / "run"
    _run(bench_inputs, out, "--replay", "target")
    result = json.loads((out / "results.json").read_text())
    # only the chosen methods, seeded ones once per seed, every task scored
    assert set(result["scores"]) == set(METHODS)
    for method, per_task in result["scores"].items():
        assert set(per_task) == {"mit-movie", "mit-restaurant"}
        n = 2 if method in ("heterofusion", "replay_only") else 1
        assert all(len(v) == n and all(0 <= x <= 1 for x in v) for v in per_task.values()), (method, per_task)
    # --replay target: the source task is absent from every trained run's replay
    assert result["settings"]["replay"] == ["mit-movie"]
    spec = (out / "specs" / "heterofusion-0.yaml").read_text()
    assert "mit-movie-replay" in spec and "mit-restaurant-replay" not in spec
    assert "| heterofusion |" in (out / "results.md").read_text()
    # references: each source expert scored on its own base and task
    refs = result["references"]
    assert set(refs) == {"gemma3 expert on mit-restaurant, own base", "smollm2 expert on mit-restaurant, own base"}
    assert all(r["task"] == "mit-restaurant" and 0 <= r["score"] <= 1 and r["answer_loss"] > 0 for r in refs.values())
    assert "gemma3 expert on mit-restaurant, own base: F1" in (out / "results.md").read_text()
    # --resume reuses every finished adapter, untouched
    weights = out / "adapters" / "heterofusion-1" / "adapter_model.safetensors"
    before = weights.stat().st_mtime_ns
    log = _run(bench_inputs, out, "--replay", "target", "--resume")
    assert log.count("reused") == 6 and weights.stat().st_mtime_ns == before
    # a different replay makes every spec different: nothing is reused
    log = _run(bench_inputs, out, "--replay", "all", "--resume", "--seeds", "0")
    assert "reused" not in log
    assert "mit-restaurant-replay" in (out / "specs" / "heterofusion-0.yaml").read_text()
    assert weights.stat().st_mtime_ns == before  # seed 1 was not asked for
