"""Kimi k1.5 length penalty: within a group of k responses, shorter is better (RECIPE.md).

``lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len)``; a correct response gets ``lambda_i``
(in [-0.5, 0.5]), a wrong one ``min(0, lambda_i)`` so that being short never rewards a wrong answer.
The total reward is ``r_i + length_weight(step, w, warmup) * len_reward_i``.
"""

from collections.abc import Sequence

__all__ = ["length_penalty", "length_weight", "group_length_rewards"]


def length_penalty(lengths: Sequence[int], correct: Sequence[bool]) -> list[float]:
    """Length rewards of ONE group of responses to the same prompt.

    Args:
        lengths: response lengths in tokens, one per response.
        correct: whether each response was judged correct.

    Returns:
        One float per response: ``lambda_i`` if correct else ``min(0, lambda_i)``. If all lengths
        are equal (including a group of one) every value is 0.0 (ours: no preference to express).

    Raises:
        ValueError: if the two sequences differ in length or a length is negative.
    """
    if len(lengths) != len(correct):
        raise ValueError(f"got {len(lengths)} lengths but {len(correct)} correctness flags")
    if any(n < 0 for n in lengths):
        raise ValueError(f"lengths must be >= 0, got {list(lengths)}")
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(lengths)
    out = []
    for n, ok in zip(lengths, correct):
        lam = 0.5 - (n - lo) / (hi - lo)
        out.append(lam if ok else min(0.0, lam))
    return out


def length_weight(step: int, weight: float, warmup_steps: int) -> float:
    """Weight of the length reward at ``step``: 0 for ``step < warmup_steps``, then ``weight``.

    k1.5 trains without the penalty first because it slows early learning, then switches it on at a
    constant weight.
    """
    return 0.0 if step < warmup_steps else float(weight)


def group_length_rewards(
    lengths: Sequence[int], correct: Sequence[bool], group_size: int
) -> list[float]:
    """:func:`length_penalty` applied group by group over a flat batch.

    Args:
        lengths: ``[B]`` response lengths; the ``group_size`` responses of a prompt are contiguous.
        correct: ``[B]`` correctness flags in the same order.
        group_size: k, responses per prompt.

    Returns:
        ``[B]`` length rewards in the input order.

    Raises:
        ValueError: if the sizes differ or B is not a multiple of ``group_size``.
    """
    if len(lengths) != len(correct):
        raise ValueError(f"got {len(lengths)} lengths but {len(correct)} correctness flags")
    if group_size < 1 or len(lengths) % group_size != 0:
        raise ValueError(
            f"batch size {len(lengths)} must be a positive multiple of group_size {group_size}"
        )
    out: list[float] = []
    for start in range(0, len(lengths), group_size):
        stop = start + group_size
        out.extend(length_penalty(lengths[start:stop], correct[start:stop]))
    return out
