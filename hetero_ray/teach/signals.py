"""Teacher signals: each source expert (its family's base model + its adapter, or what a control puts in the
adapter's place) answers the ``teach:`` prompts greedily, and scores its answer with and without the adapter.

Per source and prompt the signal is the answer text and, on chunks of the answer whose boundaries agree in
the source's and the target's tokenizations (:mod:`hetero_ray.teach.chunks`), the log-probability excess
log p(S + LoRA) - log p(S) summed over the chunk's source tokens. Chunks that fail the decode check are
dropped and counted. Labels are never read. Results are cached by a content hash of everything they depend
on (base files, adapter weights, control, seed, prompts, target tokenizer, settings).

Plain functions: the Ray runner calls :func:`source_signals` inside each family's actor, the in-process
runner calls it directly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from hetero_ray.controls import Control, control_factors
from hetero_ray.errors import HeteroRayError, OutputError
from hetero_ray.io.adapters import LoraAdapter, dir_fingerprint
from hetero_ray.io.outputs import atomic_output_dir
from hetero_ray.teach.chunks import align_chunks
from hetero_ray.train.replay import Example, format_prompt, load_records

SIGNALS_VERSION = 1


@torch.no_grad()
def generate(model, tokenizer, records: Sequence[Mapping], batch_size: int = 16, max_new_tokens: int = 64
             ) -> list[str]:
    """Greedy answers for ``records`` (prompts formatted as in training, left-padded batches)."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for i in range(0, len(records), batch_size):
        prompts = [tokenizer(format_prompt(tokenizer, r), add_special_tokens=False)["input_ids"]
                   for r in records[i : i + batch_size]]
        n = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), n), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), n), dtype=torch.long)
        for j, p in enumerate(prompts):
            ids[j, n - len(p) :] = torch.tensor(p)
            mask[j, n - len(p) :] = 1
        device = next(model.parameters()).device
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        out += tokenizer.batch_decode(gen[:, n:], skip_special_tokens=True)
    return out


def teach_records(spec, index: int | None = None) -> list[dict]:
    """The prompt records the spec's ``teach:`` selects (``take`` applied with a seeded shuffle per file); with
    ``index``, only those of the files that source answers (a file's ``sources:``, or every file without one)."""
    if spec.teach is None:
        return []
    sid = None if index is None else spec.source_ids()[index]
    return [r for i, t in enumerate(spec.teach.prompts) if sid is None or t.sources is None or sid in t.sources
            for r in load_records(t.path, t.take, spec.seed + i, field=f"teach.prompts[{i}]", need_output=False)]


def source_base_dir(spec, index: int, adapter: LoraAdapter) -> Path:
    """The source's base model directory: ``sources[i].base`` (a directory, or its config.json), else the
    adapter's ``base_model_name_or_path`` when that is a local directory. It must hold safetensors weights."""
    from hetero_ray.train.target import check_base_dir

    s = spec.sources[index]
    tried = []
    for where, c in (("base", s.base), ("adapter's base_model_name_or_path", adapter.base_model_path)):
        if not c:
            continue
        d = Path(c)
        d = d.parent if d.suffix == ".json" else d
        tried.append(f"{where} {c}")
        if d.is_dir() and (d / "config.json").is_file():
            check_base_dir(d, f"sources[{index}].base")
            return d
    raise HeteroRayError(f"sources[{index}] ({s.adapter}): teacher signals need the source's base model (weights "
                         f"and tokenizer), and none is readable here ({'; '.join(tried) or 'none given'}); set "
                         f"`sources[{index}].base:` to its local directory")


