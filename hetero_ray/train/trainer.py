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

from hetero_ray.denoise.fusion import (
    EXTRA,
    GroupInputs,
    group_diagnostics,
    group_rdm,
    module_deltas,
    rdm_generators,
)
from hetero_ray.io.export import EXTRA_A, EXTRA_B
from hetero_ray.spec import MethodSpec, TrainingSpec
from hetero_ray.train.objectives import active, answer_forward, cross_entropy, micro_loss
from hetero_ray.train.partition import by_group
from hetero_ray.train.replay import Example, collate
from hetero_ray.train.target import LoraDeltaPatch


def lm_loss(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens, with logits only at the positions that predict an
    answer token (the ``paper`` term on :func:`~hetero_ray.train.objectives.answer_forward`)."""
    return cross_entropy(answer_forward(model, batch))


def plan_windows(n_examples: int, training: TrainingSpec, seed: int) -> list[list[list[int]]]:
    """Optimizer steps as windows of micro-batches (lists of example indices).

    Each epoch is a seeded permutation; a window holds ``grad_accum`` micro-batches, which
    :func:`plan_steps` deals round-robin to the workers, so that 1 worker and N workers see the same data
    per step.
    """
    micro = []
    for epoch in range(training.epochs):
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        micro += [order[i : i + training.batch_size] for i in range(0, n_examples, training.batch_size)]
    windows = [micro[i : i + training.grad_accum] for i in range(0, len(micro), training.grad_accum)]
    if training.max_steps:
        windows = windows[: training.max_steps]
    return windows


@dataclass
class Step:
    """One optimizer step's micro-batches: replay example indices and teacher example indices."""

    replay: list[list[int]]
    teacher: list[list[int]]
    index: int = 0  # the optimizer step (its RDM draws depend on it)
    world: int = 1  # workers sharing the window
    replay_micro: int | None = None  # micro-batches of each kind in the whole window, every worker's
    teacher_micro: int | None = None

    def scale(self, kind: str) -> float:
        """What each of this worker's micro-batch losses of ``kind`` is divided by, so that averaging the
        workers' gradients (DeepSpeed's data-parallel mean, or the exchange's) gives the mean over the whole
        window's micro-batches, however unevenly they were dealt (a worker may have none)."""
        total = self.replay_micro if kind == "replay" else self.teacher_micro
        mine = len(self.replay if kind == "replay" else self.teacher)
        return (total / self.world if total is not None else mine) or 1.0


def plan_steps(n_replay: int, n_teacher: int, training: TrainingSpec, seed: int, rank: int = 0, world: int = 1
               ) -> list[Step]:
    """Windows over the replay and over the teacher examples (either may be absent: 0 examples), each planned
    by :func:`plan_windows`; the run takes as many steps as the longer plan, cycling the shorter one."""
    replay = plan_windows(n_replay, training, seed) if n_replay else []
    teacher = plan_windows(n_teacher, training, seed + 7919) if n_teacher else []
    n = max(len(replay), len(teacher))
    if training.max_steps:
        n = min(n, training.max_steps)
    steps = []
    for i in range(n):
        r = replay[i % len(replay)] if replay else []
        t = teacher[i % len(teacher)] if teacher else []
        steps.append(Step(r[rank::world], t[rank::world], i, world, len(r), len(t)))
    return steps


class FusionObjective:
    """The objective's weighted terms (:mod:`hetero_ray.train.objectives`) of the patched target on replay and
    teacher micro-batches, + paper weight * lambda * RDM, one window at a time.

    With an ``exchange`` (:class:`~hetero_ray.train.partition.GroupExchange`) this worker's ``groups`` are its
    own share of ``n_groups``: dB and the modules' gradients are exchanged with the other owners, and the
    surrogate carries only this worker's nets (see :mod:`hetero_ray.train.partition`). ``extra_modules``:
    modules patched besides the groups' own (every fused module, under an exchange)."""

    def __init__(self, model, groups: Mapping[str, GroupInputs], method: MethodSpec,
                 examples: Sequence[Example], pad_id: int, seed: int,
                 weights: Mapping[str, float] | None = None, teacher: Sequence[Example] = (),
                 extra_modules: Sequence[str] = (), exchange=None, n_groups: int | None = None):
        self.model = model
        self.groups = dict(groups)
        self.method = method
        self.examples = examples
        self.teacher = list(teacher)
        self.pad_id = pad_id
        self.seed = seed
        self.exchange = exchange
        self.n_groups = n_groups
        self.weights = dict(weights or {"paper": 1.0})
        self.replay_terms = active(self.weights, "replay")
        self.teacher_terms = active(self.weights, "teacher")
        modules = sorted({p for g in self.groups.values() for p in g.modules} | set(extra_modules))
        self.patch = LoraDeltaPatch(model, modules)

    def steps(self, training: TrainingSpec, seed: int, rank: int = 0, world: int = 1) -> list[Step]:
        return plan_steps(len(self.examples) if self.replay_terms else 0,
                          len(self.teacher) if self.teacher_terms else 0, training, seed, rank, world)

    def window(self, net: nn.Module, step: Step | Sequence[Sequence[int]]) -> tuple[torch.Tensor, dict]:
        """Forward the net once, accumulate the terms' gradients over the micro-batches, return the surrogate
        loss to back-propagate into ``net`` and this window's metrics (each kind's losses averaged over the
        whole window's micro-batches of that kind, see :meth:`Step.scale`)."""
        if not isinstance(step, Step):
            step = Step(list(step), [])
        t0 = time.perf_counter()
        outputs = net(self.groups)
        extra = outputs.pop(EXTRA, {})
        deltas = module_deltas(outputs, self.groups)
        every, every_extra = self._everyone(deltas, extra)
        leaves = {p: d.detach().requires_grad_(True) for p, d in every.items()}
        extra_leaves = {p: (a.detach().requires_grad_(True), b.detach().requires_grad_(True))
                        for p, (a, b) in every_extra.items()}
        t1 = time.perf_counter()
        self.patch.set(leaves, extra_leaves)
        totals: dict[str, list[float]] = {}  # term -> [sum over micro-batches, micro-batches]
        for kind, micro, data, terms in (("replay", step.replay, self.examples, self.replay_terms),
                                         ("teacher", step.teacher, self.teacher, self.teacher_terms)):
            denom = step.scale(kind)
            for idx in micro:
                loss, values = micro_loss(self.model, collate([data[i] for i in idx], self.pad_id), terms,
                                          self.patch.off)
                (loss / denom).backward()
                for n, v in values.items():
                    totals.setdefault(n, [0.0, 0])
                    totals[n][0] += v
                    totals[n][1] += 1
        self.patch.clear()
        t2 = time.perf_counter()
        lam = self.method.lambda_reg * self.weights.get("paper", 0.0)
        reg = group_rdm(outputs, self.groups, rdm_generators(self.seed, step.index, self.groups),
                        self.method.mu_target, self.method.sigma_target, self.method.num_projections,
                        self.method.rdm_max_samples, self.method.rdm_sort_budget,
                        self.n_groups, self.method.rdm_directions) if lam > 0 else torch.zeros(())
        t3 = time.perf_counter()
        grads = {p: leaf.grad for p, leaf in leaves.items()}
        grads.update({k: g for p, (la, lb) in extra_leaves.items() for k, g in ((f"{EXTRA_A}{p}", la.grad),
                                                                                 (f"{EXTRA_B}{p}", lb.grad))})
        if self.exchange is not None:  # the mean over workers, as DeepSpeed averages replicated nets' grads
            grads = self.exchange.average(grads, self._like(deltas, extra))
        # a worker without micro-batches this window (and no RDM) still back-propagates: zeros, with a graph
        # (and every one of its parameters gets a gradient, as DeepSpeed's ZeRO buckets expect on every rank)
        surrogate = (lam * reg + sum(0.0 * d.sum() for d in deltas.values())
                     + sum(0.0 * (a.sum() + b.sum()) for a, b in extra.values()))
        for p, d in deltas.items():
            if grads.get(p) is not None:
                surrogate = surrogate + (d * grads[p]).sum()
        for p, (a, b) in extra.items():
            if grads.get(f"{EXTRA_A}{p}") is not None:
                surrogate = surrogate + (a * grads[f"{EXTRA_A}{p}"]).sum() + (b * grads[f"{EXTRA_B}{p}"]).sum()
        t4 = time.perf_counter()
        per_group = {"rdm": float(reg.detach()), **group_diagnostics(outputs)}
        if self.exchange is not None:  # the whole window's losses, every group's diagnostics
            parts = self.exchange.merge({**per_group, "totals": totals})
            per_group = {"rdm": sum(p["rdm"] for p in parts), **by_group(parts, ("alpha", "gate_open"))}
            totals = {}
            for part in parts:
                for n, (v, c) in part["totals"].items():
                    total = totals.setdefault(n, [0.0, 0])
                    total[0] += v
                    total[1] += c
        sums = {n: v / c for n, (v, c) in totals.items()}
        metrics = {
            "lm_loss": sums.get("paper", sums.get("distill", 0.0)),
            "terms": sums,
            **per_group,
            # the step's parts (seconds); the caller adds the nets' backward and the optimizer step
            # (:func:`time_step`), after which ``time_net_s`` is the nets' whole share of the step
            "time_nets_forward_s": (t1 - t0) + (t4 - t3),
            "time_target_s": t2 - t1,  # the frozen target's forward and backward, every micro-batch
            "time_rdm_s": t3 - t2,
        }
        return surrogate, metrics

    @staticmethod
    def _like(deltas: Mapping[str, torch.Tensor], extra) -> torch.Tensor:
        """A tensor with the dtype and device of this worker's updates (for the exchange's buffers)."""
        return next(iter([*deltas.values(), *(a for a, _ in extra.values())]), torch.zeros(()))

    def _everyone(self, deltas, extra):
        """Every module's update: this worker's own, or, under an exchange, everyone's gathered."""
        if self.exchange is None:
            return deltas, extra
        parts = dict(deltas)
        for p, (a, b) in extra.items():
            parts[f"{EXTRA_A}{p}"], parts[f"{EXTRA_B}{p}"] = a, b
        full = self.exchange.gather(parts, self._like(deltas, extra))
        every = {p: t for p, t in full.items() if not p.startswith((EXTRA_A, EXTRA_B))}
        every_extra = {p[len(EXTRA_A):]: (t, full[f"{EXTRA_B}{p[len(EXTRA_A):]}"]) for p, t in full.items()
                       if p.startswith(EXTRA_A)}
        return every, every_extra

    @torch.no_grad()
    def final_deltas(self, net: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
        """The trained B updates per module (added-rank factors under ``EXTRA_A:``/``EXTRA_B:`` + module path),
        and the net's outputs (without the added rank; this worker's groups only, under an exchange)."""
        outputs = net(self.groups)
        extra = outputs.pop(EXTRA, {})
        every, every_extra = self._everyone(module_deltas(outputs, self.groups), extra)
        deltas = {p: d.detach().float().cpu() for p, d in every.items()}
        for p, (a, b) in every_extra.items():
            deltas[f"{EXTRA_A}{p}"] = a.detach().float().cpu()
            deltas[f"{EXTRA_B}{p}"] = b.detach().float().cpu()
        return deltas, outputs


def clip_over_owners(params: Sequence[torch.Tensor], max_norm: float, exchange) -> float:
    """Clip every owner's gradients by their global norm (as one process holding every net would)."""
    local = sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None)
    norm = sum(part["sq"] for part in exchange.merge({"sq": local})) ** 0.5  # one gather, every owner's part
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


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
    rank: int = 0,
    world: int = 1,
) -> list[dict]:
    """Train ``net`` in this process (torch AdamW, cosine schedule with warm-up); returns per-step metrics.
    With ``world`` > 1 the objective has an exchange and this process is owner ``rank``: it takes its share
    of each window and clips by the norm over every owner's gradients (torch.distributed, no DeepSpeed)."""
    windows = objective.steps(training, seed, rank, world)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=training.lr, weight_decay=training.weight_decay)
    scheduler = cosine_schedule(optimizer, len(windows), training.warmup_ratio)
    history = []
    for step, window in enumerate(windows):
        surrogate, metrics = objective.window(net, window)
        t0 = time.perf_counter()
        surrogate.backward()
        t1 = time.perf_counter()
        if training.max_grad_norm and objective.exchange is not None:
            clip_over_owners(params, training.max_grad_norm, objective.exchange)
        elif training.max_grad_norm:
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
