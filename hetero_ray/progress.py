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


def train_callback(sink=None):
    """A Ray Train UserCallback printing rank 0's metrics after every report (log lines for job clients)
    and, given a :func:`progress_sink` handle, passing them to the driver."""
    import ray.train

    class ProgressCallback(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and "lm_loss" in metrics[0]:
                event = {"stage": "train", **metrics[0]}
                emit(event)
                if sink is not None:
                    sink.put.remote(event)

    return ProgressCallback()


def progress_sink():
    """A small actor collecting training events from the Ray Train controller for the driver to poll."""
    import ray

    @ray.remote(num_cpus=0)
    class ProgressSink:
        def __init__(self):
            self.events: list[dict] = []

        def put(self, event: dict) -> None:
            self.events.append(event)

        def drain(self) -> list[dict]:
            out, self.events = self.events, []
            return out

    return ProgressSink.remote()


class TerminalBars:
    """Progress bars for alignment (one per family, counting its adapters' tasks) and training (step, LM loss,
    RDM, mean alpha), fed with the same events as the log lines. Bars draw only on a terminal."""

    def __init__(self, disable: bool | None = None):
        self.bars: dict[str, object] = {}
        self.disable = disable

    def _bar(self, key: str, total: int, desc: str):
        from tqdm.auto import tqdm

        from hetero_ray.console import terminal

        if key not in self.bars:
            self.bars[key] = tqdm(total=total, desc=desc, dynamic_ncols=True, disable=self.disable, file=terminal())
        return self.bars[key]

    def __call__(self, event: dict) -> None:
        stage = event.get("stage")
        if stage == "align":
            fam = event.get("family", "all")
            bar = self._bar(f"align/{fam}", event.get("family_total", event["total"]), f"align {fam}")
            bar.update(1)
            if event.get("source_id"):
                bar.set_postfix_str(f"{event['source_id']} layers {event.get('layers', '')}")
        elif stage == "train":
            bar = self._bar("train", int(event.get("total_steps", 0)) or None, "train")
            bar.n = int(event.get("step", bar.n + 1))
            alphas = [v for k, v in event.items() if k.startswith("alpha/")]
            if isinstance(event.get("alpha"), dict):
                alphas = list(event["alpha"].values())
            post = {"lm": f"{event['lm_loss']:.3f}", "rdm": f"{event.get('rdm', 0.0):.3f}"}
            if alphas:
                post["alpha"] = f"{sum(alphas) / len(alphas):.3f}"
            bar.set_postfix(post)
            bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


class PlainLines:
    """Not on a terminal: one readable line when a stage starts and ends, and every ``1/every`` of training
    (the JSON events stay on stdout for programs)."""

    def __init__(self, out=None, every: int = 10):
        self.out = out or sys.stderr
        self.every = every
        self.seen: set[str] = set()

    def _say(self, text: str) -> None:
        print(f"hetero-ray: {text}", file=self.out, flush=True)

    def __call__(self, event: dict) -> None:
        stage = event.get("stage")
        if stage == "align":
            if "align" not in self.seen:
                self.seen.add("align")
                self._say(f"align: {event['total']} tasks")
            if event.get("done") == event.get("total"):
                self._say(f"align: done ({event['total']} tasks)")
        elif stage == "train":
            step, total = int(event.get("step", 0)), int(event.get("total_steps", 0))
            if step == 1 or step == total or (total and step % max(1, total // self.every) == 0):
                self._say(f"train: step {step}/{total}, lm loss {event['lm_loss']:.4f}, "
                          f"rdm {event.get('rdm', 0.0):.4f}")

    def close(self) -> None:
        pass
