"""Module-group partitioning of the transfer networks across workers (``cluster.partition: groups``).

Each worker owns whole groups: their transfer net, alpha, optimizer state and candidate tokens, so adding
workers divides that memory and the nets' compute. The frozen target stays data-parallel: every worker runs
its share of each window's micro-batches with every module patched. Per window:

1. each worker computes its groups' dB; one all-reduce (sum of disjoint parts) gives every worker all of dB;
2. each worker back-propagates its micro-batches into a detached copy of every module's dB;
3. one all-reduce averages those gradients over workers (what DeepSpeed's data-parallel average does for
   replicated nets), and each worker back-propagates sum(dB_own * grad) + its groups' share of RDM into its
   own nets.

This is the same gradient as one worker holding every net. Nothing here knows about Ray; the exchange needs
an initialised ``torch.distributed`` process group.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

import torch

from hetero_ray.errors import SpecError


def lpt(costs: Sequence[float], bins: int, loads: Sequence[float] | None = None) -> list[int]:
    """Each item's bin, the largest item first onto the least loaded bin (LPT scheduling: the heaviest bin
    carries at most 4/3 of the optimum); deterministic, ties broken by item index and bin index. ``loads``:
    what each bin carries already (``inf``: a bin that takes an item only when every bin is so)."""
    heap = [(float(loads[b]) if loads is not None else 0.0, b) for b in range(bins)]
    heapq.heapify(heap)
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, b = heapq.heappop(heap)
        out[i] = b
        heapq.heappush(heap, (load + costs[i], b))
    return out


def balance(costs: Mapping[str, float], workers: int) -> list[list[str]]:
    """Groups dealt to ``workers`` owners by :func:`lpt`, ties broken by name and rank."""
    if workers > len(costs):
        raise SpecError(f"cluster.partition: groups: {workers} workers but only {len(costs)} module groups "
                        f"({', '.join(sorted(costs))}); use fewer workers or cluster.partition: replicate")
    names = sorted(costs)
    owned: list[list[str]] = [[] for _ in range(workers)]
    for name, r in zip(names, lpt([costs[n] for n in names], workers), strict=True):
        owned[r].append(name)
    return owned


def group_costs(lengths: Mapping[str, tuple[int, int]], modules: Mapping[str, int]) -> dict[str, float]:
    """A group's share of the work and memory: its modules times their tokens (target + longest source
    sequence), what the transfer net's attention and its activations scale with."""
    return {g: float(modules[g] * (t + s)) for g, (t, s) in lengths.items()}


def resolve(mode: str, workers: int, costs: Mapping[str, float]) -> list[list[str]] | None:
    """The owners' groups for ``cluster.partition`` = ``mode``, or None for replicated nets."""
    if workers <= 1 or mode == "replicate" or (mode == "auto" and len(costs) < workers):
        return None
    return balance(costs, workers)


def by_group(parts: Sequence[Mapping[str, Mapping[str, object]]], keys: Sequence[str]) -> dict[str, dict]:
    """Owners' per-group dicts (``parts``, one per worker) joined per key, groups in name order."""
    return {k: dict(sorted({g: v for p in parts for g, v in p[k].items()}.items())) for k in keys}


def owner_of_extra(paths: Sequence[str], workers: int) -> dict[str, int]:
    """Added-rank factors (``method.extra_rank``): module paths dealt round-robin in sorted order."""
    return {p: i % workers for i, p in enumerate(sorted(paths))}


class GroupExchange:
    """The two all-reduces of a window between workers that own disjoint groups (see the module doc).

    ``shapes``: every exchanged tensor's name and shape, the same on every worker (module paths for dB,
    and any added-rank factors), in one flat buffer per exchange."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], group=None):
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.world = dist.get_world_size(group)
        self.names = sorted(shapes)
        self.shapes = {n: torch.Size(shapes[n]) for n in self.names}
        self.offsets = {}
        pos = 0
        for n in self.names:
            self.offsets[n] = pos
            pos += self.shapes[n].numel()
        self.numel = pos

    def _flat(self, parts: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        buf = torch.zeros(self.numel, dtype=torch.float32, device=like.device)
        for n, t in parts.items():
            if t is not None:
                o = self.offsets[n]
                buf[o : o + t.numel()] = t.detach().reshape(-1).float()
        return buf

    def _split(self, buf: torch.Tensor, dtype) -> dict[str, torch.Tensor]:
        return {n: buf[self.offsets[n] : self.offsets[n] + s.numel()].view(s).to(dtype)
                for n, s in self.shapes.items()}

    def gather(self, parts: Mapping[str, torch.Tensor], like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every tensor, from the parts each worker holds (zeros elsewhere: the sum of disjoint parts)."""
        buf = self._flat(parts, like)
        self.dist.all_reduce(buf, group=self.group)
        return self._split(buf, like.dtype)

    def average(self, grads: Mapping[str, torch.Tensor | None], like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The mean over workers of each tensor (a worker without one contributes zeros)."""
        buf = self._flat(grads, like)
        self.dist.all_reduce(buf, group=self.group)
        return self._split(buf / self.world, like.dtype)

    def merge(self, obj: dict) -> list[dict]:
        """Every worker's small dict (per-group metrics), in rank order."""
        out: list = [None] * self.world
        self.dist.all_gather_object(out, obj, group=self.group)
        return out


def exchange_shapes(plan, target, extra_rank: int = 0) -> dict[str, tuple[int, ...]]:
    """What the exchange carries: every fused module's B update (d_out, r), and with ``extra_rank`` the
    added-rank factors of every target module (keys as in the run's deltas)."""
    from hetero_ray.io.export import EXTRA_A, EXTRA_B

    shapes: dict[str, tuple[int, ...]] = {e.module: (target.modules[e.module].d_out, e.rank)
                                          for e in plan.entries if e.feeds}
    for p, m in target.modules.items() if extra_rank else ():
        shapes[f"{EXTRA_A}{p}"] = (extra_rank, m.d_in)
        shapes[f"{EXTRA_B}{p}"] = (m.d_out, extra_rank)
    return shapes
