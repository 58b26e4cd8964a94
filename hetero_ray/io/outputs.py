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
import hashlib
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
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
        ancestor = dest.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise OutputError(f"{origin}: {dest}: its parent {ancestor} is a file, not a directory")
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


def _host() -> str:
    """A short tag of this host: a PID says whether a writer is alive only on the host that wrote it (outputs
    may live on a shared filesystem)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _scratch_prefix(dest: Path, kind: str) -> str:
    return f".{dest.name}.{kind}-{_host()}-{os.getpid()}-"


def _tidy_leftovers(dest: Path) -> None:
    """Remove what a killed writer of ``dest`` on this host left: its temporary directory; and put back the
    previous output it had moved aside, if ``dest`` is missing."""
    for kind in ("old", "tmp"):
        head = f".{dest.name}.{kind}-{_host()}-"
        for p in sorted(dest.parent.glob(f"{head}*")):
            pid = p.name[len(head):].split("-", 1)[0]
            if not pid.isdigit() or _alive(int(pid)) or not p.is_dir():
                continue
            if kind == "old" and not dest.exists() and (p / OUTPUT_MARKER).is_file():
                os.replace(p, dest)  # the swap was cut between its two renames: the previous output comes back
            else:
                shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait until the block is done (the two renames of a swap must not be split)."""
    held = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest``; an existing ``dest`` is moved aside first and removed after. If the second
    rename fails, the previous output is put back."""
    if not dest.exists():
        os.replace(tmp, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=_scratch_prefix(dest, "old"), dir=dest.parent))
    os.rmdir(old)  # a unique name for the previous output while the new one moves in
    with _signals_held():
        os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        except BaseException:
            os.replace(old, dest)
            raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(dest: str | Path, overwrite: bool = False, provenance: Mapping | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; swap it into place only if the block succeeds.

    Raises OutputError (naming ``dest``) for a destination that must not be replaced, or when writing fails
    (disk full, file-size limit, permissions); the previous output, if any, is then left as it was."""
    dest = Path(dest)
    try:
        if dest.parent.is_dir():
            _tidy_leftovers(dest)  # first: a restored previous output is then judged like any other
        check_replaceable(dest, overwrite)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_scratch_prefix(dest, "tmp"), dir=dest.parent))
    except OSError as e:
        raise OutputError(f"output: cannot prepare {dest}: {e}") from e
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(json.dumps(dict(provenance or {}), sort_keys=True, default=str))
        check_replaceable(dest, overwrite)  # the block may have run for hours: look again before replacing
        _swap_into_place(tmp, dest)
    except WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"output: cannot write {dest}: {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
