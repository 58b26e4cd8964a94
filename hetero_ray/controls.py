"""Controls: what a trained run feeds the transfer networks instead of the real sources. A result is evidence
that the sources matter only if it beats every control trained the same way."""

from __future__ import annotations

from enum import Enum


class Control(str, Enum):
    NONE = "none"  # the real source updates
    ZERO_SOURCES = "zero_sources"  # every source token zero (no source tensor is read)
    RANDOM_SOURCES = "random_sources"  # Gaussian sources with each module's Frobenius norms (A and s·B)
    REPLAY_ONLY = "replay_only"  # no transfer networks: the target's B fine-tuned on the same replay and steps

    @property
    def reads_sources(self) -> bool:
        """Whether the run has source candidates at all (replay_only has none)."""
        return self is not Control.REPLAY_ONLY
