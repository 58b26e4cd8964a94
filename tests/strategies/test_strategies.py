"""Baselines registered next to HeteroFusion: each does what it says, in LoRA product space."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hetero_ray.contrib import tiny
from hetero_ray.errors import HeteroRayError
from hetero_ray.io.adapters import LoraAdapter, read_adapter
from hetero_ray.strategies import STRATEGIES, completed, factorize, product, run_strategy
from tests.helpers import make_spec


def _variant(src, dst, fn):
    """A copy of adapter ``src`` with every lora_B tensor replaced by fn(B)."""
    shutil.copytree(src, dst)
    weights = dst / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: fn(v) if "lora_B" in k else v for k, v in tensors.items()}, str(weights))
    return dst


@pytest.fixture(scope="module")
def llama_experts(zoo, tmp_path_factory):
    """Two more experts on the target's own base: the target negated, and an independent one."""
    root = tmp_path_factory.mktemp("same-family")
    neg = _variant(zoo["llama-lora"], root / "neg", lambda b: -b)
    other = tiny.build_lora_adapter(zoo["llama-base"], root / "other", "llama", rank=4, seed=7)
    return {"neg": neg, "other": other}


def _spec(zoo, tmp_path, strategy, sources, **kw):
    spec = make_spec(zoo, tmp_path / strategy, strategy=strategy, **kw)
    return spec.model_copy(update={"sources": [s.model_copy(update={"adapter": p, "id": f"s{i}"})
                                               for i, (s, p) in enumerate(zip([spec.sources[0]] * len(sources),
                                                                              sources, strict=True))]})


def _products(path) -> dict[str, torch.Tensor]:
    a = read_adapter(path)
    return {p: product(a, p) for p in a.modules}


def test_the_registry_is_the_spec_s_list_of_names(zoo, tmp_path):
    from pydantic import ValidationError

    assert {s.kind for s in STRATEGIES.values()} == {"trained", "merge"}
    for name in STRATEGIES:
        method = {"method.extra_rank": 2} if name == "added_rank_only" else {}  # it trains only the added rank
        assert make_spec(zoo, tmp_path / name, strategy=name, **method).strategy == name
    with pytest.raises((ValidationError, HeteroRayError), match="unknown strategy 'tie'.*known: heterofusion"):
        make_spec(zoo, tmp_path / "x", strategy="tie")


def test_params_are_validated_by_their_strategy_and_defaults_filled(zoo, tmp_path):
    from pydantic import ValidationError

    spec = make_spec(zoo, tmp_path / "t", strategy="ties", **{"params.density": 0.3})
    assert spec.params == {"weights": None, "density": 0.3, "scale": 1.0, "rank": None}
    with pytest.raises((ValidationError, HeteroRayError), match="params.drop_rate"):
        make_spec(zoo, tmp_path / "t", strategy="ties", **{"params.drop_rate": 0.3})  # a DARE parameter
    with pytest.raises((ValidationError, HeteroRayError), match="params.density"):
        make_spec(zoo, tmp_path / "t", strategy="ties", **{"params.density": 1.5})
    with pytest.raises((ValidationError, HeteroRayError), match="merge: the baselines' settings moved"):
        make_spec(zoo, tmp_path / "t", strategy="ties", **{"merge.density": 0.3})


def test_target_only_reproduces_the_target_update(zoo, tmp_path):
    out = run_strategy(_spec(zoo, tmp_path, "target_only", [zoo["llama-lora"]]), use_ray=False)
    want, got = _products(zoo["llama-lora"]), _products(out)
    for p in want:
        torch.testing.assert_close(got[p], want[p], rtol=1e-5, atol=1e-7)
    assert json.loads((out / "fusion_report.json").read_text())["strategy"] == "target_only"


def test_task_arithmetic_of_an_adapter_and_its_negation_is_zero(zoo, llama_experts, tmp_path):
    out = run_strategy(_spec(zoo, tmp_path, "task_arithmetic", [llama_experts["neg"]]), use_ray=False)
    target = _products(zoo["llama-lora"])
    for p, d in _products(out).items():
        assert d.abs().max() <= 1e-6 * target[p].abs().max()


def test_task_arithmetic_is_the_weighted_sum_in_product_space(zoo, llama_experts, tmp_path):
    spec = _spec(zoo, tmp_path, "task_arithmetic", [llama_experts["other"]], **{"params.weights": [0.5, 2.0]})
    got = _products(run_strategy(spec, use_ray=False))
    t, o = _products(zoo["llama-lora"]), _products(llama_experts["other"])
    for p in t:
        torch.testing.assert_close(got[p], 0.5 * t[p] + 2.0 * o[p], rtol=1e-5, atol=1e-6)


