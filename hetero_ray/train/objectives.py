"""The training objective as weighted terms from a registry (the spec's ``objective: {term: weight}``).

Each term is a mean over its own tokens or chunks (so terms of different data are comparable; under
``teach.balance: sources`` a weighted mean of per-example means, below), computed on one
micro-batch of its data with the fused update applied; ``reference`` log-probabilities come from the same
model with the fused update switched off (the target as it was: base + target adapter).

- ``paper``: next-token cross-entropy on the replay answers (the authors' loss; RDM rides on it, weighted by
  ``method.lambda_reg`` times this term's weight).
- ``retain``: KL(target-only || fused) over the replay answer positions: keeps the target's own behaviour,
  no labels needed.
- ``distill``: cross-entropy on the source experts' own answers to the ``teach:`` prompts (sequence-level
  distillation across tokenizers: the answer text is re-tokenized for the target).
- ``excess``: on chunks whose boundaries agree in both tokenizations, the fused model's log-probability gain
  over the target-only model matches the source expert's gain over its bare base (smooth L1, per chunk).

Per-task normalisation: the replay terms and the teacher terms are each a mean over their own data, so the
target's task and the sources' weigh as their weights say. Among sources, ``teach.balance: sources`` makes
the teacher terms weigh every source alike: each example's own mean, weighted by its source's share (the
batch's ``weights`` for ``distill``, ``chunk_weights`` for ``excess``: see
:func:`hetero_ray.teach.signals.teacher_examples`). The balance holds in expectation over an epoch; a
micro-batch of a rare source's examples weighs more (clip with ``training.max_grad_norm`` where sources are
very unequal). The default weighs every answer token of a micro-batch alike, so a source with more prompts or
longer answers weighs more.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hetero_ray.errors import SpecError
from hetero_ray.registry import Registry
from hetero_ray.train.replay import IGNORE, chunks_within


@dataclass(frozen=True)
class Term:
    name: str
    description: str
    data: str  # "replay" or "teacher": which micro-batches the term reads
    needs_teacher: bool
    needs_reference: str | None  # None, "logits" (full distributions) or "logprobs" (of the answer tokens)
    fn: Callable[..., torch.Tensor]


OBJECTIVES: Registry[Term] = Registry("objective term", SpecError)


def register(term: Term) -> Term:
    return OBJECTIVES.add(term.name, term)


@dataclass
class Forward:
    """One forward pass over the answer-predicting positions of a micro-batch."""

    logits: torch.Tensor  # (B, P, V) at the kept positions
    targets: torch.Tensor  # (B, P) next tokens, IGNORE where not an answer token
    positions: torch.Tensor  # (P,) positions that predict an answer token

    def token_logprobs(self) -> torch.Tensor:
        """(B, P) log p(target token), 0 where IGNORE."""
        logp = self.logits.log_softmax(-1)
        safe = self.targets.clamp_min(0)
        return logp.gather(-1, safe[..., None])[..., 0] * (self.targets != IGNORE)


def answer_forward(model, batch: Mapping[str, torch.Tensor]) -> Forward:
    """Logits only at the positions that predict an answer token (not over the vocabulary everywhere)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    targets = batch["labels"][:, 1:]
    positions = torch.nonzero((targets != IGNORE).any(dim=0)).flatten()
    if positions.numel() == 0:
        raise ValueError("a training batch has no answer tokens")
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=positions)
    return Forward(out.logits.float(), targets[:, positions], positions)


def _weighted(per_example: torch.Tensor, present: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i x_i over the examples present, divided by their count: under ``teach.balance: sources`` the
    weights average 1 over the teacher set, so each source weighs the same in expectation."""
    w = weights.to(per_example) * present
    return (w * per_example).sum() / present.sum().clamp_min(1)


def cross_entropy(fwd: Forward, ref: Forward | None = None, batch: Mapping | None = None) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (the ``paper`` and ``distill`` terms). With per-example
    ``weights`` in the batch: each example's own token mean, weighted (see :func:`_weighted`)."""
    if batch is None or "weights" not in batch:
        return F.cross_entropy(fwd.logits.flatten(0, 1), fwd.targets.flatten(), ignore_index=IGNORE)
    mask = fwd.targets != IGNORE
    ce = F.cross_entropy(fwd.logits.flatten(0, 1), fwd.targets.flatten(), ignore_index=IGNORE,
                         reduction="none").view_as(fwd.targets)
    per_example = (ce * mask).sum(1) / mask.sum(1).clamp_min(1)
    return _weighted(per_example, mask.any(1), batch["weights"])


def _retain(fwd: Forward, ref: Forward, batch: Mapping) -> torch.Tensor:
    mask = fwd.targets != IGNORE
    ref_logp = ref.logits.log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - fwd.logits.log_softmax(-1))).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp_min(1)


def _excess(fwd: Forward, ref: Forward, batch: Mapping) -> torch.Tensor:
    """batch["chunks"]: per example a list of (start, end, source_excess) over answer-token indices."""
    gain = fwd.token_logprobs() - ref.token_logprobs().detach()  # (B, P)
    terms, per_example, present = [], [], []
    for i, chunks in enumerate(batch["chunks"]):
        answer = torch.nonzero(fwd.targets[i] != IGNORE).flatten()  # kept positions of this example's answer
        mine = [F.smooth_l1_loss(gain[i, answer[start:end]].sum(), gain.new_tensor(float(target)))
                for start, end, target in chunks_within(chunks, answer.numel())]
        terms += mine
        per_example.append(torch.stack(mine).mean() if mine else gain.new_zeros(()))
        present.append(bool(mine))
    if not terms:
        return gain.sum() * 0.0
    if "chunk_weights" in batch:  # each example's own chunk mean, weighted
        return _weighted(torch.stack(per_example), torch.tensor(present, device=gain.device),
                         batch["chunk_weights"])
    return torch.stack(terms).mean()


register(Term("paper", "cross-entropy on the replay answers, plus RDM (the authors' objective)", "replay", False,
              None, cross_entropy))
register(Term("retain", "KL(target-only || fused) on the replay answer positions: keeps the target's skill",
              "replay", False, "logits", _retain))
register(Term("distill", "cross-entropy on the source experts' answers to the teach: prompts", "teacher", True,
              None, cross_entropy))
register(Term("excess", "per-chunk log-prob gain over the target matches the expert's gain over its base",
              "teacher", True, "logprobs", _excess))


def active(weights: Mapping[str, float], data: str | None = None) -> dict[str, float]:
    """The terms with a positive weight (reading ``data``, when given)."""
    return {n: w for n, w in weights.items() if w > 0 and (data is None or OBJECTIVES.lookup(n).data == data)}


def micro_loss(model, batch: Mapping, weights: Mapping[str, float], reference: Callable) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the given terms on one micro-batch; ``reference()`` is a context manager under which
    the model runs without the fused update. Returns the loss and each term's value."""
    fwd = answer_forward(model, batch)
    ref = None
    if any(OBJECTIVES.lookup(n).needs_reference for n in weights):
        with torch.no_grad(), reference():
            ref = answer_forward(model, batch)
    values = {n: OBJECTIVES.lookup(n).fn(fwd, ref, batch) for n in weights}
    loss = sum(w * values[n] for n, w in weights.items())
    return loss, {n: float(v.detach()) for n, v in values.items()}
