"""Model families as data: how each family names its LoRA-adapted modules and which canonical role each
one plays (attention q/k/v/o, MLP gate/up/down). Adding a family is one :func:`register_family` call.

Fused projections (Phi-3 ``qkv_proj`` and ``gate_up_proj``, GPT-2 ``c_attn``, GPT-NeoX
``query_key_value``) are split by rows of B into roles; their A is shared by the roles.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hetero_ray.errors import AdapterError, FamilyError
from hetero_ray.io.adapters import LoraAdapter, LoraModule, read_json
from hetero_ray.registry import Registry

ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class ModelDims:
    """Attention geometry needed to split fused q/k/v rows (from the base model's config.json)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Mapping) -> ModelDims | None:
        config = config.get("text_config") or config
        hidden = config.get("hidden_size") or config.get("n_embd")
        heads = config.get("num_attention_heads") or config.get("n_head")
        if not hidden or not heads:
            return None
        kv = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        return cls(int(hidden), int(heads), int(kv), int(head_dim))


Rows = range | tuple[int, ...]
# (fused module's d_out, dims or None, d_in of the family's o projection in this layer or None) -> rows per role
Splitter = Callable[[int, "ModelDims | None", "int | None"], dict[str, Rows]]


def split_equal(roles: tuple[str, ...]) -> Splitter:
    def split(d_out: int, dims: ModelDims | None, o_in: int | None) -> dict[str, Rows]:
        if d_out % len(roles):
            raise FamilyError(f"fused module with {d_out} rows cannot split equally into {roles}")
        n = d_out // len(roles)
        return {role: range(i * n, (i + 1) * n) for i, role in enumerate(roles)}

    return split


def split_qkv_contiguous(d_out: int, dims: ModelDims | None, o_in: int | None) -> dict[str, Rows]:
    """Rows laid out [q; k; v] with q = heads*head_dim and k = v = kv_heads*head_dim (Phi-3, GPT-2)."""
    if dims is not None:
        q = dims.num_heads * dims.head_dim
    elif o_in is not None:  # o_proj reads exactly the concatenated query heads
        q = o_in
    else:
        raise FamilyError(
            f"cannot split a fused qkv module of {d_out} rows: give the base model's config.json "
            "(num_attention_heads, num_key_value_heads) or include o_proj in the adapter"
        )
    kv = (d_out - q) // 2
    if kv <= 0 or q + 2 * kv != d_out:
        raise FamilyError(f"fused qkv module has {d_out} rows, inconsistent with {q} query rows")
    return {"q": range(0, q), "k": range(q, q + kv), "v": range(q + kv, d_out)}


def split_qkv_interleaved(d_out: int, dims: ModelDims | None, o_in: int | None) -> dict[str, Rows]:
    """GPT-NeoX layout: rows are (heads, 3, head_dim), q/k/v interleaved per head."""
    if dims is None:
        raise FamilyError("splitting GPT-NeoX query_key_value needs the base model's config.json (num_attention_heads)")
    h, hd = dims.num_heads, d_out // (3 * dims.num_heads)
    if h * 3 * hd != d_out:
        raise FamilyError(f"query_key_value has {d_out} rows, not 3 * {h} heads * head_dim")
    return {
        role: tuple(head * 3 * hd + part * hd + j for head in range(h) for j in range(hd))
        for part, role in enumerate(("q", "k", "v"))
    }


def _single(role: str) -> Splitter:
    return lambda d_out, dims, o_in: {role: range(d_out)}


@dataclass(frozen=True)
class Family:
    """A model family: the regex that finds the layer index in a module path, and its modules' roles."""

    name: str
    model_types: tuple[str, ...]
    layer_pattern: str
    modules: Mapping[str, Splitter]
    name_hints: tuple[str, ...] = ()
    o_module: str | None = None
    # (base config) -> {module name within a layer: (d_in, d_out)}; enables planning from configs alone
    shapes: Callable[[Mapping], dict[str, tuple[int, int]]] | None = None
    module_template: str = "model.layers.{layer}.{module}"
    _regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", re.compile(self.layer_pattern))

    def locate(self, module_path: str) -> tuple[int, str] | None:
        """(layer index, module name within the layer) or None if the path is not inside a layer."""
        m = self._regex.match(module_path)
        return (int(m[1]), m[2]) if m else None


FAMILIES: Registry[Family] = Registry("family", FamilyError)


def register_family(family: Family) -> Family:
    return FAMILIES.add(family.name, family)


def get_family(name: str) -> Family:
    return FAMILIES.lookup(name)


def _geometry(config: Mapping) -> tuple[int, int, int, int]:
    config = config.get("text_config") or config
    dims = ModelDims.from_config(config)
    if dims is None or "intermediate_size" not in config:
        raise FamilyError("config needs hidden_size, num_attention_heads and intermediate_size")
    q, kv = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    return dims.hidden_size, q, kv, config["intermediate_size"]


def llama_style_shapes(config: Mapping) -> dict[str, tuple[int, int]]:
    h, q, kv, inter = _geometry(config)
    return {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter),
            "mlp.down_proj": (inter, h)}


