"""Sweep benchmark: N fusions run as one sweep on a Ray cluster against the same N run one after another, in
one run of this job. Prints the wall times, their ratio and the sweep's table.

    python jobs/benchmark_sweep.py --runs 8 --cpus 2
    python jobs/benchmark_sweep.py --address 127.0.0.1:6379      # an existing cluster (cluster/local_cluster.sh)

The runs are a grid of strategies (heterofusion, its zero/random-source controls, replay_only) x seeds
over locally built tiny models (a Llama target, Qwen2 and Gemma-3 sources of --hidden width); nothing is
downloaded. One after another: each run in this process, first with 1 torch thread (as each sweep run has),
then with --cpus threads (the whole machine per run); the faster is the baseline. The sweep: a local Ray
instance with --cpus logical CPUs (or the cluster at --address), one CPU per run; its time is given on the
started instance (the goal's "2 workers' worth of cluster": its workers' first imports count, its start does
not) and with the start. Both produce the same adapters (checked here, bit for bit, against the 1-thread pass).
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

STRATEGIES = ["heterofusion", "zero_sources", "random_sources", "replay_only"]


def build_inputs(root: Path, hidden: int, layers: int, epochs: int) -> Path:
    """Tiny target + two sources of other families, a replay file, and a spec file; returns the spec."""
    import yaml

    from hetero_ray.contrib import tiny

    def dims(h, n):
        return dict(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=n, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=h // 4)

    target = tiny.build_tiny_model("llama", root / "llama", **dims(hidden, layers))
    sources = []
    for i, fam in enumerate(["qwen2", "gemma3"]):
        base = tiny.build_tiny_model(fam, root / fam, seed=i + 1, **dims(hidden + 16 * (i + 1), layers + i))
        sources.append({"adapter": str(tiny.build_lora_adapter(base, root / f"{fam}-lora", fam, rank=8, seed=i))})
    spec = {
        "target": {"base": str(target), "adapter": str(tiny.build_lora_adapter(target, root / "llama-lora", "llama",
                                                                                rank=8, seed=9))},
        "sources": sources,
        "replay": [{"path": str(tiny.write_jsonl(tiny.color_task_records(48), root / "replay.jsonl"))}],
        "method": {"num_projections": 64},
        "training": {"epochs": epochs, "lr": 3e-3, "batch_size": 4, "grad_accum": 2, "max_length": 64},
    }
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8, help="sweep size: strategies x seeds, in that order")
    ap.add_argument("--cpus", type=int, default=2, help="the sweep's local Ray CPUs (2 workers' worth: 2)")
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6, help="over 48 replay records, 6 optimizer steps each")
    ap.add_argument("--address", default=None, help="run the sweep on this Ray cluster instead of a local one")
    ap.add_argument("--skip-threaded", action="store_true", help="leave out the --cpus-thread serial pass")
    ap.add_argument("--keep", type=Path, default=None, help="keep the inputs and outputs in this directory")
    args = ap.parse_args()

    import ray
    import torch
    from safetensors.torch import load_file

    from hetero_ray.runners.ray.driver import ensure_ray
    from hetero_ray.sweep import grid, run_sweep

    root = Path(tempfile.mkdtemp(prefix="hetero-ray-sweep-")) if args.keep is None else args.keep.resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        spec = build_inputs(root / "inputs", args.hidden, args.layers, args.epochs)
        seeds = -(-args.runs // len(STRATEGIES))
        runs = grid({"seed": list(range(seeds)), "strategy": STRATEGIES})[: args.runs]
        times = {}
        t0 = time.perf_counter()
        serial = run_sweep(spec, runs, root / "serial-1", use_ray=False, cpus_per_run=1)
        times["serial, 1 thread"] = time.perf_counter() - t0
        if not args.skip_threaded:
            t0 = time.perf_counter()
            run_sweep(spec, runs, root / f"serial-{args.cpus}", use_ray=False, cpus_per_run=args.cpus)
            times[f"serial, {args.cpus} threads"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ensure_ray(args.address, num_cpus=args.cpus)
        start_s = time.perf_counter() - t0
        swept = run_sweep(spec, runs, root / "sweep", cpus_per_run=1)
        times["sweep (Ray start included)"] = time.perf_counter() - t0
        # the goal's sweep runs "on 2 workers' worth of cluster": one that is up already (its workers' first
        # imports stay in); a local instance's start is reported beside it
        times["sweep (on the started instance)"] = times["sweep (Ray start included)"] - start_s
        cluster_cpus = ray.cluster_resources().get("CPU", 0)
        ray.shutdown()
        bad = [r["name"] for r in serial.rows + swept.rows if r["status"] != "trained"]
        if bad:
            raise SystemExit(f"runs that did not train (failed, or reused from an earlier --keep run): {bad}")
        same = all(
            all(bool((a[k] == b[k]).all()) for k in a)
            for x, y in zip(serial.rows, swept.rows, strict=True)
            for a, b in [(load_file(x["output"] + "/adapter_model.safetensors"),
                          load_file(y["output"] + "/adapter_model.safetensors"))])
        baseline = min(v for k, v in times.items() if k.startswith("serial"))
        sweep_s = times["sweep (on the started instance)"]
        print(f"\n{args.runs} runs ({', '.join(STRATEGIES)} x seeds), tiny Llama {args.hidden} x {args.layers} <- "
              f"Qwen2 + Gemma-3; torch {torch.__version__}; sweep on {cluster_cpus:g} Ray CPUs, 1 per run\n")
        print("| how | wall s | / fastest serial |\n|---|---:|---:|")
        for k, v in times.items():
            print(f"| {k} | {v:.1f} | {v / baseline:.2f} |")
        print(f"\nsweep / fastest serial: {sweep_s / baseline:.2f} on the started instance (goal <= 0.65), "
              f"{times['sweep (Ray start included)'] / baseline:.2f} with Ray's start ({start_s:.1f} s); adapters "
              f"equal to the 1-thread serial pass, bit for bit: {same}")
        busy = sum(r["seconds"] for r in swept.rows)
        print(f"run seconds summed in the sweep: {busy:.1f} (serial 1-thread: "
              f"{sum(r['seconds'] for r in serial.rows):.1f}); occupancy {busy / (sweep_s * args.cpus):.0%} of "
              f"{args.cpus} CPUs over the sweep's wall time\n")
        print(swept.markdown())
        print("| run | serial s | in the sweep s |\n|---|---:|---:|")
        for x, y in zip(serial.rows, swept.rows, strict=True):
            print(f"| {x['name']} | {x['seconds']:.1f} | {y['seconds']:.1f} |")
        print(json.dumps({"times_s": times, "ray_start_s": start_s, "ratio": sweep_s / baseline,
                          "ratio_with_start": times["sweep (Ray start included)"] / baseline, "same_adapters": same}))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
