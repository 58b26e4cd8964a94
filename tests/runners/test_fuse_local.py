"""The in-process fusion on tiny models: step-0 identity, training, export round-trip, determinism,
controls."""

import json

import pytest
import torch
from safetensors.torch import load_file

from hetero_ray.denoise.fusion import group_rdm, module_deltas, rdm_generators
from hetero_ray.io.adapters import LoraAdapter, read_adapter
from hetero_ray.io.export import fused_tensors
from hetero_ray.runners.local import fuse_local
from hetero_ray.runners.prepare import (
    alignment_plan,
    build_net,
    candidates_of,
    open_source,
    open_target,
    prepare_groups,
    replay_examples,
)
from hetero_ray.train.replay import load_tokenizer
from hetero_ray.train.target import load_target
from hetero_ray.train.trainer import FusionObjective, lm_loss, plan_windows
from tests.helpers import make_spec


def _setup(spec):
    p = prepare_groups(spec)
    return p.target, p.plan, p.block, p.groups


def test_step0_fused_adapter_equals_target_bit_for_bit(zoo, tmp_path):
    spec = make_spec(zoo, tmp_path / "out")
    target, plan, block, groups = _setup(spec)
    net = build_net(spec, plan, block, groups, target)
    with torch.no_grad():
        deltas = module_deltas(net(groups), groups)
    assert set(deltas) == set(plan.fused_modules())
    fused = fused_tensors(target, deltas)
    original = load_file(str(target.weights_path))
    assert fused.keys() == original.keys()
    assert all(torch.equal(fused[k], original[k]) for k in original)


def test_gradient_once_per_window_equals_per_micro_batch_gradient(zoo, tmp_path):
    """The surrogate backward gives the gradient of the accumulated LM loss (lambda = 0)."""
    spec = make_spec(zoo, tmp_path / "out", **{"method.lambda_reg": 0.0})
    target, plan, block, groups = _setup(spec)
    model = load_target(spec.target.base, target)
    tok = load_tokenizer(spec.target.base)
    examples = replay_examples(spec, tok)
    net = build_net(spec, plan, block, groups, target)
    with torch.no_grad():
        for n in net.nets.values():
            n.decoder[2].weight.normal_(std=0.01)
    obj = FusionObjective(model, groups, spec.method, examples, tok.pad_token_id, 0)
    window = plan_windows(len(examples), spec.training, spec.seed)[0]
    surrogate, _ = obj.window(net, window)
    surrogate.backward()
    fast = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    from hetero_ray.train.replay import collate

    for idx in window:  # the naive way: dB recomputed and differentiated through per micro-batch
        obj.patch.set(module_deltas(net(groups), groups))
        (lm_loss(model, collate([examples[i] for i in idx], tok.pad_token_id)) / len(window)).backward()
    obj.patch.clear()
    slow = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    assert fast.keys() == slow.keys() and len(fast) > 0
    for n in fast:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-4, atol=1e-6)


def test_the_objective_draws_rdm_as_the_spec_says(zoo, tmp_path):
    """``method.rdm_directions`` reaches RDM through the objective: a window's RDM is group_rdm's with that
    kind of directions, and the two kinds give different draws."""
    for kind in ("iid", "orthogonal"):
        spec = make_spec(zoo, tmp_path / kind, **{"method.rdm_directions": kind})
        target, plan, block, groups = _setup(spec)
        tok = load_tokenizer(spec.target.base)
        net = build_net(spec, plan, block, groups, target)
        obj = FusionObjective(load_target(spec.target.base, target), groups, spec.method,
                              replay_examples(spec, tok), tok.pad_token_id, spec.seed)
        _, metrics = obj.window(net, plan_windows(len(obj.examples), spec.training, spec.seed)[0])
        m = spec.method
        with torch.no_grad():
            outputs = net(groups)
            want = {k: float(group_rdm(outputs, groups, rdm_generators(spec.seed, 0, groups), m.mu_target,
                                       m.sigma_target, m.num_projections, m.rdm_max_samples, m.rdm_sort_budget,
                                       directions=k)) for k in ("iid", "orthogonal")}
        assert metrics["rdm"] == pytest.approx(want[kind], rel=1e-5), (kind, metrics["rdm"], want)
        assert abs(want["iid"] - want["orthogonal"]) > 1e-3 * want["iid"], want


@pytest.fixture(scope="module")
def fused_run(zoo, tmp_path_factory):
    spec = make_spec(zoo, tmp_path_factory.mktemp("run") / "fused")
    return spec, fuse_local(spec)


