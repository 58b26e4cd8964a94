"""Inputs are never harmed and outputs are all-or-nothing: overwrite semantics, leftovers of killed writers,
SIGTERM in-process and on Ray, a full disk, input errors raised inside Ray actors, impossible cluster asks,
and source scaling carried into the candidates."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from hetero_ray.cli import main
from hetero_ray.errors import OutputError
from hetero_ray.io.adapters import CONFIG_NAME, WEIGHTS_NAME
from hetero_ray.io.outputs import OUTPUT_MARKER, atomic_output_dir
from tests.helpers import Workspace, tree_state

ROOT = Path(__file__).resolve().parents[2]


def test_overwrite_replaces_an_earlier_output_and_a_failed_write_keeps_it(tmp_path):
    dest = tmp_path / "out"
    with atomic_output_dir(dest) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (dest / OUTPUT_MARKER).is_file()
    with pytest.raises(OutputError, match="already exists"), atomic_output_dir(dest):
        pass
    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(dest, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("second")
        raise RuntimeError("boom")
    assert (dest / "a.txt").read_text() == "first"
    with atomic_output_dir(dest, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("second")
    assert (dest / "a.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_killed_writer_are_tidied_and_a_cut_swap_is_undone(tmp_path):
    from hetero_ray.io.outputs import _host

    dest, pid, host = tmp_path / "fused", _dead_pid(), _host()
    stale = tmp_path / f".fused.tmp-{host}-{pid}-abc"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"partial")
    moved = tmp_path / f".fused.old-{host}-{pid}-def"  # killed between moving the old output aside and the rename
    moved.mkdir()
    (moved / OUTPUT_MARKER).write_text("{}")
    (moved / "a.txt").write_text("previous")
    live = tmp_path / f".fused.tmp-{host}-{os.getpid()}-ghi"  # a writer still running: left alone
    other_host = tmp_path / f".fused.tmp-00000000-{pid}-jkl"  # another host's writer: its PID means nothing here
    live.mkdir()
    other_host.mkdir()
    # restored first, then judged: without overwrite the previous output is not replaced
    with pytest.raises(OutputError, match="already exists"), atomic_output_dir(dest):
        pass
    assert (dest / "a.txt").read_text() == "previous"
    assert not stale.exists() and not moved.exists() and live.exists() and other_host.exists()


def test_a_swap_cut_between_its_renames_puts_the_previous_output_back(tmp_path, monkeypatch):
    import hetero_ray.io.outputs as outputs

    dest = tmp_path / "fused"
    with atomic_output_dir(dest) as tmp:
        (tmp / "a.txt").write_text("previous")
    real, calls = os.replace, []

    def second_rename_interrupted(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", second_rename_interrupted)
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(dest, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
    monkeypatch.setattr(outputs.os, "replace", real)
    assert (dest / "a.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused"]


def _spec(ws: Workspace, **extra) -> str:
    ws.spec.update(extra)
    return ws.write_spec()


def test_sigterm_while_writing_leaves_no_partial_output(zoo, tmp_path, monkeypatch, capsys):
    import hetero_ray.io.export as export

    real = export.write_adapter

    def write_then_terminated(out_dir, *a, **k):
        real(out_dir, *a, **k)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler main() installs raises in this (main) thread
        time.sleep(5)

    monkeypatch.setattr(export, "write_adapter", write_then_terminated)
    ws = Workspace(tmp_path, zoo)
    before = tree_state(tmp_path)
    try:
        assert main(["fuse", _spec(ws), "--no-ray"]) == 143
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert "terminated" in capsys.readouterr().err
    after = tree_state(tmp_path)
    assert {k: after.get(k) for k in before} == before
    assert not (tmp_path / "fused").exists() and not list(tmp_path.glob(".fused.*"))


def test_a_full_disk_is_a_clear_error_and_leaves_nothing(zoo, tmp_path):
    ws = Workspace(tmp_path, zoo)
    spec = _spec(ws, strategy="target_only")
    limit = 16 * 1024  # the adapter file is larger than this: the write fails with EFBIG, as on a full disk

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "hetero_ray", "fuse", spec, "--no-ray"], cwd=ROOT, text=True,
                          capture_output=True, preexec_fn=small_files, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"output: cannot write {tmp_path / 'fused'}" in proc.stderr and "File too large" in proc.stderr
    assert not (tmp_path / "fused").exists() and not list(tmp_path.glob(".fused.*"))


def test_source_lora_alpha_scales_its_candidates(zoo, tmp_path):
    from hetero_ray.runners.prepare import alignment_plan, candidates_of, open_source, open_target
    from tests.helpers import make_spec

    ws = Workspace(tmp_path, zoo)
    spec = make_spec(zoo, tmp_path / "o", sources=("gemma3",))  # same rank as the target: no harmonization
    spec = spec.model_copy(update={"sources": [spec.sources[0].model_copy(update={"adapter": ws.path("g")})]})
    import shutil

    shutil.copytree(zoo["gemma3-lora"], ws.path("g"))
    _, ttopo = open_target(spec)

    def b_tokens():
        a, t = open_source(spec, 0)
        plan = alignment_plan(spec, ttopo, [t])
        return [c.tokens[c.n_a_blocks:] for c in candidates_of(spec, plan, 0, a, t, 64)]

    first = b_tokens()
    ws.edit_config("g", lambda c: c.update(lora_alpha=3 * c["lora_alpha"]))
    tripled = b_tokens()
    ws.edit_config("g", lambda c: c.update(use_rslora=True))
    rs = b_tokens()
    r = json.loads((ws.path("g") / CONFIG_NAME).read_text())["r"]
    for x, y, z in zip(first, tripled, rs, strict=True):
        torch.testing.assert_close(y, 3 * x, rtol=1e-6, atol=0)
        torch.testing.assert_close(z, y * r**0.5, rtol=1e-6, atol=0)  # alpha / sqrt(r) instead of alpha / r


@pytest.mark.slow
def test_ray_path_input_errors_and_impossible_asks_are_clear(zoo, tmp_path, capsys):
    import ray

    ws = Workspace(tmp_path, zoo)

    def nan(t):
        t["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].view(-1)[0] = float("nan")

    ws.edit_tensors("src-qwen2", nan)
    ws.spec["name"] = "nan-run"
    ws.spec["cluster"] = {**ws.spec["cluster"], "storage": "runs"}
    before = tree_state(tmp_path, *zoo.values())
    try:
        # the NaN is found inside a FamilyActor on Ray: the user reads the in-process message, not a RayTaskError
        code = main(["fuse", ws.write_spec()])
        err = capsys.readouterr().err
        assert code == 2, err
        # the last line is the message (earlier lines may hold Ray's own logging, not ours)
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and "non-finite values" in last, err
        assert "src-qwen2/adapter_model.safetensors [base_model.model.model.layers.1.self_attn.q_proj.lora_A." in last
        assert "RayTaskError" not in err
        ws.edit_tensors("src-qwen2", lambda t: t[next(iter(t))].nan_to_num_(0.0))
        ws.spec.update(name="too-many", cluster={"workers": 64, "zero_stage": 0, "storage": "runs"})
        started = time.monotonic()
        assert main(["fuse", ws.write_spec()]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "cluster.workers: 64 workers" in last and "CPUs, but the Ray cluster has" in last
        assert time.monotonic() - started < 60
    finally:
        ray.shutdown()
    after = tree_state(tmp_path, *zoo.values())
    changed = {k for k in before if after.get(k) != before[k]}
    assert changed <= {str(ws.path("src-qwen2") / WEIGHTS_NAME)}  # the test's own repair of the NaN
    assert not (tmp_path / "fused").exists()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["nan-run", "too-many"]  # run state only


@pytest.mark.slow
def test_sigterm_during_a_ray_fusion_leaves_no_output_and_no_ray_process(zoo, tmp_path):
    ws = Workspace(tmp_path, zoo)
    spec = _spec(ws, training={"epochs": 50, "grad_accum": 1, "batch_size": 2, "max_length": 48},
                 cluster={"workers": 1, "zero_stage": 0, "storage": "runs"})
    proc = subprocess.Popen([sys.executable, "-m", "hetero_ray", "fuse", spec], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    children: set[psutil.Process] = set()
    deadline = time.monotonic() + 240
    for line in proc.stdout:
        children |= set(psutil.Process(proc.pid).children(recursive=True))
        if "Reporting training result" in line or '"stage": "train"' in line or time.monotonic() > deadline:
            break
    assert time.monotonic() < deadline, "training never started"
    children |= set(psutil.Process(proc.pid).children(recursive=True))
    assert any("gcs_server" in " ".join(c.cmdline()) for c in children if c.is_running())
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, rest[-3000:]
    assert "terminated" in rest
    gone, alive = psutil.wait_procs(list(children), timeout=60)
    assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
    assert not (tmp_path / "fused").exists() and not list(tmp_path.glob(".fused.*"))
    assert yaml.safe_load(Path(spec).read_text())["output"] == "fused"