def test_ties_of_an_adapter_with_itself_is_the_adapter_and_with_its_negation_zero(zoo, llama_experts, tmp_path):
    same = _spec(zoo, tmp_path / "a", "ties", [zoo["llama-lora"]], **{"params.density": 1.0})
    t = _products(zoo["llama-lora"])
    for p, d in _products(run_strategy(same, use_ray=False)).items():
        torch.testing.assert_close(d, t[p], rtol=1e-4, atol=1e-6)
    opposite = _spec(zoo, tmp_path / "b", "ties", [llama_experts["neg"]], **{"params.density": 1.0})
    for d in _products(run_strategy(opposite, use_ray=False)).values():
        assert d.abs().max() < 1e-6


def test_ties_honours_weights(zoo, llama_experts, tmp_path):
    """With density 1 the TIES mean of two updates of one sign is their weighted mean: sum w_i d_i / sum w_i
    over the inputs that agree; weights [1, 3] of the same adapter give that adapter back, scaled by 1."""
    src = [zoo["llama-lora"]]
    got = _products(run_strategy(_spec(zoo, tmp_path / "w", "ties", src, **{"params.density": 1.0,
                                                                               "params.weights": [1.0, 3.0]}),
                                 use_ray=False))
    want = _products(zoo["llama-lora"])
    for p in want:
        torch.testing.assert_close(got[p], want[p], rtol=1e-4, atol=1e-6)
    neg = _products(run_strategy(_spec(zoo, tmp_path / "n", "ties", [llama_experts["neg"]],
                                       **{"params.density": 1.0, "params.weights": [1.0, 3.0]}), use_ray=False))
    for p in want:  # the heavier negated input wins every sign election: -3d / 3 = -d
        torch.testing.assert_close(neg[p], -want[p], rtol=1e-4, atol=1e-6)


def test_linear_is_the_weighted_mean(zoo, llama_experts, tmp_path):
    other = llama_experts["other"]
    got = _products(run_strategy(_spec(zoo, tmp_path, "linear", [other], **{"params.weights": [1.0, 3.0]}),
                                 use_ray=False))
    t, o = _products(zoo["llama-lora"]), _products(other)
    for p in t:
        torch.testing.assert_close(got[p], (t[p] + 3 * o[p]) / 4, rtol=1e-5, atol=1e-7)


def test_ties_trims_to_the_largest_entries(zoo, tmp_path):
    spec = _spec(zoo, tmp_path, "ties", [zoo["llama-lora"]], **{"params.density": 0.1, "params.rank": 64})
    t = _products(zoo["llama-lora"])
    for p, d in _products(run_strategy(spec, use_ray=False)).items():
        keep = t[p].abs() >= t[p].abs().flatten().kthvalue(t[p].numel() - round(0.1 * t[p].numel()) + 1).values
        torch.testing.assert_close(d, torch.where(keep, t[p], 0.0), rtol=1e-4, atol=1e-6)


def test_dare_without_drops_is_task_arithmetic_and_with_drops_is_seeded(zoo, llama_experts, tmp_path):
    src = [llama_experts["other"]]
    ta = _products(run_strategy(_spec(zoo, tmp_path / "ta", "task_arithmetic", src), use_ray=False))
    d0 = _products(run_strategy(_spec(zoo, tmp_path / "d0", "dare", src, **{"params.drop_rate": 0.0}),
                                use_ray=False))
    for p in ta:
        torch.testing.assert_close(d0[p], ta[p], rtol=1e-4, atol=1e-6)
    runs = [_products(run_strategy(_spec(zoo, tmp_path / f"seeded{i}", "dare", src, **{"params.drop_rate": 0.5}),
                                   use_ray=False)) for i in range(2)]
    p = next(iter(ta))
    torch.testing.assert_close(runs[0][p], runs[1][p])
    assert not torch.allclose(runs[0][p], ta[p])


def test_same_family_merges_refuse_another_family(zoo, tmp_path):
    with pytest.raises(HeteroRayError, match="qwen2-lora.*same-family"):
        run_strategy(_spec(zoo, tmp_path, "task_arithmetic", [zoo["qwen2-lora"]]), use_ray=False)


