"""Weighted mixture of data sources for one epoch.

A source's weight is the number of passes over it per epoch: 1 = every example once, 2 = twice,
0.5 = a seeded random half, 0 = left out. The result is shuffled with the same seed, so an epoch's
order is reproducible (resume relies on it).
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def mix(groups: Sequence[Sequence[int]], weights: Sequence[float], seed: int) -> list[int]:
    """Indices of one epoch: each group repeated floor(w) times plus a random (w mod 1) share."""
    if len(groups) != len(weights):
        raise ValueError(f"{len(groups)} groups but {len(weights)} weights")
    rng = random.Random(seed)
    out: list[int] = []
    for group, w in zip(groups, weights):
        if w < 0:
            raise ValueError(f"weight {w} < 0")
        whole, frac = int(w), w - int(w)
        out.extend(list(group) * whole)
        out.extend(rng.sample(list(group), round(frac * len(group))))
    rng.shuffle(out)
    return out
