"""Controls: what a trained run uses instead of the real sources. A control replaces a source adapter
everywhere it is read: in the update tokens the transfer networks see and in the teacher that answers the
``teach:`` prompts. A result is evidence that the sources matter only if it beats every control trained the
same way."""

from __future__ import annotations

import re
from enum import Enum

import torch

from hetero_ray.tokens.seeds import stable_seed


class Control(str, Enum):
    NONE = "none"  # the real source adapters
    ZERO_SOURCES = "zero_sources"  # every source update zero: zero tokens, the bare base as teacher
    RANDOM_SOURCES = "random_sources"  # Gaussian A and B with each module's Frobenius norms
    SPECTRUM_SOURCES = "spectrum_sources"  # each module's B A with its singular values, random singular vectors
    SHUFFLED_LAYERS = "shuffled_layers"  # each source's layers permuted (same tensors, wrong places)
    REPLAY_ONLY = "replay_only"  # no transfer networks, no teacher: the target's LoRA fine-tuned on the replay
    DISTILL_ONLY = "distill_only"  # no transfer networks: the target's LoRA trained on the same objective
    ADDED_RANK_ONLY = "added_rank_only"  # no transfer networks, the target's B kept: only the added rank trained
    # distill_only with its teacher replaced: the matched controls of the direct strategy (no tokens to replace)
    DISTILL_ZERO_SOURCES = "distill_zero_sources"
    DISTILL_RANDOM_SOURCES = "distill_random_sources"
    DISTILL_SPECTRUM_SOURCES = "distill_spectrum_sources"
    DISTILL_SHUFFLED_LAYERS = "distill_shuffled_layers"

    @property
    def reads_sources(self) -> bool:
        """Whether the run has source candidates (transfer networks) at all."""
        return self not in (Control.REPLAY_ONLY, Control.DISTILL_ONLY, Control.ADDED_RANK_ONLY, *_DISTILL_TEACHER)

    @property
    def teacher(self) -> Control:
        """What answers the teach: prompts: the control's replacement (``distill_X``: X's), or the real experts."""
        if self in _DISTILL_TEACHER:
            return _DISTILL_TEACHER[self]
        return self if self.reads_sources else Control.NONE

    @property
    def trains_target_b(self) -> bool:
        """Whether the target's B is trained (by the transfer networks' dB, or directly); ``added_rank_only``
        trains only the added rank."""
        return self is not Control.ADDED_RANK_ONLY

    @property
    def uses_teacher(self) -> bool:
        """Whether the run's objective keeps the terms that learn from the source experts' answers."""
        return self is not Control.REPLAY_ONLY


# distill_only's controls -> the control whose teacher they learn from
_DISTILL_TEACHER = {Control(f"distill_{c.value}"): c for c in (Control.ZERO_SOURCES, Control.RANDOM_SOURCES,
                                                                 Control.SPECTRUM_SOURCES, Control.SHUFFLED_LAYERS)}


def equal_norm_random(t: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(t.shape, generator=g, dtype=torch.float32)
    return r * (t.float().norm() / r.norm().clamp_min(1e-30))


def _random_orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def spectrum_matched(a: torch.Tensor, b: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A', B') whose product has the singular values of B A and random singular vectors."""
    sigma = torch.linalg.svdvals(b.double() @ a.double()).float()[: a.shape[0]]
    root = sigma.sqrt()
    u = _random_orthonormal(b.shape[0], a.shape[0], seed)
    v = _random_orthonormal(a.shape[1], a.shape[0], seed + 1)
    return root[:, None] * v.T, u * root[None, :]


_LAYER = re.compile(r"\.(\d+)\.")


def layer_permutation(paths: list[str], seed: int) -> dict[str, str]:
    """module path -> the path whose tensors it gets under ``shuffled_layers``: the layer indices (the first
    integer component of each path) permuted by a seeded derangement-if-possible, roles kept."""
    layers = sorted({int(m.group(1)) for p in paths if (m := _LAYER.search(p))})
    if len(layers) < 2:
        return {p: p for p in paths}
    g = torch.Generator().manual_seed(seed)
    perm = layers
    for _ in range(16):  # a permutation that moves every layer, when one is found quickly
        perm = [layers[i] for i in torch.randperm(len(layers), generator=g).tolist()]
        if all(x != y for x, y in zip(perm, layers, strict=True)):
            break
    to = dict(zip(layers, perm, strict=True))
    out = {}
    for p in paths:
        m = _LAYER.search(p)
        q = p if m is None else p[: m.start()] + f".{to[int(m.group(1))]}." + p[m.end():]
        out[p] = q if q in paths else p
    return out


def control_factors(adapter, path: str, control: Control, seed: int, source_id: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of module ``path`` of a source adapter as the control replaces them (unscaled B, PEFT shapes)."""
    if control is Control.ZERO_SOURCES:
        a, b = adapter.module_tensors(path)
        return torch.zeros(a.shape), torch.zeros(b.shape)
    if control is Control.SHUFFLED_LAYERS:
        path = layer_permutation(sorted(adapter.modules), stable_seed(seed, source_id, "layers"))[path]
    a, b = (t.float() for t in adapter.module_tensors(path))
    if control is Control.RANDOM_SOURCES:
        return (equal_norm_random(a, stable_seed(seed, source_id, path, "A")),
                equal_norm_random(b, stable_seed(seed, source_id, path, "B")))
    if control is Control.SPECTRUM_SOURCES:
        return spectrum_matched(a, b, stable_seed(seed, source_id, path, "spectrum") & 0xFFFFFFFF)
    return a, b
