"""FusionSpec: the one input of a fusion run. A frozen, validated pydantic model; YAML files, CLI flags,
the job entrypoint and the Python client all go through it. Paths are relative to the spec file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from hetero_ray.errors import SpecError

Auto = Literal["auto"]
Positive = Annotated[int, Field(gt=0)]
# a run name becomes a directory under cluster.storage: one plain path component
RUN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


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
    take: int | float | Literal["all"] = Field("all", description="a count, a fraction in (0, 1], or all")

    @field_validator("take", mode="before")
    @classmethod
    def _not_bool(cls, v):
        if isinstance(v, bool):
            raise ValueError("take must be a positive count, a fraction in (0, 1], or 'all', not a boolean")
        return v

    @field_validator("take")
    @classmethod
    def _positive(cls, v):
        if v != "all" and (v <= 0 or (isinstance(v, float) and v > 1)):
            raise ValueError("take must be a positive count, a fraction in (0, 1], or 'all'")
        return v


class TeachPromptSpec(ReplaySpec):
    sources: list[str] | None = Field(None, min_length=1, description="ids of the sources that answer this file "
                                      "(default: every source); e.g. each expert its own domain's prompts")

    @model_serializer(mode="wrap")
    def _omit_unset_sources(self, handler):
        # left out when unset, so the spec digest (and the run name) of a spec written before this field existed
        # is unchanged and `completed()` still finds its finished output
        data = handler(self)
        if data.get("sources") is None:
            data.pop("sources", None)
        return data


class TeachSpec(_Strict):
    """Prompts the source experts answer (teacher signals); records need an ``instruction``, never an output."""

    prompts: list[TeachPromptSpec] = Field(min_length=1, description="record files (JSON list or JSONL), how "
                                           "many, and which sources answer them")
    max_new_tokens: int = Field(64, gt=0, description="longest teacher answer, in source tokens")
    batch_size: int = Field(8, gt=0, description="prompts per generation batch")
    balance: Literal["tokens", "sources"] = Field("tokens", description="how the teacher terms weigh their "
                                                  "examples: tokens (every answer token alike), sources (every "
                                                  "source alike, whatever its number of prompts and the length of "
                                                  "its answers)")

    @model_serializer(mode="wrap")
    def _omit_default_balance(self, handler):
        # left out at its default, so the digest of a spec written before this field existed is unchanged
        data = handler(self)
        if data.get("balance") == "tokens":
            data.pop("balance", None)
        return data


class MethodSpec(_Strict):
    """The HeteroFusion hyper-parameters; defaults are the paper's, sizes scale with the adapters."""

    preset: Literal["auto", "paper"] = Field("auto", description="auto: sizes scale with the adapters; paper: "
                                             "block 4096, width 1024, 8 heads, 4096 positions")
    alignment: str = "tail"
    transfer_ratio: float = Field(1.0, gt=0, le=1)
    block_size: Positive | Auto = "auto"
    embed_dim: Positive | Auto = "auto"
    num_heads: Positive | Auto = "auto"
    max_positions: Positive | Auto = "auto"
    alpha_init: float = 0.3
    mu_gate: float = 0.1
    lambda_reg: float = Field(0.005, ge=0)
    mu_target: float = 0.0
    sigma_target: float = Field(1.0, gt=0)
    num_projections: int = Field(2048, gt=0)
    rdm_max_samples: int | None = Field(None, gt=0, description="RDM on at most this many rows per term (a "
                                        "random subset each step; biases the estimate up); null: every row, as "
                                        "the paper")
    rdm_sort_budget: int | None = Field(2048 * 128, gt=0, description="at most this many projected values per "
                                        "RDM sort: a term with more rows uses fewer projections (not under 64; "
                                        "unbiased, noisier); the paper's 2048 up to 128 rows; null: always "
                                        "num_projections")
    rdm_directions: Literal["orthogonal", "iid"] = Field("orthogonal", description="RDM's directions: "
                                                         "orthogonal in blocks of the encoder width (each still "
                                                         "uniform on the sphere: the same expectation, lower "
                                                         "variance); iid: independent, as the paper")
    net: Literal["paper", "grounded"] = Field("paper", description="paper: the authors' transfer network; "
                                              "grounded: values linear in the raw source tokens (zero sources "
                                              "give dB = 0), per-source gates that can close, steps of ~lr")
    extra_rank: int = Field(0, ge=0, description="rank added beside the target's (new A and B rows, trained "
                                                 "directly), so the update is not confined to row(A_t)")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> MethodSpec:
        if isinstance(self.embed_dim, int) and isinstance(self.num_heads, int) and self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} does not divide embed_dim {self.embed_dim} (attention "
                             "splits the width evenly across heads)")
        return self


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
    partition: Literal["auto", "groups", "replicate"] = Field(
        "auto", description="how workers share the transfer networks: `groups` (each worker owns whole module "
        "groups: their nets, optimizer state and candidates; dB exchanged once per step), `replicate` (every "
        "worker holds every net, ZeRO shards them), `auto` (groups when there are at least as many groups as "
        "workers)")