def signals_key(base: Path, adapter: LoraAdapter, control: Control, seed: int, records: Sequence[dict],
                target_base: Path, settings: Mapping) -> str:
    payload = {"v": SIGNALS_VERSION, "base": dir_fingerprint(base), "adapter": adapter.sha256(),
               "control": control.value, "seed": seed if control not in (Control.NONE,) else 0,
               "records": [{k: r.get(k) for k in ("instruction", "input")} for r in records],
               "target_tokenizer": dir_fingerprint(target_base), "settings": dict(settings)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _teacher_model(model, adapter: LoraAdapter, control: Control, seed: int, source_id: str):
    """The source base with the adapter (or the control's replacement) applied through PEFT; the bare base
    for ``zero_sources``."""
    from peft import PeftModel

    if control is Control.ZERO_SOURCES:
        return model, False
    model = PeftModel.from_pretrained(model, str(adapter.path), is_trainable=False, local_files_only=True)
    if control.reads_sources and control is not Control.NONE:
        inner = model.base_model.model
        for path in adapter.modules:
            a, b = control_factors(adapter, path, control, seed, source_id)
            layer = inner.get_submodule(path)
            layer.lora_A["default"].weight.data.copy_(a)
            layer.lora_B["default"].weight.data.copy_(b)
    model.eval()
    return model, True


@torch.no_grad()
def _answer_logprobs(model, prompt_ids: list[int], answer_ids: list[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + answer_ids], device=device)
    logits = model(input_ids=ids, logits_to_keep=len(answer_ids) + 1).logits[0, :-1].float().cpu()
    return logits.log_softmax(-1).gather(-1, torch.tensor(answer_ids)[:, None])[:, 0]


def compute_signals(base: Path, adapter: LoraAdapter, control: Control, seed: int, source_id: str,
                    records: Sequence[dict], target_tokenizer, max_new_tokens: int, batch_size: int,
                    base_model=None, device: str = "cpu", excess: bool = True) -> dict:
    """The teacher signals of one source (see the module docstring); JSON-able. ``base_model``: the family's
    base already loaded (it is returned to its bare state afterwards), else it is loaded from ``base``."""
    from hetero_ray.train.replay import load_tokenizer
    from hetero_ray.train.target import load_base_model

    tok = load_tokenizer(base)
    bare = base_model if base_model is not None else load_base_model(base).to(device)
    model, has_adapter = _teacher_model(bare, adapter, control, seed, source_id)
    try:
        return _signals(model, has_adapter and excess, tok, control, source_id, records, target_tokenizer,
                        max_new_tokens, batch_size)
    finally:
        if has_adapter:
            model.unload()  # the base model without the LoRA layers, for the family's next source


def _signals(model, score, tok, control, source_id, records, target_tokenizer, max_new_tokens, batch_size):
    """Answers, chunks, and (``score``) each chunk's excess; without ``score`` the excess is 0."""
    answers = [a.strip() for a in generate(model, tok, records, batch_size, max_new_tokens)]
    items, n_chunks, n_dropped = [], 0, 0
    for r, answer in zip(records, answers, strict=True):
        al = align_chunks(answer, tok, target_tokenizer)
        excess = [0.0] * len(al.chunks)
        if score and al.chunks:
            prompt = tok(format_prompt(tok, r), add_special_tokens=False)["input_ids"]
            with_lora = _answer_logprobs(model, prompt, al.src_ids)
            with model.disable_adapter():
                without = _answer_logprobs(model, prompt, al.src_ids)
            gain = (with_lora - without).tolist()
            excess = [float(sum(gain[c.src[0] : c.src[1]])) for c in al.chunks]
        items.append({"answer": answer, "chunks": [[c.tgt[0], c.tgt[1], e] for c, e in zip(al.chunks, excess,
                                                                                           strict=True)]})
        n_chunks += len(al.chunks)
        n_dropped += len(al.dropped)
    return {"source_id": source_id, "control": control.value, "items": items, "chunks": n_chunks,
            "dropped_chunks": n_dropped, "empty_answers": sum(1 for a in answers if not a)}


def cache_dir(spec) -> Path | None:
    """``<cluster.storage>/teacher-cache`` when the storage is local (None for remote storage)."""
    run_dir = spec.run_dir()
    return None if run_dir is None else run_dir.parent / "teacher-cache"


def source_signals(spec, index: int, adapter: LoraAdapter, cache: Path | None = None, base_models: dict | None = None
                   ) -> dict:
    """The teacher signals of source ``index`` under the spec's control, from the cache when there.
    ``base_models``: loaded bases by directory, shared by the sources of one family (filled as needed)."""
    from hetero_ray.train.replay import load_tokenizer

    control = spec.control.teacher
    records = teach_records(spec, index)
    base = source_base_dir(spec, index, adapter)
    excess = spec.objective.get("excess", 0.0) > 0
    settings = {"max_new_tokens": spec.teach.max_new_tokens, "excess": excess}
    key = signals_key(base, adapter, control, spec.seed, records, spec.target.base, settings)
    source_id = spec.source_ids()[index]
    path = cache / f"{source_id}-{key}" / "signals.json" if cache is not None else None
    if path is not None and path.is_file():
        return {**json.loads(path.read_text()), "cached": True}
    from hetero_ray.train.target import load_base_model

    device = "cuda" if spec.cluster.use_gpu and torch.cuda.is_available() else "cpu"
    model = None
    if base_models is not None:
        model = base_models.get(str(base))
        if model is None:
            model = base_models[str(base)] = load_base_model(base).to(device)
    torch.manual_seed(spec.seed)
    out = compute_signals(base, adapter, control, spec.seed, source_id, records, load_tokenizer(spec.target.base),
                          spec.teach.max_new_tokens, spec.teach.batch_size, model, device, excess)
    out["key"] = key
    if path is not None and not path.is_file():  # another run of the same key (a sweep) may have written it
        try:
            with atomic_output_dir(path.parent, overwrite=True) as tmp:
                (tmp / "signals.json").write_text(json.dumps(out))
        except (OSError, OutputError):
            if not path.is_file():  # the same content is there unless nobody wrote it
                raise
    return {**out, "cached": False}


def teacher_examples(spec, signals: Sequence[dict], tokenizer) -> list[Example]:
    """Target-tokenized training examples: each teach prompt with the answer of each source that answers it
    (the ``distill`` term), carrying the per-chunk excess (the ``excess`` term). Empty answers are skipped.
    Under ``teach.balance: sources`` each example weighs n / (S n_s) (n examples, S sources with any, n_s of
    its source), so every source's examples weigh n / S together; in the ``excess`` term the same over the
    examples that have a chunk within their (possibly cut) answer, the only ones that term reads."""
    from hetero_ray.train.replay import IGNORE, chunks_within, tokenize

    index = {sid: i for i, sid in enumerate(spec.source_ids())}
    per_source = []
    for sig in signals:
        records = teach_records(spec, index[sig["source_id"]])
        kept = [(r, it) for r, it in zip(records, sig["items"], strict=True) if it["answer"]]
        examples = tokenize(tokenizer, [{**r, "output": it["answer"]} for r, it in kept], spec.training.max_length)
        for e, (_, it) in zip(examples, kept, strict=True):
            e.chunks = [tuple(c) for c in it["chunks"]]
        per_source.append(examples)
    out = [e for examples in per_source for e in examples]
    if spec.teach is not None and spec.teach.balance == "sources":
        _balance([examples for examples in per_source if examples], "weight")
        for e in out:
            e.chunk_weight = 0.0
        # the excess term reads only the examples with a chunk inside their answer
        with_chunks = [[e for e in examples if chunks_within(e.chunks, sum(t != IGNORE for t in e.labels))]
                       for examples in per_source]
        _balance([examples for examples in with_chunks if examples], "chunk_weight")
    return out


def _balance(per_source: Sequence[Sequence[Example]], field: str) -> None:
    """Set ``field`` of each example to n / (S n_s): every source's examples weigh n / S together."""
    n = sum(len(examples) for examples in per_source)
    for examples in per_source:
        for e in examples:
            setattr(e, field, n / (len(per_source) * len(examples)))


def signals_summary(signals: Sequence[dict]) -> dict:
    """For the report: per source, answers, chunks, dropped chunks, empty answers, cache hit."""
    return {s["source_id"]: {"control": s["control"], "answers": len(s["items"]), "chunks": s["chunks"],
                             "dropped_chunks": s["dropped_chunks"], "empty_answers": s["empty_answers"],
                             "cached": s.get("cached", False), "key": s.get("key")} for s in signals}
