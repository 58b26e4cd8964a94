"""A quiet terminal: on a tty, `hetero-ray fuse` shows bars and the result only; library and Ray chatter go
to the run's log file. Not on a tty, every line stays (job logs, FusionClient) plus readable stage lines."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import Workspace

ROOT = Path(__file__).resolve().parents[1]
CHATTER = ("Warning", "WARNING", "Loading weights", "HETERO_RAY_PROGRESS", "Traceback", "INFO", "(RayTrainWorker",
           "(TrainController", "Checkpoint")


def on_a_terminal(argv: list[str], timeout_s: float = 400, stdout=None) -> tuple[int, str]:
    """Run ``argv`` with stdin, stdout (unless given) and stderr on a pseudo-terminal; returns (exit code,
    what the terminal showed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=stdout or slave, stderr=slave, cwd=ROOT, close_fds=True)
    os.close(slave)
    shown = b""
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # the other side closed
                break
            if not data:
                break
            shown += data
        elif proc.poll() is not None:
            break
    proc.wait(timeout=timeout_s)
    os.close(master)
    return proc.returncode, shown.decode(errors="replace")


def visible(text: str) -> str:
    """What a person sees: without ANSI colour codes (Ray resets the colour at exit) and trailing space."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text).rstrip()


def _spec(ws: Workspace) -> str:
    ws.spec["sources"] = ws.spec["sources"][:1]
    ws.spec["cluster"] = {**ws.spec["cluster"], "storage": "runs"}
    ws.spec["name"] = "quiet"
    return ws.write_spec()


def test_a_terminal_shows_the_result_and_no_chatter(zoo, tmp_path):
    ws = Workspace(tmp_path, zoo)
    code, shown = on_a_terminal([sys.executable, "-m", "hetero_ray", "fuse", _spec(ws), "--no-ray"])
    assert code == 0, shown
    assert f"heterofusion: {tmp_path / 'fused'} (1 training steps)" in shown
    assert not [c for c in CHATTER if c in shown], shown
    log = tmp_path / "runs" / "quiet" / "hetero-ray.log"
    assert log.is_file() and "Warning" in log.read_text()  # the chatter went here
    assert visible(shown).endswith(f"log {log}")  # nothing after the result


def test_verbose_and_not_a_terminal_keep_every_line(zoo, tmp_path):
    ws = Workspace(tmp_path, zoo)
    spec = _spec(ws)
    code, shown = on_a_terminal([sys.executable, "-m", "hetero_ray", "fuse", spec, "--no-ray", "--verbose",
                                 "--output", str(tmp_path / "v")])
    assert code == 0 and "HETERO_RAY_RESULT" in shown and "HETERO_RAY_PROGRESS" in shown
    proc = subprocess.run([sys.executable, "-m", "hetero_ray", "fuse", spec, "--no-ray", "--output",
                           str(tmp_path / "p")], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr
    assert "HETERO_RAY_PROGRESS" in proc.stdout and "HETERO_RAY_RESULT" in proc.stdout
    assert "hetero-ray: train: step 1/1, lm loss" in proc.stderr


def test_a_piped_stdout_keeps_the_result_line(zoo, tmp_path):
    ws = Workspace(tmp_path, zoo)
    out = tmp_path / "stdout.txt"
    with out.open("w") as f:
        code, shown = on_a_terminal([sys.executable, "-m", "hetero_ray", "fuse", _spec(ws), "--no-ray",
                                     "--strategy", "target_only"], stdout=f)
    assert code == 0, shown
    assert "HETERO_RAY_RESULT" in out.read_text()


@pytest.mark.slow
def test_a_terminal_on_ray_shows_no_worker_logs(zoo, tmp_path):
    ws = Workspace(tmp_path, zoo)
    code, shown = on_a_terminal([sys.executable, "-m", "hetero_ray", "fuse", _spec(ws)])
    assert code == 0, shown
    assert f"heterofusion: {tmp_path / 'fused'}" in shown
    assert not [c for c in CHATTER if c in shown], shown
    assert visible(shown).endswith("hetero-ray.log")
    log = (tmp_path / "runs" / "quiet" / "hetero-ray.log").read_text()
    assert "RayTrainWorker" in log or "TrainController" in log  # the workers' lines reached the log
