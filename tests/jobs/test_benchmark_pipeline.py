"""jobs/benchmark_pipeline.py end to end on tiny models: its table, and RDM's rows and cost in it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

JOB = Path(__file__).resolve().parents[2] / "jobs" / "benchmark_pipeline.py"


def _run(tmp: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(JOB), "--hidden", "64", "--layers", "2", "--sources", "2", "--steps",
                           "2", "--repeats", "1", "--projections", "96", *args],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not list(tmp.glob("hr-bench-*"))  # the job removes the models it built
    return json.loads(proc.stdout[proc.stdout.index("{"):])


@pytest.mark.timeout(600)
def test_benchmark_pipeline_reports_rdm_rows_and_share_and_caps_them(tmp_path):
    full = _run(tmp_path, "--rdm-max-samples", "-1", "--rdm-sort-budget", "-1")
    assert full["rdm"]["max_samples"] is None and full["rdm"]["sort_budget"] is None
    assert full["rdm"]["projections"] == 96
    rows = full["rdm"]["rows_per_group"]
    assert rows and all(r["target"] > 0 and r["source"] > 0 for r in rows.values())
    assert all(r["projections"] == {"target": 96, "source": 96} for r in rows.values())
    assert 0 < full["rdm"]["share_of_step"] < 1 and full["step_s"] > 0
    assert set(full["step_parts_s"]) == {"nets_forward", "rdm", "nets_backward", "optimizer", "target"}

    capped = _run(tmp_path, "--rdm-max-samples", "3", "--rdm-sort-budget", "1")
    assert capped["rdm"]["max_samples"] == 3 and capped["rdm"]["sort_budget"] == 1
    capped_rows = capped["rdm"]["rows_per_group"]
    assert {g: (r["target"], r["source"]) for g, r in capped_rows.items()} == {  # rows before the cap
        g: (r["target"], r["source"]) for g, r in rows.items()}
    assert max(max(r["target"], r["source"]) for r in rows.values()) > 3  # the cap cuts something here
    # past the sort budget a term sorts fewer projections, never under the floor of 64
    assert all(r["projections"] == {"target": 64, "source": 64} for r in capped_rows.values())


@pytest.mark.timeout(300)
def test_benchmark_pipeline_align_only_times_alignment_against_the_raw_read(tmp_path):
    table = _run(tmp_path, "--align-only")
    assert table["raw_read_MBps"] > 0 and table["alignment_MBps"] > 0 and table["candidates"] > 0
    assert table["alignment_over_raw_time"] > 0 and "step_s" not in table
    assert table["raw_read_touched_MBps"] > 0 and table["prepare_groups_s"] > 0
    assert table["alignment_share_of_raw"] == pytest.approx(table["alignment_MBps"] / table["raw_read_MBps"],
                                                            rel=0.05, abs=2e-3)  # both rounded
    parts = table["alignment_parts_s"]  # the stages' timers, each inside the pass they split
    assert all(parts[k] > 0 for k in ("open", "read", "assembly", "singular_values", "raw_read", "to_arrow"))
    assert parts["singular_values"] <= parts["assembly"]  # taken at assembly, not in the pass
    assert parts["open"] + parts["read"] + parts["other"] == pytest.approx(parts["total"], abs=1e-3)
