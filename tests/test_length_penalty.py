"""k1.5 length penalty against a hand-computed table."""

import pytest

from thinkvl.rewards.length import group_length_rewards, length_penalty, length_weight


@pytest.mark.parametrize(
    ("lengths", "correct", "expected"),
    [
        # all correct: lambda = 0.5 - (len - 10) / 20
        ([10, 20, 30], [True, True, True], [0.5, 0.0, -0.5]),
        # all wrong: min(0, lambda), never positive
        ([10, 20, 30], [False, False, False], [0.0, 0.0, -0.5]),
        # mixed, min 50 max 100: lambdas -0.5, 0.5, 0.0, 0.3, -0.3
        ([100, 50, 75, 60, 90], [True, False, True, True, False], [-0.5, 0.0, 0.0, 0.3, -0.3]),
        # ties: equal lengths carry no preference
        ([7, 7, 7], [True, False, True], [0.0, 0.0, 0.0]),
        # a group of one
        ([12], [True], [0.0]),
        # two distinct lengths, the short one wrong
        ([4, 8, 4], [False, True, True], [0.0, -0.5, 0.5]),
        ([], [], []),
    ],
)
def test_length_penalty_table(
    lengths: list[int], correct: list[bool], expected: list[float]
) -> None:
    assert length_penalty(lengths, correct) == pytest.approx(expected, abs=1e-12)


def test_wrong_answers_never_get_a_positive_length_reward() -> None:
    lengths = [3, 9, 1, 40, 17, 17, 2]
    out = length_penalty(lengths, [False] * len(lengths))
    assert all(v <= 0.0 for v in out)
    assert min(out) == -0.5


def test_group_length_rewards_goes_group_by_group() -> None:
    lengths = [10, 20, 30, 5, 5, 5, 100, 50, 75]
    correct = [True, True, True, True, True, False, True, False, True]
    assert group_length_rewards(lengths, correct, 3) == pytest.approx(
        [0.5, 0.0, -0.5, 0.0, 0.0, 0.0, -0.5, 0.0, 0.0]
    )
    # not the same as one big group: the 5-token responses would then score 0.5
    assert length_penalty(lengths, correct)[3] == pytest.approx(0.5)


def test_length_weight_warmup() -> None:
    assert [length_weight(s, 0.2, warmup_steps=3) for s in range(5)] == [0.0, 0.0, 0.0, 0.2, 0.2]
    assert length_weight(0, 0.2, warmup_steps=0) == 0.2


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="2 lengths but 1"):
        length_penalty([1, 2], [True])
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_length_rewards([1, 2, 3], [True] * 3, 2)
    with pytest.raises(ValueError, match=">= 0"):
        length_penalty([-1, 2], [True, True])
