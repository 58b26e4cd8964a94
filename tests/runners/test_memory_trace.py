"""A worker's memory marks (what jobs/benchmark_scale.py compares with `hetero-ray check`): read from /proc,
and the growth computed from them."""

import json
import subprocess
import sys

import pytest

from hetero_ray.runners.ray.aggregator import memory_growth


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_marks_see_a_tensor_in_the_heap_and_the_peak():
    # in a fresh process: the pytest process's heap, after hundreds of tests, may already hold the pages
    code = ("import json, torch\nfrom hetero_ray.runners.ray.aggregator import MemoryTrace\n"
            "trace = MemoryTrace()\nx = torch.ones(64 << 20, dtype=torch.uint8)\ntrace.mark('held')\n"
            "del x\ntrace.mark('freed')\nprint(json.dumps(trace.marks))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    marks = json.loads(proc.stdout.strip().splitlines()[-1])
    start, held, freed = (marks[k] for k in ("start", "held", "freed"))
    assert set(start) == {"anon", "shmem", "file", "peak"}
    # the kernel's RSS counters are batched per CPU: a few MiB either way
    assert 56 <= held["anon"] - start["anon"] <= 90, marks
    # the peak is the process's (earlier tests may have set it higher): at least what is resident, never falling
    assert held["peak"] >= held["anon"] + held["shmem"] + held["file"] - 8 and freed["peak"] >= held["peak"]
    assert freed["anon"] < held["anon"] - 40  # a tensor this large is its own mapping: given back


def test_growth_separates_the_object_store_and_files_from_the_heap():
    marks = {"start": {"anon": 100.0, "shmem": 5.0, "file": 20.0, "peak": 125.0},
             "candidates_read": {"anon": 150.0, "shmem": 45.0, "file": 22.0, "peak": 217.0},
             "setup": {"anon": 200.0, "shmem": 45.0, "file": 30.0, "peak": 275.0},
             "end": {"anon": 180.0, "shmem": 45.0, "file": 30.0, "peak": 400.0}}
    g = memory_growth(marks)
    assert g == {"total": 275.0, "setup": 150.0, "shared": 40.0, "file": 10.0, "own": 225.0}
    # up to a mark: the later marks' peaks and pages do not count
    assert memory_growth(marks, until="setup") == {"total": 150.0, "setup": 150.0, "shared": 40.0, "file": 10.0,
                                                   "own": 100.0}
    assert memory_growth(marks, until="first_step") is None
    del marks["setup"]
    assert memory_growth(marks)["setup"] is None
