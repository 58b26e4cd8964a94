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
from tests.helpers import SOURCES  # noqa: E402


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
