"""Closed-form baselines, computed in LoRA *product space* (the updates s·B·A, never A and B averaged apart).

The maths are small pure functions (:func:`ties_merge`, :func:`dare_merge`, :func:`factorize`, ...); each
strategy is a :class:`MergeStrategy` with its own ``Params`` and a ``merge`` method returning factors:

- ``target_only``: the target adapter, unchanged.
- ``task_arithmetic``: ΔW = Σ w_i ΔW_i (target first). Exact at rank Σ r: the factors are concatenated.
- ``linear``: the weighted mean Σ w_i ΔW_i / Σ w_i (mergekit's ``linear``); exact like task arithmetic.
- ``ties``: per update, keep the ``density`` fraction of entries largest in magnitude; weight each kept
  update by w_i; elect each entry's sign by the sum; average the agreeing weighted values, dividing by the sum
  of their weights (mergekit's TIES; with all weights 1, the paper's disjoint mean); scale by ``scale``.
  The dense result is factored back by truncated SVD at ``rank`` (default Σ r) and its error reported.
- ``dare``: per update, drop entries with probability ``drop_rate`` (seeded) and rescale the rest by
  1/(1 - drop_rate); weighted sum; SVD factorization as TIES.
- ``naive_transfer``: cross-family. Each target module receives, for every source slot the alignment plan
  feeds it, the source update cropped or zero-padded to the target's shape: w_t ΔW_t + Σ w_i P(ΔW_i).
  Exact at rank r_t + Σ r_i (cropping or padding B's rows and A's columns crops or pads the product).

The same-family merges need sources whose modules have the target's paths and shapes (experts on the
target's base); anything else is refused, naming the file and module.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, Field, field_validator

from hetero_ray.errors import HeteroRayError
from hetero_ray.io.adapters import LoraAdapter
from hetero_ray.spec import FusionSpec
from hetero_ray.strategies import NoParams, Strategy, register

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A, B), scaling 1


@dataclass
class Merged:
    factors: Factors
    rank: int
    extra: dict = field(default_factory=dict)


# ---- pure maths --------------------------------------------------------------------------------------------


def product(adapter: LoraAdapter, path: str) -> torch.Tensor:
    """The update PEFT applies for module ``path``: s·B·A, in float64."""
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


def concat_factors(parts: list[tuple[float, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ w·B·A for parts (w, B, A) as one factor pair: A stacked, w·B side by side (exact)."""
    return torch.cat([a for _, _, a in parts], 0), torch.cat([w * b for w, b, _ in parts], 1)


def crop_or_pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``t`` cropped or zero-padded along ``dim`` to ``size``."""
    n = t.shape[dim]
    if n >= size:
        return t.narrow(dim, 0, size)
    pad = list(t.shape)
    pad[dim] = size - n
    return torch.cat([t, t.new_zeros(pad)], dim)


def uniform_rank(factors: Factors) -> tuple[Factors, int]:
    """Zero-pad every module's factors to the largest rank (one ``r`` for the whole adapter)."""
    rank = max(a.shape[0] for a, _ in factors.values())
    return {p: (crop_or_pad(a, 0, rank), crop_or_pad(b, 1, rank)) for p, (a, b) in factors.items()}, rank


def trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries largest in magnitude (ties at the threshold kept), zero the rest."""
    k = max(1, int(round(density * delta.numel())))
    threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def ties_merge(deltas: list[torch.Tensor], weights: list[float], density: float, scale: float) -> torch.Tensor:
    """TIES: trim, weight, elect signs by the weighted sum, weighted disjoint mean, scale."""
    stack = torch.stack([w * trim_to_density(d, density) for w, d in zip(weights, deltas, strict=True)])
    sign = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    w = torch.tensor(weights, dtype=stack.dtype).view(-1, *[1] * (stack.dim() - 1)).abs()
    divisor = (w * agree).sum(0)
    return scale * (stack * agree).sum(0) / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def dare_merge(deltas: list[torch.Tensor], weights: list[float], drop_rate: float,
               generator: torch.Generator) -> torch.Tensor:
    """DARE: drop entries with probability ``drop_rate``, rescale the kept ones, weighted sum."""
    total = torch.zeros_like(deltas[0])
    for w, d in zip(weights, deltas, strict=True):
        keep = (torch.rand(d.shape, generator=generator, dtype=torch.float64) >= drop_rate).to(d.dtype)
        total += w * d * keep / (1.0 - drop_rate)
    return total


# ---- parameters --------------------------------------------------------------------------------------------


class Weighted(NoParams):
    weights: list[float] | None = Field(None, description="per input, target first (default: all 1)")

    def resolved(self, n_inputs: int) -> list[float]:
        w = [1.0] * n_inputs if self.weights is None else self.weights
        if len(w) != n_inputs:
            raise HeteroRayError(f"params.weights: {len(w)} weights for the target and {n_inputs - 1} sources "
                                 f"(need {n_inputs})")
        return list(w)


class TiesParams(Weighted):
    density: float = Field(0.2, gt=0, le=1, description="fraction of entries kept per update")
    scale: float = Field(1.0, gt=0, description="lambda applied to the merged update")
    rank: int | None = Field(None, gt=0, description="rank of the SVD factorization (default: sum of ranks)")


class DareParams(Weighted):
    drop_rate: float = Field(0.5, ge=0, lt=1, description="probability of dropping an entry")
    rank: int | None = Field(None, gt=0, description="rank of the SVD factorization (default: sum of ranks)")


class LinearParams(Weighted):
    @field_validator("weights")
    @classmethod
    def _nonzero_sum(cls, v):
        if v is not None and math.isclose(sum(v), 0.0, abs_tol=1e-12):
            raise ValueError("weights sum to 0: the weighted mean is undefined")
        return v


# ---- strategies --------------------------------------------------------------------------------------------


class MergeStrategy(Strategy):
    """A closed-form merge: ``merge`` returns factors (scaling 1); the shared writer makes the adapter."""

    kind = "merge"

    def merge(self, spec: FusionSpec, params: BaseModel) -> Merged:
        raise NotImplementedError

    def run(self, spec: FusionSpec, address: str | None, use_ray: bool,
            on_progress: Callable[[dict], None] | None) -> Path:
        from hetero_ray.io.export import write_merged

        t0 = time.perf_counter()
        merged = self.merge(spec, self.params(spec))
        return write_merged(spec, self, merged.factors, merged.rank, merged.extra,
                            {"merge_s": time.perf_counter() - t0})


def _target(spec: FusionSpec) -> LoraAdapter:
    from hetero_ray.runners.prepare import open_target

    return open_target(spec)[0]


def same_family_inputs(spec: FusionSpec) -> list[LoraAdapter]:
    """[target, *sources], refusing a source that is not an expert on the target's own base."""
    from hetero_ray.runners.prepare import open_source, open_target

    target, ttopo = open_target(spec)
    out = [target]
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


