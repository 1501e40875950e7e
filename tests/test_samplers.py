"""Problem samplers: draw frequencies, curriculum pools, exact resume."""

import io
import json
import random
from collections import Counter

import numpy as np
import pytest
import torch

from thinkvl.rl.samplers import (
    SAMPLER_KINDS,
    CurriculumSampler,
    PrioritizedSampler,
    ProblemSampler,
    UniformSampler,
    build_sampler,
    curriculum_order,
    curriculum_pool_size,
    priority_weights,
)


def _frequencies(sampler: ProblemSampler, n: int, draws: int, step: int = 0) -> np.ndarray:
    counts = Counter(i for _ in range(draws) for i in sampler.sample(1, step))
    return np.array([counts[i] for i in range(n)]) / draws


def test_priority_weights() -> None:
    # 1 - s = 1, 0.5, 0, 0.25 over a sum of 1.75
    got = priority_weights(np.array([0.0, 0.5, 1.0, 0.75]))
    np.testing.assert_allclose(got, np.array([1.0, 0.5, 0.0, 0.25]) / 1.75)
    np.testing.assert_allclose(priority_weights(np.array([1.0, 1.0, 1.0, 1.0])), [0.25] * 4)


def test_prioritized_frequencies_follow_one_minus_success() -> None:
    s = PrioritizedSampler(5, seed=0)
    s.update([0, 1, 2, 3, 4], [0.0, 0.5, 0.75, 1.0, 0.25])
    freq = _frequencies(s, 5, 20_000)
    # (1 - s) = 1, 0.5, 0.25, 0, 0.75 over a sum of 2.5; sd of each frequency <= 0.0035
    np.testing.assert_allclose(freq, [0.4, 0.2, 0.1, 0.0, 0.3], atol=0.015)
    assert freq[3] == 0.0  # a solved problem is never drawn while others are unsolved


def test_all_solved_falls_back_to_uniform() -> None:
    s = PrioritizedSampler(4, seed=1)
    s.update(range(4), [1.0] * 4)
    np.testing.assert_allclose(_frequencies(s, 4, 8_000), [0.25] * 4, atol=0.02)


