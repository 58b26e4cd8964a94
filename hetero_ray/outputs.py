"""Where results are written, and the guarantee that inputs are never harmed.

- :func:`check_spares_inputs` refuses, before any work, an output (or run directory) that is, contains or lies
  inside an input, after resolving symbolic links.
- :func:`atomic_output_dir` writes into a temporary directory beside the destination and swaps it into place
  only when complete. With ``overwrite`` it replaces only a directory hetero-ray wrote itself (it carries
  :data:`OUTPUT_MARKER`), or an empty one: never a file, a symbolic link or a directory of someone else's.
  On failure, on SIGTERM or on Ctrl-C the previous output stays intact and nothing partial is left; what a
  killed process left behind (``.NAME.tmp-PID-*``, ``.NAME.old-PID-*``) is tidied up by the next writer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from safetensors import SafetensorError

from hetero_ray.errors import OutputError

# what writing can raise when the disk is full, a file-size limit is hit or a directory is not writable
WRITE_ERRORS = (OSError, SafetensorError)

OUTPUT_MARKER = ".hetero-ray-output"


def check_spares_inputs(output: Path, inputs: Mapping[str, Path], origin: str, field: str = "output") -> None:
    """Raise OutputError if ``output`` is, contains or lies inside any of ``inputs`` (field name -> path),
    comparing real paths so that symbolic links cannot hide an input."""
    out = Path(output).resolve()
    for name, path in inputs.items():
        real = Path(path).resolve()
        if out == real:
            how = "is"
        elif out in real.parents:
            how = "contains"
        elif real in out.parents:
            how = "lies inside"
        else:
            continue
        via = f" (real path {out})" if out != Path(output).absolute() else ""
        raise OutputError(f"{origin}: {field}: {output}{via} {how} the input {name} ({path}); writing there could "
                          f"change or delete it. Choose an {field} outside every input.")


def check_replaceable(dest: Path, overwrite: bool, origin: str = "output") -> None:
    """Raise OutputError unless ``dest`` is free, or (with ``overwrite``) a directory hetero-ray wrote, or empty."""
    if dest.is_symlink():
        raise OutputError(f"{origin}: {dest} is a symbolic link (to {os.readlink(dest)}); hetero-ray writes only to "
                          "a real directory it creates: name that directory itself, or a new path")
    if not dest.exists():
        if dest.parent.exists() and not dest.parent.is_dir():
            raise OutputError(f"{origin}: {dest}: its parent {dest.parent} is a file, not a directory")
        return
    if not dest.is_dir():
        raise OutputError(f"{origin}: {dest} is an existing file, not an output directory; hetero-ray never "
                          "replaces a file: remove it yourself or choose another path")
    if not overwrite:
        raise OutputError(f"{origin}: {dest} already exists (set overwrite: true or --overwrite to replace an "
                          "earlier hetero-ray output)")
    if (dest / OUTPUT_MARKER).is_file() or not any(dest.iterdir()):
        return
    raise OutputError(f"{origin}: {dest} exists and was not written by hetero-ray (no {OUTPUT_MARKER} inside); "
                      "overwrite replaces only hetero-ray's own outputs: remove it yourself or choose another path")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tidy_leftovers(dest: Path) -> None:
    """Remove what a killed writer of ``dest`` left: its temporary directory, and restore (or drop) the
    previous output it had moved aside."""
    for kind in ("old", "tmp"):
        for p in sorted(dest.parent.glob(f".{dest.name}.{kind}-*")):
            pid = p.name[len(f".{dest.name}.{kind}-"):].split("-", 1)[0]
            if not pid.isdigit() or _alive(int(pid)) or not p.is_dir():
                continue
            if kind == "old" and not dest.exists() and (p / OUTPUT_MARKER).is_file():
                os.replace(p, dest)  # the swap was cut between its two renames: the previous output comes back
            else:
                shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(dest: str | Path, overwrite: bool = False, provenance: Mapping | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; swap it into place only if the block succeeds.

    Raises OutputError (naming ``dest``) for a destination that must not be replaced, or when writing fails
    (disk full, file-size limit, permissions); the previous output, if any, is then left as it was."""
    dest = Path(dest)
    check_replaceable(dest, overwrite)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _tidy_leftovers(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    except OSError as e:
        raise OutputError(f"output: cannot prepare {dest}: {e}") from e
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(json.dumps(dict(provenance or {}), sort_keys=True, default=str))
        check_replaceable(dest, overwrite)  # the block may have run for hours: look again before replacing
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-{os.getpid()}-", dir=dest.parent))
            os.rmdir(old)  # a unique name for the previous output while the new one moves in
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"output: cannot write {dest}: {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
