"""Update candidates: one record per (target slot, aligned source slot), holding the source's
[A^T ; B] tokens at the target rank and their per-block singular values. Plain tensors plus metadata,
convertible to and from Arrow so that they can stream through Ray Data."""

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
from hetero_ray.tokens.blocks import batched_module_rows, harmonize_rank, n_blocks


@dataclass
class Candidate:
    """One source slot aligned to one target slot. It holds the slot's rows unpadded, [A^T ; B] at the target
    rank ((d_in + d_out) x r): its tokens, each part zero-padded to whole blocks of ``block_size`` rows, are
    made where the groups are assembled (padding would cost up to ~3x the adapter's bytes in transit)."""

    group: str
    target_module: str
    target_layer: int
    role: str
    source: int
    source_id: str
    family: str
    source_layer: int
    d_in: int
    block_size: int
    rows: torch.Tensor  # (d_in + d_out, rank), fp32
    sigmas: torch.Tensor  # (n_tokens, rank), fp32: the singular values of each block

    @property
    def key(self) -> tuple[str, int, int]:
        """Deterministic order within a group: target layer, then source index."""
        return (self.group, self.target_layer, self.source)

    @property
    def n_a_blocks(self) -> int:
        return n_blocks(self.d_in, self.block_size)

    @property
    def n_tokens(self) -> int:
        return self.n_a_blocks + n_blocks(self.rows.shape[0] - self.d_in, self.block_size)

    def write_tokens(self, out: torch.Tensor) -> None:
        """Write the tokens into ``out`` ((n_tokens, block_size * rank), zero-filled)."""
        r, split = self.rows.shape[1], self.n_a_blocks * self.block_size
        assert out.shape == (self.n_tokens, self.block_size * r)
        flat = out.view(-1, r)
        flat[: self.d_in] = self.rows[: self.d_in]
        flat[split : split + self.rows.shape[0] - self.d_in] = self.rows[self.d_in :]

    @property
    def tokens(self) -> torch.Tensor:
        """(n_tokens, block_size * rank): [A^T blocks ; B blocks], each part zero-padded to whole blocks."""
        out = torch.zeros(self.n_tokens, self.block_size * self.rows.shape[1])
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

    Each module is read once and each source slot's rows and singular values made once, however many target
    slots it feeds, batched over the slots of one shape; no padding is made here.
    """
    if not control.reads_sources:
        raise ValueError(f"control {control.value!r} has no source candidates")
    source_id = plan.sources[source].source_id
    wanted = None if layers is None else set(layers)
    work = [(entry, feed) for entry in plan.entries if wanted is None or entry.layer in wanted
            for feed in entry.feeds if feed.source == source]
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # a fused module feeds several roles
    factors: dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for entry, feed in work:
        key = (feed.source_layer, entry.role, entry.rank)
        if key in factors:
            continue
        slot = topology.slots[(feed.source_layer, entry.role)]
        if control is Control.ZERO_SOURCES:
            a, b = torch.zeros(feed.rank, feed.d_in), torch.zeros(feed.d_out, feed.rank)
        else:
            path = slot.module.path
            if path not in modules:
                modules[path] = control_factors(adapter, path, control, seed, source_id)
            a, b = slot_tensors(adapter, slot, modules[path])
            b = b.float() * adapter.module_scaling(path)
        factors[key] = harmonize_rank(a, b, entry.rank)
    blocked = batched_module_rows(factors, block_size)
    for entry, feed in work:
        key = (feed.source_layer, entry.role, entry.rank)
        rows, sigmas = blocked[key]
        yield Candidate(entry.group, entry.module, entry.layer, entry.role, source, source_id, feed.family,
                        feed.source_layer, factors[key][0].shape[1], block_size, rows, sigmas)


_SCALARS = {
    "group": pa.string(), "target_module": pa.string(), "target_layer": pa.int32(), "role": pa.string(),
    "source": pa.int32(), "source_id": pa.string(), "family": pa.string(), "source_layer": pa.int32(),
    "d_in": pa.int32(), "block_size": pa.int32(),
}
CANDIDATE_SCHEMA = pa.schema(
    [*_SCALARS.items(), ("n_tokens", pa.int32()), ("rank", pa.int32()),
     ("rows", pa.large_list(pa.float32())), ("sigmas", pa.large_list(pa.float32()))]
)


def candidates_to_arrow(candidates: Iterable[Candidate]) -> pa.Table:
    """Arrow table with one row per candidate; tensors as flat float32 lists plus their shape."""
    cols: dict[str, list] = {name: [] for name in CANDIDATE_SCHEMA.names}
    for c in candidates:
        for name in _SCALARS:
            cols[name].append(getattr(c, name))
        cols["n_tokens"].append(c.n_tokens)
        cols["rank"].append(c.rows.shape[1])
        cols["rows"].append(c.rows.contiguous().numpy().ravel())
        cols["sigmas"].append(c.sigmas.numpy().ravel())
    arrays = [
        pa.array(cols[f.name], type=f.type) if f.name not in ("rows", "sigmas")
        else _flat_list_array(cols[f.name]) for f in CANDIDATE_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=CANDIDATE_SCHEMA)


def _flat_list_array(chunks: list[np.ndarray]) -> pa.Array:
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in chunks], out=offsets[1:])
    values = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))


def candidates_from_arrow(table: pa.Table) -> list[Candidate]:
    """Inverse of :func:`candidates_to_arrow` (bit-exact). The tensors are read-only views of the table's
    buffers, not copies (on Ray, the object store's shared memory): they keep the table alive, nothing may
    write to them, and assembly copies them once, into the groups' tensors. A copy here would hold every
    token twice in a worker's heap while the groups are built (the allocator keeps what it frees)."""
    table = table.combine_chunks()
    scalars = {name: table.column(name).to_pylist() for name in _SCALARS}
    n_tokens = table.column("n_tokens").to_numpy()
    ranks = table.column("rank").to_numpy()
    tok_vals = table.column("rows").chunk(0).flatten().to_numpy() if table.num_rows else None
    sig_vals = table.column("sigmas").chunk(0).flatten().to_numpy() if table.num_rows else None
    tok_off = table.column("rows").chunk(0).offsets.to_numpy() if table.num_rows else None
    sig_off = table.column("sigmas").chunk(0).offsets.to_numpy() if table.num_rows else None
    out = []
    with warnings.catch_warnings():  # Arrow's buffers are read-only: so are these views, by contract
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for i in range(table.num_rows):
            n, r = int(n_tokens[i]), int(ranks[i])
            rows = torch.from_numpy(tok_vals[tok_off[i] : tok_off[i + 1]]).reshape(-1, r)
            sigmas = torch.from_numpy(sig_vals[sig_off[i] : sig_off[i + 1]]).reshape(n, -1)
            out.append(Candidate(**{k: v[i] for k, v in scalars.items()}, rows=rows, sigmas=sigmas))
    return out

