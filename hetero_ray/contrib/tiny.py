"""Tiny models of real families (built from transformers configs, a few layers, widths 32-96), a local
byte-level tokenizer, LoRA adapters with real PEFT key names, and a small templated task. Used by the tests
and the offline demo; nothing here downloads."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# family -> (config class name, config kwargs, LoRA target modules)
TINY_FAMILIES: dict[str, tuple[str, dict, list[str]]] = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2), []),
    "qwen2": ("Qwen2Config", dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2), []),
    "mistral": ("MistralConfig", dict(hidden_size=80, intermediate_size=160, num_hidden_layers=5,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=20), []),
    "gemma3": ("Gemma3TextConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16), []),
    "phi3": ("Phi3Config", dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2),
             ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}
LLAMA_STYLE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

_CORPUS_WORDS = (
    "the a movie actor director restaurant price car color red blue green genre year title "
    "city name extract entity type answer text option none person location organization"
).split()


def build_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 384, seed: int = 0,
                    texts: list[str] | None = None):
    """A byte-level BPE tokenizer trained locally on a small corpus (or on ``texts``), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = texts or [" ".join(rng.choice(_CORPUS_WORDS) for _ in range(12)) for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    if out_dir:
        fast.save_pretrained(str(out_dir))
    return fast


def tiny_config(family: str, vocab_size: int, **overrides):
    import transformers

    cls_name, kwargs, _ = TINY_FAMILIES[family]
    kwargs = {**kwargs, **overrides, "vocab_size": vocab_size, "pad_token_id": 0, "bos_token_id": 1,
              "eos_token_id": 2, "tie_word_embeddings": False}
    return getattr(transformers, cls_name)(**kwargs)


def build_tiny_model(family: str, out_dir: str | Path, seed: int = 0, tokenizer=None, **overrides) -> Path:
    """Save a randomly initialised tiny causal LM of ``family`` plus the local tokenizer to ``out_dir``."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer), **overrides))
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def lora_targets(family: str) -> list[str]:
    return TINY_FAMILIES[family][2] or LLAMA_STYLE_TARGETS


def build_lora_adapter(base_dir: str | Path, out_dir: str | Path, family: str, rank: int = 4, seed: int = 0,
                       lora_alpha: int | None = None, targets: list[str] | None = None,
                       b_scale: float = 0.1) -> Path:
    """A LoRA adapter on ``base_dir`` with random A and B (B scaled by ``b_scale``), saved with PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    config = LoraConfig(r=rank, lora_alpha=lora_alpha or 2 * rank, target_modules=targets or lora_targets(family),
                        lora_dropout=0.0, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


def color_task_records(n: int, seed: int = 0) -> list[dict]:
    """A small extraction task: name the colour mentioned in a sentence."""
    rng = random.Random(seed)
    colors = ["red", "blue", "green"]
    things = ["car", "movie", "restaurant", "title", "city"]
    out = []
    for _ in range(n):
        c, t = rng.choice(colors), rng.choice(things)
        text = f"the {t} is {c}"
        out.append({"instruction": f"extract the color. text: {text} answer:", "input": text, "output": f"color: {c}"})
    return out


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# Generated extraction tasks in the UIE format ("Option: ... Text: ... Answer:" -> "type: span; type: span").
# Each task draws its entities from its own word lists; train and test splits are disjoint draws.
TASKS: dict[str, dict] = {
    "movie": {
        "types": {"genre": ["comedy", "horror", "drama", "western", "musical", "thriller"],
                  "director": ["nolan", "kubrick", "varda", "kurosawa", "lynch", "bigelow"],
                  "year": ["1968", "1977", "1984", "1999", "2004", "2019"]},
        "templates": ["show me a {genre} movie by {director}", "any {genre} film from {year}",
                      "which movie did {director} make in {year}", "list {genre} movies from {year} by {director}"],
    },
    "restaurant": {
        "types": {"cuisine": ["thai", "mexican", "italian", "korean", "greek", "indian"],
                  "location": ["downtown", "uptown", "harbor", "airport", "campus", "midtown"],
                  "price": ["cheap", "expensive", "moderate", "affordable", "pricey", "budget"]},
        "templates": ["find a {price} {cuisine} place near {location}", "is there {cuisine} food near {location}",
                      "i want {price} food near {location}", "book a {cuisine} table at {location} that is {price}"],
    },
    "vehicle": {
        "types": {"color": ["silver", "orange", "black", "white", "yellow", "purple"],
                  "brand": ["volvo", "toyota", "fiat", "tesla", "honda", "skoda"],
                  "speed": ["40 km/h", "65 km/h", "90 km/h", "110 km/h", "120 km/h", "30 km/h"]},
        "templates": ["a {color} {brand} drives at {speed}", "the {brand} moving at {speed} is {color}",
                      "i saw a {color} car from {brand}", "a {brand} passes by at {speed}"],
    },
    # what every demo base model is pre-trained on (full fine-tuning) before its experts: the answer format
    # and copying spans, with entity types and words that none of the tasks above uses
    "pretrain": {
        "types": {"person": 300, "city": 300, "animal": 300, "number": 300},  # counts: generated words
        "templates": ["{person} saw {number} {animal} in {city}", "in {city} {person} keeps a {animal}",
                      "{person} moved to {city}", "{number} people in {city} like the {animal}",
                      "the {animal} of {person} is {number} years old", "{person} and a {animal}"],
    },
}


_SYLLABLES = "ka lo mi ru te sa no vi pe zu da ri fo ne gu ba tsi mo le ya".split()


def _words(kind: str, n: int) -> list[str]:
    """``n`` pronounceable pseudo-words for an entity type (seeded by its name): spans that must be copied."""
    rng = random.Random(kind)
    return ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))) for _ in range(n)]


def task_records(task: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` examples of a generated extraction task (see TASKS), in the instruction/input/output format."""
    spec = TASKS[task]
    spec = {**spec, "types": {t: _words(t, w) if isinstance(w, int) else w for t, w in spec["types"].items()}}
    rng = random.Random(f"{task}-{seed}")
    options = ", ".join(spec["types"])
    out = []
    for _ in range(n):
        template = rng.choice(spec["templates"])
        values = {t: rng.choice(words) for t, words in spec["types"].items()}
        text = template.format(**values)
        used = sorted((template.index("{" + t + "}"), t) for t in spec["types"] if "{" + t + "}" in template)
        answer = "; ".join(f"{t}: {values[t]}" for _, t in used)
        out.append({"instruction": f"Please tell me all the entity words in the text that belong to a given "
                                   f"category. Option: {options} \nText: {text} \nAnswer:",
                    "input": text, "output": answer})
    return out


def task_corpus() -> list[str]:
    """Text covering every generated task's instructions and answers (for the demo tokenizer)."""
    return [r["instruction"] + " " + r["output"] for t in TASKS for r in task_records(t, 150, seed=99)]
