"""`hetero-ray check` at the paper's scale, from configs alone (no weights)."""

import json

from hetero_ray.check import check
from hetero_ray.cli import main
from hetero_ray.spec import parse_spec

ROLES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {  # the published config.json values that matter here
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
}


def _paper_zoo(tmp_path):
    paths = {}
    for name, cfg in CONFIGS.items():
        base = tmp_path / name
        base.mkdir()
        (base / "config.json").write_text(json.dumps(cfg))
        adapter = tmp_path / f"{name}-lora"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ROLES,
             "base_model_name_or_path": str(base)}))
        paths[name] = (base, adapter)
    replay = tmp_path / "replay.jsonl"
    replay.write_text('{"instruction": "x", "output": "y"}\n')
    return paths, replay


def _spec(tmp_path, workers=2, stage=3):
    paths, replay = _paper_zoo(tmp_path)
    return parse_spec({
        "output": str(tmp_path / "out"),
        "target": {"base": str(paths["llama-3.1-8b"][0]), "adapter": str(paths["llama-3.1-8b"][1])},
        "sources": [{"adapter": str(paths["qwen2.5-7b"][1])}, {"adapter": str(paths["mistral-7b"][1])}],
        "replay": [{"path": str(replay)}],
        "method": {"preset": "paper"},
        "cluster": {"workers": workers, "zero_stage": stage, "dtype": "bf16"},
    })


def test_paper_scale_parameter_count_and_memory_from_configs(tmp_path):
    report = check(_spec(tmp_path))
    assert len(report["groups"]) == 7
    assert abs(report["transfer_net_params"] - 773e6) / 773e6 < 0.02
    assert report["target"]["config_only"] and all(s["config_only"] for s in report["sources"])
    assert abs(report["target"]["base_params"] - 8.03e9) / 8.03e9 < 0.01
    # tail alignment: Qwen's 28 layers feed target layers 4..31, Mistral's 32 feed all
    qwen, mistral = report["sources"]
    assert qwen["aligned_target_layers"] == list(range(4, 32)) and mistral["aligned_target_layers"] == list(range(32))
    mem = report["memory_gib_per_worker"]
    totals = [mem[w]["total"] for w in sorted(mem)]
    assert all(a > b for a, b in zip(totals, totals[1:], strict=False)), totals
    nets = [mem[w]["transfer_nets"] for w in sorted(mem)]
    assert nets[-1] < nets[0] / 4  # ZeRO-3: 8 workers each hold about an eighth, plus one gathered group
    # ~770M params: 2 B weights + 2 B grads + 12 B fp32 master + Adam states, all on one worker at ZeRO-3/1 worker
    assert 10 < mem[1]["transfer_nets"] < 13


def test_zero0_memory_does_not_fall_with_workers(tmp_path):
    mem = check(_spec(tmp_path, stage=0))["memory_gib_per_worker"]
    assert len({m["transfer_nets"] for m in mem.values()}) == 1


def test_check_command_prints_the_plan(tmp_path, capsys):
    spec = _spec(tmp_path)
    spec_file = tmp_path / "spec.yaml"
    import yaml

    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    assert main(["check", str(spec_file)]) == 0
    out = capsys.readouterr().out
    assert "total transfer-net parameters: 7" in out
    assert "L 31 q     <- qwen2.5-7b-lora L27 (offset -4, rank 8->8 none, pad 1024)" in out
