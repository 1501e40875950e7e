"""The two-stage warm-up + cosine schedule of Kimi-VL's joint SFT, checked by hand."""

from __future__ import annotations

import math

import pytest

from thinkvl.train.schedule import Segment, lr_at

# Stage 1: 11 steps, 2 warm-up, 2e-5 -> 2e-6. Stage 2: 11 steps, 2 warm-up, re-warm to 1e-5 -> 1e-6.
# Cosine span per stage = 11 - 1 - 2 = 8 steps, so the midpoint is 4 steps after the peak.
S1 = Segment(steps=11, peak=2e-5, end=2e-6, warmup=2)
S2 = Segment(steps=11, peak=1e-5, end=1e-6, warmup=2)
SEGS = [S1, S2]


def test_stage_one():
    assert lr_at(0, SEGS) == pytest.approx(2e-5 / 3, rel=1e-12)  # linear from 0, exclusive
    assert lr_at(1, SEGS) == pytest.approx(2e-5 * 2 / 3, rel=1e-12)
    assert lr_at(2, SEGS) == 2e-5  # first step after warm-up = peak, exactly
    assert lr_at(6, SEGS) == pytest.approx((2e-5 + 2e-6) / 2, rel=1e-12)  # cosine midpoint: 1.1e-5
    # a quarter of the way: end + (peak - end) * (1 + cos(pi/4)) / 2
    assert lr_at(4, SEGS) == pytest.approx(2e-6 + 1.8e-5 * (1 + math.sqrt(0.5)) / 2, rel=1e-12)
    assert lr_at(10, SEGS) == 2e-6  # last step of stage 1, exactly
    values = [lr_at(s, SEGS) for s in range(11)]
    assert all(a < b for a, b in zip(values[:3], values[1:3]))  # rising while warming
    assert all(a > b for a, b in zip(values[2:], values[3:]))  # then strictly falling


def test_stage_two_rewarms_from_stage_one_end():
    assert lr_at(11, SEGS) == pytest.approx(2e-6 + (1e-5 - 2e-6) / 3, rel=1e-12)
    assert lr_at(12, SEGS) == pytest.approx(2e-6 + (1e-5 - 2e-6) * 2 / 3, rel=1e-12)
    assert lr_at(13, SEGS) == 1e-5
    assert lr_at(17, SEGS) == pytest.approx((1e-5 + 1e-6) / 2, rel=1e-12)
    assert lr_at(21, SEGS) == 1e-6  # final step
    assert lr_at(22, SEGS) == 1e-6  # past the end: stays at the final rate
    assert lr_at(500, SEGS) == 1e-6


def test_no_warmup_and_single_step_stages():
    segs = [Segment(steps=5, peak=1e-3, end=1e-4, warmup=0)]
    assert lr_at(0, segs) == 1e-3
    assert lr_at(2, segs) == pytest.approx(5.5e-4, rel=1e-12)
    assert lr_at(4, segs) == 1e-4
    # a warm-up as long as the stage is capped: the last step still lands on the final rate
    segs = [Segment(steps=3, peak=1e-3, end=1e-4, warmup=10)]
    assert [lr_at(s, segs) for s in range(3)] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-4], rel=1e-12)
    assert lr_at(0, [Segment(steps=1, peak=1e-3, end=1e-4, warmup=0)]) == 1e-4
