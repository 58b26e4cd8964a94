"""Evaluation: greedy generation on held-out task records and the tasks' metrics.

Metrics (all micro-averaged over a task's examples):

- ``ner`` (named entities and entity typing): an answer is ``"type: span; type: span"``. Each ``;``-separated
  item is split at its first ``:`` into (type, span); both are lower-cased and whitespace-normalized; items
  without a ``:`` or with an empty side are dropped (they count as nothing predicted, so a malformed answer
  costs recall, not a crash). Precision, recall and F1 count (type, span) pairs as multisets.
- ``re`` (relations): ``"relation: head, tail; relation: head, tail"``. Each item is split at its first ``:``
  into the relation and the argument text, and the argument text at its *last* ``,`` into head and tail (so
  a head such as "Washington, D.C." keeps its comma; a tail with a comma is not supported by the format).
  A triple is correct only if relation, head and tail all match after normalization (strict F1).
- ``label`` (classification): exact match of the normalized answer.

A task's kind is read from its records (``"relation1: word1, word2"`` in the instruction means ``re``; gold
answers without ``:`` mean ``label``; otherwise ``ner``) unless given.
"""

from __future__ import annotations

import json
import random
import re
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hetero_ray.teach.signals import generate  # noqa: F401  - re-exported

KINDS = ("ner", "re", "label")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def parse_entities(text: str) -> list[tuple[str, str]]:
    out = []
    for item in str(text).split(";"):
        kind, sep, span = item.partition(":")
        kind, span = _norm(kind), _norm(span)
        if sep and kind and span:
            out.append((kind, span))
    return out


def parse_relations(text: str) -> list[tuple[str, str, str]]:
    out = []
    for item in str(text).split(";"):
        rel, sep, args = item.partition(":")
        head, comma, tail = args.rpartition(",")
        rel, head, tail = _norm(rel), _norm(head), _norm(tail)
        if sep and comma and rel and head and tail:
            out.append((rel, head, tail))
    return out


@dataclass
class Score:
    correct: int = 0
    predicted: int = 0
    gold: int = 0

    def add(self, pred: Sequence, gold: Sequence) -> None:
        self.correct += sum((Counter(pred) & Counter(gold)).values())
        self.predicted += len(pred)
        self.gold += len(gold)

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.gold if self.gold else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def task_kind(records: Sequence[Mapping]) -> str:
    if any("relation1: word1, word2" in r.get("instruction", "") for r in records[:5]):
        return "re"
    if all(":" not in str(r["output"]) for r in records):
        return "label"
    return "ner"


