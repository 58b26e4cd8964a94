"""Fault injection, a hook for the fault-tolerance tests only: ``HETERO_RAY_FAULT=<point>:<marker file>[:<step>]``
in the driver's environment makes the process that reaches ``point`` (at ``step``, when given) exit abruptly,
once: the marker file records that the fault happened, so the restarted process runs normally. Production
signatures know nothing of it: the driver forwards the variable through Ray's runtime_env (``runtime_env()``),
and ``maybe_fail`` reads it where it runs. Unset in normal use, when both do nothing."""

from __future__ import annotations

import os
from pathlib import Path

ENV = "HETERO_RAY_FAULT"


def runtime_env() -> dict | None:
    """The runtime_env that carries the driver's fault setting to actors and Train workers (None when unset:
    they then run with the job's runtime_env, unchanged)."""
    value = os.environ.get(ENV)
    return {"env_vars": {ENV: value}} if value else None


def maybe_fail(point: str, step: int | None = None) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != point or (len(parts) > 2 and step is not None and int(parts[2]) != step):
        return
    marker = Path(parts[1])
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(13)
