"""Token log-probs (and entropy) from hidden states without the full ``[B*T, V]`` float32 logits.

With long responses and a large vocabulary, the float32 logits of a whole RL batch do not fit
(8 x 32k tokens x 160k vocab x 4 B = 168 GB). :func:`token_logprobs_and_entropy` projects the final
hidden states through the LM head one chunk of tokens at a time, keeps only a few numbers per
token, and recomputes each chunk's logits in the backward pass, so the extra memory is
O(chunk_size * V) in both directions. When the log-softmax of every kept token fits in
``save_bytes`` (default 256 MiB: small vocabularies, short CPU batches), the forward keeps it and
the backward skips the recomputation, one LM-head matmul in four. The matmul runs in the
weights' dtype (as the model's own head does) and the softmax in float32 (float64 if the inputs
are float64).
"""

import contextlib

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "token_logprobs_from_hidden",
    "token_logprobs_and_entropy",
    "token_logprobs_from_logits",
]


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    """``(h @ W^T + b) / temperature`` for one chunk, upcast for the softmax: ``[c, V]``.

    Fresh buffer, so callers may work on it in place; no division at temperature 1."""
    logits = h @ weight.t()
    if bias is not None:
        logits += bias
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits if temperature == 1.0 else logits.div_(temperature)


class _ChunkedLogprobEntropy(torch.autograd.Function):
    """Per-token ``log softmax(z)[target]`` and entropy of ``softmax(z)``, z = logits / temperature.

    Saves the inputs plus two numbers per token (logsumexp, entropy); the backward recomputes each
    chunk's logits, using ``d logp/dz = onehot - p`` and ``dH/dz = -p * (log p + H)``. When a
    gradient is needed and the whole ``[N, V]`` log-softmax takes at most ``save_bytes``, it is
    kept from the forward instead and nothing is recomputed. A recomputation runs under the
    forward's autocast state, so its logits match the ``lse`` saved from the forward. First-order
    only (a double backward raises). Without ``with_entropy`` the entropy is neither computed nor
    differentiable (returned as zeros), which saves an exp, a product and a sum over every
    ``[c, V]`` chunk in each direction.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,  # [N, H]
        weight: Tensor,  # [V, H]
        bias: Tensor | None,  # [V]
        targets: Tensor,  # [N]
        chunk_size: int,
        temperature: float,
        with_entropy: bool = True,
        save_bytes: int = 0,
    ) -> tuple[Tensor, Tensor]:
        n = hidden.shape[0]
        out_dtype = torch.promote_types(hidden.dtype, torch.float32)
        n_vocab = weight.shape[0]
        # grad mode is off inside forward and needs_input_grad only says what requires grad, so the
        # caller passes save_bytes=0 when no backward can follow (no_grad / inference_mode)
        keep = any(ctx.needs_input_grad[:3]) and n * n_vocab * out_dtype.itemsize <= save_bytes
        saved = hidden.new_empty((n, n_vocab) if keep else (0,), dtype=out_dtype)  # log-softmax rows
        logp = hidden.new_empty(n, dtype=out_dtype)
        entropy = hidden.new_empty(n, dtype=out_dtype) if with_entropy else hidden.new_zeros(n, dtype=out_dtype)
        lse = hidden.new_empty(n, dtype=out_dtype)
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            z = _chunk_logits(hidden[sl], weight, bias, temperature)  # [c, V]
            lse_c = torch.logsumexp(z, dim=-1)  # [c]
            lse[sl] = lse_c
            logp[sl] = z.gather(1, targets[sl].unsqueeze(1)).squeeze(1) - lse_c
            if with_entropy:
                # H = lse - sum_v p_v z_v; in place so a chunk never holds more than two [c, V] buffers
                p = torch.exp(z - lse_c.unsqueeze(1))  # [c, V]
                entropy[sl] = lse_c - p.mul_(z).sum(dim=-1)
            if keep:
                torch.sub(z, lse_c.unsqueeze(1), out=saved[sl])
            del z
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy, saved)
        ctx.kept = keep
        dev = hidden.device.type
        ctx.autocast = (dev, torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else None
        ctx.chunk_size = chunk_size
        ctx.temperature = temperature
        ctx.with_entropy = with_entropy
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: skip its work
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_logp: Tensor, grad_entropy: Tensor
    ) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, lse, entropy, saved = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        chunk_size, temperature = ctx.chunk_size, ctx.temperature
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        grad_h = torch.empty_like(hidden) if need_h else None
        # accumulate the weight gradient over chunks in float32 at least, then cast once
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        dev = weight.device
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=dev) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc_dtype, device=dev) if need_b else None
        with_entropy = ctx.with_entropy and grad_entropy is not None
        autocast = (torch.autocast(ctx.autocast[0], dtype=ctx.autocast[1]) if ctx.autocast and not ctx.kept
                    else contextlib.nullcontext())
        for start in range(0, hidden.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            h = hidden[sl]
            if ctx.kept:  # a fresh buffer only where the in-place entropy path would write into it
                log_p = saved[sl].clone() if with_entropy else saved[sl]
            else:
                with autocast:  # the forward's logits: bf16 under bf16 autocast, as lse came from them
                    z = _chunk_logits(h, weight, bias, temperature)
                log_p = z.sub_(lse[sl].unsqueeze(1))  # [c, V]
            g_lp = grad_logp[sl].unsqueeze(1)  # [c, 1]
            if with_entropy:
                p = torch.exp(log_p)  # [c, V]
                g_en = grad_entropy[sl].unsqueeze(1)  # [c, 1]
                # dL/dz = g_lp * (onehot - p) - g_en * p * (log p + H), built in log_p's buffer
                grad_z = log_p.add_(entropy[sl].unsqueeze(1)).mul_(g_en).add_(g_lp).mul_(p).neg_()
                del p
            else:  # dL/dz = g_lp * (onehot - p), in the one buffer (a new one over a kept log-softmax)
                grad_z = (log_p.exp() if ctx.kept else log_p.exp_()).mul_(g_lp).neg_()
            grad_z.scatter_add_(1, targets[sl].unsqueeze(1), g_lp)
            if temperature != 1.0:
                grad_z.div_(temperature)
            grad_logits = grad_z.to(weight.dtype)  # [c, V], d/d(h W^T + b)
            if need_h:
                grad_h[sl] = grad_logits @ weight
            if need_w:
                grad_w += grad_logits.t() @ h
            if need_b:
                grad_b += grad_logits.sum(dim=0)
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
            None,
            None,
        )


SAVE_BYTES = 256 << 20  # default `save_bytes`: keep the forward's log-softmax up to 256 MiB


def token_logprobs_and_entropy(
    hidden: Tensor,
    lm_head_weight: Tensor,
    targets: Tensor,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    with_entropy: bool = True,
    save_bytes: int = SAVE_BYTES,
) -> tuple[Tensor, Tensor]:
    """Log-prob of each target token and entropy of each next-token distribution.

    With ``z = (hidden @ W^T + bias) / temperature`` and ``q = softmax(z)`` over the vocabulary::

        logp[b, t]    = log q[b, t, targets[b, t]]
        entropy[b, t] = -sum_v q[b, t, v] log q[b, t, v]

    Both are differentiable w.r.t. ``hidden``, ``lm_head_weight`` and ``bias``. Rollouts sampled at
    a temperature need the same temperature here for their log-probs to match the sampler's.

    Positions where ``mask`` is 0 or ``targets == ignore_index`` are skipped (no compute) and
    return 0 for both outputs, with zero gradient.

    Args:
        hidden: ``[B, T, H]`` (any leading shape) final hidden states, aligned with ``targets``
            (i.e. already shifted: ``hidden[:, t]`` predicts ``targets[:, t]``).
        lm_head_weight: ``[V, H]`` output embedding.
        targets: ``[B, T]`` token ids.
        chunk_size: tokens per chunk; peak extra memory is a few ``[chunk_size, V]`` float32
            buffers.
        temperature: divides the logits (> 0).
        bias: ``[V]`` optional LM-head bias.
        mask: ``[B, T]`` optional, nonzero where a log-prob is wanted.
        ignore_index: target value marking a position to skip.
        with_entropy: False skips the entropy (returned as zeros, not differentiable).
        save_bytes: when a gradient is needed and the float32 log-softmax of all kept positions
            takes at most this many bytes, the forward keeps it and the backward does not
            recompute the logits (one matmul fewer: a 50M-parameter SFT step with a 32k vocabulary
            and ~800 supervised tokens went 4.35 -> 4.07 s on a 2-core CPU). 0 always recomputes
            (memory O(chunk_size * V) in both directions).

    Returns:
        ``(logp, entropy)``, each ``[B, T]`` in float32 (float64 for float64 inputs).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be targets {tuple(targets.shape)} + [H]"
        )
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight must be [V, {hidden.shape[-1]}], got {tuple(lm_head_weight.shape)}"
        )
    flat_h = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    flat_t = targets.reshape(-1)  # [N]
    keep = flat_t != ignore_index
    if mask is not None:
        keep = keep & mask.reshape(-1).bool()
    idx = keep.nonzero().squeeze(1)  # [n]; skipping prompt/padding rows saves their V-wide work
    logp_kept, ent_kept = _ChunkedLogprobEntropy.apply(
        flat_h.index_select(0, idx), lm_head_weight, bias, flat_t.index_select(0, idx),
        chunk_size, temperature, with_entropy, save_bytes if torch.is_grad_enabled() else 0,
    )
    out_dtype = torch.promote_types(hidden.dtype, torch.float32)
    zeros = flat_h.new_zeros(flat_t.shape[0], dtype=out_dtype)
    logp = zeros.index_copy(0, idx, logp_kept).view(targets.shape)
    entropy = zeros.index_copy(0, idx, ent_kept).view(targets.shape)
    return logp, entropy


