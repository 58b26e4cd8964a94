"""Errors raised on bad input. Each names the file, the key and what is wrong."""

from __future__ import annotations

from pathlib import Path


class HeteroRayError(Exception):
    """Base class: a problem with the user's input or setup, reported without a traceback by the CLI."""


class AdapterError(HeteroRayError):
    """A LoRA adapter directory or tensor that cannot be used."""

    def __init__(self, path: str | Path, message: str, key: str | None = None):
        self.path = str(path)
        self.key = key
        where = f"{self.path}" + (f" [{key}]" if key else "")
        super().__init__(f"{where}: {message}")


class FamilyError(HeteroRayError):
    """An adapter whose model family is unknown or whose keys do not map to canonical roles."""


class SpecError(HeteroRayError):
    """An invalid fusion spec: names the field and the file."""
