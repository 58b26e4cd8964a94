"""Update candidates: one record per (target slot, aligned source slot), holding the source's factors at the
target rank (A, B and the scale of s·B·A; its tokens are made at assembly). Plain tensors plus metadata,
convertible to and from Arrow (the factors A and B as they are, and s) so that they can stream through Ray
Data."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from hetero_ray.align import AlignmentPlan
from hetero_ray.controls import Control, control_factors
from hetero_ray.families import Slot, Topology
from hetero_ray.io.adapters import LoraAdapter
from hetero_ray.tokens.blocks import harmonize_rank, n_blocks


@dataclass
class Candidate:
    """One source slot aligned to one target slot: its factors at the target rank, A (r x d_in) and B
    (d_out x r), and the scale s of the update s·B·A. An fp32 factor already at the target rank is a view of
    the source file's memory map (its private, copy-on-write mapping: nothing can reach the file), not a
    copy; half-precision factors, harmonized ranks, controls and interleaved fused rows are copies. The
    tokens, [A^T ; s·B] with each part zero-padded to whole blocks of ``block_size`` rows, and their blocks'
    singular values are made where the groups are assembled (padding would cost up to ~3x the adapter's
    bytes in transit)."""

    group: str
    target_module: str
    target_layer: int
    role: str
    source: int
    source_id: str
    family: str
    source_layer: int
    block_size: int
    a: torch.Tensor  # (rank, d_in)
    b: torch.Tensor  # (d_out, rank)
    scale: float = 1.0

    @property
    def key(self) -> tuple[str, int, int]:
        """Deterministic order within a group: target layer, then source index."""
        return (self.group, self.target_layer, self.source)

    @property
    def d_in(self) -> int:
        return self.a.shape[1]

    @property
    def d_out(self) -> int:
        return self.b.shape[0]

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def n_a_blocks(self) -> int:
        return n_blocks(self.d_in, self.block_size)

    @property
    def n_tokens(self) -> int:
        return self.n_a_blocks + n_blocks(self.d_out, self.block_size)

    def write_tokens(self, out: torch.Tensor) -> None:
        """Write the tokens into ``out`` ((n_tokens, block_size * rank), zero-filled): A^T from the first row,
        s·B (in fp32 whatever B's dtype) from the first row of the B blocks."""
        r, split = self.rank, self.n_a_blocks * self.block_size
        assert out.shape == (self.n_tokens, self.block_size * r)
        flat = out.view(-1, r)
        flat[: self.d_in].copy_(self.a.T)
        b_rows = flat[split : split + self.d_out]
        if self.scale == 1.0:
            b_rows.copy_(self.b)
        else:
            torch.mul(self.b.float(), self.scale, out=b_rows)

    @property
    def tokens(self) -> torch.Tensor:
        """(n_tokens, block_size * rank): [A^T blocks ; s·B blocks], each part zero-padded to whole blocks."""
        out = torch.zeros(self.n_tokens, self.block_size * self.rank)
        self.write_tokens(out)
        return out


def slot_tensors(adapter: LoraAdapter, slot: Slot, factors: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B rows of the slot's role) in PEFT shapes, of the adapter or of the given module ``factors``."""
    a, b = factors if factors is not None else adapter.module_tensors(slot.module.path)
    if not slot.fused:
        return a, b
    if isinstance(slot.rows, range):
        return a, b[slot.rows.start : slot.rows.stop]
    return a, b[torch.as_tensor(slot.rows)]


def source_candidates(
    plan: AlignmentPlan,
    source: int,
    adapter: LoraAdapter,
    topology: Topology,
    block_size: int,
    control: Control = Control.NONE,
    seed: int = 0,
    layers: Iterable[int] | None = None,
) -> Iterator[Candidate]:
    """Yield the candidates of one source, in plan order (only those of target ``layers`` when given).

    The tokens carry the source's update as PEFT applies it, s·B·A: B is multiplied by the module's scale s
    (``lora_alpha / r``, rsLoRA and per-module patterns honoured), so a source's ``lora_alpha`` matters.
    ``control`` replaces what the source contributes (:func:`hetero_ray.controls.control_factors`):
    ``zero_sources`` gives all-zero tokens (no tensor is read), ``random_sources`` a Gaussian adapter with the
    same Frobenius norm per module (A and B each), and so on; the teacher gets the same replacement.

    Each module is read once and each source slot's factors taken once, however many target slots it feeds.
    At the target's rank the candidates of an fp32 adapter hold views of the read tensors (no copy); tokens,
    padding and singular values are made at assembly (:func:`hetero_ray.denoise.fusion.assemble_groups`).
    """
    if not control.reads_sources:
        raise ValueError(f"control {control.value!r} has no source candidates")
    source_id = plan.sources[source].source_id
    wanted = None if layers is None else set(layers)
    work = [(entry, feed) for entry in plan.entries if wanted is None or entry.layer in wanted
            for feed in entry.feeds if feed.source == source]
    if wanted is None and work and control is not Control.ZERO_SOURCES:
        # the source's every planned module is about to be read: one check for the whole file (which also
        # reads its modules no target slot uses: a tail layer map, roles the target lacks)
        adapter.check_finite()
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # a fused module feeds several roles
    factors: dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor, float]] = {}
    for entry, feed in work:
        key = (feed.source_layer, entry.role, entry.rank)
        if key not in factors:
            factors[key] = _slot_factors(adapter, topology.slots[(feed.source_layer, entry.role)], feed, entry.rank,
                                         control, seed, source_id, modules)
        a, b, scale = factors[key]
        yield Candidate(entry.group, entry.module, entry.layer, entry.role, source, source_id, feed.family,
                        feed.source_layer, block_size, a, b, scale)


