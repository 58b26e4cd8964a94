"""Sweeps: many fusions of one spec (seeds x strategies x controls x lr, ...) as concurrent runs on one Ray
cluster, each with its own resources, resumable by run name, gathered into one results table.

    from hetero_ray.sweep import grid, run_sweep
    result = run_sweep("spec.yaml", grid({"strategy": ["heterofusion", "zero_sources"], "seed": [0, 1],
                                          "training.lr": [1e-3, 2e-3]}), out="runs/sweep")
    print(result.markdown())

Each run is the spec with its overrides (dotted keys, as on the command line), its own ``name``, its output at
``OUT/adapters/NAME`` and its run state under ``OUT/state`` (shared, so runs of one seed and control share the
teacher-signal cache). A run is one Ray task holding ``cpus_per_run`` CPUs (its torch threads) and
``gpus_per_run`` GPUs; Ray starts as many as the cluster has room for. A run is in-process inside its task
(the same path as ``hetero-ray fuse --no-ray``); a run that itself needs several DeepSpeed workers is a job
of its own (:class:`hetero_ray.FusionClient`).

Resuming: a run whose output holds a finished fusion of the very same resolved spec is reused, not redone;
outputs appear only when complete, so a sweep killed at any point resumes with what it finished. Every spec
is validated, with its inputs, before any run starts. The table (``OUT/sweep.json``, ``OUT/sweep.md``) has
per run: name, status (trained, reused, failed; missing: not finished and ``train=False``), spec hash,
settings, seconds, steps, final replay loss, output, report, and what the optional ``after(spec, output)``
returned (run in the same task: an evaluation, say).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hetero_ray.errors import SpecError
from hetero_ray.io.outputs import check_spares_inputs
from hetero_ray.spec import FusionSpec, apply_overrides, parse_spec, read_spec_file

SWEEP_SCHEMA = "hetero-ray/sweep/1"
SETTING_KEYS = {"training.lr": "lr", "strategy": "", "seed": "s"}  # short forms in run names
SWEEP_OWNS = ("name", "output", "overwrite", "cluster.storage")  # set by the sweep for every run


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: a run name and the spec fields it sets (dotted keys: ``training.lr``)."""

    name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)


def run_name(overrides: Mapping[str, Any]) -> str:
    """A readable run name from its settings: ``heterofusion-s0-lr0.001`` (strategy bare, seed as s, lr as lr,
    any other field as its last part and its value); characters a run name cannot hold become '_'."""
    parts = []
    for key, value in overrides.items():
        short = SETTING_KEYS.get(key, key.split(".")[-1] + "=")
        text = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(f"{short}{text}")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", "-".join(parts) or "run").strip("._-") or "run"
    return name[:128]


def grid(axes: Mapping[str, Sequence[Any]]) -> list[SweepRun]:
    """The cartesian product of the axes, in the order given (the last axis varies fastest)."""
    for key, values in axes.items():
        if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
            raise SpecError(f"sweep: axis {key!r}: expected a non-empty list of values")
    keys = list(axes)
    runs = [SweepRun(run_name(dict(zip(keys, combo, strict=True))), dict(zip(keys, combo, strict=True)))
            for combo in itertools.product(*(axes[k] for k in keys))]
    return runs


