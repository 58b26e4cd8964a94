"""Fusion strategies: HeteroFusion, its controls and the baselines, in one registry.

``spec.strategy`` picks one; :func:`run_strategy` runs it and writes a PEFT adapter for the target with a
``fusion_report.json``. Trained strategies (HeteroFusion and its controls) go through the pipeline; the others
are closed-form merges computed in LoRA *product space* (the updates s·B·A, not A and B averaged separately):

- ``target_only``: the target adapter, unchanged.
- ``task_arithmetic``: ΔW = w_t ΔW_t + Σ w_i ΔW_i. Exact at rank Σ r: the factors are concatenated.
- ``ties``: per update, keep the ``density`` fraction of entries largest in magnitude; elect each entry's sign
  by the sum of the kept values; average the kept values that agree with it (disjoint mean); scale by
  ``lambda``. The dense result is factored back by truncated SVD at ``rank`` (default Σ r); the relative
  error of that factorization is reported.
- ``dare``: per update, drop entries with probability ``drop_rate`` (seeded) and rescale the rest by
  1/(1 - drop_rate); weighted sum as task arithmetic; SVD factorization as TIES.
- ``naive_transfer``: the simplest cross-family baseline. Each target module receives, for every source slot
  the alignment plan feeds it (tail-aligned layers by default), the source update with rows and columns
  cropped or zero-padded to the target's shape: ΔW_t + Σ w_i P(ΔW_i). Exact at rank r_t + Σ r_i, because
  cropping or padding B's rows and A's columns crops or pads the product.

The three same-family merges need sources whose modules have the target's paths and shapes (experts on the
target's base); anything else is refused, naming the file and module.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from hetero_ray.adapters import LoraAdapter, write_adapter
from hetero_ray.candidates import slot_tensors
from hetero_ray.errors import HeteroRayError
from hetero_ray.outputs import atomic_output_dir
from hetero_ray.spec import FusionSpec


@dataclass(frozen=True)
class Strategy:
    name: str
    kind: str  # "trained": the HeteroFusion pipeline (with a control); "merge": closed form
    description: str
    merge: Callable[[FusionSpec], tuple[dict[str, torch.Tensor], int, dict]] | None = None


STRATEGIES: dict[str, Strategy] = {}


def register(name: str, kind: str, description: str):
    def wrap(fn):
        STRATEGIES[name] = Strategy(name, kind, description, fn)
        return fn

    return wrap


for _name, _desc in [("heterofusion", "transfer networks over aligned source updates, conflict-aware (the method)"),
                     ("zero_sources", "control: HeteroFusion with every source token zeroed"),
                     ("random_sources", "control: HeteroFusion with Gaussian sources of equal norm"),
                     ("replay_only", "control: the target's B fine-tuned on the same replay and steps")]:
    STRATEGIES[_name] = Strategy(_name, "trained", _desc)


def control_of(spec: FusionSpec) -> str:
    """The control a trained strategy runs with (``heterofusion`` uses ``spec.control``)."""
    if spec.strategy == "heterofusion":
        return spec.control
    return spec.strategy


def run_spec(spec: FusionSpec) -> FusionSpec:
    """The spec as it runs: a trained control strategy is HeteroFusion with that control set."""
    if STRATEGIES[spec.strategy].kind == "trained":
        return spec.model_copy(update={"control": control_of(spec)})
    return spec


# ---- product-space helpers -------------------------------------------------------------------------------


def product(adapter: LoraAdapter, path: str) -> torch.Tensor:
    a, b = adapter.module_tensors(path)
    return adapter.module_scaling(path) * (b.double() @ a.double())


def factorize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, relative Frobenius error) with B @ A the best rank-``rank`` approximation of ``delta``."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    b = u[:, :k] * s[:k].sqrt()
    a = s[:k].sqrt()[:, None] * vh[:k]
    if k < rank:  # pad with zero rank components so every module has the same rank
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], 1)
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], 0)
    err = float((s[k:] ** 2).sum().sqrt() / s.norm().clamp_min(1e-30))
    return a, b, err


def _weights(spec: FusionSpec) -> list[float]:
    w = spec.merge.weights or [1.0] * (1 + len(spec.sources))
    if len(w) != 1 + len(spec.sources):
        raise HeteroRayError(f"merge.weights: {len(w)} weights for the target and {len(spec.sources)} sources "
                             f"(need {1 + len(spec.sources)})")
    return list(w)


def _same_family_sources(spec: FusionSpec, target: LoraAdapter) -> list[LoraAdapter]:
    from hetero_ray.pipeline import open_source, open_target

    _, ttopo = open_target(spec)
    out = []
    for i in range(len(spec.sources)):
        src, topo = open_source(spec, i)
        if topo.family.name != ttopo.family.name:
            raise HeteroRayError(f"{spec.sources[i].adapter}: {spec.strategy} merges same-family experts on the "
                                 f"target's base; this adapter is {topo.family.name}, the target "
                                 f"{ttopo.family.name} (use heterofusion or naive_transfer across families)")
        for path, m in target.modules.items():
            sm = src.modules.get(path)
            if sm is None or (sm.d_in, sm.d_out) != (m.d_in, m.d_out):
                got = "missing" if sm is None else f"shape {(sm.d_out, sm.d_in)}"
                raise HeteroRayError(f"{spec.sources[i].adapter}: module {path}: {got}, the target's is "
                                     f"{(m.d_out, m.d_in)}; {spec.strategy} needs experts on the target's base")
        out.append(src)
    return out


def _open(spec: FusionSpec) -> LoraAdapter:
    from hetero_ray.pipeline import open_target

    return open_target(spec)[0]


def _concat(parts: list[tuple[float, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ w·B·A for parts (w, B, A) as one factor pair: A stacked, w·B side by side (the result's scaling is 1)."""
    return torch.cat([a for _, _, a in parts], 0), torch.cat([w * b for w, b, _ in parts], 1)


