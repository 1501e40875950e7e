"""RL losses as pure tensor functions: k1.5 policy mirror descent and a GRPO baseline.

Conventions shared by every function here:

- ``logprobs`` / ``ref_logprobs`` are per-token log-probs ``[B, T]``; ``ref_logprobs`` are those of
  the rollout policy pi_i (the reference of this iteration) and are always detached.
- ``mask`` ``[B, T]`` is 1 on response tokens and 0 elsewhere (prompt, padding). Masked positions
  are selected with ``torch.where``, so a -inf or NaN there cannot leak into the loss.
- The ``group_size`` = k responses of one prompt sit next to each other in the batch, so B must be a
  multiple of k.
- Aggregation is explicit: each loss is ``sum(...) / normalizer``. With ``normalizer=None`` it is
  the local count (responses for mirror descent, response tokens for GRPO). A step split into
  micro-batches or shards passes the *global* count, and the per-micro-batch losses then sum to the
  loss of the whole batch.
- Advantages need whole groups. When a micro-batch cannot hold a whole group (long responses),
  compute the advantages once on the full batch with :func:`group_advantages` and call the
  ``*_from_advantages`` variants on any slice.

A loss is chosen by name once at setup (:func:`get_loss`), and its settings bound there, e.g.
``functools.partial(get_loss("mirror_descent"), tau=0.1)``.
"""

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "LOSSES",
    "get_loss",
    "group_advantages",
    "tied_groups",
    "sequence_logprobs",
    "mirror_descent_loss",
    "mirror_descent_loss_from_advantages",
    "mirror_descent_stats",
    "grpo_loss",
    "grpo_loss_from_advantages",
]

GRPO_STD_EPS = 1e-4


def _check_inputs(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, per_seq: Tensor) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    if ref_logprobs.shape != logprobs.shape or mask.shape != logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, ref_logprobs {tuple(ref_logprobs.shape)} and "
            f"mask {tuple(mask.shape)} must have the same shape"
        )
    if per_seq.shape != logprobs.shape[:1]:
        raise ValueError(
            f"rewards/advantages must be [B] = [{logprobs.shape[0]}], got {tuple(per_seq.shape)}"
        )


def _divide(total: Tensor, normalizer: float | Tensor | None, default: float | Tensor) -> Tensor:
    denom = default if normalizer is None else normalizer
    # only plain numbers are checked: reading a CUDA tensor here would sync every micro-batch
    if isinstance(denom, (int, float)) and denom <= 0:
        raise ValueError(f"normalizer must be > 0, got {denom}")
    return total / denom


def sequence_logprobs(logprobs: Tensor, mask: Tensor) -> Tensor:
    """Sequence log-probability: ``log pi(y|x) = sum_t mask[b, t] * logprobs[b, t]``.

    Args:
        logprobs: token log-probs ``[B, T]``.
        mask: 1 on response tokens ``[B, T]``.

    Returns:
        ``[B]`` summed log-probs of the masked tokens.
    """
    return torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs)).sum(dim=-1)


def tied_groups(values: Tensor, group_size: int) -> Tensor:
    """``[B/k]`` bool: True where the k = ``group_size`` contiguous values of a group are all equal.

    A group whose rewards are tied carries no learning signal: its advantages are exactly 0.

    Raises:
        ValueError: if ``values`` is not ``[B]`` or B is not a positive multiple of ``group_size``.
    """
    if values.dim() != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(values.shape)}")
    if group_size < 1 or values.shape[0] % group_size != 0:
        raise ValueError(
            f"batch size {values.shape[0]} must be a positive multiple of group_size {group_size}"
        )
    grouped = values.detach().view(-1, group_size)  # [B/k, k]
    return grouped.max(dim=1).values == grouped.min(dim=1).values


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale: bool = False,
    eps: float = GRPO_STD_EPS,
    correct: Tensor | None = None,
) -> Tensor:
    """Group-baseline advantages: ``A_j = r_j - rbar``, or with ``scale`` GRPO's scaled form.

    rbar is the mean of the k = ``group_size`` contiguous total rewards r of one prompt; a group
    whose rewards are all equal gets A = 0 exactly (the float mean of k equal values can be off by
    an ulp). With ``scale``, c = ``correct`` (the verifier's part of r; default r itself) and
    std_k(c) its population standard deviation (``correction=0``) within the group::

        A_j = (r_j - rbar) / (std_k(c) + eps)   if the group's c are not all equal
        A_j =  r_j - rbar                       if they are (every response right, or every one wrong)

    Scaling by the correctness spread, not by that of r, keeps an auxiliary term such as the length
    reward (r = c + w * len_reward) at its weight w relative to correctness: in a tied group the
    std of r is the small spread of the w-terms alone, and dividing by it would blow them up to
    unit scale. Without ``correct`` this is plain GRPO (c = r; a tied group has A = 0).

    Args:
        rewards: ``[B]`` total rewards, B a multiple of ``group_size``.
        group_size: k, the number of responses per prompt.
        scale: GRPO's scaling (above) instead of only subtracting the mean (mirror descent).
        eps: added to the std; keeps a group whose c barely differ finite.
        correct: ``[B]`` correctness part of each reward, used only with ``scale``.

    Returns:
        ``[B]`` advantages in the dtype of ``rewards`` (float32 at least).

    Raises:
        ValueError: if ``group_size < 1``, B is not a multiple of it, or ``correct`` is not ``[B]``.
    """
    tied = tied_groups(rewards, group_size).unsqueeze(1)  # [B/k, 1]
    r = rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32))
    grouped = r.view(-1, group_size)  # [B/k, k]
    adv = (grouped - grouped.mean(dim=1, keepdim=True)).masked_fill(tied, 0.0)  # [B/k, k]
    if scale:
        if correct is not None and correct.shape != rewards.shape:
            raise ValueError(f"correct must be [B] = [{rewards.shape[0]}], got {tuple(correct.shape)}")
        c = r if correct is None else correct.detach().to(r.dtype)
        c_grouped = c.view(-1, group_size)  # [B/k, k]
        std = c_grouped.std(dim=1, correction=0, keepdim=True)  # [B/k, 1]
        adv = torch.where(tied_groups(c, group_size).unsqueeze(1), adv, adv / (std + eps))
    return adv.reshape(-1)  # [B]


