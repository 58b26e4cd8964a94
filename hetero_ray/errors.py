"""Errors raised on bad input or setup. Each names the file, the key or field, and what is wrong.

The CLI prints a :class:`HeteroRayError` without a traceback and exits with code 2; anything else is an
internal error (exit 1, stack shown with ``--debug``)."""

from __future__ import annotations

from pathlib import Path


class HeteroRayError(Exception):
    """Base class: a problem with the user's input or setup, reported without a traceback by the CLI."""


class AdapterError(HeteroRayError):
    """A LoRA adapter directory or tensor that cannot be used."""

    def __init__(self, path: str | Path, message: str, key: str | None = None):
        self.path = str(path)
        self.key = key
        self.message = message
        where = f"{self.path}" + (f" [{key}]" if key else "")
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # travels intact from a Ray actor or worker back to the driver
        return (type(self), (self.path, self.message, self.key))


class FamilyError(HeteroRayError):
    """An adapter whose model family is unknown or whose keys do not map to canonical roles."""


class SpecError(HeteroRayError):
    """An invalid fusion spec: names the field and the file."""


class DataError(HeteroRayError):
    """A replay or task data file that cannot be used: names the file, the record and the field."""


class OutputError(HeteroRayError):
    """An output that must not or cannot be written: names the output and the input it would harm."""


class ClusterError(HeteroRayError):
    """A run the Ray cluster cannot host as asked: names the field and the cluster's resources."""


def find_input_error(exc: BaseException) -> HeteroRayError | None:
    """The HeteroRayError behind an exception raised in a Ray actor, task or Train worker, if any.

    Ray wraps remote errors (``RayTaskError.cause``, Train's ``worker_failures``, ``__cause__`` chains);
    the user should read the clear message the in-process path gives, not the wrapper's stack."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # Ray's RayTaskError(AdapterError) is both: read its cause instead
        if isinstance(e, HeteroRayError) and not isinstance(cause, BaseException):
            return e
        stack += [cause, e.__cause__, e.__context__]
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            stack += list(failures.values())
    return None
