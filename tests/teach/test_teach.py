"""Teacher signals, objective terms, the grounded transfer net, added rank and the controls that replace a
source everywhere (tiny zoo, in-process)."""

from __future__ import annotations

import json

import pytest
import torch

from hetero_ray.controls import Control, control_factors, layer_permutation, spectrum_matched
from hetero_ray.denoise.transfer_net import GroundedNet, TransferNetConfig
from hetero_ray.errors import SpecError
from hetero_ray.io.adapters import read_adapter
from hetero_ray.runners.local import fuse_local
from hetero_ray.teach.signals import cache_dir, source_signals
from hetero_ray.train.target import LoraDeltaPatch, load_target
from tests.helpers import make_spec

OBJ = {"paper": 1.0, "distill": 1.0, "excess": 0.5, "retain": 0.5}


def teach_spec(zoo, out, **kw):
    kw.setdefault("teach", {"prompts": [{"path": str(zoo["replay"]), "take": 4}], "max_new_tokens": 6})
    kw.setdefault("objective", OBJ)
    kw.setdefault("cluster", {"workers": 1, "zero_stage": 0, "storage": str(out.parent / "runs")})
    kw.setdefault("training", {"epochs": 1, "lr": 3e-3, "grad_accum": 1, "batch_size": 2, "max_length": 64})
    return make_spec(zoo, out, **kw)


def test_grounded_net_gives_exactly_zero_update_for_zero_sources_and_steps_of_about_lr():
    torch.manual_seed(0)
    cfg = TransferNetConfig(block_size=8, rank=4, embed_dim=32, num_heads=4, max_positions=64)
    net = GroundedNet(cfg, n_sources=2)
    with torch.no_grad():  # whatever the parameters are
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    m, t, s, d = 3, 5, 6, 8 * 4
    tgt, sig_t = torch.randn(m, t, d), torch.rand(m, t, 4)
    valid = torch.ones(m, s, dtype=torch.bool)
    owner = torch.tensor([0, 0, 0, 1, 1, 1]).expand(m, s)
    zero = net(tgt, sig_t, torch.zeros(m, s, d), torch.zeros(m, s, 4), valid, owner)["delta"]
    assert torch.equal(zero, torch.zeros_like(zero))

    # a fresh net: dB starts at zero, and one Adam step moves it by about lr (not alpha * lr * sum|h|)
    net = GroundedNet(cfg, n_sources=2)
    src = torch.randn(m, s, d) * 0.03  # source updates are small; RMS normalisation makes them O(1)
    before = net(tgt, sig_t, src, torch.rand(m, s, 4), valid, owner)["delta"]
    assert torch.equal(before, torch.zeros_like(before))
    lr = 1e-3
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    out = net(tgt, sig_t, src, torch.rand(m, s, 4), valid, owner)["delta"]
    (out * torch.randn_like(out)).sum().backward()
    opt.step()
    after = net(tgt, sig_t, src, torch.rand(m, s, 4), valid, owner)["delta"]
    step = float((after - before).detach().abs().max())
    assert 0.2 * lr < step < 5 * lr, step / lr


def test_spectrum_matched_keeps_singular_values_and_changes_vectors():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 20, generator=g), torch.randn(12, 4, generator=g)
    a2, b2 = spectrum_matched(a, b, seed=3)
    assert a2.shape == a.shape and b2.shape == b.shape
    torch.testing.assert_close(torch.linalg.svdvals(b2 @ a2)[:4], torch.linalg.svdvals(b @ a)[:4], rtol=1e-4, atol=1e-5)
    assert torch.nn.functional.cosine_similarity((b2 @ a2).flatten(), (b @ a).flatten(), dim=0).abs() < 0.5


def test_layer_permutation_moves_every_layer_and_keeps_roles():
    paths = [f"model.layers.{i}.self_attn.{r}" for i in range(5) for r in ("q_proj", "v_proj")]
    perm = layer_permutation(paths, seed=1)
    assert sorted(perm.values()) == sorted(paths)
    assert all(p != q and p.rsplit(".", 1)[1] == q.rsplit(".", 1)[1] for p, q in perm.items())


