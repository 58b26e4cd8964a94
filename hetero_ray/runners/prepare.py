"""Prepare a fusion, shared by every runner: open the target and the sources, align them, size the
blocks and transfer networks, make candidates and the replay examples, hash the inputs."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hetero_ray.align import AlignmentPlan, plan_alignment
from hetero_ray.denoise.fusion import DirectDelta, FusionNet, GroupInputs, assemble_groups
from hetero_ray.denoise.transfer_net import PAPER, TransferNetConfig, auto_sizes
from hetero_ray.errors import SpecError
from hetero_ray.families import (
    ModelDims,
    Topology,
    build_topology,
    check_against_base,
    detect_family,
    find_base_config,
)
from hetero_ray.io.adapters import LoraAdapter, file_sha256, read_adapter
from hetero_ray.spec import FusionSpec
from hetero_ray.tokens.blocks import n_blocks
from hetero_ray.tokens.candidates import Candidate, source_candidates
from hetero_ray.train.replay import Example, load_records, tokenize


def open_adapter(path: Path, family: str | None, base: Path | None, allow_pickle: bool, strict: bool
                 ) -> tuple[LoraAdapter, Topology]:
    adapter = read_adapter(path, allow_pickle=allow_pickle)
    found = find_base_config(adapter, base)
    config = found[1] if found else None
    fam = detect_family(adapter, config, family)
    if found:
        check_against_base(adapter, fam, *reversed(found))
    dims = ModelDims.from_config(config) if config else None
    return adapter, build_topology(adapter, fam, dims, strict=strict)


def open_target(spec: FusionSpec) -> tuple[LoraAdapter, Topology]:
    t = spec.target
    return open_adapter(t.adapter, t.family, t.base, spec.allow_pickle, strict=False)


def open_source(spec: FusionSpec, index: int) -> tuple[LoraAdapter, Topology]:
    s = spec.sources[index]
    return open_adapter(s.adapter, s.family, s.base, spec.allow_pickle, strict=True)


def alignment_plan(spec: FusionSpec, target: Topology, sources: list[Topology]) -> AlignmentPlan:
    ids = spec.source_ids()
    pairs = list(zip(ids, sources, strict=True))
    return plan_alignment(target, pairs, spec.method.alignment, spec.method.transfer_ratio)


def resolve_block_size(spec: FusionSpec, plan: AlignmentPlan) -> int:
    if spec.method.block_size != "auto":
        return int(spec.method.block_size)
    if spec.method.preset == "paper":
        return PAPER["block_size"]
    widest = max((max(e.d_in, e.d_out) for e in plan.entries if e.feeds), default=1)
    return auto_sizes(widest, 1)["block_size"]


def sequence_lengths(plan: AlignmentPlan, block_size: int) -> dict[str, tuple[int, int]]:
    """Per group: (target tokens per module, longest source sequence)."""
    out: dict[str, tuple[int, int]] = {}
    for name, entries in plan.groups().items():
        t = n_blocks(entries[0].d_in, block_size) + n_blocks(entries[0].d_out, block_size)
        s = max(sum(n_blocks(f.d_in, block_size) + n_blocks(f.d_out, block_size) for f in e.feeds) for e in entries)
        out[name] = (t, s)
    return out


def plan_costs(plan: AlignmentPlan, block_size: int) -> dict[str, float]:
    """Each group's share of the transfer-net work and memory (see ``train.partition.group_costs``)."""
    from hetero_ray.train.partition import group_costs

    return group_costs(sequence_lengths(plan, block_size), {g: len(es) for g, es in plan.groups().items()})


def group_owners(spec: FusionSpec, plan: AlignmentPlan, block_size: int) -> list[list[str]] | None:
    """Each worker's module groups under ``cluster.partition`` (None: every net on every worker); refuses
    more workers than groups under ``groups``."""
    from hetero_ray.train.partition import resolve

    return resolve(spec.cluster.partition, spec.cluster.workers, plan_costs(plan, block_size))


def net_configs(spec: FusionSpec, plan: AlignmentPlan, block_size: int) -> dict[str, TransferNetConfig]:
    """One TransferNetConfig per group; "auto" sizes scale with the adapters (paper values at 8B)."""
    lengths = sequence_lengths(plan, block_size)
    auto = auto_sizes(block_size, max((max(v) for v in lengths.values()), default=1))
    if spec.method.preset == "paper":
        auto = dict(PAPER)
    m = spec.method
    pick = lambda v, k: auto[k] if v == "auto" else int(v)  # noqa: E731
    embed = pick(m.embed_dim, "embed_dim")
    heads = pick(m.num_heads, "num_heads") if m.num_heads != "auto" else max(1, math.gcd(embed, auto["num_heads"]))
    if embed % heads:
        raise SpecError(f"method.num_heads: {heads} heads do not divide method.embed_dim {embed} (set both, or "
                        "leave num_heads: auto)")
    positions = pick(m.max_positions, "max_positions")
    longest = max((max(v) for v in lengths.values()), default=0)
    if longest > positions:
        raise SpecError(f"method.max_positions: {positions}, but the longest token sequence is {longest} (at "
                        f"block_size {block_size}); raise it or leave it auto")
    return {
        name: TransferNetConfig(block_size, entries[0].rank, embed, heads, positions, m.mu_gate)
        for name, entries in plan.groups().items()
    }


