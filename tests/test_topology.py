import pytest
import torch

from hetero_ray.align import head_map, layer_pairs, plan_alignment, tail_map, uniform_map
from hetero_ray.errors import FamilyError
from hetero_ray.families import (
    ModelDims,
    build_topology,
    detect_family,
    get_family,
    split_qkv_interleaved,
)
from hetero_ray.io.adapters import read_adapter
from hetero_ray.runners.prepare import open_adapter
from hetero_ray.tokens.blocks import from_tokens, harmonize_rank, module_tokens, to_tokens


def test_layer_maps_match_hand_tables():
    assert tail_map(4, 2) == {2: 0, 3: 1}
    assert tail_map(4, 5) == {0: 1, 1: 2, 2: 3, 3: 4}
    assert tail_map(3, 3) == {0: 0, 1: 1, 2: 2}
    assert head_map(4, 2) == {0: 0, 1: 1}
    assert head_map(3, 5) == {0: 0, 1: 1, 2: 2}
    assert uniform_map(4, 2) == {0: 0, 1: 0, 2: 1, 3: 1}
    assert uniform_map(3, 5) == {0: 0, 1: 2, 2: 4}
    assert uniform_map(1, 3) == {0: 2}
    assert layer_pairs(4, 4, "tail", 0.5) == {2: 2, 3: 3}
    assert layer_pairs(4, 2, "tail", 0.5) == {3: 1}
    assert layer_pairs(4, 4, "head", 0.25) == {3: 3}


def test_detects_every_tiny_family(zoo):
    for family in ["llama", "qwen2", "mistral", "gemma3", "phi3"]:
        adapter, topo = open_adapter(zoo[f"{family}-lora"], None, None, False, True)
        assert topo.family.name == family
        assert {role for _, role in topo.slots} == {"q", "k", "v", "o", "gate", "up", "down"}


def test_aligning_an_adapter_to_itself_is_identity(zoo):
    adapter, topo = open_adapter(zoo["llama-lora"], None, None, False, False)
    plan = plan_alignment(topo, [("self", topo)], "tail")
    assert plan.unaligned == []
    for entry in plan.entries:
        (feed,) = entry.feeds
        assert (feed.source_layer, feed.source_module, feed.harmonize) == (entry.layer, entry.module, "none")
    from hetero_ray.tokens.candidates import slot_tensors, source_candidates

    for c in source_candidates(plan, 0, adapter, topo, block_size=64):
        slot = topo.slots[(c.target_layer, c.role)]
        a, b = slot_tensors(adapter, slot)
        # the tokens carry the update as PEFT applies it: s * B A, s = lora_alpha / r = 2 here
        assert adapter.module_scaling(slot.module.path) == 2.0
        tokens, sigmas, _ = module_tokens(a, 2.0 * b, 64)
        torch.testing.assert_close(c.tokens, tokens, rtol=0, atol=0)


def test_tail_alignment_of_shallower_and_deeper_sources(zoo):
    _, target = open_adapter(zoo["llama-lora"], None, None, False, False)  # 4 layers
    srcs = [(f, open_adapter(zoo[f"{f}-lora"], None, None, False, True)[1]) for f in ("gemma3", "mistral")]
    plan = plan_alignment(target, srcs, "tail")
    gemma, mistral = plan.sources
    assert gemma.layer_pairs == {2: 0, 3: 1} and mistral.layer_pairs == {0: 1, 1: 2, 2: 3, 3: 4}
    q3 = next(e for e in plan.entries if (e.layer, e.role) == (3, "q"))
    assert [(f.source_id, f.source_layer) for f in q3.feeds] == [("gemma3", 1), ("mistral", 4)]
    assert [f.harmonize for f in q3.feeds] == ["none", "truncated"]  # mistral rank 8 -> target rank 4
    assert set(plan.groups()) == {f"{r}_r4" for r in ("q", "k", "v", "o", "gate", "up", "down")}
    roundtrip = type(plan).from_dict(plan.to_dict())
    assert roundtrip.to_json() == plan.to_json()


