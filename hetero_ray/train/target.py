"""The frozen target: base causal LM + target LoRA adapter, and the additive delta on its LoRA path.

The fused update is applied as an extra term on the LoRA path, s * (B_t + alpha dB) A_t x, through a forward
hook on each ``lora_B`` module (its input is A_t x after dropout, and PEFT multiplies its output by s).
No parameter is swapped or reassigned, so the same code is valid when the trained transfer networks are
partitioned by DeepSpeed ZeRO-3.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from hetero_ray.errors import AdapterError, HeteroRayError
from hetero_ray.io.adapters import LoraAdapter


def load_base_model(base: str | Path, dtype: torch.dtype = torch.float32):
    """A causal LM from a local HF directory (config.json + weights); never downloads."""
    from transformers import AutoModelForCausalLM

    check_base_dir(base)
    return AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype, local_files_only=True)


def check_base_dir(base: str | Path, field: str = "base model") -> None:
    """A local HF model directory with config.json and safetensors weights (the only weights hetero-ray reads)."""
    base = Path(base)
    if not (base / "config.json").is_file():
        raise HeteroRayError(f"{field}: {base}: not a local model directory (no config.json)")
    if not any(base.glob("*.safetensors")):
        others = sorted(p.name for p in base.glob("*.bin")) + sorted(p.name for p in base.glob("*.pt"))
        raise HeteroRayError(f"{field}: {base}: no *.safetensors weights" + (
            f" (found {', '.join(others)}: pickled weights are not read; convert them to safetensors)" if others
            else "; the directory holds a config without a model"))


def load_target(base: str | Path, adapter: LoraAdapter, dtype: torch.dtype = torch.float32):
    """Base model + target adapter, frozen and in eval mode. Every adapter module must exist in the base."""
    from peft import PeftModel

    model = load_base_model(base, dtype)
    names = dict(model.named_modules())
    for path, m in adapter.modules.items():
        if path not in names:
            raise AdapterError(adapter.weights_path, f"target module {path!r} is missing in the base model {base}",
                               key=m.b_key)
    model = PeftModel.from_pretrained(model, str(adapter.path), is_trainable=False, local_files_only=True)
    model.eval()
    model.requires_grad_(False)
    return model


class LoraDeltaPatch:
    """Adds F.linear(A_t x, delta) to the output of selected ``lora_B`` modules, and with added rank
    F.linear(F.linear(x, A_new), B_new) (x: the input of ``lora_A``), both scaled by PEFT's s like B_t.
    ``set`` swaps the deltas; ``off()`` runs the target as it was (base + target adapter)."""

    def __init__(self, peft_model, module_paths: list[str], adapter_name: str = "default"):
        inner = peft_model.base_model.model
        self._deltas: dict[str, torch.Tensor] = {}
        self._extra: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._inputs: dict[str, torch.Tensor] = {}
        self._off = False
        self._handles = []
        for path in module_paths:
            layer = inner.get_submodule(path)
            if not hasattr(layer, "lora_B") or adapter_name not in layer.lora_B:
                raise HeteroRayError(f"module {path} has no LoRA adapter {adapter_name!r} in the target model")
            self._handles.append(layer.lora_A[adapter_name].register_forward_hook(self._keep_input(path)))
            self._handles.append(layer.lora_B[adapter_name].register_forward_hook(self._hook(path)))

    def _keep_input(self, path: str):
        def hook(module, args, output):
            if path in self._extra and not self._off:
                self._inputs[path] = args[0]

        return hook

    def _hook(self, path: str):
        def hook(module, args, output):
            if self._off:
                return output
            delta = self._deltas.get(path)
            if delta is not None:
                output = output + F.linear(args[0], delta.to(args[0].dtype))
            if path in self._extra:
                a, b = self._extra[path]
                x = self._inputs.pop(path)
                output = output + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))
            return output

        return hook

    def set(self, deltas: Mapping[str, torch.Tensor],
            extra: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self._deltas = dict(deltas)
        self._extra = dict(extra or {})

    def clear(self) -> None:
        self._deltas, self._extra, self._inputs = {}, {}, {}

    @contextmanager
    def off(self):
        """The target without the fused update (the reference of the ``retain`` and ``excess`` terms)."""
        self._off = True
        try:
            yield
        finally:
            self._off = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
