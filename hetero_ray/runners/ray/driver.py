"""The distributed fusion: FamilyActors -> Ray Data -> DeepSpeed aggregator on Ray Train -> writer.

Inputs (adapters, base model, replay files) must be readable at the same paths from every node (a shared
filesystem); run state and checkpoints go to ``cluster.storage`` (a local path or any pyarrow filesystem URI).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import torch

from hetero_ray.align import AlignmentPlan
from hetero_ray.console import quiet_requested
from hetero_ray.errors import ClusterError, HeteroRayError
from hetero_ray.io.export import export_fused_adapter
from hetero_ray.progress import progress_sink, train_callback
from hetero_ray.runners.local import FusionResult, build_report, fusion_card
from hetero_ray.runners.prepare import (
    group_owners,
    input_hashes,
    net_configs,
    objective_weights,
    open_and_align,
    replay_examples,
    require_trained,
)
from hetero_ray.runners.ray import faults
from hetero_ray.runners.ray.actors import FamilyActor
from hetero_ray.runners.ray.aggregator import FINAL_DELTAS, FINAL_STATE, candidate_streams, train_loop
from hetero_ray.spec import FusionSpec
from hetero_ray.teach.signals import signals_summary
from hetero_ray.tokens.candidates import CANDIDATE_SCHEMA
from hetero_ray.train.objectives import OBJECTIVES
from hetero_ray.train.partition import lpt
from hetero_ray.train.replay import load_tokenizer

TASKS_PER_ALIGNER = 2  # alignment tasks per FamilyActor, for balance
WORKER_ENV = {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
# How often the Ray Train controller polls its workers (Ray's default: every 2 s). A worker's
# ``ray.train.report`` blocks until the controller has taken its previous report (a queue of one), so
# reporting every step made each step last about one poll: 9 steps of 0.09 s took 18 s. Ray passes this
# variable from the driver to the controller; a value the user set is kept. Like ensure_ray's variables it
# stays set in this process (another Ray Train run here polls as often).
CONTROLLER_POLL_ENV = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.05")


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (or RAY_ADDRESS); else start a local Ray instance with enough
    logical CPUs that the train workers, the actors and Ray Data tasks cannot starve each other."""
    import ray
    import ray.data

    if ray.is_initialized():
        return
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/hetero-ray/torch_extensions"))
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray's core worker installs a native SIGTERM handler that aborts the process; keep the caller's Python
    # handler (the CLI's turns SIGTERM into a clean exit: no partial output, Ray shut down)
    on_term = signal.getsignal(signal.SIGTERM)
    # on a terminal the workers' log lines still reach the driver, whose output goes to the run's log file
    quiet = {"logging_level": logging.WARNING} if quiet_requested() else {}
    if address:
        ray.init(address=address, runtime_env={"env_vars": WORKER_ENV}, log_to_driver=True, **quiet)
    else:
        ray.init(num_cpus=num_cpus or max(8, 2 * (os.cpu_count() or 1)), include_dashboard=False,
                 _node_ip_address="127.0.0.1", **quiet)
    if callable(on_term) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    # hetero-ray reports its own progress (HETERO_RAY_PROGRESS lines and terminal bars); Ray Data's per-dataset
    # bars from every worker would bury them
    ray.data.DataContext.get_current().enable_progress_bars = False


def check_resources(spec: FusionSpec) -> None:
    """Refuse a run the cluster can never place (Ray Train would wait for worker slots forever)."""
    import ray

    total = ray.cluster_resources()
    c = spec.cluster
    need = c.workers * c.cpus_per_worker
    if need > total.get("CPU", 0):
        raise ClusterError(f"cluster.workers: {c.workers} workers x cluster.cpus_per_worker {c.cpus_per_worker} "
                           f"need {need:g} CPUs, but the Ray cluster has {total.get('CPU', 0):g} CPUs "
                           f"({len(ray.nodes())} node(s)); lower cluster.workers or add nodes")
    if c.use_gpu and c.workers > total.get("GPU", 0):
        raise ClusterError(f"cluster.workers: {c.workers} GPU workers (cluster.use_gpu), but the Ray cluster has "
                           f"{total.get('GPU', 0):g} GPUs")


