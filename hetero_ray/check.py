"""Pre-flight check: validate a spec and its inputs, show the alignment plan, the candidate tokens per
group, the transfer-net sizes and a per-worker memory estimate, without training. Adapters given as
``adapter_config.json`` alone (no weights) are planned from the base model's config.json, so a cluster job
can be sized before any model is downloaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

from hetero_ray.adapters import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME, LoraAdapter, config_only_adapter
from hetero_ray.errors import FamilyError
from hetero_ray.pipeline import align, net_configs, open_adapter, resolve_block_size, sequence_lengths
from hetero_ray.spec import FusionSpec
from hetero_ray.topology.families import ModelDims, Topology, build_topology, detect_family, read_base_config

GIB = 1 << 30


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


def memory_per_worker(net_params: int, largest_group: int, zero_stage: int, workers: int, dtype: str,
                      target_params: int, target_config: dict, tokens_bytes: int, seq_len: int, batch: int) -> dict:
    """Bytes per worker. Transfer nets: weights + grads + AdamW (2 fp32 states; bf16 adds fp32 master
    weights), partitioned by ZeRO stage; ZeRO-3 also holds the largest group's gathered weights during its
    forward. Frozen target: full copy per worker. Activations: Korthikanti et al.'s per-layer estimate
    (34 s b h + 5 a s^2 b bytes in 16-bit; doubled for fp32)."""
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
    acts = c["num_hidden_layers"] * (34 * seq_len * batch * c["hidden_size"] + 5 * heads * seq_len**2 * batch)
    out = {"transfer_nets": nets, "frozen_target": w * target_params, "activations": act_scale * acts,
           "candidate_tokens": tokens_bytes}
    out["total"] = sum(out.values())
    return {k: round(v / GIB, 3) for k, v in out.items()}


def check(spec: FusionSpec) -> dict:
    """Everything a user needs to know before launching the spec."""
    target, ttopo, tconfig = open_for_check(spec.target.adapter, spec.target.family, spec.target.base,
                                            spec.allow_pickle, strict=False)
    if tconfig is None:
        raise FamilyError(f"{spec.target.base}: the target base model's config.json is needed")
    sources = [open_for_check(s.adapter, s.family, s.base, spec.allow_pickle, strict=True) for s in spec.sources]
    plan = align(spec, ttopo, [t for _, t, _ in sources])
    block = resolve_block_size(spec, plan)
    cfgs = net_configs(spec, plan, block)
    lengths = sequence_lengths(plan, block)
    groups = plan.groups()
    tokens = {g: {"modules": len(es), "target_tokens_per_module": lengths[g][0],
                  "source_tokens": sum(sum(math.ceil(f.d_in / block) + math.ceil(f.d_out / block) for f in e.feeds)
                                       for e in es)} for g, es in groups.items()}
    token_bytes = 4 * sum(cfgs[g].block_size * cfgs[g].rank * (t["source_tokens"] + t["modules"]
                                                                * t["target_tokens_per_module"])
                          for g, t in tokens.items())
    params = {g: c.num_parameters() for g, c in cfgs.items()}
    total = sum(params.values())
    target_params = base_model_params(tconfig)
    est = {
        w: memory_per_worker(total, max(params.values(), default=0), spec.cluster.zero_stage, w, spec.cluster.dtype,
                             target_params, tconfig, token_bytes, spec.training.max_length, spec.training.batch_size)
        for w in sorted({1, 2, 4, 8, spec.cluster.workers})
    }
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
        "memory_gib_per_worker": est, "alignment": rows,
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
    lines.append(f"memory per worker (GiB), ZeRO-{report['zero_stage']}, {report['dtype']}:")
    for w, m in report["memory_gib_per_worker"].items():
        lines.append(f"  {w} worker(s): total {m['total']:.2f} = transfer nets {m['transfer_nets']:.2f} + target "
                     f"{m['frozen_target']:.2f} + activations {m['activations']:.2f} "
                     f"+ tokens {m['candidate_tokens']:.2f}")
    lines.append("alignment (target layer x role <- source layer, offset, rank, padding rows):")
    for r in report["alignment"]:
        lines.append(f"  L{r['target_layer']:>3} {r['role']:<5} <- {r['source']} L{r['source_layer']} "
                     f"(offset {r['layer_offset']:+d}, rank {r['rank']} {r['harmonize']}, pad {r['padding_rows']})")
    return "\n".join(lines)
