"""FusionSpec: the one input of a fusion run. A frozen, validated pydantic model; YAML files, CLI flags,
the job entrypoint and the Python client all go through it. Paths are relative to the spec file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hetero_ray.errors import SpecError

Auto = Literal["auto"]
CONTROLS = ("none", "zero_sources", "random_sources", "replay_only")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TargetSpec(_Strict):
    base: Path = Field(description="HF model directory (config.json + safetensors)")
    adapter: Path = Field(description="PEFT LoRA adapter directory of the target")
    family: str | None = Field(None, description="override the detected family")


class SourceSpec(_Strict):
    adapter: Path = Field(description="PEFT LoRA adapter directory")
    family: str | None = Field(None, description="override the detected family")
    base: Path | None = Field(None, description="the source base's config.json or directory (optional)")
    id: str | None = Field(None, description="name in the report; default: the adapter directory name")


class ReplaySpec(_Strict):
    path: Path
    take: int | float | Literal["all"] = "all"

    @field_validator("take")
    @classmethod
    def _positive(cls, v):
        if v != "all" and (v <= 0 or (isinstance(v, float) and v > 1)):
            raise ValueError("take must be a positive count, a fraction in (0, 1], or 'all'")
        return v


class MethodSpec(_Strict):
    """The HeteroFusion hyper-parameters; defaults are the paper's, sizes scale with the adapters."""

    preset: Literal["auto", "paper"] = Field("auto", description="auto: sizes scale with the adapters; paper: "
                                             "block 4096, width 1024, 8 heads, 4096 positions")
    alignment: str = "tail"
    transfer_ratio: float = Field(1.0, gt=0, le=1)
    block_size: int | Auto = "auto"
    embed_dim: int | Auto = "auto"
    num_heads: int | Auto = "auto"
    max_positions: int | Auto = "auto"
    alpha_init: float = 0.3
    mu_gate: float = 0.1
    lambda_reg: float = Field(0.005, ge=0)
    mu_target: float = 0.0
    sigma_target: float = Field(1.0, gt=0)
    num_projections: int = Field(2048, gt=0)


class TrainingSpec(_Strict):
    epochs: int = Field(3, gt=0)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_accum: int = Field(8, gt=0)
    batch_size: int = Field(1, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_length: int = Field(512, gt=8)
    max_grad_norm: float | None = Field(None, gt=0, description="clip the global gradient norm (default: no clipping)")
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")


class ClusterSpec(_Strict):
    workers: int = Field(2, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 3
    storage: str = "runs/"
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    dtype: Literal["fp32", "bf16"] = "fp32"


STRATEGY_NAMES = ("heterofusion", "zero_sources", "random_sources", "replay_only", "target_only",
                  "task_arithmetic", "ties", "dare", "naive_transfer")


class MergeSpec(_Strict):
    """Settings of the closed-form baselines (see hetero_ray.strategies)."""

    weights: list[float] | None = Field(None, description="per input, target first (default: all 1)")
    density: float = Field(0.2, gt=0, le=1, description="TIES: fraction of entries kept per update")
    scale: float = Field(1.0, gt=0, description="TIES: lambda applied to the merged update")
    drop_rate: float = Field(0.5, ge=0, lt=1, description="DARE: probability of dropping an entry")
    rank: int | None = Field(None, gt=0, description="TIES/DARE: rank of the SVD factorization (default: sum)")


class FusionSpec(_Strict):
    name: str | None = None
    seed: int = 0
    output: Path
    overwrite: bool = False
    target: TargetSpec
    sources: list[SourceSpec] = Field(min_length=1)
    replay: list[ReplaySpec] = Field(min_length=1)
    method: MethodSpec = MethodSpec()
    training: TrainingSpec = TrainingSpec()
    cluster: ClusterSpec = ClusterSpec()
    control: Literal["none", "zero_sources", "random_sources", "replay_only"] = "none"
    strategy: Literal[STRATEGY_NAMES] = "heterofusion"
    merge: MergeSpec = MergeSpec()
    allow_pickle: bool = False

    @model_validator(mode="after")
    def _names(self) -> FusionSpec:
        if self.strategy != "heterofusion" and self.control != "none":
            raise ValueError(f"strategy {self.strategy!r} with control {self.control!r}: a control is a "
                             "variant of heterofusion; set one of them")
        ids = [s.id or s.adapter.name for s in self.sources]
        if len(set(ids)) != len(ids):
            raise ValueError(f"sources must have distinct ids (set `id:`), got {ids}")
        return self

    def source_ids(self) -> list[str]:
        return [s.id or s.adapter.name for s in self.sources]

    def resolved_name(self) -> str:
        return self.name or f"fusion-{self.digest()[:10]}"

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()

    def check_files(self, origin: str = "spec") -> None:
        """Every input path exists; raises SpecError naming the field."""
        checks = [("target.base", self.target.base), ("target.adapter", self.target.adapter)]
        checks += [(f"sources[{i}].adapter", s.adapter) for i, s in enumerate(self.sources)]
        checks += [(f"sources[{i}].base", s.base) for i, s in enumerate(self.sources) if s.base]
        checks += [(f"replay[{i}].path", r.path) for i, r in enumerate(self.replay)]
        for field_name, path in checks:
            if not path.exists():
                raise SpecError(f"{origin}: {field_name}: {path} does not exist")
        if self.output.exists() and not self.overwrite:
            raise SpecError(f"{origin}: output: {self.output} already exists (set overwrite: true or --overwrite)")


def _resolve(data: dict, root: Path) -> dict:
    def fix(p):
        return str(p if Path(p).is_absolute() else root / p) if p is not None else None

    data = dict(data)
    if "output" in data:
        data["output"] = fix(data["output"])
    if isinstance(data.get("target"), dict):
        t = dict(data["target"])
        t["base"], t["adapter"] = fix(t.get("base")), fix(t.get("adapter"))
        data["target"] = t
    if isinstance(data.get("sources"), list):
        data["sources"] = [
            {**s, "adapter": fix(s.get("adapter")), **({"base": fix(s["base"])} if s.get("base") else {})}
            if isinstance(s, dict) else s for s in data["sources"]
        ]
    if isinstance(data.get("replay"), list):
        data["replay"] = [{**r, "path": fix(r.get("path"))} if isinstance(r, dict) else r for r in data["replay"]]
    if isinstance(data.get("cluster"), dict) and "storage" in data["cluster"]:
        storage = data["cluster"]["storage"]
        if "://" not in str(storage):
            data["cluster"] = {**data["cluster"], "storage": fix(storage)}
    return data


def parse_spec(data: dict, root: str | Path = ".", origin: str = "spec") -> FusionSpec:
    """Validate a spec mapping; relative paths resolve against ``root``. Raises SpecError naming fields."""
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: expected a mapping at the top level")
    try:
        return FusionSpec.model_validate(_resolve(data, Path(root).resolve()))
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in e.errors()
        )
        raise SpecError(f"{origin}: {problems}") from None


def load_spec(path: str | Path, overrides: dict | None = None) -> FusionSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: invalid YAML: {e}") from e
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    spec = parse_spec(data, path.parent, origin=str(path))
    spec.check_files(origin=str(path))
    return spec
