"""Learning-rate schedule across context stages: warm-up then cosine decay, per stage.

Kimi-VL's joint SFT runs two stages: the first decays 2e-5 -> 2e-6, the second re-warms to 1e-5 and
decays to 1e-6. Each stage here warms up linearly from the previous stage's final rate (0 before
the first stage) to its peak over `warmup` steps, then follows a half cosine down to its final rate,
reached exactly on the stage's last step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """One stage of the schedule."""

    steps: int
    peak: float
    end: float
    warmup: int


def lr_at(step: int, segments: Sequence[Segment]) -> float:
    """Learning rate at global optimiser step `step` (0-based)."""
    start_lr = 0.0
    for seg in segments:
        if step < seg.steps:
            return _within(step, seg, start_lr)
        step -= seg.steps
        start_lr = seg.end
    return segments[-1].end if segments else 0.0


def _within(s: int, seg: Segment, start_lr: float) -> float:
    warm = min(seg.warmup, seg.steps - 1)
    if s < warm:
        # Linear from start_lr (exclusive) to the peak, reached at step `warm`.
        return start_lr + (seg.peak - start_lr) * (s + 1) / (warm + 1)
    span = seg.steps - 1 - warm
    progress = 1.0 if span <= 0 else (s - warm) / span
    return seg.end + 0.5 * (seg.peak - seg.end) * (1.0 + math.cos(math.pi * progress))
