"""Read and write PEFT LoRA adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``).

Tensors are read lazily: shapes come from the safetensors header, data only when a key is asked for.
Pickled ``adapter_model.bin`` files are refused unless the caller opts in, because unpickling can run
arbitrary code; with the opt-in they are loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hetero_ray.errors import AdapterError, HeteroRayError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# base_model.model.<module path>.lora_A[.<adapter name>].weight
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


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
        r = int(self.config.get("r", 8))
        alpha = float(self.config.get("lora_alpha", r))
        return alpha / (r**0.5) if self.config.get("use_rslora") else alpha / r

    @property
    def base_model_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def tensor(self, key: str) -> torch.Tensor:
        """Read one tensor, checking that it is finite. Raises AdapterError naming file and key."""
        if key in self._cache:
            return self._cache[key]
        if key not in self.shapes:
            raise AdapterError(self.weights_path, "no such tensor", key=key)
        if self.config_only:
            raise AdapterError(self.path, "planned from adapter_config.json alone: it has no weights", key=key)
        if self.pickled:
            t = self._load_pickled()[key]
        else:
            try:
                if self._handle is None:  # one memory-mapped handle for all reads of this file
                    self._handle = safe_open(str(self.weights_path), framework="pt")
                t = self._handle.get_tensor(key)
            except (SafetensorError, OSError, ValueError) as e:
                raise AdapterError(self.weights_path, f"cannot read tensor: {e}", key=key) from e
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise AdapterError(self.weights_path, f"{bad} non-finite values (NaN/Inf)", key=key)
        return t

    def __getstate__(self) -> dict:  # the file handle does not travel between processes
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
                self._cache.update(torch.load(self.weights_path, map_location="cpu", weights_only=True))
            except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
                raise AdapterError(self.weights_path, f"cannot load with weights_only=True: {e}") from e
        return self._cache


def read_adapter(path: str | Path, allow_pickle: bool = False) -> LoraAdapter:
    """Open a PEFT LoRA adapter directory lazily and validate its structure (not yet its values)."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(path, "adapter directory not found")
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(path, f"missing {CONFIG_NAME}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(config_path, f"invalid JSON: {e}") from e
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(config_path, f"peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    if config.get("use_dora"):
        raise AdapterError(config_path, "DoRA adapters (use_dora: true) are not supported")

    weights = path / WEIGHTS_NAME
    pickled = False
    if weights.is_file():
        shapes = _safetensors_shapes(weights)
    elif (path / PICKLE_NAME).is_file():
        weights, pickled = path / PICKLE_NAME, True
        if not allow_pickle:
            raise AdapterError(
                weights,
                "pickled weights are refused by default because unpickling can execute code; convert the "
                "adapter to safetensors, or opt in (spec `allow_pickle: true`, CLI `--allow-pickle`) to "
                "load it with torch.load(weights_only=True)",
            )
        adapter = LoraAdapter(path, config, weights, {}, {}, [], pickled=True)
        shapes = {k: tuple(v.shape) for k, v in adapter._load_pickled().items()}
    else:
        raise AdapterError(path, f"no {WEIGHTS_NAME} (or {PICKLE_NAME})")

    modules, other = _pair_modules(weights, shapes)
    adapter = LoraAdapter(path, config, weights, shapes, modules, other, pickled=pickled)
    if pickled:
        adapter._load_pickled()
    return adapter


def _safetensors_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(weights, f"not a valid safetensors file: {e}") from e


def _pair_modules(weights: Path, shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, LoraModule], list[str]]:
    halves: dict[str, dict[str, str]] = {}
    other: list[str] = []
    for key in shapes:
        parsed = parse_lora_key(key)
        if parsed is None:
            other.append(key)
            continue
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
        modules[path] = LoraModule(path, ab["A"], ab["B"], a_shape[0], a_shape[1], b_shape[0])
    if not modules:
        raise AdapterError(weights, "no lora_A/lora_B tensors found")
    return modules, other


def config_only_adapter(path: str | Path, module_shapes: Mapping[str, tuple[int, int]]) -> LoraAdapter:
    """An adapter described by its adapter_config.json alone (rank, target modules) with module shapes
    (d_in, d_out) taken from the base model's config: enough to plan and size a fusion, not to run one."""
    path = Path(path)
    config = json.loads((path / CONFIG_NAME).read_text())
    r = int(config.get("r", 8))
    shapes: dict[str, tuple[int, ...]] = {}
    for module, (d_in, d_out) in module_shapes.items():
        shapes[f"base_model.model.{module}.lora_A.weight"] = (r, d_in)
        shapes[f"base_model.model.{module}.lora_B.weight"] = (d_out, r)
    modules, other = _pair_modules(path / CONFIG_NAME, shapes)
    return LoraAdapter(path, config, path / CONFIG_NAME, shapes, modules, other, config_only=True)


@contextlib.contextmanager
def atomic_output_dir(dest: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; rename it into place only if the block succeeds.

    On any exception the temporary directory is removed, so nothing partial is left at ``dest``.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise HeteroRayError(f"{dest}: output already exists (use --overwrite)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_adapter(
    out_dir: str | Path, config: Mapping, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a PEFT adapter into an existing (temporary) directory."""
    out_dir = Path(out_dir)
    (out_dir / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True))
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(contiguous, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt", **(metadata or {})})
