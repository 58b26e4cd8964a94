"""jobs/benchmark_rdm.py on a small sample: one row per setting, the paper's form the closest to the expected
gradient, cost falling with the sort budget."""

import json
import subprocess
import sys
from pathlib import Path

JOB = Path(__file__).resolve().parents[2] / "jobs" / "benchmark_rdm.py"


def test_benchmark_rdm_prints_closeness_and_cost_per_setting():
    proc = subprocess.run([sys.executable, str(JOB), "--rows", "600", "--width", "16", "--draws", "3",
                           "--reference-draws", "4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["directions"], r["projections"]) for r in rows] == [
        ("iid", 2048), ("iid", 1747), ("orthogonal", 2048), ("orthogonal", 1747), ("orthogonal", 873),
        ("orthogonal", 436), ("orthogonal", 218)]
    assert all(-1 <= r["grad_cosine_min"] <= r["grad_cosine_mean"] <= 1 and r["seconds"] > 0 for r in rows)
    # every row estimates the same expectation, and the full orthogonal form is at least as close as the iid one
    assert all(abs(r["value_mean_over_expected"] - 1) < 0.1 for r in rows), rows
    assert rows[2]["grad_cosine_mean"] >= rows[0]["grad_cosine_mean"] - 0.02, rows
    assert "| orthogonal | 2048 x 128 | 436 |" in proc.stdout