def phi3_shapes(config: Mapping) -> dict[str, tuple[int, int]]:
    h, q, kv, inter = _geometry(config)
    return {"self_attn.qkv_proj": (h, q + 2 * kv), "self_attn.o_proj": (q, h), "mlp.gate_up_proj": (h, 2 * inter),
            "mlp.down_proj": (inter, h)}


_DECODER_LAYERS = r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)\.(.+)$"
_LLAMA_STYLE = {
    "self_attn.q_proj": _single("q"),
    "self_attn.k_proj": _single("k"),
    "self_attn.v_proj": _single("v"),
    "self_attn.o_proj": _single("o"),
    "mlp.gate_proj": _single("gate"),
    "mlp.up_proj": _single("up"),
    "mlp.down_proj": _single("down"),
}

for _name, _types, _hints in (
    ("llama", ("llama",), ("llama", "smollm", "tinyllama")),
    ("qwen2", ("qwen2",), ("qwen2", "qwen")),
    ("qwen3", ("qwen3",), ("qwen3",)),
    ("mistral", ("mistral",), ("mistral",)),
    ("gemma", ("gemma",), ("gemma-1", "gemma-7b", "gemma-2b")),
    ("gemma2", ("gemma2",), ("gemma-2", "gemma2")),
    ("gemma3", ("gemma3", "gemma3_text"), ("gemma-3", "gemma3")),
):
    register_family(Family(_name, _types, _DECODER_LAYERS, _LLAMA_STYLE, _hints, "self_attn.o_proj",
                           llama_style_shapes))

register_family(
    Family(
        "phi3",
        ("phi3",),
        _DECODER_LAYERS,
        {
            "self_attn.qkv_proj": split_qkv_contiguous,
            "self_attn.o_proj": _single("o"),
            "mlp.gate_up_proj": split_equal(("gate", "up")),
            "mlp.down_proj": _single("down"),
        },
        ("phi-3", "phi3", "phi-4", "phi4"),
        "self_attn.o_proj",
        phi3_shapes,
    )
)
register_family(
    Family(
        "gpt2",
        ("gpt2",),
        r"^(?:transformer\.)?h\.(\d+)\.(.+)$",
        {
            "attn.c_attn": split_qkv_contiguous,
            "attn.c_proj": _single("o"),
            "mlp.c_fc": _single("up"),
            "mlp.c_proj": _single("down"),
        },
        ("gpt2",),
        "attn.c_proj",
    )
)
register_family(
    Family(
        "gpt_neox",
        ("gpt_neox",),
        r"^(?:gpt_neox\.)?layers\.(\d+)\.(.+)$",
        {
            "attention.query_key_value": split_qkv_interleaved,
            "attention.dense": _single("o"),
            "mlp.dense_h_to_4h": _single("up"),
            "mlp.dense_4h_to_h": _single("down"),
        },
        ("pythia", "gpt-neox", "gpt_neox"),
        "attention.dense",
    )
)


def find_base_config(adapter: LoraAdapter, base: str | Path | None = None) -> tuple[Path, dict] | None:
    """(path, contents) of the base model's config.json: from ``base`` (a directory or a config.json file),
    else from the adapter's ``base_model_name_or_path`` when that is a local directory; None when neither
    exists."""
    candidates = [Path(base)] if base else []
    if isinstance(adapter.base_model_path, str) and adapter.base_model_path:
        candidates.append(Path(adapter.base_model_path))
    for c in candidates:
        path = c / "config.json" if c.is_dir() else c
        if path.is_file() and path.suffix == ".json":
            config = read_json(path, lambda p, m: FamilyError(f"{p}: {m}"))
            if not isinstance(config, dict):
                raise FamilyError(f"{path}: expected a JSON object, got a JSON {type(config).__name__}")
            if "text_config" in config and not isinstance(config["text_config"], dict | None):
                raise FamilyError(f"{path}: field text_config: expected an object, got "
                                  f"{type(config['text_config']).__name__}")
            return path, with_defaults(config)
    return None


