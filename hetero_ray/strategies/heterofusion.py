"""HeteroFusion and its controls: one trained strategy, run with a :class:`~hetero_ray.controls.Control`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hetero_ray.controls import Control
from hetero_ray.spec import FusionSpec
from hetero_ray.strategies import Strategy, register


class HeteroFusion(Strategy):
    """Transfer networks over the aligned source updates, trained on the replay (the spec's ``method`` and
    ``training`` sections); on Ray + DeepSpeed, or in this process (``use_ray=False``)."""

    kind = "trained"

    def __init__(self, name: str, control: Control, description: str):
        self.name, self.control, self.description = name, control, description

    def run(self, spec: FusionSpec, address: str | None, use_ray: bool,
            on_progress: Callable[[dict], None] | None) -> Path:
        from hetero_ray.train.target import check_base_dir

        check_base_dir(spec.target.base, "target.base")
        if use_ray:
            from hetero_ray.runners.ray.driver import fuse

            return fuse(spec, address, on_progress=on_progress).output
        from hetero_ray.runners.local import fuse_local

        on_step = (lambda m: on_progress({"stage": "train", **m})) if on_progress else None
        return fuse_local(spec, on_step=on_step).output


for _name, _control, _desc in [
    ("heterofusion", Control.NONE, "transfer networks over aligned source updates, conflict-aware (the method)"),
    ("zero_sources", Control.ZERO_SOURCES, "control: HeteroFusion with every source token zeroed"),
    ("random_sources", Control.RANDOM_SOURCES, "control: HeteroFusion with Gaussian sources of equal norm"),
    ("spectrum_sources", Control.SPECTRUM_SOURCES,
     "control: each source module's singular values with random singular vectors (tokens and teacher)"),
    ("shuffled_layers", Control.SHUFFLED_LAYERS, "control: each source's layers permuted (tokens and teacher)"),
    ("replay_only", Control.REPLAY_ONLY, "control: the target's LoRA fine-tuned on the replay terms, same steps"),
    ("distill_only", Control.DISTILL_ONLY, "baseline: the target's LoRA trained on the same objective (teacher "
     "included), no transfer networks"),
    ("added_rank_only", Control.ADDED_RANK_ONLY, "baseline: only the added rank (method.extra_rank) trained on the "
     "same objective, the target's B kept (heterofusion without its transfer networks)"),
    ("distill_zero_sources", Control.DISTILL_ZERO_SOURCES,
     "control: distill_only taught by the bare source base (the zero_sources teacher)"),
    ("distill_random_sources", Control.DISTILL_RANDOM_SOURCES, "control: distill_only taught by the source base "
     "with a random adapter of equal norm (the random_sources teacher)"),
    ("distill_spectrum_sources", Control.DISTILL_SPECTRUM_SOURCES, "control: distill_only taught by the source "
     "adapter's singular values with random singular vectors (the spectrum_sources teacher)"),
    ("distill_shuffled_layers", Control.DISTILL_SHUFFLED_LAYERS,
     "control: distill_only taught by the source adapter with its layers permuted (the shuffled_layers teacher)"),
]:
    register(HeteroFusion(_name, _control, _desc))
