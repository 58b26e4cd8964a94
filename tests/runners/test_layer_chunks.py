"""How the Ray driver divides alignment into FamilyActor tasks (no Ray needed)."""

from hetero_ray.runners.prepare import open_and_align
from hetero_ray.runners.ray.driver import assign_tasks, chunk_cost, layer_chunks, layer_costs
from tests.helpers import make_spec


def test_sources_align_whole_when_there_are_enough_and_split_into_chunks_of_layers_when_few(zoo, tmp_path):
    opened = open_and_align(make_spec(zoo, tmp_path / "o"))
    indices = list(range(len(opened.plan.sources)))
    assert len(indices) == 3
    # 3 sources for 1 aligner: each source is one task, all its layers (None)
    assert layer_chunks(opened.plan, indices, 1) == [(i, None) for i in indices]
    # 3 sources for 4 aligners (2 tasks each): each source in up to 3 chunks that cover its layers once, in order
    chunks = layer_chunks(opened.plan, indices, 4)
    for i in indices:
        layers = sorted(opened.plan.sources[i].layer_pairs)
        mine = [c for j, c in chunks if j == i]
        if len(layers) > 1:
            assert len(mine) > 1 and all(c is not None and len(c) <= -(-len(layers) // 3) for c in mine)
            assert [x for c in mine for x in c] == layers
        else:
            assert mine == [None]
    assert len(chunks) > len(indices)


def test_a_source_aligned_to_no_target_layer_gets_no_task(zoo, tmp_path):
    import dataclasses

    opened = open_and_align(make_spec(zoo, tmp_path / "o"))
    plan = opened.plan
    sources = [dataclasses.replace(s, layer_pairs={}) if s.index == 0 else s for s in plan.sources]
    plan = dataclasses.replace(plan, sources=sources)
    for aligners in (1, 4):
        assert all(i != 0 for i, _ in layer_chunks(plan, [0, 1, 2], aligners))


def test_a_layer_costs_the_values_its_feeds_read(zoo, tmp_path):
    opened = open_and_align(make_spec(zoo, tmp_path / "o"))
    plan = opened.plan
    costs = layer_costs(plan)
    for src in plan.sources:
        assert set(costs[src.index]) == set(src.layer_pairs)
        for layer, cost in costs[src.index].items():
            feeds = [f for e in plan.entries if e.layer == layer for f in e.feeds if f.source == src.index]
            assert cost == sum((f.d_in + f.d_out) * f.rank for f in feeds) > 0
        # a task's cost is its layers' (all of them for a whole source); a layer nothing of the source feeds
        # (a source with LoRA on some layers only) and a source with no feed at all cost nothing
        chunks = [c for j, c in layer_chunks(plan, [src.index], 4) if j == src.index]
        whole = chunk_cost(costs, src.index, None)
        assert sum(chunk_cost(costs, src.index, c) for c in chunks) == whole == sum(costs[src.index].values())
        assert chunk_cost(costs, src.index, [*sorted(src.layer_pairs), 10**6]) == whole
    assert chunk_cost(costs, 10**6, None) == chunk_cost(costs, 10**6, [0]) == 0


def test_tasks_go_to_the_least_loaded_actor_longest_first():
    # equal costs: in turn, as before
    assert assign_tasks([5] * 5, 2) == [0, 1, 0, 1, 0]
    assert assign_tasks([5] * 3, 1) == [0, 0, 0]
    # ranks 64 and 8 alternating in pairs: in turn, one actor would take every rank-64 source (4 x 64 vs 4 x 8)
    costs = [64, 8, 64, 8, 64, 8, 64, 8]
    assert [k for k in range(8) if k % 2 == 0] == [k for k in range(8) if costs[k] == 64]
    owner = assign_tasks(costs, 2)
    loads = [sum(c for c, k in zip(costs, owner, strict=True) if k == a) for a in (0, 1)]
    assert loads == [144, 144]
    # within 4/3 of the best split on an uneven mix (LPT's bound), every task given once
    costs = [97, 13, 55, 55, 40, 31, 31, 8, 8, 8, 70, 2]
    owner = assign_tasks(costs, 3)
    loads = [sum(c for c, k in zip(costs, owner, strict=True) if k == a) for a in range(3)]
    assert sum(loads) == sum(costs) and max(loads) <= 4 / 3 * max(sum(costs) / 3, max(costs))
    # the first actor teaches: it takes alignment only when it is the only actor
    assert assign_tasks([3, 2, 1], 3, reserve_first=True) == [1, 2, 2]
    assert assign_tasks([3, 2, 1], 1, reserve_first=True) == [0, 0, 0]
