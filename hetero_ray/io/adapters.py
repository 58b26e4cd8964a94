"""Read and write PEFT LoRA adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``).

Tensors are read lazily: shapes come from the safetensors header, data only when a key is asked for.
Pickled ``adapter_model.bin`` files are refused unless the caller opts in, because unpickling can run
arbitrary code; with the opt-in they are loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hetero_ray.errors import AdapterError
from hetero_ray.io.outputs import atomic_output_dir

__all__ = ["LoraAdapter", "LoraModule", "atomic_output_dir", "read_adapter", "write_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# base_model.model.<module path>.lora_A[.<adapter name>].weight
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# LoRA factors must be floating point; the safetensors header names the dtype before any data is read
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module: its path in the base model and its two tensor keys."""

    path: str
    a_key: str
    b_key: str
    rank: int
    d_in: int
    d_out: int


def parse_lora_key(key: str) -> tuple[str, str] | None:
    """Return (module path, "A"|"B") for a LoRA weight key, or None for any other tensor."""
    m = _LORA_KEY.match(key)
    return (m["module"], m["ab"]) if m else None


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_fingerprint(base: str | Path) -> str:
    """sha256 over a model directory's config, weight and tokenizer files (names and contents)."""
    h = hashlib.sha256()
    for p in sorted(Path(base).iterdir()):
        if p.is_file() and p.suffix in {".json", ".safetensors", ".model", ".txt", ".jinja"}:
            h.update(p.name.encode())
            h.update(file_sha256(p).encode())
    return h.hexdigest()


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter on disk, opened lazily.

    ``modules`` maps module path (e.g. ``model.layers.3.self_attn.q_proj``) to its :class:`LoraModule`;
    ``shapes`` holds every tensor's shape from the file header without reading data.
    """

    path: Path
    config: dict
    weights_path: Path
    shapes: dict[str, tuple[int, ...]]
    modules: dict[str, LoraModule]
    other_keys: list[str]
    pickled: bool = False
    config_only: bool = False
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _handle: object = field(default=None, repr=False)

    @property
    def scaling(self) -> float:
        """The adapter-wide scale s of the update s·B·A (lora_alpha / r, or / sqrt(r) with rsLoRA)."""
        r = int(self.config.get("r", 8))
        return _scale(float(self.config.get("lora_alpha", 8)), r, bool(self.config.get("use_rslora")))

    def module_rank(self, path: str) -> int:
        """The rank PEFT gives module ``path``: its ``rank_pattern`` entry, else ``r``."""
        return int(_pattern_value(self.config.get("rank_pattern"), path, self.config.get("r", 8)))

    def module_scaling(self, path: str) -> float:
        """The scale PEFT applies to module ``path`` (``rank_pattern`` and ``alpha_pattern`` honoured)."""
        r = self.module_rank(path)
        alpha = float(_pattern_value(self.config.get("alpha_pattern"), path, self.config.get("lora_alpha", 8)))
        return _scale(alpha, r, bool(self.config.get("use_rslora")))

    @property
    def base_model_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def tensor(self, key: str) -> torch.Tensor:
        """Read one tensor, checking that it is finite (unless :meth:`check_finite` found the whole file
        finite). Raises AdapterError naming file and key."""
        if key in self._cache:
            return self._cache[key]
        if key not in self.shapes:
            raise AdapterError(self.weights_path, "no such tensor", key=key)
        if self.config_only:
            raise AdapterError(self.path, "planned from adapter_config.json alone: it has no weights", key=key)
        t = self._load_pickled()[key] if self.pickled else self._mapped().tensor(key)
        checked = self._handle is not None and self._handle.finite  # the whole file, by check_finite
        if t.is_floating_point() and not checked and not _all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise AdapterError(self.weights_path, f"{bad} non-finite values (NaN/Inf)", key=key)
        return t

    def _mapped(self) -> _MappedSafetensors:
        if self._handle is None:  # one memory map for all reads of this file
            self._handle = _MappedSafetensors(self.weights_path)
        return self._handle

    def check_finite(self) -> None:
        """Check every tensor of the file at once, for a reader about to read all of its LoRA factors: when
        the file holds nothing else, all in one floating dtype, one sum over the bytes they fill (each value
        only where the sum overflows), and a finite file spares each read its own check (a sum per tensor
        costs ~10 us at rank 8). Otherwise (a NaN or Inf anywhere, other tensors, several dtypes) each
        tensor is still checked as it is read, and the error names its key. The verdict belongs to this
        process's map of the file."""
        if not (self.pickled or self.config_only or self.other_keys):
            self._mapped().check_all_finite()

    def __getstate__(self) -> dict:  # the file handle (and its verdict) does not travel between processes
        return {**self.__dict__, "_handle": None}

    def module_tensors(self, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of a module in PEFT shapes: A is (r, d_in), B is (d_out, r)."""
        m = self.modules[path]
        return self.tensor(m.a_key), self.tensor(m.b_key)

    def all_tensors(self) -> dict[str, torch.Tensor]:
        return {k: self.tensor(k) for k in self.shapes}

    def sha256(self) -> str:
        """Content hash of the adapter: weights file and config."""
        h = hashlib.sha256()
        h.update(file_sha256(self.weights_path).encode())
        h.update(json.dumps(self.config, sort_keys=True).encode())
        return h.hexdigest()

    def _load_pickled(self) -> dict[str, torch.Tensor]:
        if not self._cache:
            try:
                loaded = torch.load(self.weights_path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
                raise AdapterError(self.weights_path, f"cannot load with weights_only=True: {e}") from e
            if not isinstance(loaded, dict):
                raise AdapterError(self.weights_path, f"holds a {type(loaded).__name__}, not a mapping of tensor "
                                   "names to tensors")
            for key, value in loaded.items():
                if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                    raise AdapterError(self.weights_path, f"holds a {type(value).__name__} under this key, not a "
                                       "tensor", key=str(key))
                if not value.is_floating_point():
                    raise AdapterError(self.weights_path, f"dtype {value.dtype}: LoRA factors must be floating "
                                       "point", key=key)
            self._cache.update(loaded)
        return self._cache


def _scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _pattern_value(patterns: Mapping | None, path: str, default):
    """PEFT's per-module override: the first pattern key that matches the end of the module path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def validate_config(config: object, config_path: Path) -> dict:
    """adapter_config.json as a schema: a JSON object with a LoRA ``peft_type``, ``r`` an integer >= 1,
    ``lora_alpha`` a finite number > 0, ``use_rslora`` a boolean, rank/alpha patterns mapping names to
    numbers. Raises AdapterError naming the file and the field."""
    if not isinstance(config, dict):
        raise AdapterError(config_path, f"expected a JSON object, got a JSON {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(config_path, f"peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    if config.get("use_dora"):
        raise AdapterError(config_path, "DoRA adapters (use_dora: true) are not supported")
    r = config.get("r", 8)
    if not _is_int(r) or r < 1:
        raise AdapterError(config_path, f"field r: expected an integer >= 1, got {r!r}")
    alpha = config.get("lora_alpha", 8)  # PEFT's defaults: r 8, lora_alpha 8
    if not _is_number(alpha) or alpha <= 0:
        raise AdapterError(config_path, f"field lora_alpha: expected a finite number > 0, got {alpha!r} (the update "
                           "is lora_alpha / r * B A; to negate an adapter, negate its lora_B)")
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdapterError(config_path, f"field use_rslora: expected true or false, got {config['use_rslora']!r}")
    for name, check, what in (("rank_pattern", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
                              ("alpha_pattern", lambda v: _is_number(v) and v > 0, "a finite number > 0")):
        patterns = config.get(name) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(config_path, f"field {name}: expected a mapping of module names to values")
        for module, value in patterns.items():
            try:
                re.compile(module)
            except re.error as e:
                raise AdapterError(config_path, f"field {name}: key {module!r} is not a valid pattern ({e})") from None
            if not check(value):
                raise AdapterError(config_path, f"field {name}[{module!r}]: expected {what}, got {value!r}")
    return config


def read_adapter(path: str | Path, allow_pickle: bool = False) -> LoraAdapter:
    """Open a PEFT LoRA adapter directory lazily and validate its structure (not yet its values)."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(path, "adapter directory not found")
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(path, f"missing {CONFIG_NAME}")
    config = validate_config(read_json(config_path, AdapterError), config_path)

    weights = path / WEIGHTS_NAME
    pickled, dtypes = False, None
    if weights.is_file():
        shapes, dtypes = _safetensors_header(weights)
    elif (path / PICKLE_NAME).is_file():
        weights, pickled = path / PICKLE_NAME, True
        if not allow_pickle:
            raise AdapterError(
                weights,
                "pickled weights are refused by default because unpickling can execute code; convert the "
                "adapter to safetensors, or opt in (spec `allow_pickle: true`, or `--allow-pickle` on the "
                "command line) to load it with torch.load(weights_only=True)",
            )
        loaded = LoraAdapter(path, config, weights, {}, {}, [], pickled=True)._load_pickled()
        shapes = {k: tuple(v.shape) for k, v in loaded.items()}
    else:
        raise AdapterError(path, f"no {WEIGHTS_NAME} (or {PICKLE_NAME})")

    modules, other = _pair_modules(weights, shapes, dtypes)
    adapter = LoraAdapter(path, config, weights, shapes, modules, other, pickled=pickled)
    if pickled:
        adapter._cache.update(loaded)
    for m in modules.values():
        expected = adapter.module_rank(m.path)
        if m.rank != expected:
            raise AdapterError(weights, f"rank {m.rank} (lora_A has {m.rank} rows), but {config_path} gives this "
                               f"module r = {expected}", key=m.a_key)
    return adapter


def read_json(path: Path, error: type = AdapterError):
    """A JSON file's value; ``error(path, message)`` for unreadable, non-UTF-8, invalid or absurdly nested text."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(path, f"not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise error(path, f"invalid JSON: {e}") from None
    except RecursionError:
        raise error(path, "JSON nested too deeply") from None
    except OSError as e:
        raise error(path, f"cannot read: {e}") from None


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every value is finite: a NaN or Inf anywhere makes the sum non-finite, so one summing pass
    answers for a finite tensor (the sum of finite values can still overflow: then each value is checked)."""
    return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class _MappedSafetensors:
    """A safetensors file as one private, copy-on-write memory map (a write to a tensor read from it stays
    in this process and never reaches the file), its tensors views of the map: a read copies nothing and
    costs one view (of the whole map as the tensor's dtype). The header is re-read from the map, so offsets
    and contents agree; a tensor whose offset is not aligned to its dtype is read through safetensors
    instead."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            n = int.from_bytes(mm[:8], "little")
            header = json.loads(mm[8 : 8 + n])
            start = 8 + n
            self.layout = {k: (v["dtype"], tuple(int(d) for d in v["shape"]), start + int(v["data_offsets"][0]),
                               start + int(v["data_offsets"][1])) for k, v in header.items() if k != "__metadata__"}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            # the header was checked when the adapter was opened: the file changed since
            raise AdapterError(path, f"cannot map the file, or its header changed since it was opened: {e}") from e
        self.data = torch.frombuffer(mm, dtype=torch.uint8) if len(mm) else torch.zeros(0, dtype=torch.uint8)
        self._mm = mm
        self._typed: dict[torch.dtype, torch.Tensor] = {}  # the whole map as one dtype: a read is one view of it
        self._fallback = None
        self.finite: bool | None = None  # every tensor finite, by check_all_finite (None: not checked)

    def check_all_finite(self) -> bool:
        """Whether every tensor of the file is finite, taken once over the bytes they fill when they are all
        of one floating dtype and fill one aligned run of bytes (False when they are not laid out so: each is
        then checked as read). Kept in ``finite``."""
        if self.finite is None:
            spans = sorted((lo, hi) for _, _, lo, hi in self.layout.values())
            dtypes = {_SAFETENSORS_DTYPES.get(dt) for dt, *_ in self.layout.values()}
            self.finite = False
            if spans and len(dtypes) == 1 and None not in dtypes:
                (dtype,), lo, hi = dtypes, spans[0][0], spans[-1][1]
                gapless = all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
                aligned = not lo % dtype.itemsize and not (hi - lo) % dtype.itemsize
                if gapless and aligned and 0 <= lo <= hi <= self.data.numel():
                    self.finite = _all_finite(self.data[lo:hi].view(dtype))
        return self.finite

    def tensor(self, key: str) -> torch.Tensor:
        if key not in self.layout:
            raise AdapterError(self.path, "no such tensor in the file (it changed since it was opened)", key=key)
        dt, shape, lo, hi = self.layout[key]
        dtype = _SAFETENSORS_DTYPES.get(dt)
        if dtype is not None and lo % dtype.itemsize == 0:
            if not 0 <= lo <= hi <= self.data.numel() or hi - lo != math.prod(shape) * dtype.itemsize:
                raise AdapterError(self.path, f"tensor bytes {lo}..{hi} do not hold its {dt} shape {list(shape)} "
                                   f"within the file's {self.data.numel()} bytes", key=key)
            typed = self._typed.get(dtype)
            if typed is None:
                count = len(self._mm) // dtype.itemsize
                typed = self._typed[dtype] = torch.frombuffer(self._mm, dtype=dtype, count=count)
            return typed.as_strided(shape, _contiguous_strides(shape), lo // dtype.itemsize)
        try:
            if self._fallback is None:
                self._fallback = safe_open(str(self.path), framework="pt")
            return self._fallback.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterError(self.path, f"cannot read tensor: {e}", key=key) from e


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


def _safetensors_header(weights: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Every tensor's shape and dtype, from the header (safetensors validates it)."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118
            return ({k: tuple(sl.get_shape()) for k, sl in slices.items()},
                    {k: sl.get_dtype() for k, sl in slices.items()})
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(weights, f"not a valid safetensors file: {e}") from e


def _pair_modules(weights: Path, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str] | None
                  ) -> tuple[dict[str, LoraModule], list[str]]:
    """The LoRA modules (A and B paired by module path) and the other keys; with ``dtypes`` (None: not known,
    as for a plan from adapter_config.json alone), a LoRA factor of a dtype that is not floating point is
    refused."""
    halves: dict[str, dict[str, str]] = {}
    other: list[str] = []
    for key in shapes:
        parsed = parse_lora_key(key)
        if parsed is None:
            other.append(key)
            continue
        if dtypes is not None and dtypes[key] not in FLOAT_DTYPES:
            raise AdapterError(weights, f"dtype {dtypes[key]}: LoRA factors must be floating point "
                               f"({', '.join(sorted(FLOAT_DTYPES))})", key=key)
        halves.setdefault(parsed[0], {})[parsed[1]] = key
    modules: dict[str, LoraModule] = {}
    for path, ab in sorted(halves.items()):
        for need, have in (("B", "A"), ("A", "B")):
            if need not in ab:
                raise AdapterError(weights, f"lora_{have} has no lora_{need} partner", key=ab[have])
        a_shape, b_shape = shapes[ab["A"]], shapes[ab["B"]]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise AdapterError(
                weights, f"lora_A shape {a_shape} and lora_B shape {b_shape} do not form (r, d_in), (d_out, r)",
                key=ab["A"],
            )
        if 0 in a_shape or 0 in b_shape:
            raise AdapterError(weights, f"empty factor: lora_A {a_shape}, lora_B {b_shape} (rank and sizes must "
                               "be >= 1)", key=ab["A"])
        modules[path] = LoraModule(path, ab["A"], ab["B"], a_shape[0], a_shape[1], b_shape[0])
    if not modules:
        raise AdapterError(weights, "no lora_A/lora_B tensors found")
    return modules, other


def config_only_adapter(path: str | Path, module_shapes: Mapping[str, tuple[int, int]]) -> LoraAdapter:
    """An adapter described by its adapter_config.json alone (rank, target modules) with module shapes
    (d_in, d_out) taken from the base model's config: enough to plan and size a fusion, not to run one."""
    path = Path(path)
    config = validate_config(read_json(path / CONFIG_NAME), path / CONFIG_NAME)
    r = int(config.get("r", 8))
    shapes: dict[str, tuple[int, ...]] = {}
    for module, (d_in, d_out) in module_shapes.items():
        shapes[f"base_model.model.{module}.lora_A.weight"] = (r, d_in)
        shapes[f"base_model.model.{module}.lora_B.weight"] = (d_out, r)
    modules, other = _pair_modules(path / CONFIG_NAME, shapes, None)
    return LoraAdapter(path, config, path / CONFIG_NAME, shapes, modules, other, config_only=True)


def write_adapter(
    out_dir: str | Path, config: Mapping, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a PEFT adapter into an existing (temporary) directory."""
    out_dir = Path(out_dir)
    (out_dir / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True))
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(contiguous, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt", **(metadata or {})})
