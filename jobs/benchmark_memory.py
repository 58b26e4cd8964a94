"""Measure the transfer networks' memory for one training step and compare it with `hetero-ray check`.

    python jobs/benchmark_memory.py --scale paper --device cuda      # Llama-3.1-8B <- Qwen2.5-7B + Mistral-7B
    python jobs/benchmark_memory.py --scale 16 --device cpu          # the same shapes, every width / 16

Writes random rank-8 PEFT adapters with the published shapes of the paper's models (no weights of the
models are needed: the transfer networks read only the adapters), builds the real candidates, groups and
networks (preset `paper` at full scale), runs one step (forward, RDM, a surrogate LM gradient on dB, backward,
torch AdamW) in fp32 on one device, and prints the peak memory next to check's estimate for 1 worker with
ZeRO-0: transfer-net weights + gradients + AdamW states + candidate tokens, plus the larger of the transfer
nets' activations and AdamW's step temporary. It also prints the bytes autograd actually saved for backward
(any device). The frozen target model and its activations are not part of this measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from hetero_ray.planning import PAPER_MODELS  # noqa: E402

ROLES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def shapes(cfg: dict, role: str) -> tuple[int, int]:
    """(d_in, d_out) of a projection."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, i),
            "up_proj": (h, i), "down_proj": (i, h)}[role]


def write_zoo(root: Path, divisor: int, rank: int = 8) -> dict[str, tuple[Path, Path]]:
    out = {}
    g = torch.Generator().manual_seed(0)
    for name, cfg in PAPER_MODELS.items():
        cfg = dict(cfg)
        for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
            cfg[k] = max(1, cfg[k] // divisor) if k.startswith("num") else cfg[k] // divisor
        base, adapter = root / name, root / f"{name}-lora"
        base.mkdir(parents=True)
        adapter.mkdir()
        (base / "config.json").write_text(json.dumps(cfg))
        tensors = {}
        for layer in range(cfg["num_hidden_layers"]):
            for role, block in ROLES.items():
                d_in, d_out = shapes(cfg, role)
                key = f"base_model.model.model.layers.{layer}.{block}.{role}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) / d_in**0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.01
        save_file(tensors, str(adapter / "adapter_model.safetensors"))
        (adapter / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(ROLES),
             "base_model_name_or_path": str(base)}))
        out[name] = (base, adapter)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", default="paper", help="'paper' or a width divisor (e.g. 16)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    from hetero_ray.denoise.fusion import group_rdm, module_deltas
    from hetero_ray.planning import check, saved_tensor_bytes
    from hetero_ray.runners.prepare import build_net, prepare_groups
    from hetero_ray.spec import parse_spec

    divisor = 1 if args.scale == "paper" else int(args.scale)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        zoo = write_zoo(root, divisor)
        replay = root / "replay.jsonl"
        replay.write_text('{"instruction": "x", "output": "y"}\n')
        spec = parse_spec({
            "output": str(root / "out"),
            "target": {"base": str(zoo["llama-3.1-8b"][0]), "adapter": str(zoo["llama-3.1-8b"][1])},
            "sources": [{"adapter": str(zoo["qwen2.5-7b"][1]), "base": str(zoo["qwen2.5-7b"][0])},
                        {"adapter": str(zoo["mistral-7b"][1]), "base": str(zoo["mistral-7b"][0])}],
            "replay": [{"path": str(replay)}],
            "method": {"preset": "paper" if divisor == 1 else "auto", "num_projections": 256},
            "cluster": {"workers": 1, "zero_stage": 0, "dtype": "fp32"},
        })
        report = check(spec)
        estimate = report["memory_gib_per_worker"][1]
        t0 = time.perf_counter()
        prepared = prepare_groups(spec)
        plan, block = prepared.plan, prepared.block
        align_s = time.perf_counter() - t0
        groups = {n: g.to(device) for n, g in prepared.groups.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
        net = build_net(spec, plan, block, groups, prepared.target).to(device)
        params = sum(p.numel() for p in net.parameters())
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
        gen = torch.Generator().manual_seed(0)  # RDM draws on the CPU generator, then moves to the device
        times = []
        inputs = [*net.parameters(), *(t for g in groups.values() for t in g.net_inputs())]
        saved = []
        for _ in range(2):  # the second step has AdamW's states allocated
            t0 = time.perf_counter()
            nbytes, outputs = saved_tensor_bytes(lambda: net(groups), exclude=inputs)
            saved.append(nbytes)
            deltas = module_deltas(outputs, groups)
            nbytes, rdm = saved_tensor_bytes(lambda o=outputs: group_rdm(o, groups, gen, num_projections=256),
                                             exclude=inputs)
            saved[-1] += nbytes
            surrogate = spec.method.lambda_reg * rdm
            for dlt in deltas.values():  # stands in for the LM gradient on each module's dB
                surrogate = surrogate + (dlt * torch.randn(dlt.shape, generator=gen).to(device)).sum()
            surrogate.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        gib = 1024**3
        result = {"scale": args.scale, "device": str(device), "groups": len(groups), "transfer_net_params": params,
                  "check_params": report["transfer_net_params"], "block_size": block,
                  "estimate_gib": {k: estimate[k] for k in ("transfer_nets", "candidate_tokens",
                                                            "transfer_activations", "optimizer_step")},
                  "estimate_peak_gib": round(estimate["transfer_nets"] + estimate["candidate_tokens"]
                                             + max(estimate["transfer_activations"], estimate["optimizer_step"]), 3),
                  "measured_saved_activations_gib": round(saved[-1] / 1024**3, 3),
                  "align_s": round(align_s, 2), "step_s": [round(t, 3) for t in times]}
        if device.type == "cuda":
            result["measured_peak_gib"] = round((torch.cuda.max_memory_allocated() - base_mem) / gib, 3)
            result["measured_after_step_gib"] = round((torch.cuda.memory_allocated() - base_mem) / gib, 3)
            result["candidate_tokens_on_device_gib"] = round(base_mem / gib, 3)
            result["gpu"] = torch.cuda.get_device_name()
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
