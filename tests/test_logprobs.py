"""Chunked token log-probs: same values and gradients as the naive computation, less memory."""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch.autograd.graph import saved_tensors_hooks

from thinkvl.rl.logprobs import (
    token_logprobs_and_entropy,
    token_logprobs_from_hidden,
    token_logprobs_from_logits,
)

torch.set_num_threads(1)
B, T, H, V = 3, 7, 8, 50  # B*T = 21 tokens


def _inputs(dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(V, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    return hidden, weight, bias, targets


def _naive(
    hidden: Tensor, weight: Tensor, bias: Tensor, targets: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    logits = (hidden @ weight.t() + bias) / temperature  # [B, T, V], all of it at once
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


SAVE = [0, 1 << 20]  # recompute the logits in the backward / keep the forward's log-softmax


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 21, 1024])  # 4 and 5 do not divide 21
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("save_bytes", SAVE)
def test_values_and_gradients_match_naive(chunk_size: int, temperature: float, save_bytes: int) -> None:
    hidden, weight, bias, targets = _inputs()
    g = torch.Generator().manual_seed(1)
    w_lp = torch.randn(B, T, generator=g, dtype=torch.float64)  # arbitrary upstream gradients
    w_en = torch.randn(B, T, generator=g, dtype=torch.float64)

    lp, en = token_logprobs_and_entropy(
        hidden, weight, targets, chunk_size=chunk_size, temperature=temperature, bias=bias, save_bytes=save_bytes
    )
    got = torch.autograd.grad((lp * w_lp).sum() + (en * w_en).sum(), (hidden, weight, bias))
    lp_ref, en_ref = _naive(hidden, weight, bias, targets, temperature)
    ref_loss = (lp_ref * w_lp).sum() + (en_ref * w_en).sum()
    want = torch.autograd.grad(ref_loss, (hidden, weight, bias))

    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(en, en_ref, rtol=0, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("save_bytes", SAVE)
def test_logprob_only_paths_match_naive(temperature: float, save_bytes: int) -> None:
    """The cheaper paths: no entropy at all, entropy returned but unused (its backward is skipped),
    and entropy alone (the log-prob's gradient is None)."""
    hidden, weight, bias, targets = _inputs()
    w_lp = torch.randn(B, T, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lp_ref, en_ref = _naive(hidden, weight, bias, targets, temperature)
    want_lp = torch.autograd.grad((lp_ref * w_lp).sum(), (hidden, weight, bias), retain_graph=True)
    want_en = torch.autograd.grad((en_ref * w_lp).sum(), (hidden, weight, bias))

    kw = dict(chunk_size=4, temperature=temperature, bias=bias, save_bytes=save_bytes)
    lp = token_logprobs_from_hidden(hidden, weight, targets, **kw)
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=1e-12)
    got = torch.autograd.grad((lp * w_lp).sum(), (hidden, weight, bias))
    lp2, en2 = token_logprobs_and_entropy(hidden, weight, targets, with_entropy=False, **kw)
    assert not en2.requires_grad and float(en2.abs().max()) == 0.0
    lp3, en3 = token_logprobs_and_entropy(hidden, weight, targets, **kw)
    got3 = torch.autograd.grad((lp3 * w_lp).sum(), (hidden, weight, bias))  # entropy unused
    lp4, en4 = token_logprobs_and_entropy(hidden, weight, targets, **kw)
    got4 = torch.autograd.grad((en4 * w_lp).sum(), (hidden, weight, bias))  # log-prob unused
    for a, b3, w in zip(got, got3, want_lp):
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b3, w, rtol=1e-10, atol=1e-12)
    for a, w in zip(got4, want_en):
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("save_bytes", SAVE)
def test_gradcheck(save_bytes: int) -> None:
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 6, (2, 3), generator=g)

    def f(h: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        return token_logprobs_and_entropy(h, w, targets, chunk_size=4, temperature=0.9, bias=b, save_bytes=save_bytes)

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


@pytest.mark.parametrize("save_bytes", SAVE)
def test_no_bias_no_weight_grad_float32(save_bytes: int) -> None:
    hidden, weight, _, targets = _inputs(torch.float32)
    weight = weight.detach()  # a frozen / tied head that needs no gradient
    lp = token_logprobs_from_hidden(hidden, weight, targets, chunk_size=8, save_bytes=save_bytes)
    lp.sum().backward()
    lp_ref = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, targets[..., None])[..., 0]
    (g_ref,) = torch.autograd.grad(lp_ref.sum(), hidden)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("save_bytes", SAVE)
def test_masked_and_ignored_positions_are_zero_and_get_no_gradient(save_bytes: int) -> None:
    hidden, weight, bias, targets = _inputs()
    targets = targets.clone()
    targets[0, :2] = -100
    mask = torch.ones(B, T)
    mask[2, 4:] = 0
    lp, en = token_logprobs_and_entropy(hidden, weight, targets, 5, bias=bias, mask=mask, save_bytes=save_bytes)
    (lp.sum() + en.sum()).backward()
    skipped = torch.zeros(B, T, dtype=torch.bool)
    skipped[0, :2] = True
    skipped[2, 4:] = True
    assert torch.all(lp[skipped] == 0) and torch.all(en[skipped] == 0)
    assert torch.all(hidden.grad[skipped] == 0)
    assert torch.all(hidden.grad[~skipped].abs().sum(-1) > 0)
    lp_ref, en_ref = _naive(hidden, weight, bias, targets.clamp(min=0))
    torch.testing.assert_close(lp[~skipped], lp_ref[~skipped], rtol=0, atol=1e-12)


def _largest_saved_numel(fn: Callable[[], Tensor]) -> int:
    sizes: list[int] = []

    def pack(t: Tensor) -> Tensor:
        sizes.append(t.numel())
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()  # the saved tensors really do serve the backward
    return max(sizes)


