"""Progress lines: one JSON object per event after a fixed marker, printed by the driver and the Ray Train
controller, read back by :class:`hetero_ray.client.FusionClient` from job logs."""

from __future__ import annotations

import json
import sys

MARKER = "HETERO_RAY_PROGRESS "
RESULT_MARKER = "HETERO_RAY_RESULT "


def emit(event: dict, marker: str = MARKER) -> None:
    print(marker + json.dumps(event, sort_keys=True, default=str), file=sys.stdout, flush=True)


def parse(text: str, marker: str = MARKER) -> list[dict]:
    """Every event in a log text (Ray prefixes lines with the process name; the marker finds them)."""
    out = []
    for line in text.splitlines():
        at = line.find(marker)
        if at >= 0:
            try:
                out.append(json.loads(line[at + len(marker) :]))
            except json.JSONDecodeError:
                continue
    return out


def train_callback():
    """A Ray Train UserCallback printing rank 0's metrics after every report."""
    import ray.train

    class ProgressCallback(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and "lm_loss" in metrics[0]:
                emit({"stage": "train", **metrics[0]})

    return ProgressCallback()