def token_logprobs_from_hidden(
    hidden: Tensor,
    lm_head_weight: Tensor,
    targets: Tensor,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    save_bytes: int = SAVE_BYTES,
) -> Tensor:
    """Per-token log-probs ``[B, T]``; :func:`token_logprobs_and_entropy` without the entropy."""
    logp, _ = token_logprobs_and_entropy(
        hidden, lm_head_weight, targets, chunk_size, temperature, bias, mask, ignore_index, with_entropy=False,
        save_bytes=save_bytes,
    )
    return logp


def token_logprobs_from_logits(
    logits: Tensor, targets: Tensor, chunk_size: int = 1024, temperature: float = 1.0
) -> Tensor:
    """``log_softmax(logits / temperature)[targets]`` in float32, chunked over T: ``[B, T]``.

    For logits the model has already produced (e.g. reference log-probs under ``no_grad``); the
    upcast copy exists one chunk at a time. With gradients, autograd keeps every chunk's float32
    log-softmax, so for training prefer :func:`token_logprobs_from_hidden`.

    Args:
        logits: ``[B, T, V]``.
        targets: ``[B, T]`` token ids (any value at positions the caller will mask is fine only if
            it is a valid id; use 0 for padding).
        chunk_size: positions along T per chunk.
        temperature: divides the logits (> 0).
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be targets {tuple(targets.shape)} + [V]"
        )
    pieces = []
    for start in range(0, logits.shape[1], chunk_size):
        z = logits[:, start : start + chunk_size]
        z = z.to(torch.promote_types(z.dtype, torch.float32)) / temperature  # [B, c, V]
        t = targets[:, start : start + chunk_size].unsqueeze(-1)  # [B, c, 1]
        pieces.append(torch.log_softmax(z, dim=-1).gather(-1, t).squeeze(-1))  # [B, c]
    return torch.cat(pieces, dim=1)
