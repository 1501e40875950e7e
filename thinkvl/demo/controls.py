"""Control rewards for the demo's RL experiments: what does RL do without the answer's signal?

``coin_reward`` pays 1 for half of the well-formed responses, decided by a hash of the response
text (deterministic, so a run is reproducible and a resumed run scores the same), whatever the
answer. An RL run with it against the real reward tells the answer signal's effect from drift:
both runs take the same kind of optimiser steps on the same rollouts' statistics.
"""

from __future__ import annotations

import hashlib

from thinkvl.rewards.verifiers import format_ok


def coin_reward(response: str, reference: str) -> float:
    """1.0 for about half of the responses in the think-then-answer format (a hash of the response
    picks which), 0.0 otherwise; ``reference`` is ignored."""
    if not format_ok(response):
        return 0.0
    return float(hashlib.sha256(response.encode("utf-8", "replace")).digest()[0] & 1)
