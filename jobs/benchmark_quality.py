"""Does the fused adapter carry the source expert's knowledge? The transfer protocol on real models.

    python jobs/benchmark_quality.py --data ../shared/data/uie --out runs/bench-quality --resume

Target: SmolLM2-135M-Instruct with its own expert on --target-task; source: a Gemma-3-270M expert on
--source-task (both bases from the PyPI GGUF zoo, experts trained here and cached by content hash). Headline
setting: no label of the source task anywhere in training. The replay holds --target-task records only; the
source task's training inputs (outputs stripped) are the `teach:` prompts the source expert answers.

Every trained method uses one spec (same objective, steps, added rank) and differs only in its strategy: the fused
strategy (heterofusion with the grounded net), `distill_only` (the target's LoRA trained on the same objective
without transfer networks), `added_rank_only` (only the added rank trained, the target's B kept: the part of
heterofusion that is not its transfer networks; run it with --methods), and the retrained controls, whose source
adapter is replaced everywhere, the teacher included (zero / random / spectrum-matched / layer-shuffled sources,
and a wrong-task expert of the source family): heterofusion's by default, and with --methods distill_only's own
(`distill_zero_sources`, ..., `distill_wrong_task`: its teacher replaced). Each trained method gets its own lr: a
sweep over --lr-grid at the first seed, scored on a validation split carved from the training pools (never the test
split, never in the replay or the prompts); the chosen lr is the one with the best source-task validation F1 among
those that keep the target task within 1 SE of target_only on validation. Then it runs once per seed at that lr.
`--lr-of METHOD=LR` gives a method the lr an earlier sweep chose for it, so methods tuned apart are still compared
pair by pair in one table. `--report-only` prints the table and verdict from the runs these settings need when
every one is finished, and otherwise names those that are not and trains nothing.

Statistics, computed here: F1 on >= 100 held-out test records per task (never seen in training); for each
method and each control a paired bootstrap 95% CI over test records of (method - control), seeds averaged;
"gap recovered" = (method - target_only) / (source expert on its own base - target_only) on the source task;
the target task must stay within 1 bootstrap SE of target_only. The job prints the verdict it computed.

The trained runs go through :func:`hetero_ray.sweep.run_sweep`: with --parallel N they run N at a time on a Ray
cluster (a local one by default), each holding --threads CPUs and evaluated in its own task; with --parallel 1
one after another in this process. Same adapters either way (each run seeds itself and uses --threads threads).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hetero_ray.contrib.evaluate import (  # noqa: E402
    bootstrap_se,
    example_counts,
    generate,
    load_model,
    micro_f1,
    paired_bootstrap,
    task_kind,
)
from hetero_ray.contrib.experts import ExpertSettings, cached_expert  # noqa: E402
from hetero_ray.contrib.zoo import get_model  # noqa: E402
from hetero_ray.strategies import STRATEGIES  # noqa: E402
from hetero_ray.sweep import SweepRun, run_sweep  # noqa: E402
from hetero_ray.train.replay import load_records  # noqa: E402

SIZES = {
    # 2 CPU cores: 9-14 min per distill_only-form run with its test evaluation, 16-24 min per heterofusion-form
    # run, 2 runs at a time with 1 thread each. 150 prompts for 2 epochs: the setting chosen on validation
    # (docs/results.md, "More teaching signal"); before commit 436df1b the default was 120 prompts for 1
    # epoch (grid 5e-4 1e-3 2e-3).
    "cpu": dict(expert_steps=40, expert_batch=4, test_n=100, teach_n=150, replay_n=32, epochs=2, batch_size=4,
                grad_accum=1, max_length=192, max_new_tokens=48, extra_rank=8, seeds=[0, 1, 2, 3, 4],
                val_n=50, lr_grid=[2.5e-4, 5e-4, 1e-3], name_lr=5e-4, name_teach_n=120),
    # tiny local models, seconds: exercises every stage (tests/jobs/test_benchmark_quality.py)
    "smoke": dict(expert_steps=3, expert_batch=2, test_n=6, teach_n=6, replay_n=4, epochs=1, batch_size=2,
                  grad_accum=1, max_length=96, max_new_tokens=8, extra_rank=2, seeds=[0, 1],
                  val_n=4, lr_grid=[1e-3, 3e-3], name_lr=1e-3, name_teach_n=6),
}
# name_lr / name_teach_n: runs at this lr, and the prompts file of this many prompts, are named without the
# number ("distill_only-0", "mit-restaurant-prompts"); others carry it ("distill_only-lr0.001-0",
# "mit-restaurant-prompts-150"). Fixed, not the defaults, so that an --out directory of earlier runs keeps
# its names whatever the defaults become (a run is reused by name and spec).
FUSED = ["heterofusion", "distill_only"]  # the candidates for "the fused strategy"
# the retrained controls: heterofusion's (source replaced in its tokens and its teacher), then distill_only's
# (teacher replaced; run them with --methods). A fused strategy must beat every control the job ran.
CONTROLS = ["zero_sources", "random_sources", "spectrum_sources", "shuffled_layers", "wrong_task_expert",
            "replay_only"]
DISTILL_CONTROLS = ["distill_zero_sources", "distill_random_sources", "distill_spectrum_sources",
                    "distill_shuffled_layers", "distill_wrong_task"]
# benchmark methods that are a registered strategy run with another source: the source family's expert on
# --wrong-task teaches (and, for heterofusion, gives the tokens) instead of the --source-task expert
VARIANTS = {"wrong_task_expert": "heterofusion", "distill_wrong_task": "distill_only"}
# what heterofusion's transfer nets are compared with on the source task (the "Transfer nets vs" lines)
NETS_BASELINES = ["distill_only", "added_rank_only"]
DEFAULT_METHODS = ["target_only", *FUSED, *CONTROLS]
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def task_file(data: Path, task: str) -> Path:
    found = sorted(data.glob(f"{task}*.json"))
    if not found:
        raise SystemExit(f"{data}: no file for task {task!r}")
    return found[0]


def split(data: Path, task: str, test_n: int) -> tuple[list[dict], list[dict]]:
    """(training pool, held-out test): a seeded shuffle of the file; the last ``test_n`` records are the test
    split, never used in training."""
    records = load_records(task_file(data, task), "all")
    if test_n >= len(records):
        raise SystemExit(f"{task}: {len(records)} records, cannot hold out {test_n}")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(1234)).tolist()
    return [records[i] for i in order[:-test_n]], [records[i] for i in order[-test_n:]]


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def lora_factors(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (scale * B, A) of a PEFT LoRA adapter directory (safetensors only)."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise SystemExit(f"{adapter}: per-module rank/alpha patterns are not supported here")
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (r ** 0.5 if cfg.get("use_rslora") else r)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0]
            out[module] = (scale * tensors[key.replace(".lora_A.", ".lora_B.")].double(), a.double())
    return out


def update_parts(adapter: Path, target: Path) -> dict[str, float]:
    """The update's size against the target's, ||.||_F / ||W_target||_F over every module (W = scale * B A):
    ``total``, W_adapter - W_target; ``target_ranks``, the adapter's first r_t ranks (the target's slots, where
    a fused adapter keeps A_t and puts B_t + dB) less the target's; ``added``, its ranks beyond r_t (the added
    rank, `method.extra_rank`). By r x r Gram matrices: ||X Y||^2 = tr(X^T X Y Y^T)."""
    fused, base = lora_factors(adapter), lora_factors(target)
    if set(fused) != set(base):
        raise SystemExit(f"{adapter}: modules differ from the target adapter {target}")

    def sq(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(torch.trace((x.T @ x) @ (y @ y.T)))

    sums = dict.fromkeys(("total", "target_ranks", "added", "den"), 0.0)
    for m, (bt, at) in base.items():
        bf, af = fused[m]
        r = min(at.shape[0], af.shape[0])
        sums["total"] += sq(torch.cat([bf, -bt], 1), torch.cat([af, at], 0))
        sums["target_ranks"] += sq(torch.cat([bf[:, :r], -bt], 1), torch.cat([af[:r], at], 0))
        sums["added"] += sq(bf[:, r:], af[r:])
        sums["den"] += sq(bt, at)
    return {k: (max(v, 0.0) / sums["den"]) ** 0.5 for k, v in sums.items() if k != "den"}


def choose_lr(val: dict[float, dict[str, float]], target_val: float, se: float, tt: str, st: str) -> float:
    """The lr with the best source-task validation F1 among those keeping the target task within 1 SE of
    target_only (all of them when none does); ties go to the better target score, then the smaller lr."""
    keep = [lr for lr, f in val.items() if f[tt] >= target_val - se] or list(val)
    return max(keep, key=lambda lr: (val[lr][st], val[lr][tt], -lr))


def main() -> None:  # noqa: C901 - one job, in the order it runs
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="directory of UIE task files (JSON lists)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-quality"),
                    help="output directory (runs/bench-transfer holds runs at the defaults before 436df1b)")
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--target-task", default="mit-movie")
    ap.add_argument("--source-task", default="mit-restaurant")
    ap.add_argument("--wrong-task", default="WikiANN_en", help="task of the expert teaching the wrong-task controls")
    ap.add_argument("--target", default="smollm2-135m", help="zoo name or local HF model directory")
    ap.add_argument("--source", default="gemma3-270m", help="zoo name or local HF model directory")
    ap.add_argument("--seeds", type=int, nargs="*", default=None)
    ap.add_argument("--methods", nargs="*", default=None, help=f"default: {' '.join(DEFAULT_METHODS)}")
    ap.add_argument("--objective", default='{"paper": 1.0, "distill": 1.0}',
                    help="objective terms and weights (JSON), the same for every trained method")
    ap.add_argument("--method", default="{}", help="more method fields (JSON) for every trained run, e.g. "
                    '\'{"rdm_directions": "iid", "rdm_sort_budget": 1048576}\': RDM as before 7923662')
    ap.add_argument("--net", default="grounded", choices=["paper", "grounded"], help="heterofusion's transfer net")
    ap.add_argument("--lr", type=float, default=None, help="one lr for every trained run (no sweep)")
    ap.add_argument("--lr-grid", type=float, nargs="+", default=None, help="the sweep (default: the size's)")
    ap.add_argument("--lr-of", nargs="+", action="extend", default=[], metavar="METHOD=LR",
                    help="a given lr for these methods (e.g. the one an earlier sweep chose for them), not swept; "
                         "the others take --lr or the sweep")
    ap.add_argument("--teach-n", type=int, default=None,
                    help="source-task prompts that teach (default: the size's; at most the pool less validation)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of every trained run (default: the size's)")
    ap.add_argument("--parallel", type=int, default=1,
                    help="trained runs at once, as a sweep on Ray, each holding --threads CPUs and evaluated in its "
                         "own task (1: one after another in this process)")
    ap.add_argument("--address", default=None, help="the Ray cluster of the sweep (default: a local instance with "
                                                     "--parallel x --threads CPUs)")
    ap.add_argument("--resume", action="store_true", help="reuse what an earlier run of the same settings finished")
    ap.add_argument("--report-only", action="store_true",
                    help="the table and verdict from finished runs only (implies --resume): train nothing; when a "
                         "run these settings need is not finished with them, exit non-zero naming it (the lr sweep's "
                         "runs first, when the sweep is not finished)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: every core, at most 4; 1 leaves a core free)")
    args = ap.parse_args()
    args.resume = args.resume or args.report_only
    if args.report_only and not (args.out / "adapters").is_dir():
        ap.error(f"--report-only: {args.out} holds no finished run (no adapters/ folder)")
    methods = args.methods if args.methods is not None else DEFAULT_METHODS
    unknown = set(methods) - set(STRATEGIES) - set(VARIANTS)
    if unknown:
        ap.error(f"--methods: unknown {sorted(unknown)}; choose from {sorted([*STRATEGIES, *VARIANTS])}")
    size = dict(SIZES[args.size])
    for key, value in (("teach_n", args.teach_n), ("epochs", args.epochs)):
        if value is not None:
            if value < 1:
                ap.error(f"--{key.replace('_', '-')}: at least 1")
            size[key] = value
    seeds = args.seeds if args.seeds is not None else size["seeds"]
    if not seeds:
        ap.error("--seeds: at least one")
    grid = [args.lr] if args.lr else sorted(set(args.lr_grid or size["lr_grid"]))
    given: dict[str, float] = {}
    for item in args.lr_of:
        name, _, value = item.partition("=")
        try:
            lr = float(value)
        except ValueError:
            ap.error(f"--lr-of {item!r}: expected METHOD=LR, e.g. random_sources=1e-3")
        if name not in methods or name == "target_only":
            ap.error(f"--lr-of {item!r}: {name!r} is not a trained method of this run ({' '.join(methods)})")
        if not (math.isfinite(lr) and lr > 0):
            ap.error(f"--lr-of {item!r}: the lr must be a positive number")
        if name in given:
            ap.error(f"--lr-of {item!r}: {name} is given twice")
        given[name] = lr
    objective, method_fields = json.loads(args.objective), json.loads(args.method)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    threads = args.threads or max(1, min(4, os.cpu_count() or 1))
    torch.set_num_threads(threads)
    if args.parallel < 1:
        ap.error("--parallel: at least 1")

    t0 = time.perf_counter()
    target_base, source_base = get_model(args.target), get_model(args.source)
    timings["zoo_s"] = time.perf_counter() - t0
    tt, st, wt = args.target_task, args.source_task, args.wrong_task
    pools, tests, vals = {}, {}, {}
    for t in (tt, st):
        pools[t], tests[t] = split(args.data, t, size["test_n"])
        vals[t] = pools[t][-size["val_n"]:]  # validation: never in the replay or the prompts
        if max(size["replay_n"] if t == tt else 0, size["teach_n"] if t == st else 0) > len(pools[t]) - size["val_n"]:
            raise SystemExit(f"{t}: {len(pools[t])} training records cannot give the replay/prompts and "
                             f"{size['val_n']} validation records")
    splits = {"test": tests, "val": vals}
    kinds = {t: task_kind(tests[t]) for t in (tt, st)}

    t0 = time.perf_counter()
    cache = Path(os.environ.get("HETERO_RAY_CACHE", Path.home() / ".cache/hetero-ray")) / "experts"

    def expert(base: Path, family: str, task: str, records: list[dict]) -> Path:
        settings = ExpertSettings(rank=8, alpha=16, targets=TARGET_MODULES, steps=size["expert_steps"], lr=5e-4,
                                  batch_size=size["expert_batch"], max_length=size["max_length"], seed=0,
                                  extra={"task": task, "family": family})
        try:  # --report-only trains nothing: the expert must be in the cache already
            path, card = cached_expert(cache, f"{family}-{task}", base, records, settings, device=args.device,
                                       train=not args.report_only)
        except FileNotFoundError:
            raise SystemExit(f"--report-only: the {family} expert of {task} is not in {cache} (no run of these "
                             "settings finished here; without --report-only it is trained)") from None
        log(f"expert {family}/{task}: loss {card['loss_first']:.3f} -> {card['loss_last']:.3f}"
            f"{' (cached)' if card.get('cached') else ''}")
        return path

    # the experts saw their task's whole training pool (validation included); the fused runs never see a label
    # of the source task, and the validation records are in neither the replay nor the prompts
    target_expert = expert(target_base, "smollm2", tt, pools[tt])
    source_expert = expert(source_base, "gemma3", st, pools[st])
    wrong_expert = (expert(source_base, "gemma3", wt, split(args.data, wt, size["test_n"])[0])
                    if set(VARIANTS) & set(methods) else None)
    timings["experts_s"] = time.perf_counter() - t0

    # training data: labelled target-task replay; source-task inputs with their outputs removed
    replay = write_jsonl(pools[tt][: size["replay_n"]], out / "data" / f"{tt}-replay.jsonl")
    teach_records = pools[st][: size["teach_n"]]
    # runs are reused by their spec, which names its inputs by path: prompts of another count get another file
    prompts_name = f"{st}-prompts" + ("" if size["teach_n"] == size["name_teach_n"] else f"-{size['teach_n']}")
    teach = write_jsonl([{k: v for k, v in r.items() if k != "output"} for r in teach_records],
                        out / "data" / f"{prompts_name}.jsonl")
    base_spec = {
        "target": {"base": str(target_base), "adapter": str(target_expert)},
        "sources": [{"adapter": str(source_expert), "base": str(source_base), "id": f"gemma3-{st}"}],
        "replay": [{"path": str(replay)}],
        "teach": {"prompts": [{"path": str(teach)}], "max_new_tokens": size["max_new_tokens"], "batch_size": 16},
        "objective": objective,
        "method": {"net": args.net, "extra_rank": size["extra_rank"], **method_fields},
        "training": {"epochs": size["epochs"], "batch_size": size["batch_size"], "grad_accum": size["grad_accum"],
                     "max_length": size["max_length"], "warmup_ratio": 0.05},
        "cluster": {"workers": 1, "zero_stage": 0, "storage": str(out / "state"), "use_gpu": args.device == "cuda"},
        "overwrite": True,
    }

    def tag(method: str, seed: int, lr: float) -> str:  # runs at the size's name_lr are named without it
        return f"{method}-{seed}" if lr == size["name_lr"] else f"{method}-lr{lr:g}-{seed}"

    reports: dict[str, dict] = {}
    eval_dir = out / "eval"
    eval_dir.mkdir(exist_ok=True)

    def evaluate(name: str, base: Path, adapter: Path | None, tasks: list[str], which: str = "test",
                 reuse: bool = False) -> dict[str, list[tuple]]:
        """Per-record counts of ``adapter`` on ``which`` split, cached in eval/ (reused with --resume, or with
        ``reuse`` when this invocation wrote it)."""
        records = splits[which]
        path = eval_dir / (f"{name}.json" if which == "test" else f"{name}.{which}.json")
        key = {"adapter": str(adapter), "weights": (adapter / "adapter_model.safetensors").stat().st_mtime_ns
               if adapter else None, "tasks": tasks, "n": size["test_n"] if which == "test" else size["val_n"]}
        if which != "test":
            key["split"] = which
        if (args.resume or reuse) and path.is_file() and json.loads(path.read_text())["key"] == key:
            return json.loads(path.read_text())["counts"]
        model, tok = load_model(base, adapter, device=args.device)
        counts = {}
        for t in tasks:
            preds = generate(model, tok, records[t], batch_size=20, max_new_tokens=size["max_new_tokens"])
            counts[t] = example_counts(kinds[t], preds, [str(r["output"]) for r in records[t]])
        path.write_text(json.dumps({"key": key, "counts": counts}))
        return counts

    def overrides(method: str, seed: int, lr: float) -> dict:
        o = {"strategy": VARIANTS.get(method, method), "seed": seed, "training.lr": lr}
        if method in VARIANTS:
            o["sources"] = [{"adapter": str(wrong_expert), "base": str(source_base), "id": f"gemma3-{wt}"}]
        return o

    def train(keys: list[tuple[str, int, float]], which: str) -> dict[str, Path]:
        """Train (or reuse) each (method, seed, lr) as one sweep, each run evaluated on ``which`` split in its own
        task; returns name -> adapter. Runs finished earlier in this invocation are reused, not logged again."""
        runs = [SweepRun(tag(m, seed, lr), overrides(m, seed, lr)) for m, seed, lr in keys]

        def not_finished(names: list[str]) -> SystemExit:
            return SystemExit(f"--report-only: {len(names)} run(s) not finished with these settings in {out}: "
                              f"{', '.join(names)} (without --report-only they are trained)")

        if args.report_only:  # checked first so that nothing (spec, table) is written for a refused report
            from hetero_ray.strategies import completed
            from hetero_ray.sweep import sweep_specs

            missing = [name for name, spec in sweep_specs(base_spec, runs, out).items() if not completed(spec)]
            if missing:
                raise not_finished(missing)

        def after(spec, output: Path) -> dict:  # in the run's own process
            torch.set_num_threads(threads)
            c = evaluate(spec.name, target_base, output, [tt, st], which)
            return {f"{which} {t}": micro_f1(c[t]) for t in (tt, st)}

        def on_row(row: dict) -> None:
            if row["name"] in reports:
                return
            if row["status"] == "reused":
                log(f"{row['name']}: reused")
            elif row["status"] == "trained":
                report = json.loads(Path(row["report"]).read_text())
                teacher = "; ".join(f"{k}: {v['answers']} answers, {v['dropped_chunks']}/{v['chunks']} chunks "
                                    f"dropped" for k, v in (report.get("teacher") or {}).items())
                log(f"{row['name']}: {row['seconds']:.0f} s; terms {report['history'][-1]['terms']}; "
                    f"teacher {teacher or 'none'}")

        result = run_sweep(base_spec, runs, out, address=args.address, cpus_per_run=threads,
                           gpus_per_run=1 / args.parallel if args.device == "cuda" else 0,
                           use_ray=args.parallel > 1 and not args.report_only, after=after,
                           resume=True if args.resume else set(reports), on_row=on_row, train=not args.report_only)
        if result.failed:
            raise SystemExit("runs failed: " + "; ".join(f"{r['name']}: {r['error']}" for r in result.failed))
        if result.missing:  # finished when checked above, no longer: --report-only still trains none
            raise not_finished([r["name"] for r in result.missing])
        for row in result.rows:
            reports[row["name"]] = json.loads(Path(row["report"]).read_text())
        return {row["name"]: Path(row["output"]) for row in result.rows}

    if args.parallel > 1 and not args.report_only:
        from hetero_ray.runners.ray.driver import ensure_ray

        ensure_ray(args.address, num_cpus=args.parallel * threads)

    # 1. lr sweep on the validation split, first seed; each trained method gets the lr it does best with
    t0 = time.perf_counter()
    trained = [m for m in methods if m != "target_only"]
    swept_methods = [m for m in trained if m not in given]
    sweep: dict[str, dict[float, dict[str, float]]] = {}
    chosen: dict[str, float] = dict(given)
    target_val = se_val = None
    if len(grid) > 1 and swept_methods:
        c = evaluate("target_only-0", target_base, target_expert, [tt, st], "val")
        target_val, se_val = micro_f1(c[tt]), bootstrap_se([[tuple(x) for x in c[tt]]])
        log(f"validation target_only: {tt} {target_val:.3f} (1 SE {se_val:.3f}), {st} {micro_f1(c[st]):.3f}")
    if len(grid) == 1:
        chosen.update(dict.fromkeys(swept_methods, grid[0]))
    elif swept_methods:
        swept = train([(m, seeds[0], lr) for m in swept_methods for lr in grid], "val")
        for method in swept_methods:
            for lr in grid:
                name = tag(method, seeds[0], lr)
                c = evaluate(name, target_base, swept[name], [tt, st], "val", reuse=True)
                sweep.setdefault(method, {})[lr] = {t: micro_f1(c[t]) for t in (tt, st)}
                log(f"validation {method} lr {lr:g}: " + ", ".join(f"{t} {micro_f1(c[t]):.3f}" for t in (tt, st)))
            chosen[method] = choose_lr(sweep[method], target_val, se_val, tt, st)
            log(f"{method}: lr {chosen[method]:g} chosen")
    timings["sweep_s"] = time.perf_counter() - t0

    # 2. every seed at the chosen lr, seed by seed: a job stopped part way has whole seeds of every method
    # (rerun with --seeds <those> --resume for their statistics)
    t0 = time.perf_counter()
    adapters: dict[str, dict[int, Path]] = {}
    if "target_only" in methods:  # the target's own expert, unchanged
        adapters["target_only"] = {seeds[0]: target_expert}
    if trained:
        paths = train([(m, seed, chosen[m]) for seed in seeds for m in trained], "test")
        for m in trained:
            adapters[m] = {seed: paths[tag(m, seed, chosen[m])] for seed in seeds}
    timings["fusion_s"] = time.perf_counter() - t0

    # 3. evaluation on the held-out test splits; per-record counts kept for the paired bootstrap
    t0 = time.perf_counter()
    counts: dict[str, dict[str, list[list[tuple]]]] = {}
    ratios: dict[str, list[dict[str, float]]] = {}
    teacher_f1: dict[str, float | None] = {}
    gold = [str(r["output"]) for r in teach_records]
    for method, per_seed in adapters.items():
        for seed, path in per_seed.items():
            name = f"{method}-{seed}" if method == "target_only" else tag(method, seed, chosen[method])
            c = evaluate(name, target_base, path, [tt, st], reuse=method != "target_only")
            for t in (tt, st):
                counts.setdefault(method, {}).setdefault(t, []).append([tuple(x) for x in c[t]])
            ratios.setdefault(method, []).append(update_parts(path, target_expert))
            log(f"eval {method} seed {seed}: " + ", ".join(f"{t} {micro_f1(c[t]):.3f}" for t in (tt, st)))
            # how good the run's teacher was on the prompts it answered (their labels are known here only)
            for sid, summary in ((reports.get(name) or {}).get("teacher") or {}).items():
                sig = out / "state" / "teacher-cache" / f"{sid}-{summary.get('key')}" / "signals.json"
                if method not in teacher_f1 and sig.is_file():
                    answers = [it["answer"] for it in json.loads(sig.read_text())["items"]]
                    teacher_f1[method] = micro_f1(example_counts(kinds[st], answers, gold[: len(answers)]))
    ref = evaluate("source-expert-own-base", source_base, source_expert, [st])[st]
    ref_f1 = micro_f1(ref)
    log(f"reference: gemma3 expert on {st}, own base: {ref_f1:.3f}")
    timings["eval_s"] = time.perf_counter() - t0

    # 4. statistics and verdict
    scores = {m: {t: [micro_f1(x) for x in per[t]] for t in (tt, st)} for m, per in counts.items()}
    mean = {m: {t: statistics.fmean(v) for t, v in per.items()} for m, per in scores.items()}
    base_st = mean.get("target_only", {}).get(st)
    se_tt = bootstrap_se(counts["target_only"][tt]) if "target_only" in counts else None
    verdicts = {}
    for m in (x for x in FUSED if x in counts):
        vs = {c: paired_bootstrap(counts[m][st], counts[c][st]) for c in CONTROLS + DISTILL_CONTROLS if c in counts}
        gap = ((mean[m][st] - base_st) / (ref_f1 - base_st)) if base_st is not None and ref_f1 > base_st else None
        keeps = None if se_tt is None else mean[m][tt] >= mean["target_only"][tt] - se_tt
        beats = bool(vs) and all(v["lo"] > 0 for v in vs.values())
        # against the target's own expert, on both tasks: a control can fall below it (a teacher that knows
        # nothing teaches a format that scores 0), so beating the controls alone says little
        own = ({t: paired_bootstrap(counts[m][t], counts["target_only"][t]) for t in (tt, st)}
               if "target_only" in counts else {})
        verdicts[m] = {"vs_controls": vs, "vs_target_only": own, "gap_recovered": gap, "keeps_target_task": keeps,
                       "beats_every_control": beats,
                       "pass": bool(beats and gap is not None and gap >= 0.6 and keeps)}
    # what the transfer nets add: against the target's LoRA trained directly, and against the added rank alone
    nets_vs = {b: paired_bootstrap(counts["heterofusion"][st], counts[b][st])
               for b in NETS_BASELINES if {"heterofusion", b} <= set(counts)}

    def cell(values: list[float]) -> str:
        return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"

    lr_note = (f"lr per method from a sweep over {grid} on {size['val_n']} validation records per task"
               if len(grid) > 1 else f"lr {grid[0]:g} for every method")
    if given:
        lr_note = (f"lr given for {', '.join(f'{m} {lr:g}' for m, lr in given.items())} (--lr-of)"
                   + (", for the others " + lr_note.replace(" for every method", "")
                      if swept_methods else ""))
    lines = [f"Target SmolLM2-135M with its {tt} expert; source Gemma-3-270M {st} expert; no {st} label in training "
             f"({len(teach_records)} {st} prompts teach, {size['replay_n']} labelled {tt} records "
             f"replay). F1 on {size['test_n']} held-out records per task, mean ± std over seeds {seeds}; {lr_note}; "
             f"objective {objective}, {size['epochs']} epoch(s), added rank {size['extra_rank']}, heterofusion net "
             f"{args.net}; "
             f"wrong_task_expert / distill_wrong_task: the Gemma-3 {wt} expert. ‖ΔW‖/‖W_t‖: the update's size "
             f"against the target expert's (all modules, W = scale·B·A), and its two parts: in the target's "
             f"ranks (dB, from the transfer nets or trained directly) and in the added rank. Teacher F1: the run's "
             f"teacher's answers on the {st} prompts against their (unused) labels.", "",
             f"| method | seeds | lr | ‖ΔW‖/‖W_t‖ | in target ranks | in added rank | teacher F1 | {tt} | {st} |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, per in scores.items():
        lr_cell = f"{chosen[m]:g}" if m in chosen else "–"
        tf = f"{teacher_f1[m]:.3f}" if teacher_f1.get(m) is not None else "–"
        size_cells = " | ".join(f"{statistics.fmean(x[k] for x in ratios[m]):.3f}"
                                for k in ("total", "target_ranks", "added"))
        lines.append(f"| {m} | {len(per[tt])} | {lr_cell} | {size_cells} | {tf} | "
                     f"{cell(per[tt])} | {cell(per[st])} |")
    lines += ["", f"Reference: the Gemma-3 {st} expert on its own base: {ref_f1:.3f}. Target task 1 SE "
              f"(bootstrap, target_only): {se_tt:.3f}." if se_tt is not None else "", ""]
    if sweep:
        lines += ["Validation sweep (first seed; " + f"{tt} / {st} F1): " + "; ".join(
            f"{m}: " + ", ".join(f"{lr:g} {f[tt]:.3f}/{f[st]:.3f}" for lr, f in per.items())
            for m, per in sweep.items()), ""]
    for m, v in verdicts.items():
        lines.append(f"**{m}** on {st}: " + "; ".join(f"vs {c} {x['diff']:+.3f} [{x['lo']:+.3f}, {x['hi']:+.3f}]"
                                                     for c, x in v["vs_controls"].items()))
        if v["vs_target_only"]:
            lines.append("  vs target_only: " + "; ".join(f"{t} {x['diff']:+.3f} [{x['lo']:+.3f}, {x['hi']:+.3f}]"
                                                         for t, x in v["vs_target_only"].items()))
        gap = "n/a" if v["gap_recovered"] is None else f"{100 * v['gap_recovered']:.0f}%"
        lines.append(f"  gap recovered {gap}; {tt} kept within 1 SE: {v['keeps_target_task']}; beats every control "
                     f"(95% CI > 0): {v['beats_every_control']}. Verdict: {'PASS' if v['pass'] else 'FAIL'}.")
    for b, x in nets_vs.items():
        lines.append(f"Transfer nets vs {b} on {st}: {x['diff']:+.3f} [{x['lo']:+.3f}, {x['hi']:+.3f}] "
                     f"({'nets better' if x['lo'] > 0 else f'{b} better' if x['hi'] < 0 else 'no difference'}).")
    lines += ["", "Stage times: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timings.items())]
    md = "\n".join(lines) + "\n"
    (out / "results.md").write_text(md)
    settings = {"size": args.size, **size, "seeds": seeds, "lr_grid": grid, "objective": objective, "net": args.net,
                "method": method_fields, "lr_given": given,
                "target_task": tt, "source_task": st, "wrong_task": wt, "target": str(target_base),
                "source": str(source_base), "parallel": args.parallel, "threads": threads,
                "device": args.device}
    (out / "results.json").write_text(json.dumps({"settings": settings, "timings_s": timings, "scores": scores,
                                                  "lr": chosen, "sweep": sweep,
                                                  "update_ratio": {m: [x["total"] for x in v]
                                                                   for m, v in ratios.items()},
                                                  "update_parts": ratios,
                                                  "teacher_f1": teacher_f1, "reference": {st: ref_f1},
                                                  "target_se": se_tt,
                                                  "adapters": {m: {str(k): str(v) for k, v in per.items()}
                                                               for m, per in adapters.items()},
                                                  "verdicts": verdicts, "nets_vs": nets_vs},
                                                 indent=1, default=str))
    print(md)


if __name__ == "__main__":
    main()
