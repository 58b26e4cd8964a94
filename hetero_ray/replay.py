"""Replay data: instruction / input / output records, formatted with the target's chat template and
tokenized with the loss on the answer tokens only."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hetero_ray.errors import HeteroRayError

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def load_records(path: str | Path, take: int | float | str = "all", seed: int = 0) -> list[dict]:
    """Records from a JSON list or JSONL file. ``take``: a count, a fraction in (0, 1], or "all"; a subset
    is the first n records of a seeded shuffle."""
    path = Path(path)
    if not path.is_file():
        raise HeteroRayError(f"{path}: replay file not found")
    text = path.read_text()
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()
        ]
    except json.JSONDecodeError as e:
        raise HeteroRayError(f"{path}: invalid JSON/JSONL: {e}") from e
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "instruction" not in r or "output" not in r:
            raise HeteroRayError(f"{path}: record {i} needs `instruction` and `output` fields")
    if take == "all":
        return records
    n = int(round(float(take) * len(records))) if isinstance(take, float) and take <= 1 else int(take)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    return [records[i] for i in sorted(order[:n])]


def prompt_text(record: dict) -> str:
    """The user turn: the instruction, then the input unless the instruction already contains it."""
    instruction, extra = record["instruction"], (record.get("input") or "").strip()
    return instruction if not extra or extra in instruction else f"{instruction}\n{extra}"


def format_prompt(tokenizer, record: dict) -> str:
    text = prompt_text(record)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text + "\n"


def tokenize(tokenizer, records: Sequence[dict], max_length: int = 512) -> list[Example]:
    """Prompt tokens are labelled IGNORE; answer tokens (+ EOS) carry the loss. Prompts are cut from the
    left when prompt + answer exceed ``max_length``."""
    out = []
    for r in records:
        prompt = tokenizer(format_prompt(tokenizer, r), add_special_tokens=False)["input_ids"]
        answer = tokenizer(str(r["output"]), add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            answer = answer + [tokenizer.eos_token_id]
        answer = answer[: max_length - 1]
        prompt = prompt[max(0, len(prompt) + len(answer) - max_length) :]
        out.append(Example(prompt + answer, [IGNORE] * len(prompt) + answer))
    return out


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with attention mask."""
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
