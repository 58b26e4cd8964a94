"""LoRA experts: train one adapter on a family's base model for a task, cached by content hash.

The cache key covers the base model's files (config, weights, tokenizer), the training records and every
setting, so a benchmark can rebuild its zoo from nothing and re-use whatever it already built.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hetero_ray.io.adapters import dir_fingerprint
from hetero_ray.io.outputs import atomic_output_dir, check_replaceable, check_spares_inputs
from hetero_ray.train.replay import collate, tokenize
from hetero_ray.train.trainer import cosine_schedule, lm_loss

EXPERT_CARD = "expert.json"


@dataclass(frozen=True)
class ExpertSettings:
    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    steps: int = 100
    lr: float = 2e-4
    batch_size: int = 8
    max_length: int = 256
    warmup_ratio: float = 0.05
    seed: int = 0
    extra: dict = field(default_factory=dict)  # recorded in the card and the key (e.g. the task name)


def expert_key(base: str | Path, records: Sequence[dict], settings: ExpertSettings) -> str:
    payload = {"base": dir_fingerprint(base), "records": records, "settings": asdict(settings)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_expert(base: str | Path, records: Sequence[dict], out_dir: str | Path, settings: ExpertSettings,
                 on_step: Callable[[dict], None] | None = None, device: str = "cpu", overwrite: bool = False,
                 inputs: dict[str, Path] | None = None) -> dict:
    """Fine-tune a LoRA adapter on ``records`` and write it (PEFT format + ``expert.json``) to ``out_dir``
    atomically. ``out_dir`` must be new, or (``overwrite``) an earlier hetero-ray output, and never be, hold or
    lie inside the base or any of ``inputs`` (checked before training). Returns the card: key, losses, time,
    settings."""
    check_spares_inputs(Path(out_dir), {"base": Path(base), **(inputs or {})}, "expert", field="out")
    check_replaceable(Path(out_dir), overwrite, "expert: out")
    from peft import LoraConfig, get_peft_model

    from hetero_ray.train.replay import load_tokenizer
    from hetero_ray.train.target import load_base_model

    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer(Path(base))
    model = load_base_model(base)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in settings.targets if t in names]
    if not targets:
        raise ValueError(f"{base}: none of the LoRA targets {list(settings.targets)} is a module of this model")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=targets, lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config).to(device)
    examples = tokenize(tokenizer, records, settings.max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    scheduler = cosine_schedule(optimizer, settings.steps, settings.warmup_ratio)
    gen = torch.Generator().manual_seed(settings.seed)
    order: list[int] = []
    losses, start = [], time.perf_counter()
    model.train()
    for step in range(settings.steps):
        if len(order) < settings.batch_size:
            order += torch.randperm(len(examples), generator=gen).tolist()
        batch_ids, order = order[: settings.batch_size], order[settings.batch_size :]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in batch_ids], tokenizer.pad_token_id).items()}
        loss = lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step:
            on_step({"step": step + 1, "steps": settings.steps, "loss": losses[-1]})
    card = {"key": expert_key(base, records, settings), "base": str(base), "base_sha256": dir_fingerprint(base),
            "n_records": len(records), "settings": asdict(settings), "loss_first": losses[0],
            "loss_last": losses[-1], "losses": losses, "train_s": time.perf_counter() - start}
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp))
        (tmp / EXPERT_CARD).write_text(json.dumps(card, indent=1))
    return card


def cached_expert(cache: str | Path, name: str, base: str | Path, records: Sequence[dict],
                  settings: ExpertSettings, on_step: Callable[[dict], None] | None = None,
                  device: str = "cpu", train: bool = True) -> tuple[Path, dict]:
    """The expert for (base, records, settings) under ``cache``/NAME-KEY, trained only if not there yet
    (``train=False``: FileNotFoundError naming the folder instead)."""
    key = expert_key(base, records, settings)
    out = Path(cache) / f"{name}-{key}"
    card_path = out / EXPERT_CARD
    if card_path.is_file():
        card = json.loads(card_path.read_text())
        card["cached"] = True
        return out, card
    if not train:
        raise FileNotFoundError(f"{out}: no trained expert there ({EXPERT_CARD} missing)")
    return out, train_expert(base, records, out, settings, on_step, device, overwrite=True)