def build_net(spec: FusionSpec, plan: AlignmentPlan, block_size: int, groups: dict[str, GroupInputs],
              target: LoraAdapter, extra_paths: Iterable[str] | None = None) -> torch.nn.Module:
    """The trained module for ``groups`` (every group, or a worker's own), each part initialised from its own
    seed derived from ``spec.seed``: FusionNet, or DirectDelta for the direct controls; with
    ``method.extra_rank`` new A and B rows beside every target adapter module (those in ``extra_paths``
    when given)."""
    torch.manual_seed(spec.seed)
    k = spec.method.extra_rank
    keep = set(target.modules) if extra_paths is None else set(extra_paths)
    extra = {p: (m.d_in, m.d_out) for p, m in target.modules.items() if p in keep} if k else None
    if not spec.control.reads_sources:
        return DirectDelta({n: (len(g.modules), g.d_out, g.rank) for n, g in groups.items()}, extra, k, spec.seed,
                           train_b=spec.control.trains_target_b)
    cfgs = {n: c for n, c in net_configs(spec, plan, block_size).items() if n in groups}
    return FusionNet(cfgs, spec.method.alpha_init, spec.method.net, len(spec.sources), extra, k, spec.seed)


def objective_weights(spec: FusionSpec) -> dict[str, float]:
    """The objective's active terms for this run: ``replay_only`` keeps the ones that need no teacher (the
    paper's replay loss when none is left)."""
    from hetero_ray.train.objectives import OBJECTIVES, active

    weights = active(spec.objective)
    if not spec.control.uses_teacher:
        weights = {n: w for n, w in weights.items() if not OBJECTIVES.lookup(n).needs_teacher} or {"paper": 1.0}
    return weights


def candidates_of(spec: FusionSpec, plan: AlignmentPlan, index: int, adapter: LoraAdapter, topo: Topology,
                  block_size: int, layers: Iterable[int] | None = None) -> Iterator[Candidate]:
    """Source ``index``'s candidates (of target ``layers`` only, when given: nothing else is computed)."""
    return source_candidates(plan, index, adapter, topo, block_size, spec.control, spec.seed, layers)


def replay_records(spec: FusionSpec) -> list[dict]:
    """Every replay record the spec selects (``take`` applied with a seeded shuffle per file)."""
    return [r for i, rs in enumerate(spec.replay)
            for r in load_records(rs.path, rs.take, spec.seed + i, field=f"replay[{i}]")]


def replay_examples(spec: FusionSpec, tokenizer) -> list[Example]:
    return tokenize(tokenizer, replay_records(spec), spec.training.max_length)


def input_hashes(spec: FusionSpec, target: LoraAdapter, sources: list[LoraAdapter]) -> dict:
    base_cfg = spec.target.base / "config.json"
    return {
        "target_adapter": target.sha256(),
        "target_base_config": file_sha256(base_cfg) if base_cfg.is_file() else None,
        "sources": {sid: a.sha256() for sid, a in zip(spec.source_ids(), sources, strict=True)},
        "replay": {str(r.path): file_sha256(r.path) for r in spec.replay},
    }


@dataclass
class Opened:
    """The first stage of every path: the target and every source opened (headers only: shapes, families),
    the alignment plan, and the block size."""

    target: LoraAdapter
    target_topo: Topology
    sources: list[tuple[LoraAdapter, Topology]]
    plan: AlignmentPlan
    block: int


def require_trained(spec: FusionSpec) -> None:
    """The runners train; a merge strategy goes through :func:`hetero_ray.strategies.run_strategy`."""
    if spec.control is None:
        raise SpecError(f"strategy {spec.strategy!r} is a closed-form merge, not a trained run: run it with "
                        "hetero_ray.run / hetero-ray fuse")
    if not spec.control.reads_sources and spec.control.uses_teacher and not any(
            w > 0 and n in ("distill", "excess") for n, w in spec.objective.items()):
        raise SpecError(f"strategy {spec.strategy} trains on the source experts' answers: give the objective a "
                        "distill or excess term (and a teach: section)")


def open_and_align(spec: FusionSpec) -> Opened:
    target, target_topo = open_target(spec)
    sources = [open_source(spec, i) for i in range(len(spec.sources))]
    plan = alignment_plan(spec, target_topo, [t for _, t in sources])
    return Opened(target, target_topo, sources, plan, resolve_block_size(spec, plan))


@dataclass
class Prepared(Opened):
    """Everything the in-process runner needs before training: :class:`Opened` plus the assembled groups."""

    groups: dict[str, GroupInputs]


def prepare_groups(spec: FusionSpec) -> Prepared:
    """Open and align, then assemble the groups in this process (``replay_only`` reads no source candidates)."""
    o = open_and_align(spec)
    cands = None if not spec.control.reads_sources else [
        c for i, (a, t) in enumerate(o.sources) for c in candidates_of(spec, o.plan, i, a, t, o.block)
    ]
    groups = assemble_groups(o.plan, o.target, o.target_topo, cands, o.block)
    return Prepared(o.target, o.target_topo, o.sources, o.plan, o.block, groups)
