"""The fusion objective and a single-process trainer. The distributed aggregator drives the same
:class:`FusionObjective` under DeepSpeed; nothing here knows about Ray.

dB changes only at optimizer steps, so it is computed once per accumulation window: the micro-batches
back-propagate into a detached copy of each module's update (a leaf), and one surrogate backward
sum(dB * grad_leaf) + lambda * RDM carries the summed gradient into the transfer networks. This is exactly
the gradient of the accumulated loss, at one transfer-net forward and backward per window.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hetero_ray.denoise.fusion import EXTRA, GroupInputs, group_rdm, module_deltas
from hetero_ray.io.export import EXTRA_A, EXTRA_B
from hetero_ray.spec import MethodSpec, TrainingSpec
from hetero_ray.train.objectives import active, answer_forward, cross_entropy, micro_loss
from hetero_ray.train.replay import Example, collate
from hetero_ray.train.target import LoraDeltaPatch


def lm_loss(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens, with logits only at the positions that predict an
    answer token (the ``paper`` term on :func:`~hetero_ray.train.objectives.answer_forward`)."""
    return cross_entropy(answer_forward(model, batch))


def plan_windows(
    n_examples: int, training: TrainingSpec, seed: int, rank: int = 0, world: int = 1
) -> list[list[list[int]]]:
    """Optimizer steps as windows of micro-batches (lists of example indices), this worker's share.

    Each epoch is a seeded permutation; a window holds ``grad_accum`` micro-batches globally, dealt
    round-robin to ``world`` workers, so that 1 worker and N workers see the same data per step.
    """
    micro = []
    for epoch in range(training.epochs):
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        micro += [order[i : i + training.batch_size] for i in range(0, n_examples, training.batch_size)]
    windows = [micro[i : i + training.grad_accum] for i in range(0, len(micro), training.grad_accum)]
    if training.max_steps:
        windows = windows[: training.max_steps]
    return [w[rank::world] for w in windows]


@dataclass
class Step:
    """One optimizer step's micro-batches: replay example indices and teacher example indices."""

    replay: list[list[int]]
    teacher: list[list[int]]


def plan_steps(n_replay: int, n_teacher: int, training: TrainingSpec, seed: int, rank: int = 0, world: int = 1
               ) -> list[Step]:
    """Windows over the replay and over the teacher examples (either may be absent: 0 examples), each planned
    by :func:`plan_windows`; the run takes as many steps as the longer plan, cycling the shorter one."""
    replay = plan_windows(n_replay, training, seed, rank, world) if n_replay else []
    teacher = plan_windows(n_teacher, training, seed + 7919, rank, world) if n_teacher else []
    n = max(len(replay), len(teacher))
    if training.max_steps:
        n = min(n, training.max_steps)
    return [Step(replay[i % len(replay)] if replay else [], teacher[i % len(teacher)] if teacher else [])
            for i in range(n)]