def test_naive_transfer_adds_the_cropped_or_padded_source_update(zoo, tmp_path):
    """Qwen2 (hidden 48, 3 layers) into Llama (hidden 64, 4 layers), tail-aligned: target layer l takes
    source layer l - 1; each update is zero-padded to 64 wide; layer 0 gets nothing."""
    spec = _spec(zoo, tmp_path, "naive_transfer", [zoo["qwen2-lora"]])
    got = _products(run_strategy(spec, use_ray=False))
    t = _products(zoo["llama-lora"])
    src = read_adapter(zoo["qwen2-lora"])
    for p, d in got.items():
        layer = int(p.split(".layers.")[1].split(".")[0])
        want = t[p].clone()
        if layer >= 1:
            sp = p.replace(f".layers.{layer}.", f".layers.{layer - 1}.")
            s = product(src, sp)
            rows, cols = min(s.shape[0], want.shape[0]), min(s.shape[1], want.shape[1])
            want[:rows, :cols] += s[:rows, :cols]
        torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-6)


def test_merged_adapters_load_with_peft(zoo, llama_experts, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = run_strategy(_spec(zoo, tmp_path, "task_arithmetic", [llama_experts["other"]]), use_ray=False)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(zoo["llama-base"])), str(out))
    assert isinstance(read_adapter(out), LoraAdapter)
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_factorize_is_exact_up_to_rank_and_reports_the_rest():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(20, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 30, generator=g, dtype=torch.float64)
    a, b, err = factorize(m, 5)
    assert a.shape == (5, 30) and b.shape == (20, 5) and err < 1e-12
    torch.testing.assert_close(b @ a, m)
    _, _, err2 = factorize(m, 2)
    assert 0 < err2 < 1


def test_a_control_and_a_strategy_together_are_refused(zoo, tmp_path):
    from pydantic import ValidationError

    with pytest.raises((ValidationError, HeteroRayError), match="control"):
        make_spec(zoo, tmp_path / "x", strategy="ties", control="zero_sources")
    # the earlier spelling of a control still reads as its strategy, with the same run name
    old = make_spec(zoo, tmp_path / "y", control="zero_sources")
    assert old.strategy == "zero_sources" and old == make_spec(zoo, tmp_path / "y", strategy="zero_sources")


@pytest.mark.parametrize("strategy", ["target_only", "replay_only"])
def test_completed_recognizes_a_finished_output_of_the_same_spec_only(zoo, tmp_path, strategy):
    spec = _spec(zoo, tmp_path, strategy, [zoo["qwen2-lora"]])
    assert not completed(spec)
    out = run_strategy(spec, use_ray=False)
    assert out == spec.output and completed(spec)  # a control's report names the spec as run, control set
    assert not completed(spec.model_copy(update={"seed": spec.seed + 1}))
    (out / "fusion_report.json").write_text("{")
    assert not completed(spec)
    (out / "fusion_report.json").unlink()
    assert not completed(spec)


def test_specs_changed_by_hand_and_merges_given_to_a_runner_get_clear_errors(zoo, tmp_path):
    from pydantic import ValidationError

    from hetero_ray.runners.local import fuse_local
    from hetero_ray.strategies import get_strategy

    ties = make_spec(zoo, tmp_path / "t", strategy="ties", **{"params.density": 0.3})
    copied = ties.model_copy(update={"strategy": "dare"})  # model_copy does not validate: ties params remain
    with pytest.raises(HeteroRayError, match="params: not valid for strategy 'dare'"):
        get_strategy("dare").params(copied)
    with pytest.raises(HeteroRayError, match="closed-form merge, not a trained run"):
        fuse_local(make_spec(zoo, tmp_path / "m", strategy="target_only"))
    assert make_spec(zoo, tmp_path / "n", strategy="ties", params=None).params["density"] == 0.2
    with pytest.raises((ValidationError, HeteroRayError), match="'ties' is not a control"):
        make_spec(zoo, tmp_path / "c", control="ties")


def test_check_refuses_what_fuse_would_refuse(zoo, tmp_path, capsys):
    import yaml

    from hetero_ray.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"output": "o", "strategy": "ties",
                                    "target": {"base": str(zoo["llama-base"]), "adapter": str(zoo["llama-lora"])},
                                    "sources": [{"adapter": str(zoo["qwen2-lora"])}],
                                    "replay": [{"path": str(zoo["replay"])}]}))
    assert main(["check", str(spec)]) == 2
    assert "merges same-family experts" in capsys.readouterr().err