def test_controls_replace_the_teacher_and_signals_are_cached(zoo, tmp_path):
    spec = teach_spec(zoo, tmp_path / "o", sources=("qwen2",), strategy="heterofusion")
    adapter = read_adapter(zoo["qwen2-lora"])
    real = source_signals(spec, 0, adapter, cache_dir(spec))
    assert not real["cached"] and real["chunks"] > 0 and len(real["items"]) == 4
    again = source_signals(spec, 0, adapter, cache_dir(spec))
    assert again["cached"] and again["items"] == real["items"]
    excess = [c[2] for it in real["items"] for c in it["chunks"]]
    assert any(abs(e) > 1e-6 for e in excess)  # the adapter changes the base's log-probabilities

    zero = source_signals(spec.model_copy(update={"strategy": "zero_sources"}), 0, adapter, cache_dir(spec))
    assert not zero["cached"] and zero["key"] != real["key"]
    assert all(c[2] == 0.0 for it in zero["items"] for c in it["chunks"])  # the bare base: no excess
    rand = source_signals(spec.model_copy(update={"strategy": "random_sources"}), 0, adapter, cache_dir(spec))
    assert [c[2] for it in rand["items"] for c in it["chunks"]] != excess
    # distill_only learns from the real experts: it shares their cached signals
    direct = source_signals(spec.model_copy(update={"strategy": "distill_only"}), 0, adapter, cache_dir(spec))
    assert direct["cached"] and direct["key"] == real["key"]
    # distill_only's controls learn from their control's teacher: the same cached signals, not the real ones
    spectrum = source_signals(spec.model_copy(update={"strategy": "spectrum_sources"}), 0, adapter, cache_dir(spec))
    shuffled = source_signals(spec.model_copy(update={"strategy": "shuffled_layers"}), 0, adapter, cache_dir(spec))
    assert len({real["key"], zero["key"], rand["key"], spectrum["key"], shuffled["key"]}) == 5
    for strategy, twin in (("distill_zero_sources", zero), ("distill_random_sources", rand),
                           ("distill_spectrum_sources", spectrum), ("distill_shuffled_layers", shuffled)):
        taught = source_signals(spec.model_copy(update={"strategy": strategy}), 0, adapter, cache_dir(spec))
        assert taught["cached"] and taught["key"] == twin["key"] and taught["items"] == twin["items"], strategy
    # other prompts, another key
    other = teach_spec(zoo, tmp_path / "o", sources=("qwen2",),
                       teach={"prompts": [{"path": str(zoo["replay"]), "take": 3}], "max_new_tokens": 6})
    assert source_signals(other, 0, adapter, cache_dir(other))["key"] != real["key"]


def test_control_factors_are_what_the_teacher_and_the_tokens_get(zoo):
    adapter = read_adapter(zoo["gemma3-lora"])
    path = sorted(adapter.modules)[0]
    a, b = adapter.module_tensors(path)
    ra, rb = control_factors(adapter, path, Control.RANDOM_SOURCES, 0, "s")
    torch.testing.assert_close(ra.norm(), a.float().norm())
    torch.testing.assert_close(rb.norm(), b.float().norm())
    za, zb = control_factors(adapter, path, Control.ZERO_SOURCES, 0, "s")
    assert not za.any() and not zb.any()
    na, nb = control_factors(adapter, path, Control.DISTILL_ONLY, 0, "s")
    assert torch.equal(na, a.float()) and torch.equal(nb, b.float())


@pytest.mark.parametrize("strategy,net", [("heterofusion", "grounded"), ("distill_only", "paper"),
                                          ("added_rank_only", "paper")])
