"""Pre-flight check: validate a spec and its inputs, show the alignment plan, the candidate tokens per
group, the transfer-net sizes and a per-worker memory estimate, without training. Adapters given as
``adapter_config.json`` alone (no weights) are planned from the base model's config.json, so a cluster job
can be sized before any model is downloaded."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from hetero_ray.denoise.rdm import projections_for
from hetero_ray.denoise.transfer_net import TransferNetConfig
from hetero_ray.errors import FamilyError
from hetero_ray.families import ModelDims, Topology, build_topology, detect_family, read_base_config
from hetero_ray.io.adapters import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME, LoraAdapter, config_only_adapter
from hetero_ray.runners.prepare import (
    alignment_plan,
    net_configs,
    open_adapter,
    plan_costs,
    resolve_block_size,
    sequence_lengths,
)
from hetero_ray.spec import FusionSpec
from hetero_ray.train.partition import exchange_shapes, resolve

GIB = 1 << 30
GPU_GIB = 80e9 / GIB  # an 80 GB accelerator (H100/A100 80GB), in GiB

# The paper's target and source models: their published config.json values that planning needs
# (tests/test_check.py and jobs/benchmark_memory.py plan and measure at this scale).
PAPER_MODELS = {
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
}


def _has_weights(path: Path) -> bool:
    return (path / WEIGHTS_NAME).is_file() or (path / PICKLE_NAME).is_file()


def open_for_check(path: Path, family: str | None, base: Path | None, allow_pickle: bool, strict: bool
                   ) -> tuple[LoraAdapter, Topology, dict | None]:
    """Open an adapter with its weights' header, or plan it from adapter_config.json + the base config."""
    if _has_weights(path):
        adapter, topo = open_adapter(path, family, base, allow_pickle, strict)
        return adapter, topo, read_base_config(adapter, base)
    config = json.loads((path / CONFIG_NAME).read_text())
    stub = LoraAdapter(path, config, path / CONFIG_NAME, {}, {}, [])
    base_config = read_base_config(stub, base)
    if base_config is None:
        raise FamilyError(f"{path}: no weights, and no base config.json to plan from (set `base:`)")
    fam = detect_family(stub, base_config, family)
    if fam.shapes is None:
        raise FamilyError(f"{path}: family {fam.name} cannot be planned from configs alone; give the weights")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    n_layers = (base_config.get("text_config") or base_config)["num_hidden_layers"]
    per_layer = {m: s for m, s in fam.shapes(base_config).items() if m.rsplit(".", 1)[-1] in targets}
    shapes = {fam.module_template.format(layer=i, module=m): s for i in range(n_layers) for m, s in per_layer.items()}
    adapter = config_only_adapter(path, shapes)
    dims = ModelDims.from_config(base_config)
    return adapter, build_topology(adapter, fam, dims, strict=strict), base_config


def base_model_params(config: dict) -> int:
    """Parameter count of a decoder-only base model from its config (embeddings, attention, MLP, norms)."""
    c = config.get("text_config") or config
    h, layers, inter, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    dims = ModelDims.from_config(c)
    q, kv = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter + 2 * h
    lm_head = 0 if c.get("tie_word_embeddings", False) else vocab * h
    return vocab * h + layers * per_layer + h + lm_head