def mirror_descent_loss_from_advantages(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    advantages: Tensor,
    tau: float,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """k1.5 squared surrogate with precomputed advantages ``A_j = r_j - rbar``.

    ``L = (1/N) sum_j ( A_j - tau * (log pi_theta(y_j|x) - log pi_i(y_j|x)) )^2``

    with N = ``normalizer`` if given, else B. See :func:`mirror_descent_loss`.
    """
    _check_inputs(logprobs, ref_logprobs, mask, advantages)
    seq_logp = sequence_logprobs(logprobs, mask)  # [B]
    seq_ref = sequence_logprobs(ref_logprobs.detach(), mask)  # [B]
    residual = advantages.detach().to(seq_logp.dtype) - tau * (seq_logp - seq_ref)  # [B]
    return _divide(residual.pow(2).sum(), normalizer, default=logprobs.shape[0])


def mirror_descent_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_size: int,
    tau: float,
    normalizer: float | Tensor | None = None,
    correct: Tensor | None = None,
) -> Tensor:
    """Online policy mirror descent surrogate of Kimi k1.5 (RECIPE.md, stage 3).

    With d_j = log pi_theta(y_j|x) - log pi_i(y_j|x) the sequence log-ratio (sum over the masked
    tokens) and rbar the mean reward of the k responses of the same prompt::

        L = (1/N) sum_{j=1..B} ( r_j - rbar - tau * d_j )^2,    N = B unless ``normalizer`` is given

    i.e. the mean over responses; for equal-size groups this equals ``E_x 1/k sum_j (...)^2``.
    Its gradient w.r.t. the sequence log-prob is
    ``dL/d log pi_j = -(2 tau / N) (r_j - rbar - tau d_j)``, hence::

        grad L = -(2 tau / N) sum_j [ (r_j - rbar) grad log pi_j  -  (tau / 2) grad d_j^2 ]

    the policy gradient with a mean-reward baseline plus an L2 pull toward pi_i (RECIPE.md), times
    the constant 2 tau / N. At the first optimiser step of an iteration (d = 0) it is
    ``-(2 tau / N) (r_j - rbar)`` per response.

    Args:
        logprobs: ``[B, T]`` token log-probs under pi_theta (requires grad).
        ref_logprobs: ``[B, T]`` token log-probs under pi_i, recorded at rollout (detached here).
        mask: ``[B, T]`` 1 on response tokens.
        rewards: ``[B]`` total reward of each response (verifier + weighted length reward).
        group_size: k, responses per prompt, contiguous in the batch.
        tau: KL-regularisation strength (> 0).
        normalizer: divide the summed squares by this instead of B; pass the global number of
            responses of the step when the step is split into micro-batches or across processes.
        correct: not used; accepted so that every loss takes the same arguments. r - rbar is not
            rescaled, so no part of the reward needs telling apart.

    Returns:
        Scalar loss.

    Raises:
        ValueError: on shape mismatch, B not a multiple of ``group_size``, or ``normalizer <= 0``.
    """
    advantages = group_advantages(rewards, group_size)  # [B]
    return mirror_descent_loss_from_advantages(
        logprobs, ref_logprobs, mask, advantages, tau, normalizer
    )


