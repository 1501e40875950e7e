"""RL losses against hand-computed values and the gradient formula of RECIPE.md."""

import functools

import pytest
import torch

from thinkvl.rl.losses import (
    LOSSES,
    get_loss,
    group_advantages,
    grpo_loss,
    grpo_loss_from_advantages,
    mirror_descent_loss,
    mirror_descent_loss_from_advantages,
    mirror_descent_stats,
    sequence_logprobs,
    tied_groups,
)
from thinkvl.rewards.length import group_length_rewards

torch.set_num_threads(1)
f64 = torch.float64


def _k2_batch() -> tuple[torch.Tensor, ...]:
    """B=4, k=2, T=3; masked positions hold junk that must not matter."""
    logprobs = torch.tensor(
        [[-0.5, -0.5, -7.0], [-1.0, -1.0, -1.0], [-2.0, -7.0, -7.0], [-0.25, -0.25, -7.0]],
        dtype=f64,
    )
    ref = torch.tensor(
        [[-1.0, -0.5, -9.0], [-1.0, -1.0, -1.0], [-1.0, 0.0, 0.0], [-0.5, -0.5, -3.0]], dtype=f64
    )
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=f64)
    return logprobs, ref, mask, rewards


def test_mirror_descent_hand_value_k2() -> None:
    logprobs, ref, mask, rewards = _k2_batch()
    # sequence log-ratios d = logp - ref over masked tokens:
    #   d0 = (-0.5-0.5) - (-1.0-0.5) = 0.5   d1 = -3 - (-3) = 0
    #   d2 = -2 - (-1) = -1                  d3 = -0.5 - (-1.0) = 0.5
    # groups: (1, 0) mean 0.5 -> A = (0.5, -0.5); (1, 1) mean 1 -> A = (0, 0)
    # tau = 0.5, residual A - tau d: 0.25, -0.5, 0.5, -0.25
    # squares 0.0625 + 0.25 + 0.25 + 0.0625 = 0.625, mean over B=4 -> 0.15625
    loss = mirror_descent_loss(logprobs, ref, mask, rewards, group_size=2, tau=0.5)
    assert loss.item() == pytest.approx(0.15625, abs=1e-12)


def test_mirror_descent_hand_value_k3() -> None:
    # T=1 so the sequence log-prob is the token log-prob; ref = 0 so d_j = logp_j
    d = torch.tensor([[1.0], [-0.5], [0.0], [2.0], [0.0], [-1.0]], dtype=f64)
    ref = torch.zeros_like(d)
    mask = torch.ones_like(d)
    # rewards include a length part; groups (1.5, 0, 0) mean 0.5 -> A = (1, -0.5, -0.5)
    #                                  (1, 0.5, 0)  mean 0.5 -> A = (0.5, 0, -0.5)
    rewards = torch.tensor([1.5, 0.0, 0.0, 1.0, 0.5, 0.0], dtype=f64)
    # tau = 0.2, residuals: 1-0.2=0.8, -0.5+0.1=-0.4, -0.5, 0.5-0.4=0.1, 0, -0.5+0.2=-0.3
    # squares 0.64 + 0.16 + 0.25 + 0.01 + 0 + 0.09 = 1.15, / 6
    loss = mirror_descent_loss(d, ref, mask, rewards, group_size=3, tau=0.2)
    assert loss.item() == pytest.approx(1.15 / 6, abs=1e-12)


def test_zero_advantage_group_gives_zero_loss_and_gradient() -> None:
    logprobs = torch.randn(6, 5, dtype=f64, requires_grad=True)
    ref = logprobs.detach().clone()
    mask = torch.ones(6, 5)
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=f64)
    loss = mirror_descent_loss(logprobs, ref, mask, rewards, group_size=3, tau=0.1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logprobs.grad) == 0


