"""The aggregator: a Ray Train (V2) worker loop that trains the transfer networks under DeepSpeed.

Every worker builds the frozen target, reads the whole tokenized replay and takes its round-robin share of
each accumulation window, so a run with N workers follows the same optimizer trajectory as one worker. The
transfer networks are shared in one of two ways (``cluster.partition``, resolved by the driver):

- ``groups``: each worker owns whole module groups (:mod:`hetero_ray.train.partition`): it reads only their
  candidates (its own Ray Data stream), builds and trains only their nets, and exchanges dB and the modules'
  gradients with the others once per window. DeepSpeed sees the groups as model-parallel ranks (each its
  own data-parallel group of one), so it checkpoints each worker's part; the owners clip by the norm over
  every part themselves (``clip_over_owners``), with DeepSpeed's clipping off.
- ``replicate``: every worker holds every net and every candidate, and DeepSpeed ZeRO (stage 0/1/2/3)
  shards their states and averages their gradients.

torch AdamW; fp32 or bf16. Metrics are reported every step, DeepSpeed checkpoints every epoch; a restarted
worker group or a re-run of the same spec resumes from the latest one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

FINAL_DELTAS = "final_deltas.safetensors"
FINAL_STATE = "final_state.json"
TRAIN_STATE = "train_state.json"


def deepspeed_config(zero_stage: int, dtype: str, max_grad_norm: float | None = None) -> dict:
    return {
        # explicit: DeepSpeed's own default clips at 1.0, which the in-process reference would not do
        "gradient_clipping": max_grad_norm or 0.0,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,  # accumulation is the objective's window, not DeepSpeed's
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": dtype == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def zero_stage(spec, owners) -> int:
    """The ZeRO stage DeepSpeed runs: the spec's with replicated nets; 0 when each worker owns its groups
    (a data-parallel group of one has nothing to shard, and ZeRO-3 requires the same modules on every rank)."""
    return 0 if owners else spec.cluster.zero_stage


def peak_rss_mib() -> float:
    """This process's peak resident memory (MiB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def rss_parts_mib() -> dict[str, float]:
    """This process's resident memory now (MiB) from /proc: ``anon`` (its own heap), ``shmem`` (shared
    memory it has touched: Ray's object store) and ``file`` (mapped files); empty where there is no /proc."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    fields = {"RssAnon:": "anon", "RssShmem:": "shmem", "RssFile:": "file"}
    return {fields[w[0]]: round(int(w[1]) / 1024, 1) for w in map(str.split, lines) if w and w[0] in fields}


def preload_libraries() -> None:
    """Import what the train loop would otherwise import on first use (transformers' model and config
    classes, PEFT, the schedule, Ray Data's streaming executor), so that the memory baseline holds every
    library's code and the growth over it is what the run reads and builds."""
    import peft  # noqa: F401
    import ray.data._internal.execution.streaming_executor  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, get_cosine_schedule_with_warmup  # noqa: F401


class MemoryTrace:
    """A worker's resident memory at the marks of its run (``rss_parts_mib`` and the peak RSS so far), the
    first taken with every library imported (``preload_libraries``) and nothing read or built: the baseline
    of the growth that `hetero-ray check` estimates (jobs/benchmark_scale.py compares the two). ``MARKS``:
    their order in a run (the report's JSON sorts them by name)."""

    MARKS = ("start", "candidates_read", "groups_assembled", "target_loaded", "setup", "first_step", "end")

    def __init__(self):
        self.marks: dict[str, dict[str, float]] = {}
        self.mark("start")

    def mark(self, name: str) -> None:
        self.marks[name] = {**rss_parts_mib(), "peak": round(peak_rss_mib(), 1)}


def memory_growth(marks: dict[str, dict[str, float]], until: str | None = None) -> dict[str, float] | None:
    """What a worker's run added to its memory (MiB), from its ``MemoryTrace`` marks: ``total``, the peak RSS
    over the baseline; ``setup``, the same at the end of setup; ``shared`` and ``file``, the largest growth
    of the object store's pages and of mapped files; ``own`` = total - shared - file, its own heap at the
    peak (what `hetero-ray check` estimates). ``until``: only the marks up to that one (``MARKS`` order), e.g.
    ``first_step`` (later steps add what the allocator keeps); None where the run has no such mark."""
    if until is not None:
        if until not in marks:
            return None
        names = [k for k in MemoryTrace.MARKS if k in marks]
        marks = {k: marks[k] for k in names[: names.index(until) + 1]}
    start = marks["start"]
    base = start["anon"] + start["shmem"] + start["file"]
    shared, file = (max(m[k] for m in marks.values()) - start[k] for k in ("shmem", "file"))
    total = max(m["peak"] for m in marks.values()) - base
    out = {"total": total, "setup": marks["setup"]["peak"] - base if "setup" in marks else None,
           "shared": shared, "file": file, "own": total - shared - file}
    return {k: None if v is None else round(v, 1) for k, v in out.items()}


def partition_numel(module: torch.nn.Module) -> int:
    """Parameters held by this rank: its ZeRO-3 partition, or every parameter below stage 3."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())


class OwnGroupsParallel:
    """DeepSpeed's model-parallel interface for workers that own disjoint groups: all workers form the
    model-parallel group (each checkpoints its own part), each worker is a data-parallel group of its own
    (nothing to average or shard). Gradient clipping is the owners' own (``clip_over_owners``)."""

    def __init__(self):
        import torch.distributed as dist

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        alone = [dist.new_group([r]) for r in range(self.world)]  # every rank creates every group, in order
        self.alone = alone[self.rank]
        self.everyone = dist.new_group(list(range(self.world)))

    def get_model_parallel_rank(self):
        return self.rank

    def get_model_parallel_world_size(self):
        return self.world

    def get_model_parallel_group(self):
        return self.everyone

    def get_data_parallel_rank(self):
        return 0

    def get_data_parallel_world_size(self):
        return 1

    def get_data_parallel_group(self):
        return self.alone

    def get_data_parallel_group_ranks(self):
        return [self.rank]


def candidate_streams(owners: list[list[str]] | None) -> list[str]:
    """The candidate Datasets' names: with owners (``cluster.partition: groups``) one per worker, holding its
    groups' candidates; else one, which every worker reads whole."""
    return [f"candidates_{r}" for r in range(len(owners))] if owners else ["candidates"]


def _read_candidates(name: str):
    import ray.train

    from hetero_ray.tokens.candidates import candidates_from_arrow

    shard = ray.train.get_dataset_shard(name)
    return [c for t in shard.iter_batches(batch_format="pyarrow", batch_size=None) for c in candidates_from_arrow(t)]


def _read_replay():
    import ray.train

    from hetero_ray.train.replay import Example

    shard = ray.train.get_dataset_shard("replay")
    rows = [r for b in shard.iter_batches(batch_format="pyarrow", batch_size=None) for r in b.to_pylist()]
    rows.sort(key=lambda r: r["index"])
    return [Example(list(r["input_ids"]), list(r["labels"])) for r in rows]


def _read_teacher():
    import ray.train

    from hetero_ray.train.replay import Example

    shard = ray.train.get_dataset_shard("teacher")
    rows = [r for b in shard.iter_batches(batch_format="pyarrow", batch_size=None) for r in b.to_pylist()]
    rows.sort(key=lambda r: r["index"])
    return [Example(list(r["input_ids"]), list(r["labels"]), [tuple(c) for c in json.loads(r["chunks"])],
                    json.loads(r["weight"]), json.loads(r["chunk_weight"])) for r in rows if r["index"] >= 0]


def train_loop(config: dict) -> None:
    """Ray Train entry point; ``config`` holds the resolved spec, the alignment plan and the block size."""
    from hetero_ray.spec import FusionSpec

    spec = FusionSpec.model_validate(config["spec"])
    if not spec.cluster.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray
    import ray.train
    import ray.train.torch
    from safetensors.torch import save_file

    from hetero_ray.align import AlignmentPlan
    from hetero_ray.denoise.fusion import assemble_groups, attention_mass, group_diagnostics
    from hetero_ray.runners.prepare import build_net, objective_weights, open_target
    from hetero_ray.runners.ray.faults import maybe_fail
    from hetero_ray.train.partition import GroupExchange, by_group, exchange_shapes, owner_of_extra
    from hetero_ray.train.target import load_target
    from hetero_ray.train.trainer import FusionObjective, clip_over_owners, cosine_schedule, time_step

    preload_libraries()
    memory = MemoryTrace()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    plan = AlignmentPlan.from_dict(config["plan"])
    block = config["block_size"]
    owners = config.get("partition")  # each rank's groups, or None: every net on every rank
    t0 = time.perf_counter()
    target, ttopo = open_target(spec)
    own = owners[rank] if owners else None
    cands = (_read_candidates(candidate_streams(owners)[rank if owners else 0])
             if spec.control.reads_sources else None)
    memory.mark("candidates_read")
    device = ray.train.torch.get_device() if spec.cluster.use_gpu else torch.device("cpu")
    groups = {n: g.to(device) for n, g in assemble_groups(plan, target, ttopo, cands, block, own).items()}
    candidate_rows = len(cands or ())
    memory.mark("groups_assembled")
    del cands  # the groups hold the tokens now: the candidate list is not kept beside them
    examples = _read_replay()
    model = load_target(spec.target.base, target).to(device)
    teacher = _read_teacher()
    extra_paths = ([p for p, r in owner_of_extra(list(target.modules), world).items() if r == rank]
                   if owners else None)
    memory.mark("target_loaded")
    net = build_net(spec, plan, block, groups, target, extra_paths)
    exchange, mpu, patched = None, None, set(target.modules) if spec.method.extra_rank else set()
    if owners:
        mpu = OwnGroupsParallel()
        exchange = GroupExchange(exchange_shapes(plan, target, spec.method.extra_rank), mpu.everyone)
        patched |= set(plan.fused_modules())
    objective = FusionObjective(model, groups, spec.method, examples, config["pad_id"], spec.seed,
                                objective_weights(spec), teacher, extra_modules=sorted(patched), exchange=exchange,
                                n_groups=len(plan.groups()) if owners else None)
    windows = objective.steps(spec.training, spec.seed, rank, world)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.training.lr, weight_decay=spec.training.weight_decay)
    scheduler = cosine_schedule(optimizer, len(windows), spec.training.warmup_ratio)
    engine, *_ = deepspeed.initialize(model=net, optimizer=optimizer, lr_scheduler=scheduler, mpu=mpu,
                                      # owners clip by the norm over every owner's part themselves
                                      # (DeepSpeed's bf16 path would count rank 0's part only)
                                      config=deepspeed_config(zero_stage(spec, owners), spec.cluster.dtype,
                                                              None if owners else spec.training.max_grad_norm),
                                      dist_init_required=False)
    setup_s = time.perf_counter() - t0
    memory.mark("setup")

    start, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag="ds")
            state = json.loads((Path(d) / TRAIN_STATE).read_text())
            start, history = state["step"], state["history"]

    per_epoch = max(1, math.ceil(len(windows) / spec.training.epochs))
    ends = []  # when each step ended, its report (and checkpoint) included: the step as the run lives it
    for step in range(start, len(windows)):
        maybe_fail("worker", step)
        surrogate, metrics = objective.window(engine, windows[step])
        t0 = time.perf_counter()
        engine.backward(surrogate)
        t1 = time.perf_counter()
        if exchange is not None and spec.training.max_grad_norm:
            clip_over_owners(params, spec.training.max_grad_norm, exchange)
        engine.step()
        time_step(metrics, t1 - t0, time.perf_counter() - t1)
        metrics.update(step=step + 1, total_steps=len(windows), lr=scheduler.get_last_lr()[0], rank=rank)
        history.append(metrics)
        if step == start:
            memory.mark("first_step")
        done = step + 1
        if done % per_epoch == 0 or done == len(windows):
            _report_checkpoint(engine, rank, done, history, metrics)
        else:
            ray.train.report(_flat(metrics))
        ends.append(time.perf_counter())

    deltas, outputs = objective.final_deltas(engine)
    diagnostics = {**group_diagnostics(outputs), "attention_mass": attention_mass(outputs, groups, len(spec.sources))}
    if exchange is not None:  # every owner's groups
        diagnostics = by_group(exchange.merge(diagnostics), list(diagnostics))
    memory.mark("end")
    with tempfile.TemporaryDirectory() as d:
        state = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
                 "partition_numel": partition_numel(engine.module),
                 "total_numel": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                    for p in engine.module.parameters()),
                 "groups": sorted(groups), "candidate_rows": candidate_rows,
                 "group_bytes": sum(t.nbytes for g in groups.values() for t in vars(g).values() if torch.is_tensor(t)),
                 "memory_mib": memory.marks}
        (Path(d) / f"partition_rank{rank}.json").write_text(json.dumps(state))
        if rank == 0:
            save_file({k: v.contiguous() for k, v in deltas.items()}, str(Path(d) / FINAL_DELTAS))
            final = {"history": history, **diagnostics, "setup_s": setup_s,
                     "step_wall_s": (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else None,
                     "partition": "groups" if owners else "replicate", "zero_stage": zero_stage(spec, owners)}
            (Path(d) / FINAL_STATE).write_text(json.dumps(final))
        ray.train.report({"final": 1, "step": len(windows)}, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name="final")
    objective.patch.remove()


def _flat(metrics: dict) -> dict:
    out = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update({f"{k}/{g}": x for g, x in v.items()})
    return out


def _report_checkpoint(engine, rank, step, history, metrics) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag="ds")
        if rank == 0:
            (Path(d) / TRAIN_STATE).write_text(json.dumps({"step": step, "history": history}))
        ray.train.report(_flat(metrics), checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"step_{step:06d}")
