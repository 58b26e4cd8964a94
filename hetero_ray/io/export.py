"""The one writer of every strategy's output: a PEFT adapter, ``fusion_report.json`` with one schema (what ran,
on which inputs' hashes, with which versions; plus each strategy's own keys), a README card and plots, all
written to a temporary directory swapped into place when complete (:mod:`hetero_ray.io.outputs`). Trained runs
keep A_t and write B_t + alpha dB; merges write their factors."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from collections.abc import Mapping
from pathlib import Path

import torch

from hetero_ray.io.adapters import AdapterError, LoraAdapter, write_adapter
from hetero_ray.io.outputs import atomic_output_dir
from hetero_ray.io.plots import write_plots

REPORT_NAME = "fusion_report.json"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("hetero-ray", "torch", "transformers", "peft", "safetensors", "ray", "deepspeed", "pyarrow"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def fused_tensors(target: LoraAdapter, deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of the target adapter, with B_t + delta (computed in fp32, cast back) where a delta is
    given. Raises AdapterError if a delta does not fit its module or is not finite."""
    tensors = target.all_tensors()
    for path, delta in deltas.items():
        module = target.modules.get(path)
        if module is None:
            raise AdapterError(target.weights_path, "fused update for a module the target adapter lacks", key=path)
        b = tensors[module.b_key]
        if tuple(delta.shape) != tuple(b.shape):
            raise AdapterError(target.weights_path, f"update shape {tuple(delta.shape)} != B shape {tuple(b.shape)}",
                               key=module.b_key)
        fused = b.float() + delta.detach().float().cpu()
        if not torch.isfinite(fused).all():
            raise AdapterError(target.weights_path, "fused B is not finite", key=module.b_key)
        tensors[module.b_key] = fused.to(b.dtype)
    return tensors


REPORT_SCHEMA = 2
# every report holds these, whatever the strategy (tests/test_entry_point.py holds every strategy to it)
REPORT_KEYS = ("schema", "name", "strategy", "kind", "description", "params", "spec", "inputs", "versions",
               "timings_s", "history", "alignment")


def report_header(spec, inputs: Mapping, timings: Mapping, history: list | None = None,
                  alignment: Mapping | None = None) -> dict:
    """The part of ``fusion_report.json`` every strategy writes: what ran, on what, with what."""
    from hetero_ray.strategies import get_strategy

    strategy = get_strategy(spec.strategy)
    return {"schema": REPORT_SCHEMA, "name": spec.resolved_name(), "strategy": spec.strategy, "kind": strategy.kind,
            "description": strategy.description, "params": dict(spec.params), "spec": spec.model_dump(mode="json"),
            "inputs": dict(inputs), "versions": versions(), "timings_s": dict(timings), "history": list(history or []),
            "alignment": dict(alignment) if alignment is not None else None}


def write_output(spec, config: Mapping, tensors: Mapping[str, torch.Tensor], report: Mapping, card: str) -> Path:
    """The one writer: a PEFT adapter, ``fusion_report.json``, a README card and (for trained runs) plots,
    swapped into ``spec.output`` atomically. Returns the output directory."""
    missing = [k for k in REPORT_KEYS if k not in report]
    if missing:
        raise ValueError(f"report lacks {missing}")
    provenance = {"name": report["name"], "strategy": report["strategy"], "inputs": report["inputs"]}
    with atomic_output_dir(spec.output, overwrite=spec.overwrite, provenance=provenance) as tmp:
        write_adapter(tmp, config, tensors, metadata={"hetero_ray_strategy": spec.strategy})
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1, sort_keys=True, default=str))
        (tmp / "README.md").write_text(card)
        if report["history"]:
            write_plots(dict(report), tmp)
    return Path(spec.output)


EXTRA_A, EXTRA_B = "extra_A:", "extra_B:"  # keys of the added-rank factors among a trained run's deltas


def with_extra_rank(target: LoraAdapter, tensors: dict[str, torch.Tensor], extra: Mapping[str, torch.Tensor]
                    ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a rank r + k adapter: A' = [A_t; A_new], B' = [B_t + dB, B_new], with lora_alpha
    set so that PEFT's scale s (alpha / r, or alpha / sqrt(r) with rsLoRA) is the target's; it loads with
    ``PeftModel.from_pretrained`` unchanged."""
    config = dict(target.config)
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterError(target.path / "adapter_config.json", "added rank needs one r and lora_alpha for every "
                           "module; this adapter sets per-module patterns", key="rank_pattern")
    k = None
    for path, module in target.modules.items():
        a_new, b_new = extra.get(EXTRA_A + path), extra.get(EXTRA_B + path)
        if a_new is None:
            raise AdapterError(target.weights_path, "no added-rank factors for this module", key=path)
        k = a_new.shape[0]
        a, b = tensors[module.a_key], tensors[module.b_key]
        tensors[module.a_key] = torch.cat([a.float(), a_new.float()]).to(a.dtype)
        tensors[module.b_key] = torch.cat([b.float(), b_new.float()], dim=1).to(b.dtype)
    r = int(config.get("r", 8))
    scale = target.scaling
    config["r"] = r + k
    config["lora_alpha"] = scale * ((r + k) ** 0.5 if config.get("use_rslora") else (r + k))
    return config, tensors


def export_fused_adapter(spec, target: LoraAdapter, deltas: Mapping[str, torch.Tensor], report: Mapping,
                         card: str) -> Path:
    """A trained run's output: the target adapter with B_t + delta where a delta is given, and the added rank
    beside it when the run trained one."""
    extra = {k: v for k, v in deltas.items() if k.startswith((EXTRA_A, EXTRA_B))}
    tensors = fused_tensors(target, {k: v for k, v in deltas.items() if k not in extra})
    config = target.config
    if extra:
        config, tensors = with_extra_rank(target, tensors, extra)
    return write_output(spec, config, tensors, report, card)


def write_merged(spec, strategy, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], rank: int,
                 extra: dict, timings: dict) -> Path:
    """A merge's output: its factors as a PEFT adapter (lora_alpha = r: scaling 1, the scale is inside B)."""
    from hetero_ray.runners.prepare import input_hashes, open_source, open_target

    target = open_target(spec)[0]
    dtype = target.tensor(next(iter(target.modules.values())).a_key).dtype
    tensors = dict(target.all_tensors())
    for path, (a, b) in factors.items():
        m = target.modules[path]
        tensors[m.a_key] = a.to(dtype)
        tensors[m.b_key] = b.to(dtype)
    config = {**target.config, "r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {},
              "alpha_pattern": {}}
    sources = [open_source(spec, i)[0] for i in range(len(spec.sources))]
    report = {**report_header(spec, input_hashes(spec, target, sources), timings,
                              alignment=extra.pop("alignment", None)), "rank": rank, **extra}
    card = (f"# {spec.resolved_name()}\n\nLoRA adapter for `{spec.target.base}` made by hetero-ray's "
            f"`{spec.strategy}` strategy ({strategy.description}) from the target `{spec.target.adapter}` and "
            f"{len(sources)} source(s). Rank {rank}. Provenance: fusion_report.json.\n")
    return write_output(spec, config, tensors, report, card)
