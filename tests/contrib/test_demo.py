"""`hetero-ray demo --quick` end to end, as a user runs it: a subprocess, fusions in that process."""

import json
import os
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow
FUSED = {"heterofusion", "distill_only"}
ROWS = {"target-only", *FUSED, "zero_sources", "random_sources"}
TASKS = {"movie", "restaurant", "vehicle"}


@pytest.mark.timeout(1200)  # about 1.5 min on 2 idle cores; far more if the machine is shared
def test_demo_quick_runs_the_transfer_protocol_end_to_end(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "demo"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run([sys.executable, "-m", "hetero_ray.cli", "demo", "--quick", "--out", str(run_dir)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| distill_only |" in proc.stdout and "Stage times:" in proc.stdout and "kept within 1 SE" in proc.stdout

    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["results"]) >= ROWS
    for row in ROWS:
        per_task = results["results"][row]
        assert set(per_task) == TASKS
        for r in per_task.values():
            assert 0.0 <= r["metrics"]["f1"] <= 1.0 and r["metrics"]["answer_loss"] > 0 and r["n"] == 40
            assert len(r["counts"]) == 40
    assert set(results["timings"]) >= {"bases_s", "experts_s", "fusion_s", "eval_s", "total_s"}
    assert results["path"] == "local" and results["size_name"] == "quick"

    # the protocol: no source-task label in training; each prompt file answered by its own domain's expert
    spec = yaml.safe_load((run_dir / "specs" / "distill_only.yaml").read_text())
    assert [r["path"].rsplit("/", 1)[1] for r in spec["replay"]] == ["movie-train.jsonl"]
    routes = {p["path"].rsplit("/", 1)[1]: p["sources"] for p in spec["teach"]["prompts"]}
    assert routes == {"restaurant-prompts.jsonl": ["qwen2"], "vehicle-prompts.jsonl": ["gemma3"]}
    for name in routes:
        lines = (run_dir / "data" / "quick-s0" / name).read_text().splitlines()
        assert all("output" not in json.loads(line) for line in lines)
    report = json.loads((run_dir / "fused" / "distill_only" / "fusion_report.json").read_text())
    assert {k: v["answers"] for k, v in report["teacher"].items()} == {"qwen2": 48, "gemma3": 48}

    # the verdict is computed: intervals against target-only and each control, target task kept or not
    verdict = results["verdict"]
    assert set(verdict["strategies"]) == FUSED and verdict["target_se"] > 0
    for v in verdict["strategies"].values():
        assert set(v["tasks"]) == {"restaurant", "vehicle"} and isinstance(v["transfers"], bool)
        for per in v["tasks"].values():
            assert set(per["vs"]) == {"target-only", "zero_sources", "random_sources"}
            assert all(x["lo"] <= x["diff"] <= x["hi"] for x in per["vs"].values())

    # even at this size the experts' answers reach the fused adapter: the source tasks' held-out answer loss
    # falls below target-only's and below the zero-sources control's (whose teacher is the bare base)
    def src_loss(row):
        return sum(results["results"][row][t]["metrics"]["answer_loss"] for t in ("restaurant", "vehicle"))

    assert src_loss("distill_only") < src_loss("zero_sources") and src_loss("distill_only") < src_loss("target-only")

    base = next((run_dir / "models").glob("llama-*"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)),
                                      str(run_dir / "fused" / "distill_only"))
    assert any("lora_B" in n for n, _ in model.named_parameters())

    # run again in the same directory: every base, expert and fused adapter is reused, the table is the same
    fused = {p: p.stat().st_mtime_ns for p in (run_dir / "fused").glob("*/adapter_model.safetensors")}
    again = subprocess.run([sys.executable, "-m", "hetero_ray.cli", "demo", "--size", "quick", "--out",
                            str(run_dir)], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert len(fused) == 4 and {p: p.stat().st_mtime_ns for p in fused} == fused
    rerun = json.loads((run_dir / "results.json").read_text())
    assert {m: {t: r["metrics"] for t, r in per.items()} for m, per in rerun["results"].items()} == \
        {m: {t: r["metrics"] for t, r in per.items()} for m, per in results["results"].items()}