def test_gradient_at_reference_is_policy_gradient_with_mean_baseline() -> None:
    logprobs, _, mask, rewards = _k2_batch()
    rewards = torch.tensor([1.0, 0.0, 0.3, 0.9], dtype=f64)
    logprobs = logprobs.clone().requires_grad_(True)
    tau, b = 0.5, 4
    mirror_descent_loss(logprobs, logprobs.detach(), mask, rewards, 2, tau).backward()
    # dL/dlogpi_j = -(2 tau / B)(r_j - rbar); every response token carries the sequence gradient
    adv = torch.tensor([0.5, -0.5, -0.3, 0.3], dtype=f64)
    expected = (-2 * tau / b * adv).unsqueeze(1) * mask
    torch.testing.assert_close(logprobs.grad, expected, rtol=0, atol=1e-12)


def test_gradient_matches_recipe_formula_off_reference() -> None:
    """grad L = -(2 tau / B) sum_j [ A_j grad log pi_j - (tau/2) grad d_j^2 ] (RECIPE.md)."""
    torch.manual_seed(0)
    b, t, v, k, tau = 6, 4, 5, 3, 0.3
    theta = torch.randn(b, t, v, dtype=f64, requires_grad=True)
    tokens = torch.randint(0, v, (b, t))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]] * 2)
    ref = torch.randn(b, t, dtype=f64).clamp(max=-0.1)  # pi_i != pi_theta

    def token_lp() -> torch.Tensor:
        return torch.log_softmax(theta, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0], dtype=f64)
    (grad_loss,) = torch.autograd.grad(
        mirror_descent_loss(token_lp(), ref, mask, rewards, k, tau), theta
    )
    adv = group_advantages(rewards, k)
    seq = sequence_logprobs(token_lp(), mask)
    d = seq - sequence_logprobs(ref, mask)
    (g_pg,) = torch.autograd.grad((adv * seq).sum(), theta, retain_graph=True)
    (g_l2,) = torch.autograd.grad((d**2).sum(), theta)
    expected = -(2 * tau / b) * (g_pg - tau / 2 * g_l2)
    torch.testing.assert_close(grad_loss, expected, rtol=1e-10, atol=1e-12)
    assert d.abs().min() > 0.1  # the L2 pull really is active in this check


def test_masked_tokens_do_not_affect_loss_or_get_gradient() -> None:
    logprobs, ref, mask, rewards = _k2_batch()
    junk = logprobs.clone()
    junk[mask == 0] = float("nan")  # even NaN / -inf at padding must not leak
    ref_junk = ref.clone()
    ref_junk[mask == 0] = float("-inf")
    junk.requires_grad_(True)
    loss = mirror_descent_loss(junk, ref_junk, mask, rewards, 2, 0.5)
    loss.backward()
    assert loss.item() == pytest.approx(0.15625, abs=1e-12)
    assert torch.all(junk.grad[mask == 0] == 0)


def test_normalizer_makes_micro_batches_add_up_to_the_whole() -> None:
    torch.manual_seed(1)
    b, t, k, tau = 8, 5, 2, 0.2
    logprobs = torch.randn(b, t, dtype=f64, requires_grad=True)
    ref = torch.randn(b, t, dtype=f64)
    mask = (torch.rand(b, t) > 0.3).long()
    rewards = torch.rand(b, dtype=f64)
    whole = mirror_descent_loss(logprobs, ref, mask, rewards, k, tau)
    (g_whole,) = torch.autograd.grad(whole, logprobs)
    halves = sum(
        mirror_descent_loss(logprobs[s], ref[s], mask[s], rewards[s], k, tau, normalizer=b)
        for s in (slice(0, 4), slice(4, 8))
    )
    (g_halves,) = torch.autograd.grad(halves, logprobs)
    torch.testing.assert_close(halves, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_halves, g_whole, rtol=0, atol=1e-12)
    # a micro-batch smaller than a group: advantages computed once on the full batch
    adv = group_advantages(rewards, k)
    singles = sum(
        mirror_descent_loss_from_advantages(
            logprobs[j : j + 1], ref[j : j + 1], mask[j : j + 1], adv[j : j + 1], tau, normalizer=b
        )
        for j in range(b)
    )
    torch.testing.assert_close(singles, whole, rtol=0, atol=1e-12)