# With a `teach:` section, what a spec leaves unset resolves to the setting that passed the quality benchmark
# against every control on both task pairs measured (docs/results.md): the target's LoRA and 8 added rank
# trained on the replay and on the source experts' answers. Transfer networks (`strategy: heterofusion`,
# `method.net: grounded`) tied with it on one pair and fell behind on the other. Without `teach:` the
# paper's defaults stand (heterofusion on the replay loss), the one strategy that reads the sources' weights
# without a teacher; nothing measured transfers that way.
TEACH_DEFAULTS = {"strategy": "distill_only", "objective": {"paper": 1.0, "distill": 1.0}, "method.extra_rank": 8}


def _teach_defaults(data: dict) -> dict:
    """TEACH_DEFAULTS for what ``data`` (a spec's raw fields, with `teach:`) leaves unset; a merge's settings
    are left alone (it trains nothing)."""
    if data.get("teach") is None:
        return data
    from hetero_ray.strategies import STRATEGIES

    data = {**data}
    data.setdefault("strategy", TEACH_DEFAULTS["strategy"])
    name = data["strategy"]
    if not isinstance(name, str) or name not in STRATEGIES or STRATEGIES[name].kind != "trained":
        return data  # a merge; or a strategy its own validator refuses
    for key, value in TEACH_DEFAULTS.items():
        section, _, leaf = key.rpartition(".")
        if not section:
            data.setdefault(leaf, value)
        elif section not in data or isinstance(data[section], dict):
            data[section] = {leaf: value, **data.get(section, {})}
        elif isinstance(data[section], BaseModel) and leaf not in data[section].model_fields_set:
            data[section] = data[section].model_copy(update={leaf: value})
    return data


