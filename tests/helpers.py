"""Helpers shared by the tests (fixtures live in conftest.py): specs for the tiny zoo, a workspace of
copied inputs a test may break, and a hash of every file under a tree."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file

from hetero_ray.io.adapters import CONFIG_NAME, WEIGHTS_NAME

# (family, adapter rank): Llama target; sources of other depths, widths and ranks
SOURCES = {"qwen2": 2, "mistral": 8, "gemma3": 4, "phi3": 4}


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


def tree_state(*roots: Path) -> dict[str, str]:
    """Path -> sha256 of every file (symlinks by their target, not followed) under ``roots``."""
    state = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                if p.is_symlink():
                    state[str(p)] = "link:" + os.readlink(p)
                elif p.is_file():
                    state[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return state


class Workspace:
    """A directory of inputs a case may break: target base + adapter, two sources, a Phi-3 base, replay."""

    def __init__(self, root: Path, zoo: dict[str, Path]):
        self.root = root
        for name, key in [("target-base", "llama-base"), ("target-lora", "llama-lora"), ("src-qwen2", "qwen2-lora"),
                          ("src-phi3", "phi3-lora"), ("phi3-base", "phi3-base")]:
            shutil.copytree(zoo[key], root / name)
        shutil.copy(zoo["replay"], root / "replay.jsonl")
        self.spec = {
            "output": "fused",
            "target": {"base": "target-base", "adapter": "target-lora"},
            "sources": [{"adapter": "src-qwen2"}, {"adapter": "src-phi3", "base": "phi3-base"}],
            "replay": [{"path": "replay.jsonl", "take": 8}],
            "method": {"num_projections": 16},
            "training": {"epochs": 1, "grad_accum": 1, "batch_size": 2, "max_length": 48, "max_steps": 1},
            "cluster": {"workers": 1, "zero_stage": 0},
        }

    def path(self, rel: str) -> Path:
        return self.root / rel

    def write_spec(self, text: str | None = None) -> str:
        p = self.root / "spec.yaml"
        p.write_text(text if text is not None else yaml.safe_dump(self.spec))
        return str(p)

    def fuse(self, *flags: str) -> list[str]:
        return ["fuse", self.write_spec(), "--no-ray", *flags]

    def edit_config(self, rel: str, fn: Callable[[dict], object]) -> None:
        p = self.path(rel) / (CONFIG_NAME if (self.path(rel) / CONFIG_NAME).exists() else "config.json")
        config = json.loads(p.read_text())
        new = fn(config)
        p.write_text(json.dumps(config if new is None else new))

    def edit_tensors(self, rel: str, fn: Callable[[dict], None]) -> None:
        p = self.path(rel) / WEIGHTS_NAME
        tensors = load_file(str(p))
        fn(tensors)
        save_file(tensors, str(p))
