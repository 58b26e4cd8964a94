"""FamilyActor: one Ray actor per source model family. It reads that family's adapters (as the driver opened
them) lazily, aligns them to the target topology with the method core and returns their update candidates as
Arrow tables."""

from __future__ import annotations

import pyarrow as pa
import ray

from hetero_ray.align import AlignmentPlan
from hetero_ray.runners.prepare import candidates_of
from hetero_ray.runners.ray.faults import maybe_fail
from hetero_ray.spec import FusionSpec
from hetero_ray.tokens.candidates import candidates_to_arrow


@ray.remote(max_restarts=3, max_task_retries=3)
class FamilyActor:
    """Aligns every source of one family; a restarted actor redoes its work with identical results
    (everything it computes is a deterministic function of the spec)."""

    def __init__(self, spec: dict, family: str, plan: dict, block_size: int, sources: dict):
        """``sources``: the family's sources as the driver opened them ({index: (adapter, topology)}: headers,
        configs and topology, no tensor), so that the actor reads tensors without opening the sources again
        (which would import transformers' config classes in every actor). Each adapter maps its file at its
        first read and keeps the map for the source's later chunks."""
        self.spec = FusionSpec.model_validate(spec)
        self.family = family
        self.plan = AlignmentPlan.from_dict(plan)
        self.block_size = block_size
        self.base_models: dict = {}  # the family's base model(s), loaded once for every source's teacher
        self.sources = sources

    def _source(self, source: int, what: str):
        adapter, topo = self.sources[source]
        if topo.family.name != self.family:
            raise ValueError(f"source {source} is {topo.family.name}, this actor {what} {self.family}")
        return adapter, topo

    def teach(self, source: int) -> dict:
        """Teacher signals of source ``source`` (its expert's answers and per-chunk excess on the teach:
        prompts), from the cache when there."""
        from hetero_ray.teach.signals import cache_dir, source_signals

        adapter, _ = self._source(source, "serves")
        return source_signals(self.spec, source, adapter, cache_dir(self.spec), self.base_models)

    def candidates(self, source: int, layers: list[int] | None, owners: list[list[str]] | None = None
                   ) -> pa.Table | tuple[pa.Table, ...]:
        """Candidates of source ``source`` for the target layers ``layers`` (None: all of them): one table,
        or with ``owners`` (each worker's groups) one table per worker, its groups' candidates only (called
        with ``num_returns=len(owners)``), so that no later pass splits them."""
        adapter, topo = self._source(source, "aligns")
        cands = list(candidates_of(self.spec, self.plan, source, adapter, topo, self.block_size, layers))
        maybe_fail("actor")
        if owners is None:
            parts = [cands]
        else:
            rank = {group: r for r, groups in enumerate(owners) for group in groups}
            parts = [[] for _ in owners]
            for c in cands:
                parts[rank[c.group]].append(c)
        tables = tuple(candidates_to_arrow(part) for part in parts)
        return tables if len(tables) > 1 else tables[0]