def score(kind: str, predictions: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """{"score": the task's headline metric, plus precision / recall for extraction tasks}."""
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; one of {KINDS}")
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold answers")
    if kind == "label":
        acc = sum(_norm(p) == _norm(g) for p, g in zip(predictions, golds, strict=True)) / max(1, len(golds))
        return {"score": acc, "accuracy": acc}
    parse = parse_entities if kind == "ner" else parse_relations
    s = Score()
    for p, g in zip(predictions, golds, strict=True):
        s.add(parse(p), parse(g))
    return {"score": s.f1, "f1": s.f1, "precision": s.precision, "recall": s.recall}


def example_counts(kind: str, predictions: Sequence[str], golds: Sequence[str]) -> list[tuple[int, int, int]]:
    """Per record (correct, predicted, gold): the parts of the micro F1, for bootstrapping over records.
    Label tasks count a record as (match, 1, 1)."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold answers")
    if kind == "label":
        return [(int(_norm(p) == _norm(g)), 1, 1) for p, g in zip(predictions, golds, strict=True)]
    parse = parse_entities if kind == "ner" else parse_relations
    out = []
    for p, g in zip(predictions, golds, strict=True):
        s = Score()
        s.add(parse(p), parse(g))
        out.append((s.correct, s.predicted, s.gold))
    return out


def micro_f1(counts: Sequence[Sequence[int]]) -> float:
    """Micro F1 of per-record (correct, predicted, gold) counts (accuracy for label tasks)."""
    correct, predicted, gold = (sum(c[i] for c in counts) for i in range(3))
    return 2 * correct / (predicted + gold) if predicted + gold else 0.0


def paired_bootstrap(a: Sequence[Sequence[Sequence[int]]], b: Sequence[Sequence[Sequence[int]]], n: int = 2000,
                     seed: int = 0) -> dict[str, float]:
    """Paired bootstrap over records of mean-over-seeds micro F1(a) - F1(b). ``a``, ``b``: per seed, per record
    (correct, predicted, gold) counts, the same records in the same order. Returns the observed difference and
    the 95% percentile interval."""
    rng = random.Random(seed)
    n_rec = len(a[0])
    diff = statistics.fmean(micro_f1(x) for x in a) - statistics.fmean(micro_f1(x) for x in b)
    draws = []
    for _ in range(n):
        idx = [rng.randrange(n_rec) for _ in range(n_rec)]
        draws.append(statistics.fmean(micro_f1([x[i] for i in idx]) for x in a)
                     - statistics.fmean(micro_f1([x[i] for i in idx]) for x in b))
    draws.sort()
    return {"diff": diff, "lo": draws[int(0.025 * n)], "hi": draws[int(0.975 * n) - 1]}


def bootstrap_se(a: Sequence[Sequence[Sequence[int]]], n: int = 2000, seed: int = 1) -> float:
    """Bootstrap standard error over records of the mean-over-seeds micro F1."""
    rng = random.Random(seed)
    n_rec = len(a[0])
    draws = [statistics.fmean(micro_f1([x[rng.randrange(n_rec)] for _ in range(n_rec)]) for x in a)
             for _ in range(n)]
    return statistics.stdev(draws)


@torch.no_grad()
def answer_loss(model, tokenizer, records: Sequence[Mapping], batch_size: int = 16, max_length: int = 256) -> float:
    """Mean cross-entropy of the gold answers (+ EOS) given the prompts, over all answer tokens."""
    from hetero_ray.train.replay import IGNORE, collate, tokenize
    from hetero_ray.train.trainer import lm_loss

    model.eval()
    examples = tokenize(tokenizer, records, max_length)
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], tokenizer.pad_token_id)
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        device = next(model.parameters()).device
        total += float(lm_loss(model, {k: v.to(device) for k, v in batch.items()})) * n
        count += n
    return total / max(1, count)


@dataclass
class TaskResult:
    task: str
    kind: str
    n: int
    metrics: dict[str, float]
    samples: list[dict] = field(default_factory=list)
    counts: list[tuple[int, int, int]] = field(default_factory=list)  # per record, for paired bootstraps


def evaluate_model(model, tokenizer, tasks: Mapping[str, Sequence[Mapping]], batch_size: int = 16,
                   max_new_tokens: int = 64, kinds: Mapping[str, str] | None = None, n_samples: int = 3,
                   with_loss: bool = True, max_length: int = 256) -> dict[str, TaskResult]:
    results = {}
    for name, records in tasks.items():
        kind = (kinds or {}).get(name) or task_kind(records)
        preds = generate(model, tokenizer, records, batch_size, max_new_tokens)
        golds = [str(r["output"]) for r in records]
        samples = [{"input": r.get("input", ""), "gold": g, "prediction": p}
                   for r, g, p in list(zip(records, golds, preds, strict=True))[:n_samples]]
        metrics = score(kind, preds, golds)
        if with_loss:
            metrics["answer_loss"] = answer_loss(model, tokenizer, records, batch_size, max_length)
        results[name] = TaskResult(name, kind, len(records), metrics, samples, example_counts(kind, preds, golds))
    return results


def load_model(base: str | Path, adapter: str | Path | None = None, dtype: torch.dtype = torch.float32,
               device: str = "cpu"):
    """The base model (a local HF directory) with ``adapter`` applied through PEFT, or alone."""
    from transformers import AutoModelForCausalLM

    from hetero_ray.train.replay import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model.to(device), load_tokenizer(Path(base))


def markdown_table(rows: Mapping[str, Mapping[str, float | str]], columns: Sequence[str], digits: int = 3) -> str:
    """rows: row name -> column -> value (floats formatted, strings as given)."""
    head = "| method | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns) + "\n"

    def cell(v):
        return f"{v:.{digits}f}" if isinstance(v, float) else ("" if v is None else str(v))

    return head + "".join(f"| {name} | " + " | ".join(cell(r.get(c)) for c in columns) + " |\n"
                          for name, r in rows.items())


def write_results(path: str | Path, results: Mapping[str, Mapping[str, TaskResult]], extra: dict | None = None
                  ) -> None:
    """results: method -> task -> TaskResult, written as JSON."""
    data = {m: {t: r.__dict__ for t, r in per.items()} for m, per in results.items()}
    Path(path).write_text(json.dumps({"results": data, **(extra or {})}, indent=1))