@dataclass
class SweepResult:
    out: Path
    rows: list[dict]

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "failed"]

    @property
    def missing(self) -> list[dict]:
        """Runs not finished and not trained (``train=False``)."""
        return [r for r in self.rows if r["status"] == "missing"]

    def markdown(self) -> str:
        metric_keys = sorted({k for r in self.rows for k in (r.get("metrics") or {})})
        head = ["run", "status", "spec", "settings", "s", "steps", "final replay loss", *metric_keys]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
            loss = "" if r.get("final_loss") is None else f"{r['final_loss']:.4f}"
            secs = "" if r.get("seconds") is None else f"{r['seconds']:.1f}"
            metrics = [_cell((r.get("metrics") or {}).get(k)) for k in metric_keys]
            lines.append("| " + " | ".join([r["name"], r["status"] + (f": {r['error']}" if r.get("error") else ""),
                                            r["spec_hash"], settings, secs, str(r.get("steps") or ""), loss,
                                            *metrics]) + " |")
        return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def sweep_specs(spec: str | Path | Mapping, runs: Sequence[SweepRun], out: str | Path) -> dict[str, FusionSpec]:
    """Each run's resolved spec, validated with its inputs (raises SpecError naming the run and the field).
    ``spec``: a YAML file (relative paths from its folder) or a mapping (relative paths from the cwd)."""
    out = Path(out).resolve()
    if isinstance(spec, Mapping):
        raw, root, origin = dict(spec), Path.cwd(), "sweep spec"
    else:
        raw, root, origin = read_spec_file(Path(spec)), Path(spec).parent, str(spec)
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpecError(f"sweep: run names must be distinct, repeated: {dupes}")
    if not runs:
        raise SpecError("sweep: no runs")
    specs = {}
    spec_file = None if isinstance(spec, Mapping) else Path(spec)
    for run in runs:
        where = f"{origin} (sweep run {run.name})"
        owned = sorted(set(run.overrides) & set(SWEEP_OWNS))
        if owned:
            raise SpecError(f"{where}: {', '.join(owned)}: set by the sweep for each run (the name, and "
                            "OUT/adapters/NAME, OUT/state), not a sweep axis")
        data = apply_overrides(copy.deepcopy(raw), dict(run.overrides), where)
        data["name"], data["output"], data["overwrite"] = run.name, str(out / "adapters" / run.name), True
        data["cluster"] = {**(data.get("cluster") or {}), "storage": str(out / "state")}
        loaded = parse_spec(data, root, origin=where)
        loaded.check_files(origin=where, spec_file=spec_file)
        protected = loaded.protected_inputs(spec_file)
        for name, path in {"OUT/specs": out / "specs", "OUT/sweep.json": out / "sweep.json",
                           "OUT/sweep.md": out / "sweep.md"}.items():
            check_spares_inputs(path, protected, where, field=name)
        specs[run.name] = loaded
    return specs


def _run_one(spec_json: dict, threads: int, after: Callable | None, resume: bool = True, train: bool = True) -> dict:
    """One sweep run, in whatever process it lands in (a Ray task, or this one, whose thread count is restored
    after). ``train=False``: a run that is not finished is reported ``missing``, never trained."""
    import torch

    from hetero_ray.console import silence_libraries
    from hetero_ray.strategies import completed, run_strategy

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    silence_libraries()
    spec = FusionSpec.model_validate(spec_json)
    status = "reused" if resume and completed(spec) else "trained" if train else "missing"
    row: dict[str, Any] = {"status": status, "started": time.time(), "pid": os.getpid()}
    if status == "missing":
        row["ended"] = time.time()
        return row
    t0 = time.perf_counter()
    try:
        if row["status"] == "trained":
            run_strategy(spec, use_ray=False)
            row["seconds"] = time.perf_counter() - t0
        if after is not None:
            row["metrics"] = dict(after(spec, spec.output) or {})
    except Exception as e:  # one run's failure is its row's; the others go on
        row.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                   traceback=traceback.format_exc(limit=8))
    finally:
        torch.set_num_threads(before)
    row["ended"] = time.time()
    return row


def _row(run: SweepRun, spec: FusionSpec, result: dict) -> dict:
    report_path = spec.output / "fusion_report.json"
    row = {"name": run.name, "status": result["status"], "spec_hash": spec.digest()[:12],
           "settings": dict(run.overrides), "seconds": result.get("seconds"), "steps": None, "final_loss": None,
           "output": str(spec.output), "report": str(report_path), "metrics": result.get("metrics") or {},
           "started": result.get("started"), "ended": result.get("ended"), "pid": result.get("pid")}
    if result.get("error"):
        row["error"], row["traceback"] = result["error"], result.get("traceback")
    elif result["status"] == "missing":  # what the output holds, if anything, is another spec's
        row["report"] = None
    elif report_path.is_file():
        report = json.loads(report_path.read_text())
        history = report.get("history") or []
        row["steps"] = len(history)
        row["final_loss"] = history[-1].get("lm_loss") if history else None
        if row["seconds"] is None:  # reused: the time it took when it ran
            row["trained_seconds"] = sum((report.get("timings_s") or {}).values()) or None
    return row