def test_group_size_must_divide_batch() -> None:
    x = torch.zeros(5, 2)
    with pytest.raises(ValueError, match="multiple of group_size"):
        mirror_descent_loss(x, x, torch.ones(5, 2), torch.zeros(5), group_size=2, tau=0.1)
    with pytest.raises(ValueError, match="multiple of group_size"):
        grpo_loss(x, x, torch.ones(5, 2), torch.zeros(5), group_size=2)


def test_mirror_descent_stats() -> None:
    logprobs, ref, mask, rewards = _k2_batch()
    s = mirror_descent_stats(logprobs, ref, mask, rewards, 2, 0.5)
    assert s["log_ratio_mean"] == pytest.approx((0.5 + 0 - 1 + 0.5) / 4)
    assert s["reward_mean"] == pytest.approx(0.75)
    assert s["adv_abs_mean"] == pytest.approx(0.25)
    assert s["zero_adv_group_frac"] == pytest.approx(0.5)
    assert s["residual_rms"] == pytest.approx(0.15625**0.5)
    assert s["response_tokens_mean"] == pytest.approx(8 / 4)
    # token log-ratios: 0.5, 0 | 0, 0, 0 | -1 | 0.25, 0.25;  k3 = e^l - 1 - l
    k3 = torch.tensor([0.5, -1.0, 0.25, 0.25], dtype=f64)
    assert s["kl_k3_token"] == pytest.approx((torch.expm1(k3) - k3).sum().item() / 8)


def test_grpo_hand_value_and_gradient() -> None:
    # rewards (1, 0): mean 0.5, population std 0.5 -> A = +-0.5 / (0.5 + 1e-4) = +-a
    a = 0.5 / 0.5001
    log_ratio = torch.log(torch.tensor([[1.5, 0.9], [1.1, 0.5]], dtype=f64))
    logprobs = (log_ratio - 1.0).requires_grad_(True)  # ref = -1 everywhere
    ref = torch.full((2, 2), -1.0, dtype=f64)
    mask = torch.tensor([[1, 1], [1, 0]])
    # row 0 (A=+a): ratio 1.5 -> min(1.5a, 1.2a) = 1.2a (clipped); ratio 0.9 -> 0.9a
    # row 1 (A=-a): ratio 1.1 -> min(-1.1a, -1.1a) = -1.1a; second token masked out
    # loss = -(1.2a + 0.9a - 1.1a) / 3 tokens = -a / 3
    rewards = torch.tensor([1.0, 0.0], dtype=f64)
    loss = grpo_loss(logprobs, ref, mask, rewards, group_size=2, clip_eps=0.2)
    assert loss.item() == pytest.approx(-a / 3, abs=1e-12)
    loss.backward()
    # d/dlogp of -rho A / 3 is -rho A / 3 where unclipped, 0 where clipped or masked
    expected = torch.tensor([[0.0, -0.9 * a / 3], [1.1 * a / 3, 0.0]], dtype=f64)
    torch.testing.assert_close(logprobs.grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("ratio", "adv", "clipped"),
    [(1.5, 1.0, True), (0.5, 1.0, False), (1.5, -1.0, False), (0.5, -1.0, True), (1.1, 1.0, False)],
)
def test_grpo_clipping_zeroes_gradient_only_on_the_pessimistic_side(
    ratio: float, adv: float, clipped: bool
) -> None:
    logprobs = torch.tensor([[float(torch.log(torch.tensor(ratio)))]], dtype=f64)
    logprobs.requires_grad_(True)
    ref = torch.zeros(1, 1, dtype=f64)
    loss = grpo_loss_from_advantages(logprobs, ref, torch.ones(1, 1), torch.tensor([adv]), 0.2)
    loss.backward()
    bound = min(max(ratio, 0.8), 1.2)
    assert loss.item() == pytest.approx(-min(ratio * adv, bound * adv))
    assert logprobs.grad.item() == (0.0 if clipped else pytest.approx(-ratio * adv))


