"""What a person sees on a terminal: progress bars and results. Everything else (Ray, torch, transformers and
DeepSpeed chatter: worker logs, deprecation warnings, weight-loading bars, native log lines) goes to a log
file in the run directory; ``--verbose`` shows it instead. Not on a terminal nothing is redirected: job logs
keep every line, including the ``HETERO_RAY_PROGRESS`` events that :class:`~hetero_ray.client.FusionClient`
reads."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

QUIET_ENV = "HETERO_RAY_QUIET"  # read by ensure_ray: no worker logs in the driver, Ray's own logs at WARNING
_terminal: TextIO | None = None


def terminal() -> TextIO:
    """Where bars and results go: the real terminal while chatter is redirected, else stderr."""
    return _terminal or sys.stderr


def wants_quiet(verbose: bool) -> bool:
    """Quiet only for a person: stdout and stderr both on a terminal (a pipe keeps every line)."""
    return not verbose and sys.stdout.isatty() and sys.stderr.isatty()


@contextlib.contextmanager
def quiet_terminal(log_path: Path, enabled: bool) -> Iterator[Path | None]:
    """Send file descriptors 1 and 2 (and with them every library's warnings, logs and bars, native ones too,
    and the Ray workers' log lines the driver relays) to ``log_path`` for the block; bars and results keep the
    terminal through :func:`terminal`. On an error the terminal is back, with the log's path, before the
    message is printed."""
    global _terminal
    if not enabled:
        yield None
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log_path, "a", buffering=1) as log:
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        _terminal = os.fdopen(os.dup(2), "w", buffering=1)
        for fd in saved:
            os.dup2(log.fileno(), fd)
        previous = os.environ.get(QUIET_ENV)
        os.environ[QUIET_ENV] = "1"
        try:
            yield log_path
        except BaseException:
            _restore(saved)
            print(f"hetero-ray: library and Ray logs of this run: {log_path}", file=sys.stderr, flush=True)
            raise
        finally:
            _restore(saved)
            _terminal.close()
            _terminal = None
            if previous is None:
                os.environ.pop(QUIET_ENV, None)
            else:
                os.environ[QUIET_ENV] = previous


def _restore(saved: dict[int, int]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, copy in list(saved.items()):
        os.dup2(copy, fd)
        os.close(copy)
        del saved[fd]


def quiet_requested() -> bool:
    return os.environ.get(QUIET_ENV) == "1"


def silence_libraries() -> None:
    """Library switches that keep chatter from reaching even the log in quantity: weight-loading bars and
    transformers' info lines (their warnings still go to the log)."""
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_warning()
