"""`hetero-ray demo --quick` end to end, as a user runs it: a subprocess with its own local Ray instance."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
ROWS = {"target-only", "heterofusion", "zero_sources", "random_sources", "replay_only"}
TASKS = {"movie", "restaurant", "vehicle"}


@pytest.mark.timeout(1200)  # about 6 min on 2 idle cores; far more if the machine is shared
def test_demo_quick_runs_end_to_end(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "demo"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run([sys.executable, "-m", "hetero_ray.cli", "demo", "--quick", "--out", str(run_dir)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| heterofusion |" in proc.stdout and "Stage times:" in proc.stdout

    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["results"]) >= ROWS
    for row in ROWS:
        per_task = results["results"][row]
        assert set(per_task) == TASKS
        for r in per_task.values():
            assert 0.0 <= r["metrics"]["f1"] <= 1.0 and r["metrics"]["answer_loss"] > 0 and r["n"] == 30
    assert set(results["timings"]) >= {"bases_s", "experts_s", "fusion_s", "eval_s", "total_s"}
    assert results["path"] == "ray"
    # the fused adapters came from the distributed pipeline: 2 ZeRO-3 workers, each holding about half
    report = json.loads((run_dir / "fused" / "heterofusion" / "fusion_report.json").read_text())
    assert report["zero"]["stage"] == 3 and len(report["zero"]["partitions"]) == 2
    # the sources' held-out answer loss: the target alone never saw those tasks; fusion lowers it
    hf = results["results"]["heterofusion"]
    target = results["results"]["target-only"]
    assert hf["restaurant"]["metrics"]["answer_loss"] < target["restaurant"]["metrics"]["answer_loss"]

    base = next((run_dir / "models").glob("llama-*"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)),
                                      str(run_dir / "fused" / "heterofusion"))
    assert any("lora_B" in n for n, _ in model.named_parameters())