def test_grpo_normalizer_counts_tokens_across_micro_batches() -> None:
    torch.manual_seed(2)
    logprobs = torch.randn(6, 4, dtype=f64) * 0.2
    ref = torch.randn(6, 4, dtype=f64) * 0.2
    mask = (torch.rand(6, 4) > 0.4).long()
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    whole = grpo_loss(logprobs, ref, mask, rewards, 3)
    n_tokens = int(mask.sum())
    parts = sum(
        grpo_loss(logprobs[s], ref[s], mask[s], rewards[s], 3, normalizer=n_tokens)
        for s in (slice(0, 3), slice(3, 6))
    )
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-12)


# --- GRPO with an auxiliary (length) reward: scaled by the spread of correctness (issue 22) ---------

# One group each, k = 4, lengths 10, 20, 20, 30, w = 0.1: lambda = 0.5 - (len - 10) / 20 = 0.5, 0, 0, -0.5
LENGTHS = [10, 20, 20, 30]
W = 0.1
GROUPS = {
    # all right: len_reward = lambda -> r = 1.05, 1, 1, 0.95; rbar 1; correctness tied -> A = r - rbar
    "all_right": ([1.0, 1.0, 1.0, 1.0], [0.05, 0.0, 0.0, -0.05]),
    # all wrong: len_reward = min(0, lambda) = 0, 0, 0, -0.5 -> r = 0, 0, 0, -0.05; rbar -0.0125
    "all_wrong": ([0.0, 0.0, 0.0, 0.0], [0.0125, 0.0125, 0.0125, -0.0375]),
    # mixed: len_reward 0.5, 0, 0, -0.5 -> r = 1.05, 0, 1, -0.05; rbar 0.5; std of correctness 0.5
    "mixed": ([1.0, 0.0, 1.0, 0.0], [x / (0.5 + 1e-4) for x in (0.55, -0.5, 0.5, -0.55)]),
}


def _total_rewards(correct: list[float]) -> torch.Tensor:
    """r = correct + w * len_reward, composed as `loop.score` does."""
    lens = group_length_rewards(LENGTHS, [c >= 0.5 for c in correct], len(correct))
    return torch.tensor([c + W * lr_ for c, lr_ in zip(correct, lens)], dtype=f64)


@pytest.mark.parametrize("name", list(GROUPS))
def test_grpo_advantages_scale_by_the_correctness_spread(name: str) -> None:
    correct, expected = GROUPS[name]
    rewards = _total_rewards(correct)
    adv = group_advantages(rewards, 4, scale=True, correct=torch.tensor(correct, dtype=f64))
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=f64), rtol=0, atol=1e-12)
    if name != "mixed":  # a tied-correctness group is left unscaled: mirror descent's r - rbar
        torch.testing.assert_close(adv, group_advantages(rewards, 4), rtol=0, atol=0)
    else:  # the length terms keep their weight w relative to correctness: 0.55 vs 0.5
        assert adv[0] / adv[2] == pytest.approx(1.1)


def test_grpo_loss_takes_the_correctness_part() -> None:
    # the three groups in one batch, at the first step (ratio 1): L = -(1/N) sum_b A_b len_b
    correct = [c for name in GROUPS for c in GROUPS[name][0]]
    rewards = torch.cat([_total_rewards(GROUPS[name][0]) for name in GROUPS])
    adv = [a for name in GROUPS for a in GROUPS[name][1]]
    mask = torch.tensor([[1] * n + [0] * (30 - n) for n in LENGTHS * 3])
    logprobs = torch.full((12, 30), -1.0, dtype=f64)
    loss = grpo_loss(logprobs, logprobs, mask, rewards, 4, correct=torch.tensor(correct, dtype=f64))
    expected = -sum(a * n for a, n in zip(adv, LENGTHS * 3)) / (sum(LENGTHS) * 3)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # without `correct` it is plain GRPO: the tied groups' length terms are scaled to unit size
    plain = group_advantages(rewards, 4, scale=True)
    assert plain[:8].abs().mean() > 0.5