def _uniform_rank(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Zero-pad every module's factors to the largest rank (one ``r`` for the whole adapter)."""
    rank = max(a.shape[0] for a, _ in factors.values())
    return {p: (_fit(a, 0, rank), _fit(b, 1, rank)) for p, (a, b) in factors.items()}, rank


# ---- strategies --------------------------------------------------------------------------------------------


@register("target_only", "merge", "the target adapter alone")
def target_only(spec: FusionSpec):
    target = _open(spec)
    out = {}
    for path in target.modules:
        a, b = target.module_tensors(path)
        out[path] = (a.double(), target.module_scaling(path) * b.double())
    return *_uniform_rank(out), {}


@register("task_arithmetic", "merge", "same family: weighted sum of the updates, exact (rank = sum of ranks)")
def task_arithmetic(spec: FusionSpec):
    target = _open(spec)
    adapters = [target, *_same_family_sources(spec, target)]
    w = _weights(spec)
    out = {}
    for path in target.modules:
        parts = []
        for wi, ad in zip(w, adapters, strict=True):
            a, b = ad.module_tensors(path)
            parts.append((wi * ad.module_scaling(path), b.double(), a.double()))
        out[path] = _concat(parts)
    return *_uniform_rank(out), {}


def _dense_merge(spec: FusionSpec, combine: Callable[[list[torch.Tensor], str], torch.Tensor]):
    target = _open(spec)
    adapters = [target, *_same_family_sources(spec, target)]
    rank = spec.merge.rank or max(sum(ad.modules[p].rank for ad in adapters) for p in target.modules)
    out, errors = {}, {}
    for path in target.modules:
        a, b, errors[path] = factorize(combine([product(ad, path) for ad in adapters], path), rank)
        out[path] = (a, b)
    return out, rank, {"factorization_rel_error": {"max": max(errors.values()),
                                                   "mean": sum(errors.values()) / len(errors)}}


@register("ties", "merge", "same family: trim, elect sign, disjoint mean; SVD back to LoRA")
def ties(spec: FusionSpec):
    density, lam = spec.merge.density, spec.merge.scale

    def combine(deltas: list[torch.Tensor], _path: str) -> torch.Tensor:
        trimmed = []
        for d in deltas:
            k = max(1, int(round(density * d.numel())))
            threshold = d.abs().flatten().kthvalue(d.numel() - k + 1).values
            trimmed.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
        stack = torch.stack(trimmed)
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        total = (stack * agree).sum(0)
        count = agree.sum(0).clamp_min(1)
        return lam * total / count

    return _dense_merge(spec, combine)


@register("dare", "merge", "same family: random drop and rescale, weighted sum; SVD back to LoRA")
def dare(spec: FusionSpec):
    p, w = spec.merge.drop_rate, _weights(spec)
    gen = torch.Generator().manual_seed(spec.seed)

    def combine(deltas: list[torch.Tensor], _path: str) -> torch.Tensor:
        total = torch.zeros_like(deltas[0])
        for wi, d in zip(w, deltas, strict=True):
            keep = (torch.rand(d.shape, generator=gen, dtype=torch.float64) >= p).to(d.dtype)
            total += wi * d * keep / (1.0 - p)
        return total

    return _dense_merge(spec, combine)


def _fit(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Crop or zero-pad ``t`` along ``dim`` to ``size``."""
    n = t.shape[dim]
    if n >= size:
        return t.narrow(dim, 0, size)
    pad = list(t.shape)
    pad[dim] = size - n
    return torch.cat([t, t.new_zeros(pad)], dim)


@register("naive_transfer", "merge", "cross family: aligned source updates cropped/zero-padded into the target")
def naive_transfer(spec: FusionSpec):
    from hetero_ray.pipeline import align, open_source, open_target

    target, ttopo = open_target(spec)
    sources = [open_source(spec, i) for i in range(len(spec.sources))]
    plan = align(spec, ttopo, [t for _, t in sources])
    w = _weights(spec)
    parts: dict[str, list[tuple[float, torch.Tensor, torch.Tensor]]] = {}
    for path in target.modules:
        a, b = target.module_tensors(path)
        parts[path] = [(w[0] * target.module_scaling(path), b.double(), a.double())]
    for e in plan.entries:
        slot = ttopo.slots[(e.layer, e.role)]
        if slot.fused and e.feeds:
            raise HeteroRayError(f"{spec.target.adapter}: module {slot.module.path} is fused (holds several "
                                 "roles); naive_transfer supports unfused target modules only")
        for f in e.feeds:
            adapter, topo = sources[f.source]
            sa, sb = slot_tensors(adapter, topo.slots[(f.source_layer, e.role)])
            sa, sb = _fit(sa.double(), 1, e.d_in), _fit(sb.double(), 0, e.d_out)
            parts[slot.module.path].append((w[1 + f.source] * adapter.module_scaling(slot.module.path), sb, sa))
    # modules fed by fewer sources are zero-padded to the common rank
    return *_uniform_rank({path: _concat(p) for path, p in parts.items()}), {"alignment": plan.to_dict()}


# ---- running -----------------------------------------------------------------------------------------------


def write_merged(spec: FusionSpec, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], rank: int,
                 extra: dict, timings: dict) -> Path:
    """The merged factors as a PEFT adapter (lora_alpha = r: scaling 1, the scale is inside B) + report."""
    from hetero_ray.export import versions
    from hetero_ray.pipeline import input_hashes, open_source

    target = _open(spec)
    dtype = target.tensor(next(iter(target.modules.values())).a_key).dtype
    tensors = {}
    for path, (a, b) in factors.items():
        m = target.modules[path]
        tensors[m.a_key] = a.to(dtype)
        tensors[m.b_key] = b.to(dtype)
    config = {**target.config, "r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {},
              "alpha_pattern": {}}
    sources = [open_source(spec, i)[0] for i in range(len(spec.sources))] if spec.strategy != "target_only" else []
    report = {"strategy": spec.strategy, "description": STRATEGIES[spec.strategy].description,
              "name": spec.resolved_name(), "spec": spec.model_dump(mode="json"),
              "inputs": input_hashes(spec, target, sources) if sources else {"target_adapter": target.sha256()},
              "versions": versions(), "rank": rank, "timings_s": timings, **extra}
    with atomic_output_dir(spec.output, overwrite=spec.overwrite) as tmp:
        write_adapter(tmp, config, tensors, {"hetero_ray_strategy": spec.strategy})
        (tmp / "fusion_report.json").write_text(json.dumps(report, indent=1, default=str))
        (tmp / "README.md").write_text(
            f"# {spec.resolved_name()}\n\nLoRA adapter for `{spec.target.base}` made by hetero-ray's "
            f"`{spec.strategy}` strategy ({STRATEGIES[spec.strategy].description}) from the target "
            f"`{spec.target.adapter}` and {len(sources)} source(s). Rank {rank}. See fusion_report.json.\n")
    return Path(spec.output)


def completed(spec: FusionSpec) -> bool:
    """True when ``spec.output`` already holds a finished output of this very spec: outputs are renamed into
    place only when complete, and their report carries the run name, which hashes the resolved spec. Inputs
    are named by path, so a caller that rebuilds inputs in place must not rely on this."""
    report = spec.output / "fusion_report.json"
    if not (spec.output / "adapter_model.safetensors").is_file() or not report.is_file():
        return False
    try:
        return json.loads(report.read_text()).get("name") == run_spec(spec).resolved_name()
    except (OSError, json.JSONDecodeError):
        return False


def run_strategy(spec: FusionSpec, address: str | None = None, use_ray: bool = True,
                 on_progress: Callable[[dict], None] | None = None) -> Path:
    """Run ``spec.strategy``; returns the output adapter directory. Every input is checked and protected
    before any work; an input error raised inside a Ray actor or worker comes back as itself."""
    from hetero_ray.errors import find_input_error

    strategy = STRATEGIES[spec.strategy]
    spec.check_files()
    try:
        return _run(strategy, spec, address, use_ray, on_progress)
    except Exception as e:
        cause = find_input_error(e)
        if cause is None or cause is e:
            raise
        raise cause from None


def _run(strategy: Strategy, spec: FusionSpec, address: str | None, use_ray: bool,
         on_progress: Callable[[dict], None] | None) -> Path:
    if strategy.kind == "trained":
        from hetero_ray.target import check_base_dir

        check_base_dir(spec.target.base, "target.base")
        run = run_spec(spec)
        if use_ray:
            from hetero_ray.distributed import fuse

            return fuse(run, address, on_progress=on_progress).output
        from hetero_ray.pipeline import fuse_local

        return fuse_local(run, on_step=(lambda m: on_progress({"stage": "train", **m})) if on_progress else None).output
    t0 = time.perf_counter()
    factors, rank, extra = strategy.merge(spec)
    return write_merged(spec, factors, rank, extra, {"merge_s": time.perf_counter() - t0})