def test_success_rate_running_mean_and_ema() -> None:
    mean = PrioritizedSampler(3, seed=0, init_success=0.5)
    ema = PrioritizedSampler(3, seed=0, init_success=0.5, ema=0.75)
    for rate in (1.0, 0.0, 0.5):
        mean.update([0], [rate])
        ema.update([0], [rate])
    # mean: (1 + 0 + 0.5) / 3; ema: first observation replaces the prior, then 0.75 old + 0.25 new:
    # 1 -> 0.75 * 1 + 0 = 0.75 -> 0.75 * 0.75 + 0.25 * 0.5 = 0.6875
    np.testing.assert_allclose(mean.success, [0.5, 0.5, 0.5])
    np.testing.assert_allclose(ema.success, [0.6875, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        mean.update([1], [1.2])


def test_batch_is_without_replacement_when_possible() -> None:
    u = UniformSampler(10, seed=3)
    assert sorted(u.sample(10, 0)) == list(range(10))
    big = u.sample(13, 0)
    assert set(big) == set(range(10)) and len(big) == 13
    p = PrioritizedSampler(6, seed=3)
    p.update(range(6), [1.0, 0.2, 1.0, 1.0, 0.6, 1.0])  # only 1 and 4 are unsolved
    draws = p.sample(4, 0)
    assert sorted(draws) == [1, 1, 4, 4]


def _run(sampler: ProblemSampler, steps: range) -> list[list[int]]:
    out = []
    for step in steps:
        batch = sampler.sample(4, step)
        # deterministic fake outcomes so the weights change along the run
        sampler.update(batch, [((i * 7 + step) % 5) / 4 for i in batch])
        out.append(batch)
    return out


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
def test_resume_continues_the_same_draws(kind: str) -> None:
    difficulties = [i / 19 if i % 4 else None for i in range(20)]

    def make(seed: int) -> ProblemSampler:
        return build_sampler(kind, 20, seed, difficulties, curriculum_steps=10)

    uninterrupted = make(0)
    first = _run(uninterrupted, range(0, 6))
    resumed = make(0)
    assert _run(resumed, range(0, 6)) == first
    saved = resumed.state_dict()
    later = _run(uninterrupted, range(6, 15))

    # round trip through JSON and torch.save(weights_only) like a checkpoint would
    buf = io.BytesIO()
    torch.save(json.loads(json.dumps(saved)), buf)
    buf.seek(0)
    fresh = make(123)  # another seed: everything must come from the state
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert _run(fresh, range(6, 15)) == later
    assert fresh.summary() == uninterrupted.summary()


def test_state_dict_is_a_snapshot_and_checks_settings() -> None:
    s = PrioritizedSampler(5, seed=0)
    state = s.state_dict()
    s.sample(3, 0)
    s.update([0], [1.0])
    assert state["success"] == [0.0] * 5
    with pytest.raises(ValueError, match="prioritized=True"):
        UniformSampler(5, seed=0).load_state_dict(state)


def test_curriculum_order_easy_first_unlabelled_as_median() -> None:
    # labelled 0.1, 0.9, 0.5, 0.7, 0.3 -> median 0.5; index 2 ties with index 3, index order wins
    assert curriculum_order([0.1, 0.9, None, 0.5, 0.7, 0.3]) == [1, 4, 2, 3, 5, 0]
    with pytest.raises(ValueError, match="at least one difficulty"):
        curriculum_order([None, None])


def test_curriculum_pool_size_schedule() -> None:
    sizes = [curriculum_pool_size(10, step, 100, 0.3) for step in (0, 50, 99, 100, 500)]
    assert sizes == [3, 7, 10, 10, 10]  # 0.3*10 = 3 exactly, 0.65*10 -> 7, 0.993*10 -> 10
    assert curriculum_pool_size(3, 0, 100, 0.01) == 1


def test_curriculum_draws_easy_first_then_everything() -> None:
    difficulties = [0.05 * i for i in range(20)]  # problem 19 easiest, 0 hardest
    s = CurriculumSampler(difficulties, seed=0, schedule_steps=100, start_frac=0.3)
    early = {i for _ in range(200) for i in s.sample(3, step=0)}
    assert early == {19, 18, 17, 16, 15, 14}  # the easiest 30% = 6 problems, all of them seen
    middle = {i for _ in range(300) for i in s.sample(3, step=50)}
    assert middle == set(range(7, 20))  # 0.65 * 20 = 13 easiest
    late = {i for _ in range(300) for i in s.sample(4, step=100)}
    assert late == set(range(20))
    assert s.summary(step=0)["pool_size"] == 6.0


def test_curriculum_plus_prioritized_weights_inside_the_pool() -> None:
    difficulties = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4, 0.5, 0.0]
    s = build_sampler("curriculum+prioritized", 10, 0, difficulties, curriculum_steps=10)
    # pool at step 0: the easiest 3 = problems 0, 2, 4; problem 0 is solved, 2 at 50%
    s.update([0, 2, 9], [1.0, 0.5, 0.0])
    freq = _frequencies(s, 10, 6_000, step=0)
    expected = np.zeros(10)
    expected[[2, 4]] = [0.5 / 1.5, 1.0 / 1.5]  # problem 9 is unsolved but outside the pool
    np.testing.assert_allclose(freq, expected, atol=0.02)


def test_summary_entropy() -> None:
    u = UniformSampler(8, seed=0)
    summ = u.summary()
    assert summ["weight_entropy"] == pytest.approx(np.log(8))
    assert summ["weight_entropy_frac"] == pytest.approx(1.0)
    assert summ["seen_frac"] == 0.0
    p = PrioritizedSampler(4, seed=0)
    p.update([0, 1, 2, 3], [1.0, 1.0, 0.5, 0.5])  # two equal weights left -> log 2
    assert p.summary()["weight_entropy"] == pytest.approx(np.log(2))
    assert p.summary()["success_mean"] == pytest.approx(0.75)


def test_build_sampler_kinds_and_errors() -> None:
    assert type(build_sampler("uniform", 4, 0)) is ProblemSampler
    assert build_sampler("prioritized", 4, 0).prioritized
    cur = build_sampler("curriculum", 4, 0, [0.1, 0.2, 0.3, None], curriculum_steps=5)
    assert isinstance(cur, CurriculumSampler) and not cur.prioritized
    with pytest.raises(ValueError, match=r"allowed: \['uniform', 'prioritized', 'curriculum'"):
        build_sampler("random", 4, 0)
    with pytest.raises(ValueError, match="needs difficulties"):
        build_sampler("curriculum", 4, 0, curriculum_steps=5)
    with pytest.raises(ValueError, match="schedule_steps"):
        build_sampler("curriculum", 4, 0, [0.5] * 4)  # curriculum_steps defaults to 0


def test_samplers_do_not_touch_global_rngs() -> None:
    np.random.seed(0)
    random.seed(0)
    before = (np.random.get_state()[1].copy(), random.getstate())
    s = build_sampler("prioritized", 50, 7)
    s.sample(10, 0)
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]
