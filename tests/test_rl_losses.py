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
)

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


def test_get_loss_by_name() -> None:
    assert get_loss("mirror_descent") is mirror_descent_loss
    assert get_loss("grpo") is grpo_loss
    assert set(LOSSES) == {"mirror_descent", "grpo"}
    with pytest.raises(ValueError, match=r"allowed: \['grpo', 'mirror_descent'\]"):
        get_loss("ppo")
    bound = functools.partial(get_loss("mirror_descent"), tau=0.5)
    logprobs, ref, mask, rewards = _k2_batch()
    assert bound(logprobs, ref, mask, rewards, 2).item() == pytest.approx(0.15625)