@torch.no_grad()
def mirror_descent_stats(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_size: int,
    tau: float,
) -> dict[str, float]:
    """Scalars to log next to :func:`mirror_descent_loss` (no gradient).

    Keys:
        ``log_ratio_mean``: mean over responses of d_j = log pi_theta(y_j) - log pi_i(y_j). The
            responses were sampled from pi_i, so ``-log_ratio_mean`` estimates KL(pi_i || pi_theta)
            per sequence; it is exactly 0 at the first optimiser step of an iteration.
        ``kl_k3_token``: mean over response tokens of ``exp(l) - 1 - l`` with l the token log-ratio,
            a non-negative per-token estimate of KL(pi_i || pi_theta).
        ``reward_mean``, ``adv_abs_mean``, ``adv_std``: reward and advantage (r - rbar) statistics.
        ``zero_adv_group_frac``: share of groups whose rewards are all equal (no learning signal
            except the KL pull).
        ``residual_rms``: root-mean-square of r - rbar - tau d, the quantity the loss squares.
        ``response_tokens_mean``: mean number of masked tokens per response.
    """
    adv = group_advantages(rewards, group_size)  # [B]
    _check_inputs(logprobs, ref_logprobs, mask, adv)
    d = sequence_logprobs(logprobs, mask) - sequence_logprobs(ref_logprobs, mask)  # [B]
    on = mask.bool()
    token_ratio = torch.where(on, logprobs - ref_logprobs, torch.zeros_like(logprobs))  # [B, T]
    k3 = torch.expm1(token_ratio) - token_ratio  # [B, T], 0 where masked
    n_tokens = on.sum().clamp(min=1)
    zero_adv = tied_groups(rewards, group_size).float()
    residual = adv.to(d.dtype) - tau * d
    return {
        "log_ratio_mean": d.mean().item(),
        "kl_k3_token": (k3.sum() / n_tokens).item(),
        "reward_mean": rewards.float().mean().item(),
        "adv_abs_mean": adv.abs().mean().item(),
        "adv_std": adv.std(correction=0).item(),
        "zero_adv_group_frac": zero_adv.mean().item(),
        "residual_rms": residual.pow(2).mean().sqrt().item(),
        "response_tokens_mean": on.sum(dim=1).float().mean().item(),
    }


def grpo_loss_from_advantages(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    advantages: Tensor,
    clip_eps: float = 0.2,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Clipped token-level surrogate with precomputed (already scaled) advantages ``[B]``.

    ``L = -(1/N) sum_{b,t in mask} min( rho_bt A_b, clip(rho_bt, 1-eps, 1+eps) A_b )``,
    ``rho_bt = exp(logprobs - ref_logprobs)``, N = ``normalizer`` if given, else the number of
    response tokens. See :func:`grpo_loss`.
    """
    _check_inputs(logprobs, ref_logprobs, mask, advantages)
    on = mask.bool()
    log_ratio = torch.where(on, logprobs - ref_logprobs.detach(), torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)  # [B, T]
    adv = advantages.detach().to(ratio.dtype).unsqueeze(1)  # [B, 1]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)  # [B, T]
    total = -torch.where(on, surrogate, torch.zeros_like(surrogate)).sum()
    # clamp: a micro-batch of prompts only (no response tokens) gives 0, not NaN
    return _divide(total, normalizer, default=on.sum().clamp(min=1))


def grpo_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_size: int,
    clip_eps: float = 0.2,
    normalizer: float | Tensor | None = None,
    correct: Tensor | None = None,
) -> Tensor:
    """GRPO-style clipped policy gradient, the baseline to compare mirror descent against.

    ``A_j = (r_j - rbar) / (std_k(c) + 1e-4)`` per group, c the correctness part of the reward
    (population std; ``A_j = r_j - rbar`` where the group's c are all equal:
    :func:`group_advantages` with ``scale=True``), token ratio
    ``rho_jt = exp(log pi_theta - log pi_old)`` with pi_old = ``ref_logprobs`` (the rollout policy,
    which in this on-policy loop is also pi_i)::

        L = -(1/N) sum_{j,t in mask} min( rho_jt A_j, clip(rho_jt, 1 - eps, 1 + eps) A_j )

    N = number of response tokens in the batch (token mean), or ``normalizer`` (pass the global
    token count of the step when micro-batching / sharding). No KL term.

    Args:
        logprobs: ``[B, T]`` token log-probs under the policy being trained.
        ref_logprobs: ``[B, T]`` token log-probs of the rollout policy (detached here).
        mask: ``[B, T]`` 1 on response tokens.
        rewards: ``[B]`` total rewards.
        group_size: k, responses per prompt, contiguous in the batch.
        clip_eps: ratio clip range.
        normalizer: token count to divide by instead of the local one.
        correct: ``[B]`` verifier part of each reward (r = correct + w * length reward); the
            scale comes from its spread. None: from the spread of ``rewards`` (plain GRPO).

    Returns:
        Scalar loss.
    """
    advantages = group_advantages(rewards, group_size, scale=True, correct=correct)  # [B]
    return grpo_loss_from_advantages(
        logprobs, ref_logprobs, mask, advantages, clip_eps, normalizer
    )


LOSSES: dict[str, Callable[..., Tensor]] = {
    "mirror_descent": mirror_descent_loss,
    "grpo": grpo_loss,
}


def get_loss(name: str) -> Callable[..., Tensor]:
    """The loss function registered under ``name`` (see :data:`LOSSES`).

    Raises:
        ValueError: naming the allowed names if ``name`` is unknown.
    """
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; allowed: {sorted(LOSSES)}") from None