def check_task_fits(cpus: float, gpus: float, what: str) -> None:
    """Refuse a task that no live node can hold (Ray would keep it pending forever): ``what`` names it."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        biggest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
        raise ClusterError(f"{what} asks for {cpus:g} CPUs and {gpus:g} GPUs, but no node of the cluster has that "
                           f"much (the largest: {biggest.get('CPU', 0):g} CPUs, {biggest.get('GPU', 0):g} GPUs): "
                           "lower cpus_per_run / gpus_per_run")


ACTOR_CPUS = 0.5


def aligners_per_family(cluster_cpus: float, n_families: int) -> int:
    """FamilyActors per family: about one per CPU of the cluster in all (alignment ends before training
    starts), so that 64 sources of 3 families align on as many cores as there are, not on 3."""
    return max(1, math.floor(cluster_cpus / max(1, n_families)))


def layer_chunks(plan: AlignmentPlan, indices: list[int], aligners: int) -> list[tuple[int, list[int] | None]]:
    """(source, a chunk of its aligned target layers, or None for all of them): one alignment task each. A
    source is split only as far as it takes to give each of the family's ``aligners`` about
    TASKS_PER_ALIGNER tasks (few sources on many cores); when there are enough sources, each aligns whole in
    one task, which checks its file with one sum and makes one Arrow table."""
    aligned = [i for i in indices if plan.sources[i].layer_pairs]  # a source aligned to no layer: no task
    per_source = max(1, math.ceil(TASKS_PER_ALIGNER * aligners / max(1, len(aligned))))
    out: list[tuple[int, list[int] | None]] = []
    for i in aligned:
        layers = sorted(plan.sources[i].layer_pairs)
        size = math.ceil(len(layers) / per_source)
        if size >= len(layers):
            out.append((i, None))
            continue
        out += [(i, layers[k : k + size]) for k in range(0, len(layers), size)]
    return out


def layer_costs(plan: AlignmentPlan) -> dict[int, dict[int, int]]:
    """What aligning each source's target layer reads, as a proxy for its time: {source: {target layer:
    (d_in + d_out) x the source's rank, summed over the layer's feeds from that source}}."""
    out: dict[int, dict[int, int]] = {}
    for e in plan.entries:
        for f in e.feeds:
            by_layer = out.setdefault(f.source, {})
            by_layer[e.layer] = by_layer.get(e.layer, 0) + (f.d_in + f.d_out) * f.rank
    return out


def chunk_cost(costs: dict[int, dict[int, int]], source: int, layers: list[int] | None) -> int:
    """One alignment task's cost from :func:`layer_costs`: its source's target ``layers`` (None: all); a
    layer no module of the source feeds costs nothing."""
    by_layer = costs.get(source, {})
    return sum(by_layer.values()) if layers is None else sum(by_layer.get(x, 0) for x in layers)


def assign_tasks(costs: list[int], actors: int, reserve_first: bool = False) -> list[int]:
    """Each alignment task's actor (an index below ``actors``) by :func:`~hetero_ray.train.partition.lpt`,
    the largest first to the least loaded: sources of very different sizes in one family (ranks 8 and 64,
    say) no longer pile up on one actor, as handing them out in turn could; equal costs go in turn.
    ``reserve_first``: the first actor takes a task only when it is the only one (it teaches every source:
    a teacher's generation takes far longer than an alignment, though a cached one takes nothing)."""
    actors = max(1, actors)
    loads = [math.inf if reserve_first and actors > 1 and k == 0 else 0.0 for k in range(actors)]
    return lpt(costs, actors, loads)


def empty_candidates():
    import ray

    return ray.data.from_arrow(CANDIDATE_SCHEMA.empty_table())


def align_sources(spec: FusionSpec, plan: AlignmentPlan, block: int, on_progress: Callable | None = None,
                  candidates: bool = True, teach: bool = False, *, opened: list,
                  owners: list[list[str]] | None = None):
    """FamilyActors per family present: every source (or chunk of its target layers, :func:`layer_chunks`) is
    one actor task, spread over ``aligners_per_family`` actors of the family by size (:func:`assign_tasks`) so
    that many sources of few families align in parallel;
    with ``teach`` every source's teacher signals one more task, all on the family's first actor (its base
    model is loaded once), which then takes alignment tasks only when it is the family's one actor.
    ``opened``: every source as :func:`open_and_align` opened it (adapter, topology), handed to its family's
    actors so that they need not open it again. Returns the candidate Datasets, materialized once in the
    object store (None without ``candidates``): ``{"candidates": ...}``, or with ``owners`` (each worker's
    groups, ``cluster.partition: groups``) one per worker, ``{"candidates_RANK": ...}``, each task's table
    split by owner where it is made; and the teacher signals in source order."""
    import ray

    families: dict[str, list[int]] = {}
    for s in plan.sources:
        families.setdefault(s.family, []).append(s.index)
    gpus = {}
    if teach and spec.cluster.use_gpu:  # teachers run their models on a GPU share
        gpus = {"num_gpus": min(1.0, ray.cluster_resources().get("GPU", 0) / max(1, len(families)))}
    # logical CPUs, but no more than this machine's cores per node: a local Ray reports more than it has
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    cpus = min(ray.cluster_resources().get("CPU", 1), (os.cpu_count() or 1) * max(1, nodes))
    pool_size = aligners_per_family(cpus, len(families))
    aligners = pool_size - 1 if teach and pool_size > 1 else pool_size  # the first actor teaches (assign_tasks)
    chunks = {fam: layer_chunks(plan, indices, aligners) if candidates else [] for fam, indices in families.items()}
    costs = layer_costs(plan)
    spec_json, plan_json = spec.model_dump(mode="json"), plan.to_dict()
    given = {fam: ray.put({i: opened[i] for i in indices}) for fam, indices in families.items()}
    actors = {
        fam: [FamilyActor.options(num_cpus=ACTOR_CPUS, runtime_env=faults.runtime_env(), **(gpus if k == 0 else {}))
              .remote(spec_json, fam, plan_json, block, given[fam])
              for k in range(max(1, min(pool_size, len(chunks[fam]) + (1 if teach and chunks[fam] else 0))))]
        for fam in families
    }
    names = candidate_streams(owners)
    refs: list[list] = [[] for _ in names]  # per candidate Dataset (one per owner), in task order
    what, teach_refs = {}, {}
    for fam, indices in families.items():
        for i in indices if teach else []:
            ref = actors[fam][0].teach.remote(i)
            teach_refs[i] = ref
            what[ref] = (fam, plan.sources[i].source_id, "teacher", 0)
        owner = assign_tasks([chunk_cost(costs, i, chunk) for i, chunk in chunks[fam]], len(actors[fam]), teach)
        for (i, chunk), k in zip(chunks[fam], owner, strict=True):
            out = actors[fam][k].candidates.options(num_returns=len(names)).remote(i, chunk, owners)
            out = out if len(names) > 1 else [out]
            for r, ref in enumerate(out):
                refs[r].append(ref)
            ref = out[0]  # a task's returns are ready together
            layers = "all" if chunk is None else f"{chunk[0]}-{chunk[-1]}"
            what[ref] = (fam, plan.sources[i].source_id, layers, k)
    per_family = {fam: sum(1 for f, *_ in what.values() if f == fam) for fam in families}
    pending, done = list(what), 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)  # wakes for SIGTERM / Ctrl-C
        if not ready:
            continue
        ray.get(ready)  # surfaces an alignment error at once
        done += 1
        if on_progress:
            fam, source_id, layers, aligner = what[ready[0]]
            on_progress({"stage": "align", "done": done, "total": len(what), "family": fam,
                         "family_total": per_family[fam], "source_id": source_id, "layers": layers,
                         "aligner": aligner})
    streams = None
    if candidates:
        streams = {name: (ray.data.from_arrow_refs(part) if part else empty_candidates()).materialize()
                   for name, part in zip(names, refs, strict=True)}
    signals = [ray.get(teach_refs[i]) for i in sorted(teach_refs)]
    for pool in actors.values():
        for actor in pool:
            ray.kill(actor)
    return streams, signals


