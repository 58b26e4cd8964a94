"""How the Ray driver divides alignment into FamilyActor tasks (no Ray needed)."""

from hetero_ray.runners.prepare import open_and_align
from hetero_ray.runners.ray.driver import layer_chunks
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
