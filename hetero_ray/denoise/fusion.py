"""Everything trained in a fusion: one TransferNet per module group plus a learnable alpha per group,
the group inputs they read, and the assembly of their outputs into per-module B updates."""

from __future__ import annotations

import dataclasses
import zlib
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from hetero_ray.align import AlignmentPlan
from hetero_ray.denoise.rdm import Directions, rdm
from hetero_ray.denoise.transfer_net import TransferNet, TransferNetConfig
from hetero_ray.errors import HeteroRayError
from hetero_ray.families import Rows, Topology
from hetero_ray.io.adapters import LoraAdapter
from hetero_ray.tokens.blocks import block_rows, block_singular_values, from_tokens, module_tokens
from hetero_ray.tokens.candidates import Candidate, slot_tensors


@dataclass
class GroupInputs:
    """The token sequences of one group, batched over its M modules (ordered by target layer)."""

    name: str
    rank: int
    layers: list[int]
    modules: list[str]
    rows: list[Rows]
    module_d_out: list[int]
    d_out: int
    n_a_blocks: int
    tgt_tokens: torch.Tensor  # (M, T, D)
    tgt_sigmas: torch.Tensor  # (M, T, r)
    src_tokens: torch.Tensor  # (M, S, D), zero-padded
    src_sigmas: torch.Tensor  # (M, S, r)
    src_valid: torch.Tensor  # (M, S) bool
    src_owner: torch.Tensor  # (M, S) source index, -1 on padding

    def to(self, device: torch.device | str) -> GroupInputs:
        """A copy with every tensor on ``device``."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    def net_inputs(self) -> tuple[torch.Tensor, ...]:
        return self.tgt_tokens, self.tgt_sigmas, self.src_tokens, self.src_sigmas, self.src_valid


def assemble_groups(
    plan: AlignmentPlan,
    target: LoraAdapter,
    target_topology: Topology,
    candidates: Iterable[Candidate] | None,
    block_size: int,
    names: Collection[str] | None = None,
) -> dict[str, GroupInputs]:
    """Build every group's inputs (only those in ``names`` when given: a worker's own groups) from the
    target adapter and the (unordered) candidate stream. ``candidates=None`` builds target-only groups with
    empty source sequences (the replay_only control). Here the candidates become tokens (padded to whole
    blocks) and their blocks' singular values are taken, batched over the group, in fp64 on the CPU (a
    worker builds only the groups it trains: with ``cluster.partition: groups`` each group's once)."""
    by_slot: dict[tuple[str, int], list[Candidate]] = defaultdict(list)
    for c in candidates or ():
        by_slot[(c.group, c.target_layer)].append(c)
    groups = {}
    for name, entries in plan.groups().items():
        if names is not None and name not in names:
            continue
        dims = {(e.d_in, e.d_out) for e in entries}
        if len(dims) > 1:
            raise HeteroRayError(f"group {name}: target modules differ in shape {sorted(dims)}; cannot batch")
        tgt, src = [], []
        for e in entries:
            a, b = slot_tensors(target, target_topology.slots[(e.layer, e.role)])
            tgt.append(module_tokens(a.float(), b.float(), block_size))
            cands = sorted(by_slot.get((name, e.layer), []), key=lambda c: c.source)
            expected = sorted(f.source for f in e.feeds) if candidates is not None else []
            if [c.source for c in cands] != expected:
                raise HeteroRayError(
                    f"group {name} layer {e.layer}: candidates from sources {[c.source for c in cands]}, "
                    f"plan expects {expected}"
                )
            src.append(cands)
        groups[name] = _stack_group(name, entries, target_topology, tgt, src)
    return groups


def _stack_group(name, entries, topology, tgt, src) -> GroupInputs:
    m = len(entries)
    s_max = max(sum(c.n_tokens for c in cands) for cands in src)  # 0 without sources
    d_flat, rank = tgt[0][0].shape[1], tgt[0][1].shape[1]
    src_tokens = torch.zeros(m, s_max, d_flat)
    src_rows = torch.zeros(m, s_max, dtype=torch.long)  # each token's real rows: the Grams skip the padding
    src_owner = torch.full((m, s_max), -1, dtype=torch.long)
    for i, cands in enumerate(src):
        pos = 0
        for c in cands:
            n = c.n_tokens
            c.write_tokens(src_tokens[i, pos : pos + n])  # the padding made here, into the group's zeros
            src_rows[i, pos : pos + n] = torch.tensor(block_rows(c.d_in, c.d_out, c.block_size))
            src_owner[i, pos : pos + n] = c.source
            pos += n
    slots = [topology.slots[(e.layer, e.role)] for e in entries]
    return GroupInputs(
        name=name, rank=rank, layers=[e.layer for e in entries], modules=[e.module for e in entries],
        rows=[s.rows for s in slots], module_d_out=[s.module.d_out for s in slots], d_out=entries[0].d_out,
        n_a_blocks=tgt[0][2], tgt_tokens=torch.stack([t[0] for t in tgt]),
        tgt_sigmas=torch.stack([t[1] for t in tgt]), src_tokens=src_tokens,
        src_sigmas=block_singular_values(src_tokens, entries[0].rank, src_rows),  # 0 on the padding tokens
        src_valid=src_rows > 0, src_owner=src_owner,
    )


