"""The in-process runner: the whole fusion without Ray or DeepSpeed (the reference for the Ray runner),
on a GPU when ``cluster.use_gpu`` is set; and the report and card of a trained run."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hetero_ray.align import AlignmentPlan
from hetero_ray.denoise.fusion import GroupInputs, attention_mass, group_diagnostics
from hetero_ray.errors import HeteroRayError
from hetero_ray.io.export import export_fused_adapter, report_header
from hetero_ray.runners.prepare import (
    build_net,
    input_hashes,
    net_configs,
    objective_weights,
    prepare_groups,
    replay_examples,
    require_trained,
)
from hetero_ray.spec import FusionSpec
from hetero_ray.teach.signals import signals_summary, teacher_examples
from hetero_ray.train.replay import load_tokenizer


@dataclass
class FusionResult:
    output: Path
    history: list[dict]
    plan: AlignmentPlan
    deltas: dict[str, torch.Tensor] = field(repr=False)
    report: dict = field(repr=False)


def build_report(spec: FusionSpec, plan: AlignmentPlan, hashes: dict, history: list[dict], outputs: dict,
                 groups: dict[str, GroupInputs], net_cfgs: dict, timings: dict) -> dict:
    return {
        **report_header(spec, hashes, timings, history, plan.to_dict()),
        "transfer_nets": {n: c.to_dict() for n, c in net_cfgs.items()},
        **group_diagnostics(outputs),
        "attention_mass": attention_mass(outputs, groups, len(spec.sources)),
    }


def fusion_card(spec: FusionSpec, plan: AlignmentPlan, history: list[dict]) -> str:
    lines = [
        f"# {spec.resolved_name()}", "",
        f"A LoRA adapter for `{spec.target.base.name}` fused by hetero-ray (HeteroFusion) from the target adapter "
        f"`{spec.target.adapter.name}` and {len(spec.sources)} source(s) of other families.", "",
        "| source | family | layers | aligned target layers |", "|---|---|---|---|",
    ]
    for s in plan.sources:
        layers = sorted(s.layer_pairs)
        span = f"{layers[0]}..{layers[-1]}" if layers else "none"
        lines.append(f"| {s.source_id} | {s.family} | {s.n_layers} | {span} |")
    if history:
        lines += ["", f"Strategy: `{spec.strategy}`. Steps: {len(history)}. LM loss {history[0]['lm_loss']:.4f} "
                  f"(first step) -> {history[-1]['lm_loss']:.4f} (last step)."]
    lines += ["", "Provenance (input hashes, resolved spec, versions): `fusion_report.json`.", "",
              "![loss](loss.png) ![alpha](alpha.png) ![attention mass](attention_mass.png)", ""]
    return "\n".join(lines)


def fusion_device(spec: FusionSpec) -> torch.device:
    """cuda when the spec asks for GPUs (`cluster.use_gpu`), else cpu."""
    if spec.cluster.use_gpu:
        if not torch.cuda.is_available():
            raise HeteroRayError("cluster.use_gpu is set but this process sees no CUDA device")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def teacher_signals_local(spec: FusionSpec, adapters: list) -> list[dict]:
    """Every source's teacher signals, in this process (empty when the run's objective needs none)."""
    from hetero_ray.teach.signals import cache_dir, source_signals
    from hetero_ray.train.objectives import OBJECTIVES

    if not any(OBJECTIVES.lookup(n).needs_teacher for n in objective_weights(spec)):
        return []
    bases: dict = {}  # each family's base model loaded once
    return [source_signals(spec, i, a, cache_dir(spec), bases) for i, a in enumerate(adapters)]


def fuse_local(spec: FusionSpec, on_step: Callable[[dict], None] | None = None) -> FusionResult:
    """The whole fusion in this process, without Ray or DeepSpeed (the reference for the distributed run);
    on a GPU when ``cluster.use_gpu`` is set."""
    from hetero_ray.train.target import load_target
    from hetero_ray.train.trainer import FusionObjective, fit

    require_trained(spec)
    timings = {}
    t0 = time.perf_counter()
    prepared = prepare_groups(spec)
    target, sources, plan, block, groups = (prepared.target, prepared.sources, prepared.plan, prepared.block,
                                            prepared.groups)
    timings["align_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    device = fusion_device(spec)
    groups = {n: g.to(device) for n, g in groups.items()}
    model = load_target(spec.target.base, target).to(device)
    tokenizer = load_tokenizer(spec.target.base)
    examples = replay_examples(spec, tokenizer)
    timings["setup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    signals = teacher_signals_local(spec, [a for a, _ in sources])
    teacher = teacher_examples(spec, signals, tokenizer) if signals else []
    timings["teach_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    net = build_net(spec, plan, block, groups, target).to(device)
    objective = FusionObjective(model, groups, spec.method, examples, tokenizer.pad_token_id,
                                spec.seed, objective_weights(spec), teacher,
                                extra_modules=list(target.modules) if spec.method.extra_rank else ())
    timings["setup_s"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    history = fit(net, objective, spec.training, spec.seed, on_step)
    timings["train_s"] = time.perf_counter() - t0
    deltas, outputs = objective.final_deltas(net)
    cfgs = net_configs(spec, plan, block) if spec.control.reads_sources else {}
    report = build_report(spec, plan, input_hashes(spec, target, [a for a, _ in sources]), history, outputs,
                          groups, cfgs, timings)
    report["objective"] = objective_weights(spec)
    report["teacher"] = signals_summary(signals)
    out = export_fused_adapter(spec, target, deltas, report, fusion_card(spec, plan, history))
    objective.patch.remove()
    return FusionResult(out, history, plan, deltas, report)
