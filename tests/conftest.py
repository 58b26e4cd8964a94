"""Shared fixtures: a zoo of tiny models of real families with LoRA adapters, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hetero_ray.contrib import tiny  # noqa: E402

# (family, adapter rank): Llama target; sources of other depths, widths and ranks
SOURCES = {"qwen2": 2, "mistral": 8, "gemma3": 4, "phi3": 4}


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    paths: dict[str, Path] = {}
    for i, family in enumerate(["llama", *SOURCES]):
        base = tiny.build_tiny_model(family, root / f"{family}-base", seed=i)
        rank = 4 if family == "llama" else SOURCES[family]
        paths[f"{family}-base"] = base
        paths[f"{family}-lora"] = tiny.build_lora_adapter(base, root / f"{family}-lora", family, rank=rank,
                                                          seed=100 + i)
    paths["replay"] = tiny.write_jsonl(tiny.color_task_records(24, seed=0), root / "replay.jsonl")
    return paths


def make_spec(zoo: dict[str, Path], out: Path, sources=("qwen2", "mistral", "gemma3"), **overrides):
    """A FusionSpec for the tiny zoo with small, fast settings."""
    from hetero_ray.spec import parse_spec

    data = {
        "seed": 0,
        "output": str(out),
        "target": {"base": str(zoo["llama-base"]), "adapter": str(zoo["llama-lora"])},
        "sources": [{"adapter": str(zoo[f"{f}-lora"])} for f in sources],
        "replay": [{"path": str(zoo["replay"])}],
        "method": {"num_projections": 64},
        "training": {"epochs": 3, "lr": 3e-3, "grad_accum": 4, "batch_size": 2, "max_length": 64},
        "cluster": {"workers": 1, "zero_stage": 0},
    }
    for key, value in overrides.items():
        section, _, leaf = key.partition(".")
        if leaf:
            data[section] = {**data.get(section, {}), leaf: value}
        else:
            data[section] = value
    return parse_spec(data)