EXTRA = "_extra_rank"  # the key of the added-rank factors in a net's outputs (not a group)


def sub_seed(seed: int, key: str, step: int = 0) -> int:
    """A seed for one group (or module) and step, independent of which other groups a worker holds, so
    that nets partitioned across workers start, and draw their RDM samples, as one worker's would."""
    return (seed * 1_000_003 + step * 7_919 + zlib.crc32(key.encode())) % (2**63)


def rdm_generators(seed: int, step: int, names: Iterable[str]) -> dict[str, torch.Generator]:
    """One generator per group for one step's RDM draws."""
    return {n: torch.Generator().manual_seed(sub_seed(seed, n, step + 1)) for n in names}


class ExtraRank(nn.Module):
    """Rank added beside the target's: per module a new A (k, d_in), PEFT's default init, and B (d_out, k) at
    zero, trained directly. Parameters sit on this module (ZeRO-3 gathers them in its forward); forward
    returns copies."""

    def __init__(self, shapes: Mapping[str, tuple[int, int]], rank: int, seed: int = 0):
        super().__init__()
        self.paths = sorted(shapes)
        for i, path in enumerate(self.paths):
            d_in, d_out = shapes[path]
            a = torch.empty(rank, d_in)
            torch.manual_seed(sub_seed(seed, path))
            nn.init.kaiming_uniform_(a, a=5 ** 0.5)  # as PEFT initialises lora_A
            self.register_parameter(f"a_{i}", nn.Parameter(a))
            self.register_parameter(f"b_{i}", nn.Parameter(torch.zeros(d_out, rank)))

    def forward(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {p: (getattr(self, f"a_{i}").clone(), getattr(self, f"b_{i}").clone()) for i, p in enumerate(self.paths)}


class FusionNet(nn.Module):
    """One transfer network per group (the paper's TransferNet, or GroundedNet) and a learnable alpha per
    group (initialised to ``alpha_init``); optionally added rank beside the target's. Each group's net is
    initialised from its own seed (:func:`sub_seed`), so a worker holding some of the groups holds them
    exactly as a worker holding all of them would."""

    def __init__(self, configs: Mapping[str, TransferNetConfig], alpha_init: float = 0.3, net: str = "paper",
                 n_sources: int = 1, extra: Mapping[str, tuple[int, int]] | None = None, extra_rank: int = 0,
                 seed: int = 0):
        super().__init__()
        from hetero_ray.denoise.transfer_net import GroundedNet

        def make(name: str, cfg: TransferNetConfig) -> nn.Module:
            torch.manual_seed(sub_seed(seed, name))
            return TransferNet(cfg) if net == "paper" else GroundedNet(cfg, n_sources)

        self.grounded = net != "paper"
        self.nets = nn.ModuleDict({name: make(name, cfg) for name, cfg in configs.items()})
        self.alphas = nn.ParameterDict({name: nn.Parameter(torch.full((1,), float(alpha_init))) for name in configs})
        self.extra = ExtraRank(extra, extra_rank, seed) if extra and extra_rank else None

    def forward(self, groups: Mapping[str, GroupInputs]) -> dict[str, dict[str, torch.Tensor]]:
        """Per group: ``db`` = alpha_g * dB (M, d_out, r) and the net's diagnostics (attention, z_target,
        z_source, gate_open, alpha); under EXTRA the added-rank factors."""
        out = {}
        for name, g in groups.items():
            res = self.nets[name](*g.net_inputs(), g.src_owner) if self.grounded else self.nets[name](*g.net_inputs())
            alpha = self.alphas[name]
            # scaled here, inside forward, where ZeRO-3 has gathered alpha
            res["db"] = alpha * from_tokens(res.pop("delta")[:, g.n_a_blocks :], g.d_out, g.rank)
            res["alpha"] = alpha.detach().clone()
            out[name] = res
        if self.extra is not None:
            out[EXTRA] = self.extra()
        return out


class DirectDelta(nn.Module):
    """The direct strategies (``replay_only``, ``distill_only``): the target's B updates themselves are the
    parameters (zero-init), trained with the same steps; alpha is fixed at 1 and no source is read. With
    ``train_b`` False (``added_rank_only``) there are none: dB stays zero and only the added rank is trained.

    The parameters sit on this module itself (not in a ParameterDict child, whose forward never runs), so
    that DeepSpeed ZeRO-3 gathers them when this module's forward is called, and forward returns copies:
    ZeRO-3 releases a gathered parameter's storage when the forward ends."""

    def __init__(self, shapes: Mapping[str, tuple[int, int, int]], extra: Mapping[str, tuple[int, int]] | None = None,
                 extra_rank: int = 0, seed: int = 0, train_b: bool = True):
        super().__init__()
        self.shapes = dict(shapes)
        self.train_b = train_b
        if train_b:
            for name, shape in shapes.items():
                self.register_parameter(f"db_{name}", nn.Parameter(torch.zeros(shape)))
        self.extra = ExtraRank(extra, extra_rank, seed) if extra and extra_rank else None

    def forward(self, groups: Mapping[str, GroupInputs]) -> dict[str, dict[str, torch.Tensor]]:
        def db(name: str) -> torch.Tensor:
            if self.train_b:
                return getattr(self, f"db_{name}").clone()
            like = next(self.parameters())
            return torch.zeros(self.shapes[name], dtype=like.dtype, device=like.device)

        out = {name: {"db": db(name), "alpha": torch.ones(1)} for name in groups}
        if self.extra is not None:
            out[EXTRA] = self.extra()
        return out


def group_rdm(
    outputs: Mapping[str, Mapping[str, torch.Tensor]],
    groups: Mapping[str, GroupInputs],
    generator: torch.Generator | Mapping[str, torch.Generator] | None,
    mu_target: float = 0.0,
    sigma_target: float = 1.0,
    num_projections: int = 2048,
    max_samples: int | None = None,
    sort_budget: int | None = None,
    n_groups: int | None = None,
    directions: Directions = "orthogonal",
) -> torch.Tensor:
    """Mean over groups of RDM(target encodings) + RDM(source encodings, padding excluded); each term on at
    most ``max_samples`` rows and ``sort_budget`` projected values, along ``directions`` (see ``rdm``).
    ``generator``: one for every draw, or one per group (:func:`rdm_generators`). ``n_groups``: divide the sum
    by this many groups instead of those present (a worker's share of the mean over every worker's groups)."""
    terms = []
    for name, res in outputs.items():
        if name == EXTRA or "z_target" not in res:
            continue
        gen = generator[name] if isinstance(generator, Mapping) else generator
        z_t = res["z_target"].flatten(0, 1)
        z_s = res["z_source"][groups[name].src_valid]
        terms.append(rdm(z_t, mu_target, sigma_target, num_projections, gen, max_samples, sort_budget, directions)
                     + rdm(z_s, mu_target, sigma_target, num_projections, gen, max_samples, sort_budget, directions))
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum() / (n_groups or len(terms))


def module_deltas(
    outputs: Mapping[str, Mapping[str, torch.Tensor]], groups: Mapping[str, GroupInputs]
) -> dict[str, torch.Tensor]:
    """The scaled updates alpha_g * dB scattered into each module's full B shape (d_out, r); fused modules
    collect the rows of every role they hold."""
    deltas: dict[str, torch.Tensor] = {}
    for name, g in groups.items():
        db = outputs[name]["db"]
        for i, (path, rows, d_out) in enumerate(zip(g.modules, g.rows, g.module_d_out, strict=True)):
            if len(rows) == d_out:
                deltas[path] = db[i]
                continue
            base = deltas.get(path, db.new_zeros(d_out, g.rank))
            deltas[path] = base.index_copy(0, torch.as_tensor(list(rows)), db[i])
    return deltas


def group_diagnostics(outputs: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, float]]:
    """Per group: its alpha and, for the grounded net, the mean gate opening (what a step logs and a run
    reports)."""
    return {"alpha": {g: float(o["alpha"]) for g, o in outputs.items()},
            "gate_open": {g: float(o["gate_open"]) for g, o in outputs.items() if "gate_open" in o}}


def attention_mass(outputs: Mapping[str, Mapping[str, torch.Tensor]], groups: Mapping[str, GroupInputs],
                   n_sources: int) -> dict[str, dict[int, list[float]]]:
    """Per group and target layer: the attention mass each source received (mean over target tokens)."""
    out: dict[str, dict[int, list[float]]] = {}
    for name, g in groups.items():
        if "attention" not in outputs[name]:
            continue
        attn = outputs[name]["attention"].detach().mean(dim=1)  # (M, S)
        owner = g.src_owner.clamp_min(0)
        mass = torch.zeros(attn.shape[0], n_sources, device=attn.device).scatter_add_(1, owner, attn * g.src_valid)
        out[name] = {layer: mass[i].tolist() for i, layer in enumerate(g.layers)}
    return out