def with_defaults(config: dict) -> dict:
    """The config as transformers reads it: values a config.json leaves out take their class's defaults
    (a Gemma-3 ``text_config`` often omits head counts and ``head_dim``). Unchanged for a model type
    transformers does not know, or a config it cannot build. Building transformers' config class costs
    about 0.5 ms, so one result per distinct config (a config.json's contents) is kept: many sources share
    their family's base. Each call gets its own copy."""
    return copy.deepcopy(config_defaults(json.dumps(config, sort_keys=True)))


@functools.lru_cache(maxsize=64)
def config_defaults(text: str) -> dict:
    """:func:`with_defaults` of a config given as its JSON text, kept per text (``cache_clear()`` forgets
    them: the benchmarks time each pass as a run's first open)."""
    return _with_defaults(json.loads(text))


def _with_defaults(config: dict) -> dict:
    from transformers import AutoConfig

    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return config
    try:
        full = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"}).to_dict()
    except Exception:  # noqa: BLE001 - best effort: any failure leaves the file's own values
        return config
    return {**full, **{k: v for k, v in config.items() if k != "text_config"}} if full else config


def read_base_config(adapter: LoraAdapter, base: str | Path | None = None) -> dict | None:
    """The base model's config.json contents (see :func:`find_base_config`), or None."""
    found = find_base_config(adapter, base)
    return found[1] if found else None


def _peft_model_types(adapter: LoraAdapter) -> list[str]:
    """Model types named by PEFT's own fields: ``auto_mapping.base_model_class`` (``Qwen2ForCausalLM``) and
    ``auto_mapping.parent_library`` (``transformers.models.qwen2.modeling_qwen2``), written for models
    built from a config, where ``base_model_name_or_path`` is null."""
    mapping = adapter.config.get("auto_mapping")
    if not isinstance(mapping, dict):
        return []
    found = []
    library = mapping.get("parent_library")
    if isinstance(library, str) and (m := re.search(r"\.models\.([a-z0-9_]+)\.", library)):
        found.append(m[1])
    cls = mapping.get("base_model_class")
    if isinstance(cls, str) and (m := re.match(r"([A-Za-z0-9]+?)(?:ForCausalLM|ForConditionalGeneration|Model)$", cls)):
        found.append(m[1].lower())
    return found


def detect_family(adapter: LoraAdapter, base_config: Mapping | None = None, override: str | None = None) -> Family:
    """The adapter's family: ``override`` if given, else the base config's model_type, else the model type in
    PEFT's ``auto_mapping``, else a hint in the adapter's ``base_model_name_or_path``. Raises FamilyError
    listing what was found."""
    if override:
        return get_family(override)
    model_type = None
    types: list[str] = []
    if base_config:
        model_type = base_config.get("model_type")
        types += [model_type, (base_config.get("text_config") or {}).get("model_type")]
    types += _peft_model_types(adapter)
    for t in filter(None, types):
        for family in FAMILIES.values():
            if t in family.model_types:
                return family
    name = adapter.base_model_path.lower() if isinstance(adapter.base_model_path, str) else ""
    for family in FAMILIES.values():
        if any(h in name for h in family.name_hints):
            return family
    sample = ", ".join(list(adapter.modules)[:3])
    raise FamilyError(
        f"{adapter.path}: cannot detect the model family (model_type={model_type!r}, "
        f"base_model_name_or_path={adapter.base_model_path!r}, auto_mapping={adapter.config.get('auto_mapping')!r}, "
        f"modules like {sample}); set `family:` to one of {', '.join(sorted(FAMILIES))}"
    )


