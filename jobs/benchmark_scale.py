"""Scale-out benchmark: the distributed fusion at several source counts x worker counts x ways of sharing the
transfer networks (``cluster.partition``), on a local Ray (or the cluster at --address). Prints, per run:
per-stage wall time, rank 0's wall time per step (its reports to Ray Train and checkpoints included), the step split on
rank 0 (target forward/backward, nets forward, RDM, nets backward, optimizer: rank 0's own timed parts, so
an owner's waits at the exchange count in its nets' forward and the norm's gather in its optimizer step;
the per-step metrics merge and report are outside them),
per-worker transfer-net parameters, candidate-token bytes, their state (weights, gradients, AdamW) and peak
RSS, with ratios to the 1-worker run of the same sources; each worker's memory growth (peak RSS over its RSS
with the libraries imported, and the same at the end of setup) and its own part (less the object store's
pages and mapped files), the largest next to what `hetero-ray check` estimates for the most loaded worker of
the same spec, over the whole run and up to the end of the first step (later steps add what the allocator
keeps); per source count, alignment MB/s (in-process and on Ray) next to a raw read of the same
files, in the same run.

    python jobs/benchmark_scale.py --sources 4,16,64 --workers 1,2,4 --partition groups,replicate

Everything is built locally (tiny models of real families at the chosen width); nothing is downloaded. On
a machine with fewer cores than workers the step times measure contention, not scaling: read the memory
columns there, and the times on a machine with a core per worker.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.benchmark_pipeline import (  # noqa: E402
    add_rdm_arguments,
    align_pass,
    build_zoo,
    raw_read,
    ray_align_pass,
    rdm_method,
)

PARTS = ("target", "nets_forward", "rdm", "nets_backward", "optimizer")
MIB, GIB = 1 << 20, 1 << 30


def alignment_rates(spec, repeats: int, ray: bool) -> dict:
    """MB/s of a raw read of the source files (safetensors' mapping, and one touching every byte), of
    alignment in this process, and on Ray."""
    files = [Path(s.adapter) / "adapter_model.safetensors" for s in spec.sources]
    n_bytes = sum(f.stat().st_size for f in files)
    raw, touched, aligned, on_ray = [], [], [], []
    for _ in range(repeats):
        r = raw_read(files)
        raw.append(r[0])
        touched.append(r[1])
        t0 = time.perf_counter()
        align_pass(spec)
        aligned.append(time.perf_counter() - t0)
        if ray:
            t0 = time.perf_counter()
            ray_align_pass(spec).count()
            on_ray.append(time.perf_counter() - t0)
    out = {"adapter_MB": round(n_bytes / 1e6, 2), "raw_read_MBps": round(n_bytes / min(raw) / 1e6, 1),
           "raw_read_touched_MBps": round(n_bytes / min(touched) / 1e6, 1),
           "alignment_MBps": round(n_bytes / min(aligned) / 1e6, 1),
           "alignment_over_raw": round(min(raw) / min(aligned), 3)}
    if on_ray:  # the first Ray pass pays the actors' start
        out |= {"ray_alignment_MBps": round(n_bytes / min(on_ray) / 1e6, 1),
                "ray_over_raw": round(min(raw) / min(on_ray), 3)}
    return out


def run_one(spec, workers: int, partition: str, zero_stage: int, storage: Path, address: str | None) -> dict:
    from hetero_ray.planning import check
    from hetero_ray.runners.ray.aggregator import memory_growth
    from hetero_ray.runners.ray.driver import fuse

    name = f"scale-{len(spec.sources)}s-{workers}w-{partition}"
    spec = spec.model_copy(update={
        "name": name, "output": storage / "out" / name, "cluster": spec.cluster.model_copy(update={
            "workers": workers, "partition": partition, "zero_stage": zero_stage, "storage": str(storage / "runs")})})
    estimate = check(spec)["memory_gib_per_worker"][workers]  # the most loaded worker, this run's layout
    t0 = time.perf_counter()
    result = fuse(spec, address)
    wall = time.perf_counter() - t0
    steps = result.history[1:] or result.history  # the first step also pays one-time costs
    mean = {k: sum(h[f"time_{k}_s"] for h in steps) / len(steps) for k in (*PARTS, "step")}
    zero = result.report["zero"]
    parts = zero["partitions"]
    state = [16 * p["partition_numel"] + p["group_bytes"] for p in parts]  # fp32 weights, grads, 2 AdamW states
    # each worker's memory growth over its RSS with the libraries imported, and the part that is its own heap
    # (less the object store's pages it touched, held by Ray's store once per node, and mapped files)
    traced = [p["memory_mib"] for p in parts if "anon" in p.get("memory_mib", {}).get("start", {})]  # /proc read
    grown = [memory_growth(m) for m in traced]
    growth, setup, own = ([MIB * g[k] for g in grown] for k in ("total", "setup", "own"))
    # the same up to the first step: later steps add what the allocator keeps (glibc serves freed activations'
    # sizes from its heap once its mmap threshold has risen), which no estimate of live tensors counts
    first = [MIB * g["own"] for m in traced if (g := memory_growth(m, "first_step"))]
    shutil.rmtree(spec.output, ignore_errors=True)
    return {
        "sources": len(spec.sources), "workers": workers, "partition": zero["partition"], "zero_stage": zero["stage"],
        "wall_s": round(wall, 1), **{k: round(v, 2) for k, v in result.report["timings_s"].items()},
        "step_s": round(mean["step"], 4), "step_parts_s": {k: round(mean[k], 4) for k in PARTS},
        "step_wall_s": round(zero["step_wall_s"], 4) if zero.get("step_wall_s") is not None else None,
        "max_worker_params": max(p["partition_numel"] for p in parts),
        "max_worker_token_MB": round(max(p["group_bytes"] for p in parts) / 1e6, 2),
        "max_worker_net_state_MB": round(max(state) / 1e6, 2),
        "max_worker_peak_rss_MB": round(max(p["memory_mib"]["end"]["peak"] for p in parts) * MIB / 1e6, 1),
        "groups_per_worker": [len(p.get("groups", [])) for p in parts],
        "max_worker_rss_growth_MB": round(max(growth) / 1e6, 1) if growth else None,
        "max_worker_setup_growth_MB": round(max(setup) / 1e6, 1) if setup else None,
        "max_worker_own_growth_MB": round(max(own) / 1e6, 1) if own else None,
        "check_MB": round(estimate["total"] * GIB / 1e6, 1),
        "check_over_own_growth": round(estimate["total"] * GIB / max(own), 3) if own else None,
        "max_worker_own_growth_first_step_MB": round(max(first) / 1e6, 1) if first else None,
        "check_over_own_growth_first_step": round(estimate["total"] * GIB / max(first), 3) if first else None,
        "memory_marks_MiB": [p.get("memory_mib") for p in parts],
        "check_parts_MB": {k: round(v * GIB / 1e6, 1) for k, v in estimate.items()
                           if k != "total" and isinstance(v, float)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", default="4,16,64", help="comma-separated source counts")
    ap.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    ap.add_argument("--partition", default="groups,replicate", help="cluster.partition values to compare")
    ap.add_argument("--zero-stage", type=int, default=3,
                    help="ZeRO stage where nets are replicated over 2+ workers (1 worker: ZeRO-0)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8,
                    help="optimizer steps per run (the first is not timed; 3 timed steps vary too much to compare)")
    ap.add_argument("--repeats", type=int, default=2, help="alignment timing repeats (best of)")
    add_rdm_arguments(ap)
    ap.add_argument("--skip-ray-alignment", action="store_true", help="time alignment in-process only")
    ap.add_argument("--address", default=None, help="a running Ray cluster (default: a local instance)")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows here (JSON)")
    ap.add_argument("--keep", action="store_true", help="keep the built models")
    args = ap.parse_args()
    if args.workers.split(",")[0] != "1":
        ap.error("--workers must start with 1: every ratio is to the 1-worker run of the same sources")

    import torch

    torch.set_num_threads(1)
    from hetero_ray.runners.ray.driver import ensure_ray
    from hetero_ray.spec import parse_spec

    ensure_ray(args.address)
    root = Path(tempfile.mkdtemp(prefix="hetero-ray-scale-"))
    rows, rates = [], {}
    try:
        for n in [int(x) for x in args.sources.split(",")]:
            zoo = build_zoo(root / f"zoo{n}", args.hidden, args.layers, n, args.rank)
            spec = parse_spec({
                "output": str(root / "out"), "method": rdm_method(args),
                "target": {"base": str(zoo["target-base"]), "adapter": str(zoo["target"])},
                "sources": [{"adapter": str(zoo[f"source{i}"])} for i in range(n)],
                "replay": [{"path": str(zoo["replay"])}],
                "training": {"epochs": 1, "grad_accum": 4, "batch_size": 2, "max_length": 64,
                             "max_steps": args.steps},
            })
            rates[n] = alignment_rates(spec, args.repeats, not args.skip_ray_alignment)
            print(json.dumps({"sources": n, **rates[n]}), flush=True)
            for w in [int(x) for x in args.workers.split(",")]:
                for partition in args.partition.split(","):
                    if w == 1 and partition != args.partition.split(",")[0]:
                        continue  # one worker holds everything either way
                    # one worker holds every net: ZeRO-0, what an owner runs (ZeRO-3 alone only adds gathers)
                    stage = 0 if w == 1 else args.zero_stage
                    row = run_one(spec, w, partition, stage, root / "runs", args.address)
                    base = next(r for r in rows + [row] if r["sources"] == n and r["workers"] == 1)
                    row["state_vs_1_worker"] = round(row["max_worker_net_state_MB"]
                                                     / base["max_worker_net_state_MB"], 3)
                    row["step_vs_1_worker"] = round(row["step_s"] / base["step_s"], 3)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            if not args.keep:
                shutil.rmtree(root / f"zoo{n}", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("\n| sources | workers | partition | step s | vs 1 | wall s/step | target | nets fwd | RDM | nets bwd | "
          "optim | net state MB/worker | vs 1 | tokens MB/worker | peak RSS MB | RSS growth MB (setup) | "
          "own growth MB | check MB | check / own | own growth MB, first step | check / own, first step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["step_parts_s"]
        wall = "-" if r["step_wall_s"] is None else f"{r['step_wall_s']:.3f}"
        print(f"| {r['sources']} | {r['workers']} | {r['partition']} | {r['step_s']:.3f} | {r['step_vs_1_worker']} | "
              f"{wall} | "
              f"{p['target']:.3f} | {p['nets_forward']:.3f} | {p['rdm']:.3f} | {p['nets_backward']:.3f} | "
              f"{p['optimizer']:.3f} | {r['max_worker_net_state_MB']} | {r['state_vs_1_worker']} | "
              f"{r['max_worker_token_MB']} | {r['max_worker_peak_rss_MB']} | {r['max_worker_rss_growth_MB']} "
              f"({r['max_worker_setup_growth_MB']}) | {r['max_worker_own_growth_MB']} | {r['check_MB']} | "
              f"{r['check_over_own_growth']} | {r['max_worker_own_growth_first_step_MB']} | "
              f"{r['check_over_own_growth_first_step']} |")
    print("\n| sources | adapters MB | raw read MB/s | raw read touching every byte MB/s | alignment MB/s (share of "
          "raw) | on Ray MB/s (share) |")
    print("|---|---|---|---|---|---|")
    for n, r in rates.items():
        print(f"| {n} | {r['adapter_MB']} | {r['raw_read_MBps']} | {r['raw_read_touched_MBps']} | "
              f"{r['alignment_MBps']} ({r['alignment_over_raw']}) | "
              f"{r.get('ray_alignment_MBps', '-')} ({r.get('ray_over_raw', '-')}) |")
    if args.out:
        args.out.write_text(json.dumps({"runs": rows, "alignment": rates, "settings": vars(args)}, indent=2,
                                       default=str))


if __name__ == "__main__":
    main()
