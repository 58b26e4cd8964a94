"""Writing the fused adapter: A_t unchanged, B_t + alpha dB for fused modules, every other tensor copied,
plus provenance and report files, all written to a temporary directory renamed into place when complete."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from collections.abc import Mapping
from pathlib import Path

import torch

from hetero_ray.adapters import AdapterError, LoraAdapter, write_adapter
from hetero_ray.outputs import atomic_output_dir
from hetero_ray.plots import write_plots

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


def export_fused_adapter(
    out_dir: str | Path,
    target: LoraAdapter,
    deltas: Mapping[str, torch.Tensor],
    report: Mapping,
    card: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the fused adapter and its report atomically; returns the output directory."""
    tensors = fused_tensors(target, deltas)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        write_adapter(tmp, target.config, tensors, metadata={"hetero_ray": "fused"})
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
        if card:
            (tmp / "README.md").write_text(card)
        write_plots(dict(report), tmp)
    return Path(out_dir)