def check_against_base(adapter: LoraAdapter, family: Family, config: Mapping, config_path: Path) -> None:
    """The adapter's module shapes and layers must be those of the base model its config.json describes.
    Raises AdapterError naming the tensor, its shape and the config's values."""
    text = config.get("text_config") or config
    n_layers = text.get("num_hidden_layers")
    expected: dict[str, tuple[int, int]] = {}
    if family.shapes is not None:
        try:
            expected = family.shapes(config)
        except (FamilyError, KeyError, TypeError, ZeroDivisionError) as e:
            raise FamilyError(f"{config_path}: cannot derive {family.name} module shapes: {e}") from None
    dims = ModelDims.from_config(config)
    sizes = (f"hidden_size {dims.hidden_size}, {dims.num_heads} heads, {dims.num_kv_heads} kv heads, head_dim "
             f"{dims.head_dim}, intermediate_size {text.get('intermediate_size')}") if dims else ""
    for path, m in adapter.modules.items():
        loc = family.locate(path)
        if loc is None:
            continue
        layer, name = loc
        if isinstance(n_layers, int) and layer >= n_layers:
            raise AdapterError(adapter.weights_path, f"module in layer {layer}, but {config_path} has "
                               f"num_hidden_layers {n_layers}", key=m.a_key)
        want = expected.get(name)
        if want is not None and (m.d_in, m.d_out) != want:
            raise AdapterError(adapter.weights_path, f"{name} has d_in {m.d_in}, d_out {m.d_out} in the tensors, but "
                               f"{config_path} ({sizes}) gives d_in {want[0]}, d_out {want[1]}: the adapter was "
                               "not trained on this base", key=m.b_key)


@dataclass(frozen=True)
class Slot:
    """One canonical (layer, role) of an adapter: a module and the rows of its B that play the role."""

    layer: int
    role: str
    module: LoraModule
    rows: Rows

    @property
    def d_out(self) -> int:
        return len(self.rows)

    @property
    def fused(self) -> bool:
        return len(self.rows) != self.module.d_out

    def describe_rows(self) -> str:
        if isinstance(self.rows, range):
            return f"{self.rows.start}:{self.rows.stop}"
        return f"{len(self.rows)} interleaved rows"


@dataclass(frozen=True)
class Topology:
    """An adapter seen through its family: canonical slots keyed by (layer, role)."""

    family: Family
    n_layers: int
    slots: Mapping[tuple[int, str], Slot]
    unmapped: tuple[str, ...]

    def ranks(self) -> set[int]:
        return {s.module.rank for s in self.slots.values()}


def build_topology(
    adapter: LoraAdapter, family: Family, dims: ModelDims | None = None, strict: bool = True
) -> Topology:
    """Map every LoRA module of ``adapter`` to canonical slots.

    With ``strict`` (sources), a module that maps to no role is an error listing it and the family's known
    module names; otherwise (targets) such modules are recorded in ``unmapped`` and left untouched.
    """
    located: dict[str, tuple[int, str]] = {}
    unmapped: list[str] = []
    for path in adapter.modules:
        loc = family.locate(path)
        if loc is None or loc[1] not in family.modules:
            unmapped.append(path)
        else:
            located[path] = loc
    if strict and unmapped:
        raise FamilyError(
            f"{adapter.weights_path}: {len(unmapped)} LoRA module(s) have no canonical role in family "
            f"{family.name!r}: {', '.join(unmapped[:5])}{' ...' if len(unmapped) > 5 else ''}; "
            f"known modules per layer: {', '.join(family.modules)}"
        )
    if not located:
        raise FamilyError(
            f"{adapter.weights_path}: no module matches family {family.name!r} "
            f"(found {', '.join(list(adapter.modules)[:3])}); check `family:`"
        )
    o_in = {
        layer: adapter.modules[p].d_in for p, (layer, name) in located.items() if name == family.o_module
    }
    slots: dict[tuple[int, str], Slot] = {}
    for path, (layer, name) in located.items():
        module = adapter.modules[path]
        try:
            rows_by_role = family.modules[name](module.d_out, dims, o_in.get(layer))
        except FamilyError as e:
            raise FamilyError(f"{adapter.weights_path} [{module.b_key}]: {e}") from None
        for role, rows in rows_by_role.items():
            slots[(layer, role)] = Slot(layer, role, module, rows)
    n_layers = 1 + max(layer for layer, _ in slots)
    return Topology(family, n_layers, dict(sorted(slots.items())), tuple(unmapped))
