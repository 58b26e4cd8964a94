"""Python client for scale-out experiments: submit fusions to a Ray cluster as jobs, follow them, fetch
their results; or run one in this process with :func:`fuse`."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hetero_ray.errors import HeteroRayError
from hetero_ray.progress import RESULT_MARKER, parse
from hetero_ray.spec import FusionSpec

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass(frozen=True)
class FusionOutput:
    adapter: Path
    report: Path


class FusionClient:
    """A thin, typed wrapper over Ray's JobSubmissionClient for hetero-ray jobs.

    >>> client = FusionClient("http://127.0.0.1:8265")
    >>> job = client.submit("spec.yaml", working_dir=".")
    >>> client.wait(job); client.result(job).adapter
    """

    def __init__(self, address: str = "http://127.0.0.1:8265"):
        from ray.job_submission import JobSubmissionClient

        self.address = address
        self._jobs = JobSubmissionClient(address)

    def submit(self, spec: str | Path, working_dir: str | Path = ".", flags: list[str] | None = None,
               env: dict[str, str] | None = None) -> str:
        """Submit ``python jobs/fuse.py SPEC [flags]`` with ``working_dir`` (the project checkout) uploaded.
        Returns the job id."""
        from hetero_ray.runners.ray.driver import WORKER_ENV

        working_dir = Path(working_dir).resolve()
        spec = Path(spec).resolve()
        if not (working_dir / "jobs" / "fuse.py").is_file():
            raise HeteroRayError(f"{working_dir}: not a hetero-ray checkout (no jobs/fuse.py)")
        entry = " ".join(shlex.quote(a) for a in ["python", "jobs/fuse.py", str(spec), *(flags or [])])
        return self._jobs.submit_job(
            entrypoint=entry,
            runtime_env={"working_dir": str(working_dir), "env_vars": {**WORKER_ENV, **(env or {})}},
        )

    def status(self, job_id: str) -> dict:
        """The job's state and the latest progress event (alignment or training step metrics)."""
        state = str(self._jobs.get_job_status(job_id).value)
        events = parse(self._jobs.get_job_logs(job_id))
        return {"job_id": job_id, "status": state, "progress": events[-1] if events else None}

    def logs(self, job_id: str, poll_s: float = 1.0) -> Iterator[str]:
        """Stream the job's log lines until it ends."""
        seen = 0
        while True:
            text = self._jobs.get_job_logs(job_id)
            lines = text.splitlines()
            yield from lines[seen:]
            seen = len(lines)
            if str(self._jobs.get_job_status(job_id).value) in TERMINAL:
                yield from self._jobs.get_job_logs(job_id).splitlines()[seen:]
                return
            time.sleep(poll_s)

    def wait(self, job_id: str, timeout_s: float = 3600, poll_s: float = 1.0) -> str:
        """Block until the job ends; returns its final state (raises on timeout)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = str(self._jobs.get_job_status(job_id).value)
            if state in TERMINAL:
                return state
            time.sleep(poll_s)
        raise TimeoutError(f"job {job_id} still running after {timeout_s} s")

    def result(self, job_id: str) -> FusionOutput:
        """Where the finished job wrote the fused adapter and its report (raises if it did not succeed)."""
        state = str(self._jobs.get_job_status(job_id).value)
        logs = self._jobs.get_job_logs(job_id)
        found = parse(logs, RESULT_MARKER)
        if state != "SUCCEEDED" or not found:
            tail = "\n".join(logs.splitlines()[-20:])
            raise HeteroRayError(f"job {job_id} is {state} without a result; last log lines:\n{tail}")
        return FusionOutput(Path(found[-1]["output"]), Path(found[-1]["report"]))


def run(spec: FusionSpec | str | Path, address: str | None = None, use_ray: bool = True,
        on_progress: Callable[[dict], None] | None = None) -> FusionOutput:
    """Run one fusion from this process with ``spec.strategy`` (the same path as ``hetero-ray fuse``): on a
    local Ray instance unless ``address`` names a cluster, or in this process with ``use_ray=False``."""
    from hetero_ray.spec import load_spec
    from hetero_ray.strategies import run_strategy

    loaded = spec if isinstance(spec, FusionSpec) else load_spec(spec)
    output = run_strategy(loaded, address, use_ray=use_ray, on_progress=on_progress)
    return FusionOutput(output, output / "fusion_report.json")


fuse = run  # the earlier name of :func:`run`