def test_added_rank_adapter_loads_with_peft_and_matches_the_trained_model(zoo, tmp_path, strategy, net):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = teach_spec(zoo, tmp_path / "o", sources=("qwen2", "gemma3"), strategy=strategy,
                      method={"num_projections": 16, "net": net, "extra_rank": 3})
    result = fuse_local(spec)
    config = json.loads((result.output / "adapter_config.json").read_text())
    target = read_adapter(spec.target.adapter)
    assert config["r"] == target.config["r"] + 3
    assert config["lora_alpha"] / config["r"] == pytest.approx(target.scaling)
    report = json.loads((result.output / "fusion_report.json").read_text())
    assert report["objective"] == OBJ and set(report["teacher"]) == {"qwen2-lora", "gemma3-lora"}
    assert set(report["history"][0]["terms"]) == set(OBJ)

    deltas = {k: v for k, v in result.deltas.items() if ":" not in k}
    extra = {k.split(":", 1)[1]: (result.deltas[k], result.deltas["extra_B:" + k.split(":", 1)[1]])
             for k in result.deltas if k.startswith("extra_A:")}
    assert set(extra) == set(target.modules)
    # added_rank_only keeps the target's B: every update is in the added rank
    assert any(d.any() for d in deltas.values()) == (strategy != "added_rank_only")
    patched = load_target(spec.target.base, target)
    patch = LoraDeltaPatch(patched, sorted(target.modules))
    patch.set(deltas, extra)
    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(spec.target.base)),
                                         str(result.output)).eval()
    ids = torch.tensor([[1, 5, 9, 40, 77, 120, 3, 2]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, patched(ids).logits, rtol=1e-5, atol=1e-5)
        plain = load_target(spec.target.base, target)(ids).logits
        assert not torch.allclose(plain, exported(ids).logits)
        with patch.off():  # the reference of the retain and excess terms is the target as it was
            torch.testing.assert_close(patched(ids).logits, plain)


def test_distill_controls_train_the_target_directly_on_their_controls_teacher(zoo, tmp_path):
    """distill_zero_sources is distill_only with the bare base as teacher: no transfer networks, the zero-source
    control's teacher signals, and another adapter than the real teacher gives."""
    kw = dict(sources=("qwen2",), method={"num_projections": 16, "extra_rank": 2})
    real = fuse_local(teach_spec(zoo, tmp_path / "a", strategy="distill_only", **kw))
    zero = fuse_local(teach_spec(zoo, tmp_path / "b", strategy="distill_zero_sources", **kw))
    reports = {n: json.loads((r.output / "fusion_report.json").read_text()) for n, r in (("real", real),
                                                                                         ("zero", zero))}
    assert reports["zero"]["transfer_nets"] == {} == reports["real"]["transfer_nets"]
    assert [t["control"] for t in reports["zero"]["teacher"].values()] == ["zero_sources"]
    assert [t["control"] for t in reports["real"]["teacher"].values()] == ["none"]
    keys = [t["key"] for r in reports.values() for t in r["teacher"].values()]
    assert len(set(keys)) == 2
    assert any(not torch.equal(real.deltas[k], zero.deltas[k]) for k in real.deltas)


def test_with_teach_unset_fields_default_to_the_benchmarks_passing_setting(zoo, tmp_path):
    """With `teach:`, strategy, objective and added rank left unset resolve to distill_only on paper + distill with
    8 added rank (what passed the quality benchmark); whatever the spec sets stays; without `teach:`, the paper's."""
    from hetero_ray.spec import TEACH_DEFAULTS

    teach = {"prompts": [{"path": str(zoo["replay"]), "take": 4}]}
    spec = make_spec(zoo, tmp_path / "o", teach=teach)
    resolved = {"strategy": spec.strategy, "objective": spec.objective, "method.extra_rank": spec.method.extra_rank}
    assert resolved == TEACH_DEFAULTS == {"strategy": "distill_only", "objective": {"paper": 1.0, "distill": 1.0},
                                          "method.extra_rank": 8}
    assert spec.method.num_projections == 64  # the rest of the section is kept
    own = {"paper": 1.0, "excess": 1.0}
    chosen = make_spec(zoo, tmp_path / "o", teach=teach, strategy="heterofusion", objective=own,
                       **{"method.extra_rank": 0})
    assert (chosen.strategy, chosen.objective, chosen.method.extra_rank) == ("heterofusion", own, 0)
    assert make_spec(zoo, tmp_path / "o", teach=teach, control="zero_sources").strategy == "zero_sources"
    assert make_spec(zoo, tmp_path / "o", teach=teach, control="none").strategy == "heterofusion"  # as before
    merge = make_spec(zoo, tmp_path / "o", teach=teach, strategy="naive_transfer")  # trains nothing: left alone
    assert (merge.objective, merge.method.extra_rank) == ({"paper": 1.0}, 0)
    from hetero_ray.spec import FusionSpec, MethodSpec

    data = make_spec(zoo, tmp_path / "o", teach=teach).model_dump(mode="json")
    assert FusionSpec.model_validate(data).digest() == spec.digest()  # a resolved spec resolves to itself
    data.pop("strategy"), data.pop("objective")
    kept = FusionSpec.model_validate({**data, "method": MethodSpec(net="grounded")})
    assert kept.method.extra_rank == 8 and kept.method.net == "grounded"
    assert FusionSpec.model_validate({**data, "method": MethodSpec(extra_rank=2)}).method.extra_rank == 2
    plain = make_spec(zoo, tmp_path / "o")
    assert (plain.strategy, plain.objective, plain.method.extra_rank) == ("heterofusion", {"paper": 1.0}, 0)
    with pytest.raises(SpecError, match="method"):
        make_spec(zoo, tmp_path / "o", teach=teach, method=[1])
    # the resolved values are what the digest (and so the run's name and its provenance) records
    assert spec.digest() != make_spec(zoo, tmp_path / "o", teach=teach, strategy="heterofusion").digest()


def test_zero_sources_grounded_without_added_rank_leave_the_target_unchanged(zoo, tmp_path):
    spec = teach_spec(zoo, tmp_path / "o", sources=("qwen2",), strategy="zero_sources",
                      method={"num_projections": 16, "net": "grounded", "extra_rank": 0})
    result = fuse_local(spec)
    assert all(not d.any() for d in result.deltas.values())
    assert all(h["terms"]["retain"] == 0.0 and h["terms"]["excess"] == 0.0 for h in result.history)


def test_objective_errors_name_the_problem(zoo, tmp_path):
    with pytest.raises(SpecError, match="unknown objective term 'distil'"):
        make_spec(zoo, tmp_path / "o", objective={"distil": 1.0})
    with pytest.raises(SpecError, match="add a `teach:` section"):
        make_spec(zoo, tmp_path / "o", objective={"paper": 1.0, "distill": 1.0})
    with pytest.raises(SpecError, match="at least one term"):
        make_spec(zoo, tmp_path / "o", objective={"paper": 0.0})
    spec = make_spec(zoo, tmp_path / "o", strategy="distill_only")
    from hetero_ray import run

    with pytest.raises(SpecError, match="distill or excess term"):
        run(spec, use_ray=False)
    with pytest.raises(SpecError, match="added_rank_only trains only the added rank: set method.extra_rank"):
        make_spec(zoo, tmp_path / "o", strategy="added_rank_only")


def test_a_source_without_a_readable_base_is_a_clear_error(zoo, tmp_path):
    import shutil

    from hetero_ray.errors import HeteroRayError

    adapter_dir = tmp_path / "src"
    shutil.copytree(zoo["qwen2-lora"], adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "Qwen/Qwen2-0.5B"  # a hub name: not readable here
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    spec = teach_spec(zoo, tmp_path / "o", sources=("qwen2",))
    spec = spec.model_copy(update={"sources": [spec.sources[0].model_copy(update={"adapter": adapter_dir,
                                                                                  "family": "qwen2"})]})
    with pytest.raises(HeteroRayError, match=r"sources\[0\].*base model.*sources\[0\].base"):
        source_signals(spec, 0, read_adapter(adapter_dir), None)


def test_each_prompt_file_is_answered_by_the_sources_it_names(zoo, tmp_path):
    from hetero_ray.contrib import tiny
    from hetero_ray.teach.signals import teach_records, teacher_examples
    from hetero_ray.train.replay import load_tokenizer

    other = tiny.write_jsonl(tiny.color_task_records(5, seed=7), tmp_path / "other.jsonl")
    prompts = [{"path": str(zoo["replay"]), "take": 3, "sources": ["qwen2-lora"]}, {"path": str(other)}]
    spec = teach_spec(zoo, tmp_path / "o", sources=("qwen2", "gemma3"),
                      teach={"prompts": prompts, "max_new_tokens": 4})
    assert len(teach_records(spec)) == 8
    assert len(teach_records(spec, 0)) == 8 and teach_records(spec, 1) == teach_records(spec)[3:]
    signals = [source_signals(spec, i, read_adapter(zoo[f"{f}-lora"]), None) for i, f in enumerate(("qwen2", "gemma3"))]
    assert [len(s["items"]) for s in signals] == [8, 5]
    examples = teacher_examples(spec, signals, load_tokenizer(spec.target.base))
    assert len(examples) == sum(1 for s in signals for it in s["items"] if it["answer"]) > 5
    # the spec digest of a file without `sources:` is what it was before the field existed
    plain = teach_spec(zoo, tmp_path / "o", sources=("qwen2",))
    assert "sources" not in plain.model_dump(mode="json")["teach"]["prompts"][0]

    with pytest.raises(SpecError, match=r"teach.prompts\[0\].sources: no source has id \['nope'\]"):
        teach_spec(zoo, tmp_path / "o", sources=("qwen2", "gemma3"),
                   teach={"prompts": [{"path": str(other), "sources": ["nope"]}]})
    with pytest.raises(SpecError, match=r"no prompt file is answered by source\(s\) \['gemma3-lora'\]"):
        teach_spec(zoo, tmp_path / "o", sources=("qwen2", "gemma3"),
                   teach={"prompts": [{"path": str(other), "sources": ["qwen2-lora"]}]})


def test_balance_sources_weighs_every_source_alike(zoo, tmp_path):
    from hetero_ray.contrib import tiny
    from hetero_ray.teach.signals import teacher_examples
    from hetero_ray.train.objectives import OBJECTIVES, Forward
    from hetero_ray.train.replay import IGNORE, collate, load_tokenizer

    other = tiny.write_jsonl(tiny.color_task_records(5, seed=7), tmp_path / "other.jsonl")
    prompts = [{"path": str(zoo["replay"]), "take": 3, "sources": ["qwen2-lora"]}, {"path": str(other)}]
    teach = {"prompts": prompts, "max_new_tokens": 4}
    plain = teach_spec(zoo, tmp_path / "o", sources=("qwen2", "gemma3"), teach=teach)
    spec = teach_spec(zoo, tmp_path / "o", sources=("qwen2", "gemma3"), teach={**teach, "balance": "sources"})
    # the default is left out of the dump, so specs written before the field keep their digest
    assert "balance" not in plain.model_dump(mode="json")["teach"]
    assert spec.model_dump(mode="json")["teach"]["balance"] == "sources" and spec.digest() != plain.digest()
    with pytest.raises(SpecError, match="teach.balance"):
        teach_spec(zoo, tmp_path / "o", teach={**teach, "balance": "examples"})

    signals = [source_signals(spec, i, read_adapter(zoo[f"{f}-lora"]), None) for i, f in enumerate(("qwen2", "gemma3"))]
    tok = load_tokenizer(spec.target.base)
    assert all(e.weight is None for e in teacher_examples(plain, signals, tok))
    examples = teacher_examples(spec, signals, tok)
    counts = [sum(1 for it in s["items"] if it["answer"]) for s in signals]
    assert counts[0] > counts[1] > 0  # qwen2 answers 8 prompts, gemma3 5
    n = len(examples)
    weights = [e.weight for e in examples]
    assert weights == [n / (2 * counts[0])] * counts[0] + [n / (2 * counts[1])] * counts[1]
    assert sum(weights[: counts[0]]) == pytest.approx(sum(weights[counts[0]:])) == pytest.approx(n / 2)
    # excess: the same over the examples with a chunk inside their answer (the only ones that term reads)
    fits = [any(end <= sum(t != IGNORE for t in e.labels) for _, end, _ in e.chunks) for e in examples]
    assert all(e.chunk_weight == 0.0 for e, f in zip(examples, fits, strict=True) if not f)
    sums = [sum(e.chunk_weight for e in part) for part in (examples[: counts[0]], examples[counts[0]:])]
    assert sums[0] == pytest.approx(sums[1]) == pytest.approx(sum(fits) / 2) and sum(fits) > 0

    # the terms: each example's own mean, weighted; without weights, every answer token alike (as before)
    batch = collate(examples[:1] + examples[-1:], tok.pad_token_id)
    assert batch["weights"].tolist() == pytest.approx([weights[0], weights[-1]])
    assert batch["chunk_weights"].tolist() == pytest.approx([examples[0].chunk_weight, examples[-1].chunk_weight])
    assert "weights" not in collate(teacher_examples(plain, signals, tok)[:2], tok.pad_token_id)
    g = torch.Generator().manual_seed(0)
    targets = torch.tensor([[3, 4, 5, IGNORE], [6, IGNORE, IGNORE, IGNORE]])
    fwd = Forward(torch.randn(2, 4, 9, generator=g), targets, torch.arange(4))
    ce = torch.nn.functional.cross_entropy(fwd.logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                           reduction="none").view(2, 4)
    own = [ce[0, :3].mean(), ce[1, 0]]
    distill = OBJECTIVES.lookup("distill").fn
    w = torch.tensor([0.5, 1.5])
    assert float(distill(fwd, None, {"weights": w})) == pytest.approx(float((0.5 * own[0] + 1.5 * own[1]) / 2))
    assert float(distill(fwd, None, {})) == pytest.approx(float(ce[0, :3].sum() + ce[1, 0]) / 4)
    # excess: per example the mean of its chunks (the second has none kept: cut at max_length)
    ref = Forward(torch.randn(2, 4, 9, generator=g), targets, torch.arange(4))
    chunks = [[(0, 1, 0.2), (1, 3, -0.1)], [(0, 2, 0.3)]]
    gain = fwd.token_logprobs() - ref.token_logprobs()
    l1 = torch.nn.functional.smooth_l1_loss
    first = (l1(gain[0, :1].sum(), torch.tensor(0.2)) + l1(gain[0, 1:3].sum(), torch.tensor(-0.1))) / 2
    excess = OBJECTIVES.lookup("excess").fn
    assert float(excess(fwd, ref, {"chunks": chunks, "chunk_weights": w})) == pytest.approx(float(0.5 * first))
    assert float(excess(fwd, ref, {"chunks": chunks, "weights": w})) == pytest.approx(float(first))  # distill's
    assert float(excess(fwd, ref, {"chunks": chunks})) == pytest.approx(float(first))
