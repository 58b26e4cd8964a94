"""Topology alignment: which source (layer, role) feeds which target (layer, role).

Layer maps are a registry of functions (n_target_layers, n_source_layers) -> {target layer: source layer}.
``tail`` is the paper's rule (deepest layers paired); ``head`` pairs from the bottom; ``uniform`` pairs by
relative depth. ``transfer_ratio`` keeps only the deepest fraction of a source's pairs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from hetero_ray.errors import HeteroRayError
from hetero_ray.families import Slot, Topology

LayerMap = Callable[[int, int], dict[int, int]]
LAYER_MAPS: dict[str, LayerMap] = {}


def register_layer_map(name: str) -> Callable[[LayerMap], LayerMap]:
    def deco(fn: LayerMap) -> LayerMap:
        LAYER_MAPS[name] = fn
        return fn

    return deco


@register_layer_map("tail")
def tail_map(n_target: int, n_source: int) -> dict[int, int]:
    """offset = L_t - L_s; target t pairs with source t - offset when that is a source layer."""
    offset = n_target - n_source
    return {t: t - offset for t in range(n_target) if 0 <= t - offset < n_source}


@register_layer_map("head")
def head_map(n_target: int, n_source: int) -> dict[int, int]:
    return {t: t for t in range(min(n_target, n_source))}


@register_layer_map("uniform")
def uniform_map(n_target: int, n_source: int) -> dict[int, int]:
    """Relative depth: t -> round(t * (L_s - 1) / (L_t - 1)); every target layer gets a source layer."""
    if n_target == 1:
        return {0: n_source - 1}
    return {t: int(math.floor(t * (n_source - 1) / (n_target - 1) + 0.5)) for t in range(n_target)}


def layer_pairs(n_target: int, n_source: int, layer_map: str = "tail", transfer_ratio: float = 1.0) -> dict[int, int]:
    """Target layer -> source layer, keeping the deepest ceil(transfer_ratio * n) pairs."""
    if layer_map not in LAYER_MAPS:
        raise HeteroRayError(f"unknown alignment {layer_map!r}; known: {', '.join(sorted(LAYER_MAPS))}")
    if not 0.0 < transfer_ratio <= 1.0:
        raise HeteroRayError(f"transfer_ratio must be in (0, 1], got {transfer_ratio}")
    pairs = LAYER_MAPS[layer_map](n_target, n_source)
    keep = math.ceil(transfer_ratio * len(pairs) - 1e-9)
    deepest = sorted(pairs)[len(pairs) - keep :]
    return {t: pairs[t] for t in deepest}


@dataclass
class Feed:
    """One source slot feeding a target slot."""

    source: int
    source_id: str
    family: str
    source_layer: int
    source_module: str
    rows: str
    rank: int
    d_in: int
    d_out: int
    harmonize: str  # "none" | "exact" (rank below target, zero-padded) | "truncated" (best rank-r)


@dataclass
class Entry:
    """A target slot and the source slots aligned to it."""

    layer: int
    role: str
    module: str
    rows: str
    rank: int
    d_in: int
    d_out: int
    feeds: list[Feed] = field(default_factory=list)

    @property
    def group(self) -> str:
        return group_name(self.role, self.rank)


def group_name(role: str, rank: int) -> str:
    return f"{role}_r{rank}"


@dataclass
class SourceInfo:
    index: int
    source_id: str
    family: str
    n_layers: int
    layer_pairs: dict[int, int]


@dataclass
class AlignmentPlan:
    """Per target module, which source modules feed it and why; serializes to JSON for the report."""

    target_family: str
    n_target_layers: int
    layer_map: str
    transfer_ratio: float
    sources: list[SourceInfo]
    entries: list[Entry]
    unaligned: list[str]

    def groups(self) -> dict[str, list[Entry]]:
        """Entries with at least one feed, grouped by (role, rank), ordered by layer."""
        out: dict[str, list[Entry]] = {}
        for e in sorted(self.entries, key=lambda e: (e.group, e.layer)):
            if e.feeds:
                out.setdefault(e.group, []).append(e)
        return out

    def fused_modules(self) -> list[str]:
        return sorted({e.module for e in self.entries if e.feeds})

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> AlignmentPlan:
        sources = [
            SourceInfo(**{**s, "layer_pairs": {int(k): v for k, v in s["layer_pairs"].items()}}) for s in d["sources"]
        ]
        entries = [Entry(**{**e, "feeds": [Feed(**f) for f in e["feeds"]]}) for e in d["entries"]]
        return cls(d["target_family"], d["n_target_layers"], d["layer_map"], d["transfer_ratio"], sources,
                   entries, list(d["unaligned"]))


def _harmonize_kind(source_rank: int, target_rank: int) -> str:
    if source_rank == target_rank:
        return "none"
    return "exact" if source_rank < target_rank else "truncated"


def plan_alignment(
    target: Topology,
    sources: Sequence[tuple[str, Topology]],
    layer_map: str = "tail",
    transfer_ratio: float = 1.0,
) -> AlignmentPlan:
    """Align each source topology to the target: layer map, then same-role matching in paired layers."""
    infos = []
    entries = {key: _entry(slot) for key, slot in target.slots.items()}
    for index, (source_id, topo) in enumerate(sources):
        pairs = layer_pairs(target.n_layers, topo.n_layers, layer_map, transfer_ratio)
        infos.append(SourceInfo(index, source_id, topo.family.name, topo.n_layers, pairs))
        for (layer, role), entry in entries.items():
            src = topo.slots.get((pairs[layer], role)) if layer in pairs else None
            if src is not None:
                entry.feeds.append(_feed(index, source_id, topo, src, entry.rank))
    unaligned = [f"layers.{e.layer}.{e.role}" for e in entries.values() if not e.feeds]
    return AlignmentPlan(
        target.family.name, target.n_layers, layer_map, transfer_ratio, infos, list(entries.values()), unaligned
    )


def _entry(slot: Slot) -> Entry:
    m = slot.module
    return Entry(slot.layer, slot.role, m.path, slot.describe_rows(), m.rank, m.d_in, slot.d_out)


def _feed(index: int, source_id: str, topo: Topology, slot: Slot, target_rank: int) -> Feed:
    m = slot.module
    return Feed(index, source_id, topo.family.name, slot.layer, m.path, slot.describe_rows(), m.rank, m.d_in,
                slot.d_out, _harmonize_kind(m.rank, target_rank))