def test_autograd_keeps_full_logits_only_within_save_bytes() -> None:
    """Over the `save_bytes` budget (0 here) autograd holds nothing of size N x V; within it the
    forward's log-softmax is kept (N x V float64 = 8,400 bytes for these 21 tokens)."""
    hidden, weight, bias, targets = _inputs()
    n_tokens = B * T
    assert weight.numel() < n_tokens * V  # so the check below can only be tripped by logits

    def chunked(save_bytes: int) -> Callable[[], Tensor]:
        def run() -> Tensor:
            lp, en = token_logprobs_and_entropy(hidden, weight, targets, chunk_size=4, bias=bias,
                                                save_bytes=save_bytes)
            return lp + en
        return run

    def naive() -> Tensor:
        lp, en = _naive(hidden, weight, bias, targets)
        return lp + en

    assert _largest_saved_numel(chunked(0)) < n_tokens * V
    assert _largest_saved_numel(chunked(n_tokens * V * 8 - 1)) < n_tokens * V  # one byte short
    assert _largest_saved_numel(chunked(n_tokens * V * 8)) == n_tokens * V
    assert _largest_saved_numel(naive) >= n_tokens * V  # the probe does see full logits


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
def test_from_logits(chunk_size: int) -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(B, T, V, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, V, (B, T), generator=g)
    lp = token_logprobs_from_logits(logits, targets, chunk_size=chunk_size, temperature=0.5)
    want = torch.log_softmax(logits.float() / 0.5, -1).gather(-1, targets.unsqueeze(-1))
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, want.squeeze(-1), rtol=0, atol=1e-6)


def test_bad_arguments() -> None:
    hidden, weight, _, targets = _inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs_from_hidden(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs_from_hidden(hidden, weight, targets[:, :-1])
    with pytest.raises(ValueError, match="lm_head_weight"):
        token_logprobs_from_hidden(hidden, weight[:, :-1], targets)


@pytest.mark.parametrize("save_bytes", SAVE)
def test_bfloat16_head_is_close_to_float64(save_bytes: int) -> None:
    hidden, weight, bias, targets = _inputs(torch.float64)
    h16 = hidden.detach().to(torch.bfloat16).requires_grad_(True)
    w16 = weight.detach().to(torch.bfloat16).requires_grad_(True)
    lp = token_logprobs_from_hidden(h16, w16, targets, chunk_size=5, save_bytes=save_bytes)
    lp.sum().backward()
    assert lp.dtype == torch.float32 and w16.grad.dtype == torch.bfloat16
    # reference from the same rounded inputs, computed in float64
    h64 = h16.detach().double().requires_grad_(True)
    w64 = w16.detach().double().requires_grad_(True)
    ref = torch.log_softmax(h64 @ w64.t(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ref.sum().backward()
    # bf16 logits carry ~3 significant digits; logits here are O(10)
    torch.testing.assert_close(lp.double(), ref, rtol=0, atol=0.05)
    torch.testing.assert_close(w16.grad.double(), w64.grad, rtol=0.02, atol=0.05)
    torch.testing.assert_close(h16.grad.double(), h64.grad, rtol=0.02, atol=0.05)


@pytest.mark.parametrize("save_bytes", SAVE)
def test_bf16_autocast_gradients_match_autocast_reference(save_bytes: int) -> None:
    """Forward under CPU bf16 autocast, backward outside it (as the SFT step runs): the logits
    recomputed in the backward must be the forward's (bf16 matmul), else softmax(z) - lse does not
    sum to 1 and the gradient is off by percents. Reference: the naive computation under autocast."""
    hidden, weight, _, targets = _inputs(torch.float32, seed=4)
    g = torch.Generator().manual_seed(5)
    w_lp = torch.randn(B, T, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, _ = token_logprobs_and_entropy(hidden, weight, targets, chunk_size=4, with_entropy=False,
                                           save_bytes=save_bytes)
    got = torch.autograd.grad((lp * w_lp).sum(), (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = (hidden @ weight.t()).float()
    ref = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    want = torch.autograd.grad((ref * w_lp).sum(), (hidden, weight))
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-4)
    for a, b in zip(got, want):
        rel = float((a - b).norm() / b.norm())
        assert rel < 5e-3, rel


def test_no_log_softmax_kept_without_grad_mode(monkeypatch) -> None:
    """Under no_grad nothing can call the backward, so no [N, V] buffer is kept whatever the budget
    (the Function itself cannot tell: grad mode is always off inside its forward)."""
    import thinkvl.rl.logprobs as L

    seen = []
    real = L._ChunkedLogprobEntropy.apply
    monkeypatch.setattr(L._ChunkedLogprobEntropy, "apply", lambda *a: seen.append(a[-1]) or real(*a))
    hidden, weight, bias, targets = _inputs()
    with torch.no_grad():
        token_logprobs_and_entropy(hidden, weight, targets, chunk_size=4, bias=bias, save_bytes=1 << 30)
    with torch.inference_mode():
        token_logprobs_and_entropy(hidden, weight, targets, chunk_size=4, bias=bias, save_bytes=1 << 30)
    token_logprobs_and_entropy(hidden, weight, targets, chunk_size=4, bias=bias, save_bytes=1 << 30)
    assert seen == [0, 0, 1 << 30]


def test_double_backward_raises() -> None:
    """The backward is first-order only; asking for a second derivative fails loudly instead of
    returning a wrong one."""
    hidden, weight, bias, targets = _inputs()
    lp, _ = token_logprobs_and_entropy(hidden, weight, targets, chunk_size=4, bias=bias)
    (gh,) = torch.autograd.grad(lp.sum(), hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|marked with @once"):
        gh.sum().backward()