def _slot_factors(adapter, slot, feed, rank, control, seed, source_id, modules
                  ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, s) of one source slot at the target ``rank``: views of the read tensors when the rank is already
    the target's (s applied when the tokens are written), else harmonized with s folded into B."""
    if control is Control.ZERO_SOURCES:  # nothing read, nothing allocated
        zero = torch.zeros(())
        return zero.expand(rank, feed.d_in), zero.expand(feed.d_out, rank), 1.0
    path = slot.module.path
    if path not in modules:
        modules[path] = control_factors(adapter, path, control, seed, source_id)
    a, b = slot_tensors(adapter, slot, modules[path])
    scale = adapter.module_scaling(path)
    if a.shape[0] == rank:
        return a.float(), b.float(), scale
    a, b = harmonize_rank(a, b.float() * scale, rank)
    return a, b, 1.0


_SCALARS = {
    "group": pa.string(), "target_module": pa.string(), "target_layer": pa.int32(), "role": pa.string(),
    "source": pa.int32(), "source_id": pa.string(), "family": pa.string(), "source_layer": pa.int32(),
    "d_in": pa.int32(), "block_size": pa.int32(), "rank": pa.int32(), "scale": pa.float64(),
}
CANDIDATE_SCHEMA = pa.schema([*_SCALARS.items(), ("factors", pa.large_list(pa.float32()))])


def candidates_to_arrow(candidates: Iterable[Candidate]) -> pa.Table:
    """Arrow table with one row per candidate: its scalars (the scale s among them), and its factors A
    (r x d_in) then B (d_out x r), row-major, as one flat float32 list, copied straight into the table's one
    values buffer (the only copy alignment makes: no transpose, no scaling; the tokens are written at
    assembly, as for candidates made in process)."""
    candidates = list(candidates)
    cols: dict[str, list] = {name: [getattr(c, name) for c in candidates] for name in _SCALARS}
    sizes = [(c.d_in + c.d_out) * c.rank for c in candidates]
    offsets = np.zeros(len(candidates) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    values = torch.empty(int(offsets[-1]))
    for c, lo in zip(candidates, offsets[:-1].tolist(), strict=True):
        split = lo + c.a.numel()
        values[lo:split].view(c.a.shape).copy_(c.a)
        values[split : split + c.b.numel()].view(c.b.shape).copy_(c.b)
    arrays = [pa.array(cols[f.name], type=f.type) for f in CANDIDATE_SCHEMA if f.name != "factors"]
    arrays.append(pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values.numpy())))
    return pa.Table.from_arrays(arrays, schema=CANDIDATE_SCHEMA)


def candidates_from_arrow(table: pa.Table) -> list[Candidate]:
    """Inverse of :func:`candidates_to_arrow` (bit-exact). The factors are read-only views of the table's
    buffers, not copies (on Ray, the object store's shared memory): they keep the table alive, nothing may
    write to them, and assembly copies them once, into the groups' tensors. A copy here would hold every
    token twice in a worker's heap while the groups are built (the allocator keeps what it frees)."""
    table = table.combine_chunks()
    scalars = {name: table.column(name).to_pylist() for name in _SCALARS}
    values = table.column("factors").chunk(0).values.to_numpy() if table.num_rows else None  # offsets index it
    offsets = table.column("factors").chunk(0).offsets.to_numpy() if table.num_rows else None
    out = []
    with warnings.catch_warnings():  # Arrow's buffers are read-only: so are these views, by contract
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for i in range(table.num_rows):
            d_in, r = scalars["d_in"][i], scalars["rank"][i]
            factors = torch.from_numpy(values[offsets[i] : offsets[i + 1]])
            fields = {k: v[i] for k, v in scalars.items() if k not in ("d_in", "rank")}
            out.append(Candidate(**fields, a=factors[: r * d_in].view(r, d_in), b=factors[r * d_in :].view(-1, r)))
    return out
