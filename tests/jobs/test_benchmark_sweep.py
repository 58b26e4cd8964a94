"""jobs/benchmark_sweep.py end to end on tiny models: the same adapters either way, and both sweep times."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

JOB = Path(__file__).resolve().parents[2] / "jobs" / "benchmark_sweep.py"


@pytest.mark.timeout(600)
def test_benchmark_sweep_times_the_sweep_with_and_without_rays_start(tmp_path):
    proc = subprocess.run([sys.executable, str(JOB), "--runs", "2", "--cpus", "2", "--hidden", "32", "--layers", "1",
                           "--epochs", "1", "--skip-threaded", "--keep", str(tmp_path / "keep")],
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout[proc.stdout.rindex("\n{") + 1:])
    assert result["same_adapters"] is True
    times = result["times_s"]
    assert set(times) == {"serial, 1 thread", "sweep (Ray start included)", "sweep (on the started instance)"}
    assert times["sweep (on the started instance)"] < times["sweep (Ray start included)"]
    assert result["ratio"] == pytest.approx(times["sweep (on the started instance)"] / times["serial, 1 thread"])
    assert "on the started instance (goal <= 0.65)" in proc.stdout
    # both passes trained (nothing reused) into the kept directory
    assert len(list((tmp_path / "keep" / "sweep" / "adapters").iterdir())) == 2