def transfer_activation_bytes(cfg: TransferNetConfig, modules: int, target_tokens: int, source_tokens: int,
                              valid_source_tokens: int, num_projections: int, dtype_bytes: int,
                              rdm_max_samples: int | None = None, rdm_sort_budget: int | None = None,
                              rdm_directions: str = "orthogonal") -> int:
    """Bytes one group's transfer net and its RDM term keep for backward (inputs and parameters excluded),
    counted from the modules' saved tensors; a test holds this to the measured figure.

    Encoder, over N = M (T + S) tokens: the normalized block and its transposed copy (2 D each) and 7.25 d
    (the row and column pre-activations, their gated sum and the gate, the gate MLP's hidden d/4, out_norm's
    input, the positioned embedding) plus two norm statistics. Cross-attention: the query (M T d), keys and
    values (2 M S d), the scores' softmax and mask (2 M h T S). Decoder: four d-wide tensors per target token,
    and the delta (D) that alpha scales. RDM per encoder output (n tokens, P projections): the rectified
    embedding (n d), the directions (d P), the projected difference (n P) and the sort indices (int64), with n
    capped at ``rdm_max_samples`` (then also the kept rows' indices) and P as ``projections_for`` says; with
    orthogonal directions past one block (P > d) and fewer rows than P, the d x d rotation too (the rows are
    rotated before they meet the cached design)."""
    m, t, s, d, h = modules, target_tokens, source_tokens, cfg.embed_dim, cfg.num_heads
    big, n = cfg.block_size * cfg.rank, modules * (target_tokens + source_tokens)
    net = 2 * n * big + n * (7.25 * d + 4) + m * t * (5 * d + big) + 2 * m * s * d + 2 * m * h * t * s
    rows = [(min(k, rdm_max_samples), True) if rdm_max_samples and k > rdm_max_samples else (k, False)
            for k in (m * t, valid_source_tokens) if k]
    rdm = 0
    for k, cut in rows:
        p = projections_for(k, num_projections, rdm_sort_budget)
        rdm += dtype_bytes * (k * d + d * p + k * p) + 8 * k * p + (8 * k if cut else 0)
        if rdm_directions == "orthogonal" and d < p and k < p:
            rdm += dtype_bytes * d * d
    return int(dtype_bytes * net + rdm)


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, Any]:
    """Run ``fn`` and return (bytes of the distinct storages autograd saved for backward, its result),
    leaving out the storages of ``exclude`` (parameters and inputs, which are counted elsewhere)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[tuple[int, str], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[(storage.data_ptr(), str(t.device))] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(seen.values()), result


def memory_per_worker(net_params: int, largest_group: int, zero_stage: int, workers: int, dtype: str,
                      target_params: int, target_config: dict, tokens_bytes: int, seq_len: int, batch: int,
                      transfer_activations: int = 0, db_bytes: int = 0) -> dict:
    """Bytes per worker.

    Held throughout: the transfer nets' weights, gradients and AdamW states (2 fp32 states; bf16 adds fp32
    master weights), partitioned by ZeRO stage (ZeRO-3 also holds the largest group's gathered weights during
    its forward); the frozen target (a full copy per worker); the candidate tokens.
    Peak on top of that, the larger of two phases: forward/backward activations (the target's, by Korthikanti
    et al.'s per-layer estimate, 34 s b h + 5 a s^2 b bytes in 16-bit, doubled for fp32; plus the transfer
    nets', see ``transfer_activation_bytes``) and the optimizer step, where torch AdamW holds one fp32
    temporary the size of the parameters it updates (the whole partition on GPU, where it runs foreach; on
    CPU only the largest tensor, so this is an upper bound there). On an H100 at paper scale, 1 worker ZeRO-0
    fp32, the measured peak was 14.52 GiB against 14.67 GiB from this sum."""
    w = 2 if dtype == "bf16" else 4
    weights, grads, optim = w * net_params, w * net_params, (8 + (4 if dtype == "bf16" else 0)) * net_params
    n = max(workers, 1)
    if zero_stage == 0:
        nets = weights + grads + optim
    elif zero_stage == 1:
        nets = weights + grads + optim / n
    elif zero_stage == 2:
        nets = weights + (grads + optim) / n
    else:
        nets = (weights + grads + optim) / n + w * largest_group
    c = target_config.get("text_config") or target_config
    act_scale = 1 if dtype == "bf16" else 2
    heads = c["num_attention_heads"]
    acts = act_scale * c["num_hidden_layers"] * (34 * seq_len * batch * c["hidden_size"]
                                                 + 5 * heads * seq_len**2 * batch)
    step = 4 * net_params / (n if zero_stage >= 1 else 1)
    out = {"transfer_nets": nets, "frozen_target": w * target_params, "candidate_tokens": tokens_bytes,
           "target_activations": acts, "transfer_activations": transfer_activations, "optimizer_step": step,
           "db_buffers": db_bytes}
    out["total"] = nets + w * target_params + tokens_bytes + db_bytes + max(acts + transfer_activations, step)
    return {k: round(v / GIB, 3) for k, v in out.items()}


def check(spec: FusionSpec) -> dict:
    """Everything a user needs to know before launching the spec."""
    from hetero_ray.strategies import get_strategy
    from hetero_ray.strategies.merges import same_family_inputs

    if get_strategy(spec.strategy).same_family:
        same_family_inputs(spec)  # what fuse would refuse, refused here too
    target, ttopo, tconfig = open_for_check(spec.target.adapter, spec.target.family, spec.target.base,
                                            spec.allow_pickle, strict=False)
    if tconfig is None:
        raise FamilyError(f"{spec.target.base}: the target base model's config.json is needed")
    sources = [open_for_check(s.adapter, s.family, s.base, spec.allow_pickle, strict=True) for s in spec.sources]
    plan = alignment_plan(spec, ttopo, [t for _, t, _ in sources])
    block = resolve_block_size(spec, plan)
    cfgs = net_configs(spec, plan, block)
    lengths = sequence_lengths(plan, block)
    groups = plan.groups()
    tokens = {g: {"modules": len(es), "target_tokens_per_module": lengths[g][0],
                  "source_tokens": sum(sum(math.ceil(f.d_in / block) + math.ceil(f.d_out / block) for f in e.feeds)
                                       for e in es)} for g, es in groups.items()}
    group_token_bytes = {g: 4 * cfgs[g].block_size * cfgs[g].rank * (t["source_tokens"] + t["modules"]
                                                                   * t["target_tokens_per_module"])
                         for g, t in tokens.items()}
    params = {g: c.num_parameters() for g, c in cfgs.items()}
    total = sum(params.values())
    target_params = base_model_params(tconfig)
    w_bytes = 2 if spec.cluster.dtype == "bf16" else 4
    for g, t in tokens.items():
        t["activation_bytes"] = transfer_activation_bytes(cfgs[g], t["modules"], lengths[g][0], lengths[g][1],
                                                          t["source_tokens"], spec.method.num_projections, w_bytes,
                                                          spec.method.rdm_max_samples, spec.method.rdm_sort_budget,
                                                          spec.method.rdm_directions)
    costs = plan_costs(plan, block)
    # every module's dB (and added-rank factors), fp32: the detached copies the target is patched with and
    # their gradients on every worker; owners also hold the two exchange buffers (gathered dB, averaged grads)
    db_bytes = 4 * sum(math.prod(s) for s in exchange_shapes(plan, target, spec.method.extra_rank).values())

    def estimate(workers: int, mode: str) -> dict:
        """The most loaded worker's memory with ``workers`` workers and ``cluster.partition`` = ``mode``."""
        owners = resolve(mode, workers, costs)
        if owners is None:
            return {**memory_per_worker(total, max(params.values(), default=0), spec.cluster.zero_stage, workers,
                                        spec.cluster.dtype, target_params, tconfig, sum(group_token_bytes.values()),
                                        spec.training.max_length, spec.training.batch_size,
                                        sum(t["activation_bytes"] for t in tokens.values()), 2 * db_bytes),
                    "layout": "replicate"}
        # an owner holds its groups' nets, states, tokens and activations whole (ZeRO-0)
        parts = [{**memory_per_worker(sum(params[g] for g in own), max(params[g] for g in own), 0, 1,
                                      spec.cluster.dtype, target_params, tconfig,
                                      sum(group_token_bytes[g] for g in own), spec.training.max_length,
                                      spec.training.batch_size, sum(tokens[g]["activation_bytes"] for g in own),
                                      4 * db_bytes), "groups": own} for own in owners]
        return {**max(parts, key=lambda m: m["total"]), "layout": "groups"}

    resolve(spec.cluster.partition, spec.cluster.workers, costs)  # what fuse would refuse, refused here too
    counts = sorted({1, 2, 4, 8, spec.cluster.workers})
    est = {w: estimate(w, spec.cluster.partition) for w in counts
           if spec.cluster.partition != "groups" or w <= len(costs)}
    layouts = {"replicate": {w: estimate(w, "replicate") for w in counts}}
    if len(costs) > 1:
        layouts["groups"] = {w: estimate(w, "groups") for w in sorted({*counts, len(costs)}) if w <= len(costs)}

    def fewest(layout: str) -> int | None:
        """The fewest 80 GB workers whose most loaded one fits (owners: at most one per group)."""
        limit = len(costs) if layout == "groups" else 64
        return next((w for w in range(1, limit + 1) if estimate(w, layout)["total"] <= GPU_GIB), None)

    gpus = {layout: fewest(layout) for layout in layouts}
    rows = []
    for e in sorted(plan.entries, key=lambda e: (e.layer, e.role)):
        for f in e.feeds:
            offset = f.source_layer - e.layer
            pad = (math.ceil(f.d_out / block) * block - f.d_out) + (math.ceil(f.d_in / block) * block - f.d_in)
            rows.append({"target_layer": e.layer, "role": e.role, "source": f.source_id, "family": f.family,
                         "source_layer": f.source_layer, "layer_offset": offset, "rank": f"{f.rank}->{e.rank}",
                         "harmonize": f.harmonize, "padding_rows": pad})
    return {
        "target": {"family": ttopo.family.name, "layers": ttopo.n_layers, "base_params": target_params,
                   "config_only": target.config_only},
        "sources": [{"id": s.source_id, "family": s.family, "layers": s.n_layers,
                     "aligned_target_layers": sorted(s.layer_pairs), "config_only": a.config_only}
                    for s, (a, _, _) in zip(plan.sources, sources, strict=True)],
        "block_size": block, "groups": tokens, "unaligned": plan.unaligned,
        "transfer_nets": {g: {**cfgs[g].to_dict(), "params": p} for g, p in params.items()},
        "transfer_net_params": total,
        "zero_stage": spec.cluster.zero_stage, "dtype": spec.cluster.dtype,
        "memory_gib_per_worker": est, "memory_by_layout": layouts, "gpus_80gb": gpus,
        "partition": spec.cluster.partition, "alignment": rows,
    }


def format_check(report: dict) -> str:
    lines = [f"target: {report['target']['family']}, {report['target']['layers']} layers, "
             f"{report['target']['base_params'] / 1e9:.2f}B parameters"]
    for s in report["sources"]:
        span = s["aligned_target_layers"]
        lines.append(f"source {s['id']}: {s['family']}, {s['layers']} layers -> target layers "
                     f"{span[0] if span else '-'}..{span[-1] if span else '-'}")
    lines.append(f"block size {report['block_size']}; unaligned target slots: {len(report['unaligned'])}")
    lines.append("group      modules  tgt tok/module  src tokens  transfer-net params")
    for g, t in report["groups"].items():
        lines.append(f"{g:<10} {t['modules']:>7}  {t['target_tokens_per_module']:>14}  {t['source_tokens']:>10}  "
                     f"{report['transfer_nets'][g]['params'] / 1e6:>17.1f}M")
    lines.append(f"total transfer-net parameters: {report['transfer_net_params'] / 1e6:.1f}M")
    lines.append(f"memory per worker (GiB; the most loaded one), partition {report['partition']}, "
                 f"ZeRO-{report['zero_stage']} where nets are replicated, {report['dtype']}:")
    for w, m in report["memory_gib_per_worker"].items():
        lines.append(f"  {w} worker(s), {m['layout']}: total {m['total']:.2f} = transfer nets {m['transfer_nets']:.2f} "
                     f"+ target {m['frozen_target']:.2f} + tokens {m['candidate_tokens']:.2f} + dB buffers "
                     f"{m['db_buffers']:.2f} + max(activations {m['target_activations']:.2f} target + "
                     f"{m['transfer_activations']:.2f} transfer nets, optimizer step {m['optimizer_step']:.2f})")
    need = ", ".join(f"{layout}: {n if n else 'does not fit'}" for layout, n in report["gpus_80gb"].items())
    lines.append(f"80 GB workers needed (fewest whose most loaded worker fits): {need}")
    lines.append("alignment (target layer x role <- source layer, offset, rank, padding rows):")
    for r in report["alignment"]:
        lines.append(f"  L{r['target_layer']:>3} {r['role']:<5} <- {r['source']} L{r['source_layer']} "
                     f"(offset {r['layer_offset']:+d}, rank {r['rank']} {r['harmonize']}, pad {r['padding_rows']})")
    return "\n".join(lines)