def test_phi3_fused_projections_split_and_recombine_exactly(zoo):
    adapter, topo = open_adapter(zoo["phi3-lora"], None, None, False, True)
    cfg = ModelDims(48, 4, 2, 12)
    for layer in range(topo.n_layers):
        qkv = topo.slots[(layer, "q")].module
        assert qkv.path.endswith("qkv_proj")
        a, b = adapter.module_tensors(qkv.path)
        parts = [topo.slots[(layer, r)] for r in ("q", "k", "v")]
        assert [p.d_out for p in parts] == [cfg.num_heads * cfg.head_dim, 24, 24]
        assert all(p.module is qkv for p in parts)  # A shared
        rebuilt = torch.cat([b[p.rows.start : p.rows.stop] for p in parts])
        assert torch.equal(rebuilt, b)
        gate, up = topo.slots[(layer, "gate")], topo.slots[(layer, "up")]
        _, b2 = adapter.module_tensors(gate.module.path)
        assert torch.equal(torch.cat([b2[gate.rows.start : gate.rows.stop], b2[up.rows.start : up.rows.stop]]), b2)
    # without any config, q rows come from o_proj's input width: same split
    topo2 = build_topology(adapter, get_family("phi3"), None)
    assert topo2.slots[(0, "k")].rows == topo.slots[(0, "k")].rows


def test_gpt_neox_interleaved_split_recombines():
    dims = ModelDims(hidden_size=16, num_heads=4, num_kv_heads=4, head_dim=4)
    rows = split_qkv_interleaved(48, dims, None)
    b = torch.randn(48, 3)
    parts = {r: b[list(idx)] for r, idx in rows.items()}
    assert parts["q"].shape == (16, 3)
    rebuilt = torch.zeros_like(b)
    for r, idx in rows.items():
        rebuilt[list(idx)] = parts[r]
    assert torch.equal(rebuilt, b)
    assert torch.equal(parts["k"][:4], b[4:8])  # head 0: q rows 0-3, k rows 4-7, v rows 8-11


@pytest.mark.parametrize("src_rank", [1, 2, 4])
def test_rank_harmonization_is_exact_up_to_target_rank(src_rank):
    g = torch.Generator().manual_seed(src_rank)
    a, b = torch.randn(src_rank, 40, generator=g), torch.randn(24, src_rank, generator=g)
    a2, b2 = harmonize_rank(a, b, 4)
    assert a2.shape == (4, 40) and b2.shape == (24, 4)
    torch.testing.assert_close(b2 @ a2, b @ a, rtol=1e-5, atol=1e-5)


def test_rank_harmonization_truncates_to_best_approximation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 40, generator=g), torch.randn(24, 8, generator=g)
    a2, b2 = harmonize_rank(a, b, 3)
    w = (b @ a).double()
    s = torch.linalg.svdvals(w)
    err = torch.linalg.matrix_norm(w - (b2 @ a2).double())
    torch.testing.assert_close(err, s[3:].square().sum().sqrt(), rtol=1e-4, atol=1e-4)


def test_blocking_pads_and_inverts():
    m = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 3)
    t = to_tokens(m, 4)
    assert t.shape == (3, 12)
    assert torch.equal(t[-1, 6:], torch.zeros(6))  # two zero rows of padding
    assert torch.equal(from_tokens(t, 10, 3), m)


def test_unknown_family_and_unmappable_key_are_clear_errors(zoo, tmp_path):
    adapter = read_adapter(zoo["qwen2-lora"])
    with pytest.raises(FamilyError, match="unknown family 'falcon'.*known: .*gemma3"):
        detect_family(adapter, None, "falcon")
    adapter.config["base_model_name_or_path"] = None
    # what PEFT writes for a model built from a config: the family is in auto_mapping alone
    assert adapter.config["auto_mapping"]["base_model_class"] == "Qwen2ForCausalLM"
    assert detect_family(adapter, None, None).name == "qwen2"
    adapter.config["auto_mapping"] = {"parent_library": "transformers.models.mistral.modeling_mistral"}
    assert detect_family(adapter, None, None).name == "mistral"
    adapter.config["auto_mapping"] = {"base_model_class": "Gemma3ForConditionalGeneration"}
    assert detect_family(adapter, None, None).name == "gemma3"
    adapter.config["base_model_name_or_path"] = "some/unknown-model"
    adapter.config["auto_mapping"] = None
    with pytest.raises(FamilyError, match="cannot detect the model family.*set `family:`"):
        detect_family(adapter, None, None)
    with pytest.raises(FamilyError, match="no canonical role in family 'gpt2'|no module matches family 'gpt2'"):
        build_topology(adapter, get_family("gpt2"))