def teacher_dataset(spec: FusionSpec, signals: list[dict], tokenizer):
    """The teacher examples (each source's answers, target-tokenized, with their chunk excess) as a Dataset."""
    import ray

    from hetero_ray.teach.signals import teacher_examples

    examples = teacher_examples(spec, signals, tokenizer)
    rows = [{"index": i, "input_ids": e.input_ids, "labels": e.labels, "chunks": json.dumps(e.chunks),
             "weight": json.dumps(e.weight), "chunk_weight": json.dumps(e.chunk_weight)}
            for i, e in enumerate(examples)]
    return ray.data.from_items(rows or [{"index": -1, "input_ids": [], "labels": [], "chunks": "null",
                                         "weight": "null", "chunk_weight": "null"}]).materialize()


def replay_dataset(spec: FusionSpec, tokenizer):
    """The replay records, tokenized with the target's tokenizer and chat template, as a Dataset. They are
    tokenized here, by the tokenizer the driver has loaded and beside the records it has read: a Ray Data task
    would first start a process and load the tokenizer (about 3 s on 2 cores, for milliseconds of work at the
    sizes of a replay set)."""
    import ray

    examples = replay_examples(spec, tokenizer)
    table = pa.table({
        "index": pa.array(range(len(examples)), pa.int64()),
        "input_ids": pa.array([e.input_ids for e in examples], pa.list_(pa.int64())),
        "labels": pa.array([e.labels for e in examples], pa.list_(pa.int64())),
    })
    return ray.data.from_arrow(table).materialize()


