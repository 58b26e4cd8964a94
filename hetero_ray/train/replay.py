"""Replay data: instruction / input / output records, formatted with the target's chat template and
tokenized with the loss on the answer tokens only."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hetero_ray.errors import DataError

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    # teacher examples: (start, end, source excess) over answer-token indices (the ``excess`` objective term)
    chunks: list[tuple[int, int, float]] | None = None
    # teacher examples under ``teach.balance: sources``: the example's weight in the ``distill`` term (its
    # source's share made equal) and in the ``excess`` term (the same over the examples with a chunk that fits)
    weight: float | None = None
    chunk_weight: float | None = None


def chunks_within(chunks, answer_len: int) -> list:
    """The chunks that lie inside an answer of ``answer_len`` kept tokens (a tokenized answer may be cut at
    ``max_length``): the only ones the ``excess`` term reads, and the ones its balance counts."""
    return [c for c in chunks or () if c[1] <= answer_len]


def load_records(path: str | Path, take: int | float | str = "all", seed: int = 0, field: str = "data",
                 need_output: bool = True) -> list[dict]:
    """Records from a JSON list or JSONL file (UTF-8). ``take``: a count, a fraction in (0, 1], or "all"; a
    subset is the first n records of a seeded shuffle. Raises DataError naming ``field``, the file and the
    record for a missing, unreadable, empty or malformed file, or a count larger than the file holds."""
    path = Path(path)
    where = f"{field}: {path}"
    if not path.is_file():
        raise DataError(f"{where}: file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text ({e})") from None
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()
        ]
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON/JSONL: {e}") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply") from None
    if not records:
        raise DataError(f"{where}: no records (an empty file trains nothing)")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or (need_output and "output" not in r):
            raise DataError(f"{where}: record {i} needs a string `instruction`" +
                            (" and an `output` field" if need_output else ""))
        if r.get("input") is not None and not isinstance(r["input"], str):
            raise DataError(f"{where}: record {i}: `input` must be a string, got {type(r['input']).__name__}")
    if take == "all":
        return records
    n = int(round(float(take) * len(records))) if isinstance(take, float) and take <= 1 else int(take)
    if n > len(records):
        raise DataError(f"{where}: take is {take} but the file holds {len(records)} records; lower `take` or "
                        "use take: all")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    return [records[i] for i in sorted(order[:max(1, n)])]


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
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if any(e.chunks is not None for e in examples):
        batch["chunks"] = [e.chunks or [] for e in examples]
    for key, name in (("weights", "weight"), ("chunk_weights", "chunk_weight")):
        if any(getattr(e, name) is not None for e in examples):
            batch[key] = torch.tensor([1.0 if getattr(e, name) is None else getattr(e, name) for e in examples])
    return batch


def load_tokenizer(base: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