def test_base_configs_take_transformers_defaults_for_what_they_leave_out():
    """A Gemma-3 config.json often states no head counts or head_dim in text_config: the shapes that check the
    adapter must come from Gemma3TextConfig's defaults (8 heads, 4 kv heads, head_dim 256), not from
    hidden_size / heads."""
    from hetero_ray.families import ModelDims, llama_style_shapes, with_defaults

    raw = {"model_type": "gemma3", "text_config": {"model_type": "gemma3_text", "hidden_size": 64,
                                                   "intermediate_size": 128, "num_hidden_layers": 2}}
    full = with_defaults(raw)
    assert ModelDims.from_config(full) == ModelDims(64, 8, 4, 256)
    assert llama_style_shapes(full)["self_attn.q_proj"] == (64, 8 * 256)
    assert with_defaults({"model_type": "not-a-model", "hidden_size": 3}) == {"model_type": "not-a-model",
                                                                              "hidden_size": 3}


@pytest.mark.parametrize("control", ["none", "random_sources", "zero_sources", "shuffled_layers"])
def test_source_candidates_match_the_per_module_reference_and_read_each_tensor_once(zoo, tmp_path, control):
    """Alignment (each module read once; at the target's rank the candidates are views of the file's mapping,
    no copy) gives the per-module computation's tokens bit for bit, and assembly the blocks' singular values
    (batched per group, from Grams) to 1e-5, for sources of lower, equal and higher rank and Phi-3's fused
    projections; asked for some target layers, it yields exactly those; through Arrow the factors and the
    scale travel unpadded and come back exact."""
    from hetero_ray.controls import Control, control_factors
    from hetero_ray.denoise.fusion import assemble_groups
    from hetero_ray.runners.prepare import alignment_plan, candidates_of, open_source, open_target
    from hetero_ray.tokens.candidates import candidates_from_arrow, candidates_to_arrow, slot_tensors
    from tests.helpers import make_spec

    spec = make_spec(zoo, tmp_path / "out", sources=("qwen2", "mistral", "gemma3", "phi3"))
    spec = spec.model_copy(update={"strategy": "heterofusion" if control == "none" else control})
    _, ttopo = open_target(spec)
    sources = [open_source(spec, i) for i in range(len(spec.sources))]
    plan = alignment_plan(spec, ttopo, [t for _, t in sources])
    harmonized, views, every, want_sigmas = set(), 0, [], {}
    for i, (adapter, topo) in enumerate(sources):
        reads: list[str] = []
        read = adapter.tensor
        adapter.tensor = lambda key, read=read, reads=reads: reads.append(key) or read(key)
        got = list(candidates_of(spec, plan, i, adapter, topo, 64))
        assert len(reads) == len(set(reads))  # Phi-3's qkv feeds three roles, read once
        del adapter.tensor
        want = [(e, f) for e in plan.entries for f in e.feeds if f.source == i]
        assert [(c.target_layer, c.role, c.source_layer) for c in got] == [
            (e.layer, e.role, f.source_layer) for e, f in want]
        for c, (e, f) in zip(got, want, strict=True):
            slot = topo.slots[(f.source_layer, e.role)]
            if spec.control is Control.ZERO_SOURCES:
                a, b = torch.zeros(f.rank, f.d_in), torch.zeros(f.d_out, f.rank)
            else:
                a, b = slot_tensors(adapter, slot, control_factors(adapter, slot.module.path, spec.control, spec.seed,
                                                                   f.source_id))
                b = b.float() * adapter.module_scaling(slot.module.path)
            tokens, sigmas, n_a = module_tokens(*harmonize_rank(a, b, e.rank), 64)
            assert torch.equal(c.tokens, tokens) and c.n_a_blocks == n_a and c.n_tokens == tokens.shape[0]
            assert c.a.shape == (e.rank, f.d_in) and c.b.shape == (f.d_out, e.rank)
            want_sigmas[c.key] = sigmas
            if f.harmonize == "none" and control == "none" and not slot.fused:
                assert c.a.data_ptr() == a.data_ptr()  # the read tensor itself, not a copy
                views += 1
            harmonized.add(f.harmonize)
        every += got
        back = candidates_from_arrow(candidates_to_arrow(got))  # what Ray Data carries: A, B and s
        assert [(x.key, x.d_in, x.block_size, x.source_layer, x.scale) for x in back] == [
            (x.key, x.d_in, x.block_size, x.source_layer, x.scale) for x in got]
        assert all(torch.equal(x.a, y.a) and torch.equal(x.b, y.b) and torch.equal(x.tokens, y.tokens)
                   for x, y in zip(back, got, strict=True))
        # no padding in transit
        assert sum(x.a.numel() + x.b.numel() for x in got) < sum(x.tokens.numel() for x in got)
        some = sorted({e.layer for e, _ in want})[::2]
        part = list(candidates_of(spec, plan, i, adapter, topo, 64, some))
        assert [(c.target_layer, c.role, c.source) for c in part] == [
            (c.target_layer, c.role, c.source) for c in got if c.target_layer in some]
        assert all(torch.equal(p.tokens, g.tokens) for p, g in zip(
            part, [c for c in got if c.target_layer in some], strict=True))
    assert harmonized == {"none", "exact", "truncated"}
    assert any(topo.family.name == "phi3" for _, topo in sources)
    assert views > 0 or control != "none"
    target, _ = open_target(spec)
    groups = assemble_groups(plan, target, ttopo, every, 64)
    for name, g in groups.items():
        for m, layer in enumerate(g.layers):
            pos = 0
            for key in sorted(k for k in want_sigmas if k[:2] == (name, layer)):  # by source, as assembled
                ref = want_sigmas[key]
                torch.testing.assert_close(g.src_sigmas[m, pos : pos + len(ref)], ref, rtol=1e-5,
                                           atol=1e-6 * float(ref.max().clamp_min(1)))
                pos += len(ref)
            assert not g.src_sigmas[m, pos:].any() and not g.src_valid[m, pos:].any()