def _storage(spec: FusionSpec) -> tuple[pafs.FileSystem, str]:
    storage = spec.cluster.storage
    if "://" in storage:
        return pafs.FileSystem.from_uri(storage)
    Path(storage).mkdir(parents=True, exist_ok=True)
    return pafs.LocalFileSystem(), str(Path(storage).resolve())


def run_digest(spec: FusionSpec) -> str:
    """What identifies a run's training: the spec without where the result is written."""
    return spec.model_copy(update={"output": Path("/"), "overwrite": False}).digest()


def claim_run(fs: pafs.FileSystem, run_dir: str, spec: FusionSpec) -> bool:
    """Record this spec in the run directory, or check it matches the recorded one. Returns True when the
    run has already finished (its final checkpoint exists), so training can be skipped."""
    fs.create_dir(run_dir, recursive=True)
    marker = f"{run_dir}/hetero_ray_run.json"
    digest = run_digest(spec)
    if fs.get_file_info(marker).type == pafs.FileType.File:
        with fs.open_input_stream(marker) as f:
            recorded = json.loads(f.read())["digest"]
        if recorded != digest:
            raise HeteroRayError(f"{run_dir}: a run named {spec.resolved_name()!r} with a different spec exists; "
                                 "set another `name:` or remove that directory")
    else:
        with fs.open_output_stream(marker) as f:
            f.write(json.dumps({"digest": digest, "spec": spec.model_dump(mode="json")}).encode())
    return fs.get_file_info(f"{run_dir}/final/{FINAL_STATE}").type == pafs.FileType.File


