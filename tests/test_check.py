"""`hetero-ray check` at the paper's scale, from configs alone (no weights)."""

import json
import shutil

import pytest

from hetero_ray.cli import main
from hetero_ray.planning import PAPER_MODELS, check
from hetero_ray.spec import parse_spec

ROLES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _paper_zoo(tmp_path):
    paths = {}
    for name, cfg in PAPER_MODELS.items():
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


def _spec(tmp_path, workers=2, stage=3, partition="replicate", n_sources=2, dtype="bf16"):
    paths, replay = _paper_zoo(tmp_path)
    adapters = [paths["qwen2.5-7b"][1], paths["mistral-7b"][1]]
    for i in range(2, n_sources):  # more experts of the same shapes, each in its own directory
        copy = tmp_path / f"expert-{i}"
        shutil.copytree(adapters[i % 2], copy)
        adapters.append(copy)
    return parse_spec({
        "output": str(tmp_path / "out"),
        "target": {"base": str(paths["llama-3.1-8b"][0]), "adapter": str(paths["llama-3.1-8b"][1])},
        "sources": [{"adapter": str(a)} for a in adapters[:n_sources]],
        "replay": [{"path": str(replay)}],
        "method": {"preset": "paper"},
        "cluster": {"workers": workers, "zero_stage": stage, "dtype": dtype, "partition": partition},
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


@pytest.mark.parametrize("rdm", [{}, {"rdm_max_samples": 5}, {"num_projections": 256, "rdm_sort_budget": 1000}],
                         ids=["every-row", "row-cap", "sort-budget"])
def test_transfer_net_activation_estimate_matches_the_saved_tensors(zoo, tmp_path, rdm):
    """check's per-group activation bytes against what autograd actually keeps, on the real nets and groups;
    with RDM on at most 5 rows per term too (fewer rows than every group has), and with a sort budget that
    cuts every term's projections (to 64 of 256)."""
    import torch

    from hetero_ray.denoise.fusion import group_rdm
    from hetero_ray.planning import saved_tensor_bytes
    from hetero_ray.runners.prepare import build_net, prepare_groups
    from tests.helpers import make_spec

    spec = make_spec(zoo, tmp_path / "out")
    spec = spec.model_copy(update={"method": spec.method.model_copy(update=rdm)})
    m = spec.method
    report = check(spec)
    prepared = prepare_groups(spec)
    groups = prepared.groups
    net = build_net(spec, prepared.plan, prepared.block, groups, prepared.target)
    assert set(groups) == set(report["groups"])
    for name, g in groups.items():
        inputs = [*net.parameters(), *g.net_inputs()]

        def step(name=name, g=g):
            out = net({name: g})
            return group_rdm(out, {name: g}, torch.Generator().manual_seed(0), num_projections=m.num_projections,
                             max_samples=m.rdm_max_samples, sort_budget=m.rdm_sort_budget)

        measured, loss = saved_tensor_bytes(step, exclude=inputs)
        loss.backward()  # the graph was real
        estimate = report["groups"][name]["activation_bytes"]
        t = report["groups"][name]
        rows = min(t["modules"] * t["target_tokens_per_module"], t["source_tokens"])
        assert "rdm_max_samples" not in rdm or rows > m.rdm_max_samples  # the cap cuts every term
        assert "rdm_sort_budget" not in rdm or rows * 256 > m.rdm_sort_budget  # so does the budget
        assert abs(estimate - measured) / measured < 0.05, (name, estimate, measured)
    mem = report["memory_gib_per_worker"][1]
    assert mem["total"] >= mem["transfer_nets"] + mem["frozen_target"] + max(
        mem["target_activations"] + mem["transfer_activations"], mem["optimizer_step"]) - 0.01


def test_paper_scale_step_peak_is_the_optimizer_temporary(tmp_path):
    """Measured on an H100 (jobs/benchmark_memory.py --scale paper, fp32, 1 worker, ZeRO-0): 14.52 GiB peak
    for the transfer nets and candidate tokens. The estimate of the same terms must be within 5% of it."""
    spec = _spec(tmp_path, workers=1, stage=0).model_copy(deep=True)
    spec = spec.model_copy(update={"cluster": spec.cluster.model_copy(update={"dtype": "fp32"}),
                                   "method": spec.method.model_copy(update={"num_projections": 256})})
    mem = check(spec)["memory_gib_per_worker"][1]
    assert mem["optimizer_step"] > mem["transfer_activations"]  # at this scale the step sets the peak
    nets_peak = mem["transfer_nets"] + mem["candidate_tokens"] + mem["optimizer_step"]
    assert abs(nets_peak - 14.52) / 14.52 < 0.05, mem


def _nets_share(m):
    """What the transfer networks cost a worker: their states, tokens, activations and exchange buffers."""
    return m["transfer_nets"] + m["candidate_tokens"] + m["transfer_activations"] + m["db_buffers"]


def test_groups_partition_divides_the_transfer_net_memory_at_64_sources(tmp_path, capsys):
    """Paper scale, 64 sources, fp32: workers that own module groups each hold about their share of the
    nets, their states, tokens and activations; replicated nets under ZeRO-3 shard only the states."""
    spec = _spec(tmp_path, workers=4, partition="groups", n_sources=64, dtype="fp32")
    report = check(spec)
    groups, replicate = report["memory_by_layout"]["groups"], report["memory_by_layout"]["replicate"]
    one = _nets_share(groups[1])
    assert groups[2]["layout"] == "groups" and replicate[2]["layout"] == "replicate"
    assert _nets_share(groups[2]) <= 0.6 * one and _nets_share(groups[4]) <= 0.35 * one
    assert _nets_share(replicate[4]) > 0.6 * one  # ZeRO-3 leaves tokens and activations whole on each worker
    owned = sorted(g for g in groups[4]["groups"])
    assert owned and set(owned) <= set(report["groups"])
    assert report["memory_gib_per_worker"][4] == groups[4]
    assert set(report["gpus_80gb"]) == {"groups", "replicate"}
    spec_file = tmp_path / "spec.yaml"
    import yaml

    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    assert main(["check", str(spec_file)]) == 0
    out = capsys.readouterr().out
    assert "4 worker(s), groups: total" in out and "80 GB workers needed" in out