def test_grpo_length_terms_stay_at_their_scale_in_tied_groups() -> None:
    """The issue's measurement: k = 8, lengths 85-113, w = 0.1, mean |A| per kind of group.

    Before: GRPO divided tied groups by the spread of their +-0.05 length terms (mean |A| ~0.8-0.9,
    as large as in mixed groups); now they keep mirror descent's size (~0.02) and only the mixed
    groups are scaled (~1)."""
    gen = torch.Generator().manual_seed(0)
    k, n_groups = 8, 600
    p = torch.rand(n_groups, 1, generator=gen).repeat(1, k)  # per-prompt difficulty: many tied groups
    correct = (torch.rand(n_groups, k, generator=gen) < p).double().reshape(-1)  # [B]
    lengths = torch.randint(85, 114, (n_groups * k,), generator=gen).tolist()
    lens = group_length_rewards(lengths, [bool(c) for c in correct], k)
    rewards = correct + W * torch.tensor(lens, dtype=f64)  # [B]
    kind = correct.view(-1, k).sum(dim=1)  # [B/k] number right per group
    masks = {"mixed": (kind > 0) & (kind < k), "all_wrong": kind == 0, "all_right": kind == k}
    assert all(int(m.sum()) >= 50 for m in masks.values())  # each kind well represented

    md = group_advantages(rewards, k).view(-1, k)
    old = group_advantages(rewards, k, scale=True).view(-1, k)  # std of the total reward
    new = group_advantages(rewards, k, scale=True, correct=correct).view(-1, k)
    table = {name: [a[m].abs().mean().item() for a in (md, old, new)] for name, m in masks.items()}
    print("mean |A| (mirror descent, GRPO by reward std, GRPO by correctness std):", table)
    for name in ("all_wrong", "all_right"):
        assert table[name][1] > 0.5  # the flaw: length terms blown up to unit scale
        assert table[name][2] < 0.05  # now the length-term scale (w * |lambda| <= 0.05)
        torch.testing.assert_close(new[masks[name]], md[masks[name]], rtol=0, atol=0)
    assert table["mixed"][2] > 0.8  # mixed groups keep GRPO's unit scale


def test_tied_groups_have_exactly_zero_advantages() -> None:
    # 0.1 or 0.3 repeated: the float mean of equal values can be an ulp off; the advantage is 0 anyway
    rewards = torch.tensor([0.1] * 8 + [0.3] * 8 + [1.0, 0.0] * 4, dtype=torch.float32)
    assert tied_groups(rewards, 8).tolist() == [True, True, False]
    for scale in (False, True):
        adv = group_advantages(rewards, 8, scale=scale)
        assert torch.count_nonzero(adv[:16]) == 0 and torch.count_nonzero(adv[16:]) == 8
    with pytest.raises(ValueError, match=r"correct must be \[B\] = \[24\]"):
        group_advantages(rewards, 8, scale=True, correct=torch.zeros(8))


def test_get_loss_by_name() -> None:
    assert get_loss("mirror_descent") is mirror_descent_loss
    assert get_loss("grpo") is grpo_loss
    assert set(LOSSES) == {"mirror_descent", "grpo"}
    with pytest.raises(ValueError, match=r"allowed: \['grpo', 'mirror_descent'\]"):
        get_loss("ppo")
    bound = functools.partial(get_loss("mirror_descent"), tau=0.5)
    logprobs, ref, mask, rewards = _k2_batch()
    assert bound(logprobs, ref, mask, rewards, 2).item() == pytest.approx(0.15625)