def fuse(spec: FusionSpec, address: str | None = None, on_progress: Callable[[dict], None] | None = None
         ) -> FusionResult:
    """Run the whole fusion on Ray (starting a local instance when no cluster is given). Re-running the
    same spec resumes its run by name: from the latest checkpoint, or straight to writing when finished.
    Called through :func:`hetero_ray.strategies.run_strategy`, which checks every input first (once)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    require_trained(spec)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    opened = open_and_align(spec)  # headers only: shapes and families; the actors read the tensors
    target, sources, plan, block = opened.target, opened.sources, opened.plan, opened.block
    if spec.control.reads_sources:
        net_configs(spec, plan, block)  # refuses sizes the nets cannot take before any work starts
    owners = group_owners(spec, plan, block)  # refuses more workers than groups under partition: groups
    tokenizer = load_tokenizer(spec.target.base)
    fs, root = _storage(spec)
    name = spec.resolved_name()
    finished = claim_run(fs, f"{root}/{name}", spec)
    timings["plan_s"] = time.perf_counter() - t0
    if finished:
        from ray.train import Checkpoint

        final = Checkpoint(path=f"{root}/{name}/final", filesystem=fs)
        return _write(spec, plan, block, target, sources, final,
                      {**timings, "train_s": 0.0, "align_s": 0.0, "datasets_s": 0.0})
    ensure_ray(address)
    check_resources(spec)

    t0 = time.perf_counter()
    # the direct controls read no source tensor: the workers get an empty candidate stream
    teach = any(OBJECTIVES.lookup(n).needs_teacher for n in objective_weights(spec))
    # owners get their groups' rows only, split where the actors make them: the object store holds each once
    streams, signals = None, []
    if spec.control.reads_sources or teach:
        streams, signals = align_sources(spec, plan, block, on_progress, spec.control.reads_sources, teach,
                                         opened=sources, owners=owners)
    if streams is None:
        streams = {name: empty_candidates() for name in candidate_streams(owners)}
    timings["align_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    replay = replay_dataset(spec, tokenizer)
    teacher = teacher_dataset(spec, signals, tokenizer)
    timings["datasets_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sink = progress_sink() if on_progress else None
    os.environ.setdefault(*CONTROLLER_POLL_ENV)  # read by trainer.fit(), which starts the controller
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec.model_dump(mode="json"), "plan": plan.to_dict(), "block_size": block,
                           "pad_id": tokenizer.pad_token_id, "partition": owners},
        torch_config=TorchConfig(backend="nccl" if spec.cluster.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=spec.cluster.workers, use_gpu=spec.cluster.use_gpu,
                                               resources_per_worker={"CPU": spec.cluster.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=name, storage_path=spec.cluster.storage if "://" in spec.cluster.storage
                                       else root, failure_config=ray.train.FailureConfig(max_failures=3),
                                       callbacks=[train_callback(sink)], worker_runtime_env=faults.runtime_env()),
        datasets={**streams, "replay": replay, "teacher": teacher},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    result = _fit_with_progress(trainer, sink, on_progress)
    timings["train_s"] = time.perf_counter() - t0
    if result.checkpoint is None:
        raise HeteroRayError(f"run {name}: training finished without a final checkpoint")
    return _write(spec, plan, block, target, sources, result.checkpoint, timings, signals)


def _fit_with_progress(trainer, sink, on_progress):
    """trainer.fit() on a helper thread while this thread relays the controller's training events to
    ``on_progress``. This thread wakes every half second, so SIGTERM and Ctrl-C are handled at once: a thread
    blocked inside Ray's native wait runs no Python signal handler."""
    import ray

    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="hetero-ray-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(timeout=0.5)
            if sink is not None:
                for event in ray.get(sink.drain.remote()):
                    on_progress(event)
    finally:
        if sink is not None:
            ray.kill(sink)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _write(spec, plan, block, target, sources, checkpoint, timings, signals=None) -> FusionResult:
    from safetensors.torch import load_file

    with checkpoint.as_directory() as d:
        d = Path(d)
        deltas = load_file(str(d / FINAL_DELTAS))
        final = json.loads((d / FINAL_STATE).read_text())
        partitions = sorted((json.loads(p.read_text()) for p in d.glob("partition_rank*.json")),
                            key=lambda s: s["rank"])
    cfgs = net_configs(spec, plan, block) if spec.control.reads_sources else {}
    outputs = {g: {"alpha": torch.tensor(a), **({"gate_open": torch.tensor(final["gate_open"][g])}
                                                 if g in final["gate_open"] else {})}
               for g, a in final["alpha"].items()}
    timings["setup_s"] = final["setup_s"]
    report = build_report(spec, plan, input_hashes(spec, target, [a for a, _ in sources]),
                          final["history"], outputs, {}, cfgs, timings)
    report["attention_mass"] = final["attention_mass"]
    report["objective"] = objective_weights(spec)
    report["teacher"] = signals_summary(signals) if signals is not None else final.get("teacher")
    report["zero"] = {"stage": final.get("zero_stage", spec.cluster.zero_stage), "workers": spec.cluster.workers,
                      "partition": final.get("partition", "replicate"), "partitions": partitions,
                      "transfer_net_params": sum(c.num_parameters() for c in cfgs.values()),
                      # rank 0's wall time per step after the first: reports to Ray Train and checkpoints included
                      "step_wall_s": final.get("step_wall_s")}
    out = export_fused_adapter(spec, target, deltas, report, fusion_card(spec, plan, final["history"]))
    return FusionResult(out, final["history"], plan, deltas, report)

