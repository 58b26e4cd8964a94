"""Fusion strategies in one registry: HeteroFusion, its controls and the closed-form baselines.

A strategy is one object: a name, a description, a pydantic ``Params`` model (the spec's ``params:`` for it,
validated when the spec is loaded), and the code that runs it. The registry is the only list of names: the
spec, the CLI (``hetero-ray strategies``), the benchmark and the demo read it. Adding a merge is one
:class:`MergeStrategy` subclass registered with :func:`register` (see ``merges.py``), plus its test.

:func:`run_strategy` is the one path every entry point takes (``hetero-ray fuse``, :func:`hetero_ray.run`,
``jobs/fuse.py``, the benchmark, the demo): it checks and protects every input before any work, runs the
strategy, and writes one output with one report schema (:func:`hetero_ray.io.export.write_output`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from hetero_ray.controls import Control
from hetero_ray.errors import SpecError
from hetero_ray.registry import Registry
from hetero_ray.spec import FusionSpec


class NoParams(BaseModel):
    """A strategy without parameters of its own (it reads the spec's method/training sections)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Strategy:
    """One registered way of producing the fused adapter."""

    name: ClassVar[str]
    description: ClassVar[str]
    kind: ClassVar[str]  # "trained" (transfer networks or a fine-tune on the replay) or "merge" (closed form)
    Params: ClassVar[type[BaseModel]] = NoParams
    # the merge needs experts on the target's own base (same family, same module paths and shapes)
    same_family: ClassVar[bool] = False
    control: Control | None = None

    def run(self, spec: FusionSpec, address: str | None, use_ray: bool,
            on_progress: Callable[[dict], None] | None) -> Path:
        raise NotImplementedError

    def params(self, spec: FusionSpec) -> BaseModel:
        try:
            return self.Params.model_validate(spec.params)
        except ValidationError as e:
            raise SpecError(f"params: not valid for strategy {self.name!r}: {e.errors()[0]['msg']} at "
                            f"{'.'.join(map(str, e.errors()[0]['loc']))}") from None


STRATEGIES: Registry[Strategy] = Registry("strategy", SpecError)


def register(strategy: Strategy) -> Strategy:
    return STRATEGIES.add(strategy.name, strategy)


def get_strategy(name: str) -> Strategy:
    return STRATEGIES.lookup(name)


def validate_params(name: str, params: dict) -> dict:
    """The strategy's parameters with defaults filled in (raises ValueError naming the bad ones)."""
    strategy = get_strategy(name)
    return strategy.Params.model_validate(params).model_dump()


def describe() -> list[dict]:
    """Every strategy: name, kind, description and its parameters with their defaults (for the CLI)."""
    out = []
    for s in STRATEGIES.values():
        fields = {n: {"default": f.default, "description": f.description or ""} for n, f in
                  s.Params.model_fields.items()}
        out.append({"name": s.name, "kind": s.kind, "description": s.description, "params": fields})
    return out


def completed(spec: FusionSpec) -> bool:
    """True when ``spec.output`` already holds a finished output of this very spec: outputs are renamed into
    place only when complete, and their report carries the run name and the resolved spec, both compared here
    (a named run whose settings changed is not complete). Inputs are named by path, so a caller that rebuilds
    inputs in place must not rely on this."""
    report = spec.output / "fusion_report.json"
    if not (spec.output / "adapter_model.safetensors").is_file() or not report.is_file():
        return False
    try:
        found = json.loads(report.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not isinstance(found, dict) or found.get("name") != spec.resolved_name():
        return False
    written = hashlib.sha256(json.dumps(found.get("spec"), sort_keys=True).encode()).hexdigest()
    return written == spec.digest()


def run_strategy(spec: FusionSpec, address: str | None = None, use_ray: bool = True,
                 on_progress: Callable[[dict], None] | None = None) -> Path:
    """Run ``spec.strategy``; returns the output adapter directory. Every input is checked and protected
    before any work; an input error raised inside a Ray actor or worker comes back as itself."""
    from hetero_ray.errors import find_input_error

    strategy = get_strategy(spec.strategy)
    spec.check_files()
    try:
        return strategy.run(spec, address, use_ray, on_progress)
    except Exception as e:
        cause = find_input_error(e)
        if cause is None or cause is e:
            raise
        raise cause from None


from hetero_ray.strategies import heterofusion  # noqa: E402,F401  - registers the trained strategies
from hetero_ray.strategies.merges import MergeStrategy, factorize, product  # noqa: E402  - and the merges

__all__ = ["STRATEGIES", "Control", "MergeStrategy", "NoParams", "Strategy", "completed", "describe", "factorize",
           "get_strategy", "product", "register", "run_strategy", "validate_params"]