def weighted_sum(adapters: list[LoraAdapter], weights: list[float]) -> Factors:
    """Σ w_i s_i B_i A_i per module, exactly, as concatenated factors."""
    out = {}
    for path in adapters[0].modules:
        parts = []
        for w, ad in zip(weights, adapters, strict=True):
            a, b = ad.module_tensors(path)
            parts.append((w * ad.module_scaling(path), b.double(), a.double()))
        out[path] = concat_factors(parts)
    return out


def dense_merge(adapters: list[LoraAdapter], rank: int | None,
                combine: Callable[[list[torch.Tensor]], torch.Tensor]) -> Merged:
    """combine() the dense products per module, then factor back to one rank by truncated SVD."""
    target = adapters[0]
    rank = rank or max(sum(ad.modules[p].rank for ad in adapters) for p in target.modules)
    out, errors = {}, {}
    for path in target.modules:
        a, b, errors[path] = factorize(combine([product(ad, path) for ad in adapters]), rank)
        out[path] = (a, b)
    return Merged(out, rank, {"factorization_rel_error": {"max": max(errors.values()),
                                                          "mean": sum(errors.values()) / len(errors)}})


class TargetOnly(MergeStrategy):
    name, description = "target_only", "the target adapter alone"

    def merge(self, spec, params):
        target = _target(spec)
        return Merged(*uniform_rank(weighted_sum([target], [1.0])))


class SameFamilyMerge(MergeStrategy):
    """A merge of experts on the target's own base: [target, *sources] with one weight each."""

    Params, same_family = Weighted, True

    def merge(self, spec, params):
        adapters = same_family_inputs(spec)
        return self.combine(adapters, params.resolved(len(adapters)), params, spec.seed)

    def combine(self, adapters: list[LoraAdapter], weights: list[float], params, seed: int) -> Merged:
        raise NotImplementedError


class TaskArithmetic(SameFamilyMerge):
    name = "task_arithmetic"
    description = "same family: weighted sum of the updates, exact (rank = sum of ranks)"

    def combine(self, adapters, weights, params, seed):
        return Merged(*uniform_rank(weighted_sum(adapters, weights)))


class Linear(SameFamilyMerge):
    name = "linear"
    description = "same family: weighted mean of the updates, exact (rank = sum of ranks)"
    Params = LinearParams

    def combine(self, adapters, weights, params, seed):
        return Merged(*uniform_rank(weighted_sum(adapters, [w / sum(weights) for w in weights])))


class Ties(SameFamilyMerge):
    name = "ties"
    description = "same family: trim, weight, elect sign, disjoint mean; SVD back to LoRA"
    Params = TiesParams

    def combine(self, adapters, weights, params, seed):
        return dense_merge(adapters, params.rank, lambda d: ties_merge(d, weights, params.density, params.scale))


class Dare(SameFamilyMerge):
    name = "dare"
    description = "same family: random drop and rescale, weighted sum; SVD back to LoRA"
    Params = DareParams

    def combine(self, adapters, weights, params, seed):
        gen = torch.Generator().manual_seed(seed)
        return dense_merge(adapters, params.rank, lambda d: dare_merge(d, weights, params.drop_rate, gen))


class NaiveTransfer(MergeStrategy):
    name = "naive_transfer"
    description = "cross family: aligned source updates cropped/zero-padded into the target"
    Params = Weighted

    def merge(self, spec, params):
        from hetero_ray.runners.prepare import open_and_align
        from hetero_ray.tokens.candidates import slot_tensors

        opened = open_and_align(spec)
        target, ttopo, sources, plan = opened.target, opened.target_topo, opened.sources, opened.plan
        w = params.resolved(1 + len(sources))
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
                source_slot = topo.slots[(f.source_layer, e.role)]
                sa, sb = slot_tensors(adapter, source_slot)
                sa, sb = crop_or_pad(sa.double(), 1, e.d_in), crop_or_pad(sb.double(), 0, e.d_out)
                parts[slot.module.path].append((w[1 + f.source] * adapter.module_scaling(source_slot.module.path),
                                                sb, sa))
        # modules fed by fewer sources are zero-padded to the common rank
        factors, rank = uniform_rank({path: concat_factors(p) for path, p in parts.items()})
        return Merged(factors, rank, {"alignment": plan.to_dict()})


for _cls in (TargetOnly, TaskArithmetic, Linear, Ties, Dare, NaiveTransfer):
    register(_cls())