def test_block_singular_values_skip_padding_rows_and_match_svdvals_in_any_chunking():
    """Blocks of mixed real row counts (full, partial, one row, padding tokens): the Grams over real rows give
    each b x r block's ``svdvals`` to 1e-6 of the largest value, whatever the chunk size, and 0 for padding."""
    from hetero_ray.tokens.blocks import block_rows, block_singular_values

    torch.manual_seed(0)
    b, r = 16, 4
    counts = block_rows(37, 20, b) + [1, 0, 0]  # A part 16, 16, 5; B part 16, 4; a one-row block; padding
    assert counts[:5] == [16, 16, 5, 16, 4]
    tokens = torch.zeros(2, len(counts), b * r)  # two modules, as a group's (M, S, D)
    for m in range(2):
        for k, h in enumerate(counts):
            tokens[m, k].view(b, r)[:h] = torch.randn(h, r) * (k + 1)
    rows = torch.tensor([counts, counts])
    want = torch.linalg.svdvals(tokens.view(2, len(counts), b, r))
    for chunk in (64 << 20, 8 * r * 16, 1):  # one batch; a few blocks per batch; one block per batch
        got = block_singular_values(tokens, r, rows, chunk_bytes=chunk)
        assert got.shape == (2, len(counts), r)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.max()))
    assert not block_singular_values(tokens, r, rows)[:, -2:].any()
    torch.testing.assert_close(block_singular_values(tokens, r), want, rtol=0, atol=1e-6 * float(want.max()))