def run_sweep(spec: str | Path | Mapping, runs: Sequence[SweepRun], out: str | Path, *, address: str | None = None,
              cpus_per_run: int = 1, gpus_per_run: float = 0, use_ray: bool = True,
              after: Callable[[FusionSpec, Path], Mapping] | None = None, resume: bool | Container[str] = True,
              on_row: Callable[[dict], None] | None = None, train: bool = True) -> SweepResult:
    """Run every run of the sweep (see the module's doc) and return the table; also written to
    ``OUT/sweep.json`` and ``OUT/sweep.md`` as rows come in. ``use_ray=False`` runs them one after another in
    this process (the reference); ``resume=False`` trains every run again (or give the names of the runs that
    may be reused); ``train=False`` trains nothing: each run not finished with its spec is a ``missing`` row
    (its ``after`` is not called; the specs and the table are written as by any sweep), so the table can be
    gathered from finished runs alone. ``address``: a Ray
    cluster; default: the one this process is connected to, else RAY_ADDRESS, else a local instance with one
    logical CPU per core."""
    if isinstance(resume, str):
        raise TypeError("resume: True, False, or a collection of run names (not one string)")
    if not train and resume is not True:
        raise ValueError("train=False reports finished runs: it needs resume=True")
    out = Path(out).resolve()
    specs = sweep_specs(spec, runs, out)
    dumps = {name: s.model_dump(mode="json") for name, s in specs.items()}
    on_gpu = sorted(n for n, s in specs.items() if s.cluster.use_gpu)
    if use_ray and on_gpu and gpus_per_run <= 0:
        raise SpecError(f"sweep: runs {on_gpu[:3]}{'...' if len(on_gpu) > 3 else ''} set cluster.use_gpu: give "
                        "gpus_per_run (--gpus-per-run; a fraction shares a GPU) so that Ray places them on GPUs")
    out.mkdir(parents=True, exist_ok=True)
    (out / "specs").mkdir(exist_ok=True)
    for run in runs:
        _write_atomic(out / "specs" / f"{run.name}.yaml", yaml.safe_dump(dumps[run.name], sort_keys=False))
    reuse = {r.name: resume if isinstance(resume, bool) else r.name in resume for r in runs}
    rows: dict[str, dict] = {}

    def record(run: SweepRun, result: dict) -> None:
        rows[run.name] = _row(run, specs[run.name], result)
        ordered = [rows[r.name] for r in runs if r.name in rows]
        _write_table(out, ordered, cpus_per_run, gpus_per_run)
        if on_row:
            try:
                on_row(rows[run.name])
            except Exception as e:  # noqa: BLE001 - a caller's display hook must not lose the other runs' rows
                print(f"hetero-ray sweep: on_row failed for {run.name}: {type(e).__name__}: {e}", file=sys.stderr)

    if not use_ray:
        for run in runs:
            record(run, _run_one(dumps[run.name], cpus_per_run, after, reuse[run.name], train))
    else:
        import ray

        from hetero_ray.runners.ray.driver import check_task_fits, ensure_ray

        ensure_ray(address, num_cpus=os.cpu_count() or 1)
        check_task_fits(cpus_per_run, gpus_per_run, "sweep: a run")
        task = ray.remote(_run_one).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)
        pending = {task.remote(dumps[r.name], math.ceil(cpus_per_run), after, reuse[r.name], train): r
                   for r in runs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            run = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except Exception as e:  # the task could not run (its function did not unpickle) or its process died
                text = str(e).strip()
                result = {"status": "failed", "traceback": text,
                          "error": f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}"}
            record(run, result)
    return SweepResult(out, [rows[r.name] for r in runs])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_table(out: Path, rows: list[dict], cpus: float, gpus: float) -> None:
    payload = {"schema": SWEEP_SCHEMA, "resources_per_run": {"cpus": cpus, "gpus": gpus}, "rows": rows}
    _write_atomic(out / "sweep.json", json.dumps(payload, indent=1, default=str))
    _write_atomic(out / "sweep.md", SweepResult(out, rows).markdown())
