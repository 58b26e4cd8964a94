"""Pipeline benchmark: alignment throughput against a raw safetensors read of the same bytes, and the
training step time split into transfer-net work and target-model work. Prints one table per run.

    python jobs/benchmark_pipeline.py --hidden 256 --layers 8 --sources 4 --steps 4
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/benchmark_pipeline.py

Everything is built locally (tiny models of real families at the chosen width); nothing is downloaded.
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

FAMILIES = ["qwen2", "mistral", "gemma3", "phi3"]


SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64)


def build_zoo(root: Path, hidden: int, layers: int, n_sources: int, rank: int, shape: str = "varied") -> dict:
    """Target (Llama) and ``n_sources`` source adapters of 4 families. ``varied``: every model its own base of
    its own width and depth; ``smollm2``: every model SmolLM2-135M-shaped, one base per family (as experts
    share their family's base), each source its own adapter."""
    from hetero_ray.contrib import tiny

    def dims(i):
        if shape == "smollm2":
            return SMOLLM2
        h = hidden + 16 * i
        return dict(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=layers + i % 3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=h // 4)

    zoo = {"target-base": tiny.build_tiny_model("llama", root / "llama", **dims(0))}
    zoo["target"] = tiny.build_lora_adapter(zoo["target-base"], root / "llama-lora", "llama", rank=rank)
    for i in range(n_sources):
        fam = FAMILIES[i % len(FAMILIES)]
        base = root / (f"{fam}-base" if shape == "smollm2" else f"{fam}-{i}")
        if not base.exists():
            tiny.build_tiny_model(fam, base, seed=i, **dims(i + 1))
        zoo[f"source{i}"] = tiny.build_lora_adapter(base, root / f"{fam}-{i}-lora", fam, rank=rank, seed=i)
    zoo["replay"] = tiny.write_jsonl(tiny.color_task_records(64), root / "replay.jsonl")
    return zoo


def add_rdm_arguments(ap: argparse.ArgumentParser) -> None:
    """RDM's sort budget and directions, as benchmark jobs take them (see :func:`rdm_method`)."""
    ap.add_argument("--rdm-sort-budget", type=int, default=0,
                    help="RDM projected values per sort (default 0: the spec's default; -1: no budget)")
    ap.add_argument("--rdm-directions", choices=["orthogonal", "iid"], default=None,
                    help="RDM's directions (default: the spec's, orthogonal)")


def rdm_method(args: argparse.Namespace) -> dict:
    """The spec's method fields that :func:`add_rdm_arguments`' options ask for (none: the spec's defaults)."""
    method = {}
    if args.rdm_sort_budget:
        method["rdm_sort_budget"] = None if args.rdm_sort_budget < 0 else args.rdm_sort_budget
    if args.rdm_directions:
        method["rdm_directions"] = args.rdm_directions
    return method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--sources", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--projections", type=int, default=None, help="RDM projections (default: the spec's, 2048)")
    ap.add_argument("--rdm-max-samples", type=int, default=0,
                    help="RDM rows per term (default 0: the spec's default; -1: every row)")
    add_rdm_arguments(ap)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the Ray workers' count is 1)")
    ap.add_argument("--shape", choices=["varied", "smollm2"], default="varied",
                    help="varied: each model its own width and depth; smollm2: SmolLM2-135M shapes, one base per "
                    "family")
    ap.add_argument("--align-only", action="store_true", help="alignment against the raw read only (no training)")
    ap.add_argument("--ray", action="store_true", help="also align on a local Ray (FamilyActors, one per core)")
    ap.add_argument("--keep", action="store_true", help="keep the built models (removed at the end otherwise: "
                    "64 sources take ~14 GB)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hr-bench-"))
    try:
        run(args, root)
    finally:
        if args.keep:
            print(f"models kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def align_pass(spec, keep: bool = False):
    """One in-process alignment pass as the runners make it: open the adapters and plan
    (:func:`open_and_align`), then every source's candidates. Returns (seconds spent opening, the plan, the
    block size, the number of candidates, or the candidates themselves with ``keep``)."""
    from hetero_ray.families import config_defaults
    from hetero_ray.runners.prepare import candidates_of, open_and_align

    config_defaults.cache_clear()  # each pass opens as a run's first open does
    t0 = time.perf_counter()
    o = open_and_align(spec)
    open_s = time.perf_counter() - t0
    cands = (c for i, (a, t) in enumerate(o.sources) for c in candidates_of(spec, o.plan, i, a, t, o.block))
    return open_s, o.plan, o.block, list(cands) if keep else sum(1 for _ in cands)


def ray_align_pass(spec, parts: dict | None = None):
    """One alignment pass on Ray as a run makes it: the driver opens the inputs (headers), FamilyActors read
    the tensors, each pass starting its actors. Returns the materialized candidate Dataset. ``parts`` gets
    where the pass's time went, by the driver's progress events: ``open`` (the driver's open and plan),
    ``to_first_task`` (starting the actors, until the first task is done), ``tasks`` (from then to the last)
    and ``dataset`` (the candidate Dataset made from the tasks' tables and materialized)."""
    from hetero_ray.families import config_defaults
    from hetero_ray.runners.prepare import open_and_align
    from hetero_ray.runners.ray.driver import align_sources

    config_defaults.cache_clear()
    t0 = time.perf_counter()
    o = open_and_align(spec)
    t_open = time.perf_counter()
    done: list[float] = []
    streams, _ = align_sources(spec, o.plan, o.block, lambda _: done.append(time.perf_counter()), opened=o.sources)
    ds = streams["candidates"]
    end = time.perf_counter()
    if parts is not None and done:
        parts |= {"open": t_open - t0, "to_first_task": done[0] - t_open, "tasks": done[-1] - done[0],
                  "dataset": end - done[-1]}
    return ds


def raw_read(files) -> tuple[float, float]:
    """Seconds to read ``files`` with safetensors' ``load_file``, which maps them (no byte is touched until
    used), and to read them touching every byte once (one sum per tensor): the floor of any pass that looks
    at the values, as alignment's finiteness check must."""
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    for f in files:
        load_file(str(f))
    mapped = time.perf_counter() - t0
    t0 = time.perf_counter()
    for f in files:
        for t in load_file(str(f)).values():
            t.sum()
    return mapped, time.perf_counter() - t0


def alignment_parts(spec, raw_s: float, repeats: int) -> dict:
    """Where an in-process alignment pass spends its time, by timers around its stages (``repeats`` more
    passes after the timed ones; the fastest pass's parts): opening (configs, headers, plan), reading the
    tensors (mapping the files and checking that the values are finite, per file or per tensor), and the
    rest (rank harmonization, controls, candidates). Beside them, the raw read of the same files from the
    timed passes, what the groups' assembly then costs (``assembly``: tokens, padding and the blocks'
    singular values, of which ``singular_values``), which alignment no longer does, and what writing the
    candidates as Arrow costs (``to_arrow``: what the FamilyActors add on Ray, for their tables)."""
    from hetero_ray.denoise import fusion
    from hetero_ray.io import adapters
    from hetero_ray.runners.prepare import open_target
    from hetero_ray.tokens import blocks
    from hetero_ray.tokens.candidates import candidates_to_arrow

    spent = {"read": 0.0, "singular_values": 0.0}

    def timed(fn, key):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t0
        return wrapper

    patches = [(adapters.LoraAdapter, "tensor", "read"), (adapters.LoraAdapter, "check_finite", "read"),
               (blocks, "block_singular_values", "singular_values"),
               (fusion, "block_singular_values", "singular_values")]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    best: dict | None = None
    try:
        for obj, name, key in patches:
            setattr(obj, name, timed(getattr(obj, name), key))
        for _ in range(max(1, repeats)):
            spent.update(dict.fromkeys(spent, 0.0))
            t0 = time.perf_counter()
            open_s, plan, block, cands = align_pass(spec, keep=True)  # opening reads headers only, no tensor
            total = time.perf_counter() - t0
            parts = {"total": total, "open": open_s, "read": spent["read"],
                     "other": total - open_s - spent["read"]}
            target, ttopo = open_target(spec)
            t0 = time.perf_counter()
            fusion.assemble_groups(plan, target, ttopo, cands, block)
            parts |= {"assembly": time.perf_counter() - t0, "singular_values": spent["singular_values"]}
            t0 = time.perf_counter()
            candidates_to_arrow(cands)
            parts["to_arrow"] = time.perf_counter() - t0
            if best is None or total < best["total"]:
                best = parts
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
    return {**{k: round(v, 4) for k, v in best.items()}, "raw_read": round(raw_s, 4)}


def _timed(fn, *args) -> float:
    """Seconds ``fn(*args)`` takes, as in a run's first open of its inputs (the base configs' cache emptied
    first)."""
    from hetero_ray.families import config_defaults

    config_defaults.cache_clear()
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def run(args: argparse.Namespace, root: Path) -> None:
    import torch

    torch.set_num_threads(args.threads)

    from hetero_ray.denoise.fusion import group_rdm
    from hetero_ray.denoise.rdm import projections_for
    from hetero_ray.runners.local import fuse_local
    from hetero_ray.runners.prepare import build_net, prepare_groups
    from hetero_ray.spec import parse_spec

    t0 = time.perf_counter()
    zoo = build_zoo(root, args.hidden, args.layers, args.sources, args.rank, args.shape)
    build_s = time.perf_counter() - t0
    method = rdm_method(args)  # the spec's defaults unless asked
    if args.projections:
        method["num_projections"] = args.projections
    if args.rdm_max_samples:
        method["rdm_max_samples"] = None if args.rdm_max_samples < 0 else args.rdm_max_samples
    spec = parse_spec({
        "output": str(root / "out"),
        "target": {"base": str(zoo["target-base"]), "adapter": str(zoo["target"])},
        "sources": [{"adapter": str(zoo[f"source{i}"])} for i in range(args.sources)],
        "replay": [{"path": str(zoo["replay"])}],
        "method": method,
        "training": {"epochs": 1, "grad_accum": 4, "batch_size": 2, "max_length": 64, "max_steps": args.steps},
    })
    files = [Path(s.adapter) / "adapter_model.safetensors" for s in spec.sources]
    n_bytes = sum(f.stat().st_size for f in files)

    raw, aligned = [], []
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        raw.append(raw_read(files))
        t0 = time.perf_counter()
        _, plan, block, n_cand = align_pass(spec)
        aligned.append(time.perf_counter() - t0)
    raw_s, touched_s, align_s = min(r[0] for r in raw), min(r[1] for r in raw), min(aligned)
    table = {
        "settings": vars(args), "zoo_build_s": round(build_s, 2), "adapter_bytes": n_bytes,
        "candidates": n_cand, "block_size": block,
        "raw_read_MBps": round(n_bytes / raw_s / 1e6, 1), "alignment_MBps": round(n_bytes / align_s / 1e6, 1),
        "raw_read_touched_MBps": round(n_bytes / touched_s / 1e6, 1),
        "alignment_over_raw_time": round(align_s / raw_s, 2),
        "alignment_share_of_raw": round(raw_s / align_s, 3),
        "alignment_share_of_raw_touched": round(touched_s / align_s, 3),
        "alignment_parts_s": alignment_parts(spec, raw_s, args.repeats),
        # the in-process runner's whole first stage: alignment, then the groups' tokens and singular values
        "prepare_groups_s": round(min(_timed(prepare_groups, spec) for _ in range(max(1, args.repeats))), 4),
    }
    if args.ray:  # the same sources through the FamilyActors into a materialized Ray Dataset

        from hetero_ray.runners.ray.driver import ensure_ray

        ensure_ray()  # as the CLI starts it: logical CPUs beyond the actors for Ray Data
        ray_s = []
        ray_parts = []
        for _ in range(max(2, args.repeats)):  # each pass starts its actors, as a run does
            t0 = time.perf_counter()
            ray_parts.append({})
            assert ray_align_pass(spec, ray_parts[-1]).count() == n_cand
            ray_s.append(time.perf_counter() - t0)
        # the first pass is what a run sees (a fresh Ray starts Ray Data's workers); the others, warmer
        table |= {"ray_alignment_s": [round(x, 3) for x in ray_s],
                  "ray_alignment_parts_s": [{k: round(v, 3) for k, v in p.items()} for p in ray_parts],
                  "ray_alignment_MBps": round(n_bytes / min(ray_s) / 1e6, 1),
                  "ray_over_in_process_time": round(min(ray_s) / align_s, 2)}
    if args.align_only:
        print(json.dumps(table, indent=2))
        return

    result = fuse_local(spec)
    steps = result.history[1:] or result.history  # the first step also pays one-time costs
    def mean(key: str) -> float:
        return sum(h[key] for h in steps) / len(steps)

    # the transfer networks' share counts their forward, RDM, backward and the optimizer step
    net_s, target_s = mean("time_net_s"), mean("time_target_s")
    # RDM's whole cost (forward and backward: the step times hold its backward inside the nets' backward),
    # measured on the same groups' encodings in this process
    prepared = prepare_groups(spec)
    net = build_net(spec, prepared.plan, prepared.block, prepared.groups, prepared.target)
    with torch.no_grad():
        outputs = net(prepared.groups)
    rows = {g: {"target": o["z_target"].flatten(0, 1).shape[0],
                "source": int(prepared.groups[g].src_valid.sum())} for g, o in outputs.items() if "z_target" in o}
    for r in rows.values():  # the projections each term sorts (fewer past the sort budget)
        r["projections"] = {k: projections_for(min(r[k], spec.method.rdm_max_samples or r[k]),
                                               spec.method.num_projections, spec.method.rdm_sort_budget)
                            for k in ("target", "source")}
    gen = torch.Generator().manual_seed(0)
    rdm_times = []
    for _ in range(max(2, args.repeats)):
        leaves = {g: {k: (v.detach().requires_grad_(True) if k in ("z_target", "z_source") else v)
                      for k, v in o.items()} for g, o in outputs.items()}
        t0 = time.perf_counter()
        group_rdm(leaves, prepared.groups, gen, spec.method.mu_target, spec.method.sigma_target,
                  spec.method.num_projections, spec.method.rdm_max_samples, spec.method.rdm_sort_budget,
                  directions=spec.method.rdm_directions).backward()
        rdm_times.append(time.perf_counter() - t0)
    rdm_s = min(rdm_times)
    parts = {k: round(mean(f"time_{k}_s"), 4) for k in ("nets_forward", "rdm", "nets_backward", "optimizer", "target")}
    table |= {
        "step_s": round(net_s + target_s, 4), "step_transfer_net_s": round(net_s, 4),
        "step_target_model_s": round(target_s, 4), "transfer_net_share": round(net_s / (net_s + target_s), 3),
        "step_parts_s": parts,
        "rdm": {"projections": spec.method.num_projections, "max_samples": spec.method.rdm_max_samples,
                "sort_budget": spec.method.rdm_sort_budget, "directions": spec.method.rdm_directions,
                "rows_per_group": rows, "forward_backward_s": round(rdm_s, 4),
                "share_of_step": round(rdm_s / (net_s + target_s), 3)},
    }
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