def test_training_lowers_loss_and_export_matches_patched_model(zoo, fused_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec, result = fused_run
    losses = [h["lm_loss"] for h in result.history]
    assert len(losses) == 9  # 24 examples / (2 per micro-batch * 4 per window) * 3 epochs
    assert sum(losses[-2:]) / 2 < 0.92 * sum(losses[:2]) / 2, losses

    target = read_adapter(spec.target.adapter)
    patched = load_target(spec.target.base, target)
    from hetero_ray.train.target import LoraDeltaPatch

    patch = LoraDeltaPatch(patched, sorted(result.deltas))
    patch.set(result.deltas)
    base = AutoModelForCausalLM.from_pretrained(str(spec.target.base))
    exported = PeftModel.from_pretrained(base, str(result.output)).eval()
    ids = torch.tensor([[1, 5, 9, 40, 77, 120, 3, 2]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, patched(ids).logits, rtol=1e-5, atol=1e-5)
        plain = load_target(spec.target.base, target)(ids).logits
    assert not torch.allclose(plain, exported(ids).logits)  # the fusion changed something

    report = json.loads((result.output / "fusion_report.json").read_text())
    assert set(report["inputs"]["sources"]) == {"qwen2-lora", "mistral-lora", "gemma3-lora"}
    assert {s["source_id"] for s in report["alignment"]["sources"]} == set(report["inputs"]["sources"])
    assert report["versions"]["torch"].startswith("2.")
    assert (result.output / "README.md").read_text().startswith("# fusion-")
    from hetero_ray.io.plots import PLOTS

    for name in PLOTS:  # non-empty PNGs
        assert (result.output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (result.output / name).stat().st_size > 2000


def test_step_time_is_split_into_parts_that_add_up(fused_run):
    _, result = fused_run
    parts = ("nets_forward", "rdm", "nets_backward", "optimizer", "target")
    for h in result.history:
        assert all(h[f"time_{p}_s"] >= 0 for p in parts), h
        assert h["time_rdm_s"] > 0 and h["time_nets_backward_s"] > 0 and h["time_optimizer_s"] > 0
        # the nets' share counts their forward, RDM, backward and the optimizer step, not the forward alone
        assert h["time_net_s"] == pytest.approx(sum(h[f"time_{p}_s"] for p in parts[:4]))
        assert h["time_step_s"] == pytest.approx(h["time_net_s"] + h["time_target_s"])


def test_same_seed_same_output(zoo, fused_run, tmp_path):
    spec, first = fused_run
    again = fuse_local(spec.model_copy(update={"output": tmp_path / "again"}))
    a = load_file(str(first.output / "adapter_model.safetensors"))
    b = load_file(str(again.output / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["lm_loss"] for h in first.history] == [h["lm_loss"] for h in again.history]


def test_zero_and_random_source_controls(zoo, tmp_path):
    spec = make_spec(zoo, tmp_path / "o")
    target, ttopo = open_target(spec)
    a, t = open_source(spec, 1)  # mistral, rank 8 -> harmonized to 4
    plan = alignment_plan(spec, ttopo, [open_source(spec, i)[1] for i in range(3)])
    real = list(candidates_of(spec, plan, 1, a, t, 64))
    zero = list(candidates_of(spec.model_copy(update={"strategy": "zero_sources"}), plan, 1, a, t, 64))
    rand = list(candidates_of(spec.model_copy(update={"strategy": "random_sources"}), plan, 1, a, t, 64))
    assert len(real) == len(zero) == len(rand) > 0
    assert all(torch.count_nonzero(z.tokens) == 0 for z in zero)
    for r, c in zip(real, rand, strict=True):
        n = c.n_a_blocks
        # same rank-4 product norm is not preserved by truncation, but A^T and B token norms are set per module
        assert not torch.allclose(r.tokens, c.tokens)
        assert c.tokens[:n].norm() > 0 and c.tokens[n:].norm() > 0


def test_random_sources_have_equal_frobenius_norm_per_module(zoo, tmp_path):
    spec = make_spec(zoo, tmp_path / "o", sources=("gemma3",), control="random_sources")
    target, ttopo = open_target(spec)
    a, t = open_source(spec, 0)  # same rank as the target: no harmonization
    plan = alignment_plan(spec, ttopo, [t])
    for c in candidates_of(spec, plan, 0, a, t, 64):
        path = t.slots[(c.source_layer, c.role)].module.path
        src_a, src_b = a.module_tensors(path)
        n = c.n_a_blocks
        torch.testing.assert_close(c.tokens[:n].norm(), src_a.norm(), rtol=1e-5, atol=0)
        # B as applied: scaled by lora_alpha / r
        torch.testing.assert_close(c.tokens[n:].norm(), a.module_scaling(path) * src_b.norm(), rtol=1e-5, atol=0)


def test_replay_only_control_never_reads_source_tensors(zoo, tmp_path, monkeypatch):
    spec = make_spec(zoo, tmp_path / "ro", control="replay_only", **{"training.epochs": 1})
    read = []
    original = LoraAdapter.tensor

    def spy(self, key):
        read.append(str(self.path))
        return original(self, key)

    monkeypatch.setattr(LoraAdapter, "tensor", spy)
    result = fuse_local(spec)
    assert read and all(p == str(spec.target.adapter) for p in read)
    assert set(result.deltas) == set(result.plan.fused_modules())
    assert any(d.abs().sum() > 0 for d in result.deltas.values())
