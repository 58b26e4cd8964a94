"""Fault injection for the fault-tolerance tests: ``HETERO_RAY_FAULT=<point>:<marker file>[:<step>]``
makes the process that reaches ``point`` (at ``step``, when given) exit abruptly, once: the marker file
records that the fault happened, so the restarted process runs normally. Unset in normal use."""

from __future__ import annotations

import os
from pathlib import Path

ENV = "HETERO_RAY_FAULT"


def fault_spec() -> str | None:
    """The driver's fault setting, passed explicitly to actors and workers (their env may differ)."""
    return os.environ.get(ENV)


def maybe_fail(spec: str | None, point: str, step: int | None = None) -> None:
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