class FusionObjective:
    """The objective's weighted terms (:mod:`hetero_ray.train.objectives`) of the patched target on replay and
    teacher micro-batches, + paper weight * lambda * RDM, one window at a time."""

    def __init__(self, model, groups: Mapping[str, GroupInputs], method: MethodSpec,
                 examples: Sequence[Example], pad_id: int, generator: torch.Generator,
                 weights: Mapping[str, float] | None = None, teacher: Sequence[Example] = (),
                 extra_modules: Sequence[str] = ()):
        self.model = model
        self.groups = dict(groups)
        self.method = method
        self.examples = examples
        self.teacher = list(teacher)
        self.pad_id = pad_id
        self.generator = generator
        self.weights = dict(weights or {"paper": 1.0})
        self.replay_terms = active(self.weights, "replay")
        self.teacher_terms = active(self.weights, "teacher")
        modules = sorted({p for g in self.groups.values() for p in g.modules} | set(extra_modules))
        self.patch = LoraDeltaPatch(model, modules)

    def steps(self, training: TrainingSpec, seed: int, rank: int = 0, world: int = 1) -> list[Step]:
        return plan_steps(len(self.examples) if self.replay_terms else 0,
                          len(self.teacher) if self.teacher_terms else 0, training, seed, rank, world)

    def window(self, net: nn.Module, step: Step | Sequence[Sequence[int]],
               world_micro: int | None = None) -> tuple[torch.Tensor, dict]:
        """Forward the net once, accumulate the terms' gradients over the micro-batches, return the surrogate
        loss to back-propagate into ``net`` and this window's metrics. ``world_micro``: micro-batches of each
        kind in the window across all workers (each kind's losses are averaged over it)."""
        if not isinstance(step, Step):
            step = Step(list(step), [])
        t0 = time.perf_counter()
        outputs = net(self.groups)
        extra = outputs.pop(EXTRA, {})
        deltas = module_deltas(outputs, self.groups)
        leaves = {p: d.detach().requires_grad_(True) for p, d in deltas.items()}
        extra_leaves = {p: (a.detach().requires_grad_(True), b.detach().requires_grad_(True))
                        for p, (a, b) in extra.items()}
        t1 = time.perf_counter()
        self.patch.set(leaves, extra_leaves)
        sums: dict[str, float] = {}
        for micro, data, terms in ((step.replay, self.examples, self.replay_terms),
                                   (step.teacher, self.teacher, self.teacher_terms)):
            denom = world_micro or max(len(micro), 1)
            for idx in micro:
                loss, values = micro_loss(self.model, collate([data[i] for i in idx], self.pad_id), terms,
                                          self.patch.off)
                (loss / denom).backward()
                for n, v in values.items():
                    sums[n] = sums.get(n, 0.0) + v / max(len(micro), 1)
        self.patch.clear()
        t2 = time.perf_counter()
        lam = self.method.lambda_reg * self.weights.get("paper", 0.0)
        reg = group_rdm(outputs, self.groups, self.generator, self.method.mu_target, self.method.sigma_target,
                        self.method.num_projections, self.method.rdm_max_samples,
                        self.method.rdm_sort_budget) if lam > 0 else torch.zeros(())
        t3 = time.perf_counter()
        surrogate = lam * reg
        for p, d in deltas.items():
            if leaves[p].grad is not None:
                surrogate = surrogate + (d * leaves[p].grad).sum()
        for p, (a, b) in extra.items():
            la, lb = extra_leaves[p]
            if la.grad is not None:
                surrogate = surrogate + (a * la.grad).sum() + (b * lb.grad).sum()
        t4 = time.perf_counter()
        metrics = {
            "lm_loss": sums.get("paper", sums.get("distill", 0.0)),
            "terms": sums,
            "rdm": float(reg.detach()),
            "alpha": {g: float(o["alpha"]) for g, o in outputs.items()},
            "gate_open": {g: float(o["gate_open"]) for g, o in outputs.items() if "gate_open" in o},
            # the step's parts (seconds); the caller adds the nets' backward and the optimizer step
            # (:func:`time_step`), after which ``time_net_s`` is the nets' whole share of the step
            "time_nets_forward_s": (t1 - t0) + (t4 - t3),
            "time_target_s": t2 - t1,  # the frozen target's forward and backward, every micro-batch
            "time_rdm_s": t3 - t2,
        }
        return surrogate, metrics

    @torch.no_grad()
    def final_deltas(self, net: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
        """The trained B updates per module (added-rank factors under ``EXTRA_A:``/``EXTRA_B:`` + module path),
        and the net's outputs (without the added rank)."""
        outputs = net(self.groups)
        extra = outputs.pop(EXTRA, {})
        deltas = {p: d.detach().float().cpu() for p, d in module_deltas(outputs, self.groups).items()}
        for p, (a, b) in extra.items():
            deltas[f"{EXTRA_A}{p}"] = a.detach().float().cpu()
            deltas[f"{EXTRA_B}{p}"] = b.detach().float().cpu()
        return deltas, outputs


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine decay to zero."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * total_steps), total_steps)


def time_step(metrics: dict, nets_backward_s: float, optimizer_s: float) -> dict:
    """Complete a window's timings with the nets' backward and the optimizer step: ``time_net_s`` is then
    everything the transfer networks cost (forward, RDM, backward, optimizer) and ``time_step_s`` the step."""
    metrics["time_nets_backward_s"] = nets_backward_s
    metrics["time_optimizer_s"] = optimizer_s
    metrics["time_net_s"] = (metrics["time_nets_forward_s"] + metrics["time_rdm_s"] + nets_backward_s
                             + optimizer_s)
    metrics["time_step_s"] = metrics["time_net_s"] + metrics["time_target_s"]
    return metrics


def fit(
    net: nn.Module,
    objective: FusionObjective,
    training: TrainingSpec,
    seed: int,
    on_step: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train ``net`` in this process (torch AdamW, cosine schedule with warm-up); returns per-step metrics."""
    windows = objective.steps(training, seed)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=training.lr, weight_decay=training.weight_decay)
    scheduler = cosine_schedule(optimizer, len(windows), training.warmup_ratio)
    history = []
    for step, window in enumerate(windows):
        surrogate, metrics = objective.window(net, window)
        t0 = time.perf_counter()
        surrogate.backward()
        t1 = time.perf_counter()
        if training.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, training.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        time_step(metrics, t1 - t0, time.perf_counter() - t1)
        metrics.update(step=step + 1, total_steps=len(windows), lr=scheduler.get_last_lr()[0])
        history.append(metrics)
        if on_step:
            on_step(metrics)
    return history