class FusionSpec(_Strict):
    name: str | None = Field(None, pattern=RUN_NAME, description="run name: letters, digits, '.', '_', '-'")
    seed: int = Field(0, ge=0, lt=2**32)
    output: Path
    overwrite: bool = False
    target: TargetSpec
    sources: list[SourceSpec] = Field(min_length=1)
    replay: list[ReplaySpec] = Field(min_length=1)
    method: MethodSpec = MethodSpec()
    training: TrainingSpec = TrainingSpec()
    cluster: ClusterSpec = ClusterSpec()
    strategy: str = Field("heterofusion", description="a registered strategy (`hetero-ray strategies` lists them); "
                          "with `teach:` the default is distill_only")
    params: dict = Field(default_factory=dict, description="the strategy's own parameters (validated by it)")
    teach: TeachSpec | None = Field(None, description="prompts for the source experts' teacher signals")
    objective: dict[str, float] = Field(default_factory=lambda: {"paper": 1.0},
                                        description="weighted terms of the training loss (`hetero-ray strategies` "
                                                    "lists them): paper, distill, excess, retain; with `teach:` "
                                                    "the default is paper 1 + distill 1")
    allow_pickle: bool = False

    @model_validator(mode="before")
    @classmethod
    def _earlier_keys(cls, data):
        """With `teach:`, unset fields take TEACH_DEFAULTS; ``control: X`` (a variant of heterofusion) still reads
        as ``strategy: X``; ``merge:`` moved."""
        if not isinstance(data, dict):
            return data
        if "merge" in data:
            raise ValueError("merge: the baselines' settings moved to `params:` of the chosen strategy (e.g. "
                             "strategy: ties, params: {density: 0.3, weights: [1, 0.5]})")
        if "control" in data:
            data = dict(data)
            control = data.pop("control")
            strategy = data.setdefault("strategy", "heterofusion")  # with or without `teach:`
            if control not in (None, "none"):
                from hetero_ray.controls import Control

                if control not in {c.value for c in Control}:
                    raise ValueError(f"control: {control!r} is not a control ({', '.join(c.value for c in Control)})")
                if strategy not in ("heterofusion", control):
                    raise ValueError(f"strategy {strategy!r} with control {control!r}: a control is a variant of "
                                     "heterofusion; set `strategy:` alone")
                data["strategy"] = control
        return _teach_defaults(data)

    @field_validator("strategy")
    @classmethod
    def _registered(cls, v: str) -> str:
        from hetero_ray.strategies import STRATEGIES

        if v not in STRATEGIES:
            raise ValueError(f"unknown strategy {v!r}; known: {', '.join(STRATEGIES)}")
        return v

    @field_validator("params", mode="before")
    @classmethod
    def _strategy_params(cls, v, info):
        """The strategy's own model validates them; defaults filled in, so the digest names what runs."""
        from hetero_ray.strategies import validate_params

        strategy = info.data.get("strategy")
        if strategy is None:
            return v  # the strategy itself was refused; that error is reported
        try:
            return validate_params(strategy, {} if v is None else v)
        except ValidationError as e:
            problems = "; ".join(f"params.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise ValueError(f"for strategy {strategy!r}: {problems}") from None

    @field_validator("objective")
    @classmethod
    def _terms(cls, v: dict[str, float]) -> dict[str, float]:
        from hetero_ray.train.objectives import OBJECTIVES

        for name, weight in v.items():
            if name not in OBJECTIVES:
                raise ValueError(f"unknown objective term {name!r}; known: {', '.join(OBJECTIVES)}")
            if weight < 0:
                raise ValueError(f"objective.{name}: weight {weight} is negative")
        if not any(w > 0 for w in v.values()):
            raise ValueError("objective: at least one term needs a positive weight")
        return v

    @model_validator(mode="after")
    def _added_rank(self) -> FusionSpec:
        if self.strategy == "added_rank_only" and not self.method.extra_rank:
            raise ValueError("strategy added_rank_only trains only the added rank: set method.extra_rank > 0")
        return self

    @model_validator(mode="after")
    def _teacher_terms(self) -> FusionSpec:
        from hetero_ray.train.objectives import OBJECTIVES

        needs = [n for n, w in self.objective.items() if w > 0 and OBJECTIVES.lookup(n).needs_teacher]
        if needs and self.teach is None:
            raise ValueError(f"objective terms {needs} learn from the source experts' answers: add a `teach:` "
                             "section with the prompts they answer")
        return self

    @model_validator(mode="after")
    def _names(self) -> FusionSpec:
        ids = [s.id or s.adapter.name for s in self.sources]
        if len(set(ids)) != len(ids):
            raise ValueError(f"sources must have distinct ids (set `id:`), got {ids}")
        seen = {self.target.adapter.resolve(): "target.adapter"}
        for i, s in enumerate(self.sources):
            where = seen.setdefault(s.adapter.resolve(), f"sources[{i}].adapter")
            if where != f"sources[{i}].adapter":
                raise ValueError(f"sources[{i}].adapter {s.adapter} is the same adapter as {where}; each source "
                                 "must be a different expert, and the target is not a source")
        if self.teach is not None:
            answered = set()
            for j, p in enumerate(self.teach.prompts):
                unknown = sorted(set(p.sources or ids) - set(ids))
                if unknown:
                    raise ValueError(f"teach.prompts[{j}].sources: no source has id {unknown}; the ids are {ids}")
                answered.update(p.sources or ids)
            silent = [x for x in ids if x not in answered]
            if silent:
                raise ValueError(f"teach.prompts: no prompt file is answered by source(s) {silent}; list them in a "
                                 "file's `sources:` (or leave `sources:` out: every source answers that file)")
        return self

    @property
    def control(self):
        """The :class:`~hetero_ray.controls.Control` a trained strategy runs with (None for a merge)."""
        from hetero_ray.strategies import get_strategy

        return get_strategy(self.strategy).control

    def source_ids(self) -> list[str]:
        return [s.id or s.adapter.name for s in self.sources]

    def resolved_name(self) -> str:
        return self.name or f"fusion-{self.digest()[:10]}"

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()

    def input_paths(self) -> dict[str, Path]:
        """Every input the spec names, by field (``target.base``, ``sources[0].adapter``, ``replay[1].path``, ...)."""
        paths = {"target.base": self.target.base, "target.adapter": self.target.adapter}
        for i, s in enumerate(self.sources):
            paths[f"sources[{i}].adapter"] = s.adapter
            if s.base:
                paths[f"sources[{i}].base"] = s.base
        paths.update({f"replay[{i}].path": r.path for i, r in enumerate(self.replay)})
        if self.teach is not None:
            paths.update({f"teach.prompts[{i}].path": r.path for i, r in enumerate(self.teach.prompts)})
        return paths

    def protected_inputs(self, spec_file: Path | None = None) -> dict[str, Path]:
        """Everything a run reads and must never write to, by field: the inputs, the local bases the adapters
        name, and the spec file when there is one."""
        return {**self.input_paths(), **self._adapter_bases(), **({"spec file": spec_file} if spec_file else {})}

    def _adapter_bases(self) -> dict[str, Path]:
        """Local base models the adapters name in ``base_model_name_or_path``: read as inputs, so protected."""
        out = {}
        for field_name, adapter in [("target.adapter", self.target.adapter),
                                    *((f"sources[{i}].adapter", s.adapter) for i, s in enumerate(self.sources))]:
            try:
                base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
            except (OSError, ValueError, AttributeError, RecursionError):
                continue  # reading the adapter reports what is wrong with its config
            if isinstance(base, str) and base and Path(base).exists():
                out[f"{field_name}'s base_model_name_or_path"] = Path(base)
        return out

    def run_dir(self) -> Path | None:
        """Where run state and checkpoints go when ``cluster.storage`` is on this machine's filesystem (a path
        or a ``file://`` URI); None for remote storage."""
        storage = self.cluster.storage
        if "://" in storage:
            from pyarrow.fs import FileSystem, LocalFileSystem

            try:
                fs, path = FileSystem.from_uri(storage)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad URI
                raise SpecError(f"cluster.storage: {storage}: not a filesystem URI pyarrow can open ({e})") from None
            return Path(path) / self.resolved_name() if isinstance(fs, LocalFileSystem) else None
        return Path(storage) / self.resolved_name()

    def check_files(self, origin: str = "spec", spec_file: Path | None = None) -> None:
        """Before any work: every input exists and is of the right kind, every replay file holds usable
        records, and neither the output nor the run directory is, contains or lies inside an input (symlinks
        resolved). Raises SpecError / DataError / OutputError naming the field."""
        from hetero_ray.io.outputs import check_replaceable, check_spares_inputs
        from hetero_ray.train.replay import load_records

        inputs = self.input_paths()
        for field_name, path in inputs.items():
            if not path.exists():
                raise SpecError(f"{origin}: {field_name}: {path} does not exist")
            want_dir = field_name.endswith(".adapter") or field_name == "target.base"
            if want_dir and not path.is_dir():
                raise SpecError(f"{origin}: {field_name}: {path} is not a directory")
            if field_name.startswith(("replay", "teach")) and not path.is_file():
                raise SpecError(f"{origin}: {field_name}: {path} is not a file")
        if not (self.target.base / "config.json").is_file():
            raise SpecError(f"{origin}: target.base: {self.target.base} has no config.json (a local Hugging Face "
                            "model directory is expected)")
        for i, r in enumerate(self.replay):
            load_records(r.path, r.take, self.seed + i, field=f"{origin}: replay[{i}]")
        for i, r in enumerate(self.teach.prompts if self.teach else []):
            load_records(r.path, r.take, self.seed + i, field=f"{origin}: teach.prompts[{i}]", need_output=False)
        protected = self.protected_inputs(spec_file)
        check_spares_inputs(self.output, protected, origin)
        check_replaceable(self.output, self.overwrite, f"{origin}: output")
        run_dir = self.run_dir()
        if run_dir is not None:
            check_spares_inputs(run_dir, protected, origin, field="cluster.storage/name (the run directory)")
            check_spares_inputs(self.output, {"cluster.storage/name (the run directory)": run_dir}, origin)


def _resolve(data: dict, root: Path) -> dict:
    def fix(p):
        if not isinstance(p, str | Path):
            return p  # pydantic names the field and the wrong type
        return str(p if Path(p).is_absolute() else root / p)

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
    if isinstance(data.get("teach"), dict) and isinstance(data["teach"].get("prompts"), list):
        data["teach"] = {**data["teach"], "prompts": [{**r, "path": fix(r.get("path"))} if isinstance(r, dict) else r
                                                      for r in data["teach"]["prompts"]]}
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


def read_spec_file(path: str | Path) -> dict:
    """A spec file's mapping, unvalidated (raises SpecError naming the file)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text: {e}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: invalid YAML: {e}") from None
    except RecursionError:
        raise SpecError(f"{path}: YAML nested too deeply") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping at the top level, got a YAML {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: dict, origin: str) -> dict:
    """Set dotted fields (``training.lr``) in a spec mapping, in place; returns it."""
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SpecError(f"{origin}: {p}: expected a mapping (to set {dotted})")
        node[leaf] = value
    return data


def load_spec(path: str | Path, overrides: dict | None = None) -> FusionSpec:
    path = Path(path)
    data = apply_overrides(read_spec_file(path), overrides or {}, str(path))
    spec = parse_spec(data, path.parent, origin=str(path))
    spec.check_files(origin=str(path), spec_file=path)
    return spec
