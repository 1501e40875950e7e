"""Varlen attention for packed rows: scaled-dot-product attention run per packed example.

transformers turns a packed row (positions restarting at 0 per example, no attention mask, no
cache) into a block-diagonal [T, T] mask, and SDPA then computes the whole row's attention matrix
and throws most of it away: a 1024-token row of ten 100-token examples pays 1024^2 instead of
10 * 100^2. Off GPU there is no flash-attention varlen kernel to avoid that, so this module
registers `thinkvl_varlen` with transformers' AttentionInterface: the row is cut where the
positions restart and each example runs causal SDPA on its own slice. The result is the same
attention (tests compare it with the masked SDPA path and with each example run alone); only the
wasted work is gone. Because the implementation has no mask function registered, transformers
builds no [T, T] mask either.

Anything that is not a packed training/scoring pass (a padding mask, a KV cache, one query token,
a sliding window) falls through to transformers' own SDPA mask and SDPA path, so generation is
unchanged.

Shared prefixes (the RL update packs a prompt once for its k responses): a segment whose first
position s is not 0 is a branch of the row's last root segment (the last one that started at 0) and
attends to that root's first s tokens and causally to itself, exactly what it would attend to if the
prompt were repeated in front of it. transformers' own packed-row masks would instead treat a branch
as a new example, so shared-prefix rows need this implementation (the RL loop checks).

When the value head is narrower than the query/key head (multi-head latent attention: Kimi-VL,
DeepSeek-V3), the values are zero-padded to the query width so CPU SDPA can take its fused kernel
instead of the math fallback; the padded output columns are sliced off (exact).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

log = logging.getLogger("thinkvl")

VARLEN = "thinkvl_varlen"
# the names users write in `model.attn_implementation`
CHOICES = ("varlen", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def segment_bounds(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the start index of every packed segment (a new segment starts wherever the position
    is not the previous position + 1), followed by the row length."""
    pos = position_ids
    t = pos.shape[-1]
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    rows = []
    for r in starts.tolist():
        rows.append([i for i, s in enumerate(r) if s] + [t])
    return rows


def _row_attention(qb, kb, vb, bounds: list[int], first_pos: list[int], p: float, scaling) -> torch.Tensor:
    """Attention of one packed row [H, T, D]: causal within each segment; a branch segment (first
    position s > 0 right after a root of at least s tokens or another branch) also sees the root's
    first s tokens."""
    if len(bounds) == 2:  # one segment: plain causal attention on the row
        return F.scaled_dot_product_attention(qb, kb, vb, dropout_p=p, is_causal=True, scale=scaling)
    lens = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    parts, root = [], None
    for qs, ks, vs, s0 in zip(qb.split(lens, dim=1), kb.split(lens, dim=1), vb.split(lens, dim=1), first_pos):
        if s0 == 0:
            root = (ks, vs)
        elif root is not None and s0 <= root[0].shape[1]:  # a branch of the current root
            rk, rv = (root[0], root[1]) if s0 == root[0].shape[1] else (root[0][:, :s0], root[1][:, :s0])
            n = qs.shape[1]
            mask = _causal_offset_mask(n, s0 + n, qs.device)[0]  # [1, n, s0 + n]
            parts.append(F.scaled_dot_product_attention(qs, torch.cat([rk, ks], 1), torch.cat([rv, vs], 1),
                                                        attn_mask=mask, dropout_p=p, scale=scaling))
            continue
        else:  # a segment that starts mid-sequence with no root to hang on: its own causal block
            root = None
        parts.append(F.scaled_dot_product_attention(qs, ks, vs, dropout_p=p, is_causal=True, scale=scaling))
    return torch.cat(parts, dim=1)


def _causal_offset_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Bool [1, 1, q, kv]: causal, with the queries being the last q_len of the keys (cached prefill)."""
    q_idx = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    return (torch.arange(kv_len, device=device)[None, :] <= q_idx)[None, None]


def varlen_mask(*args, attention_mask=None, use_vmap: bool = False, local_size=None, **kwargs):
    """The mask function registered with `thinkvl_varlen`.

    No padding mask, plain causal attention (no sliding window, no extra or/and mask functions,
    which transformers signals with `use_vmap`): return None, so no [T, T] mask is ever built and
    the attention cuts packed rows by their positions. Anything else: transformers' SDPA mask.
    """
    if attention_mask is None and not use_vmap and local_size is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, use_vmap=use_vmap, local_size=local_size, **kwargs)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [B, H, T, Dqk], key [B, Hkv, S, Dqk], value [B, Hkv, S, Dv] -> ([B, T, H, Dv], None)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    position_ids = kwargs.get("position_ids")
    if attention_mask is None and 1 < q_len < kv_len:  # prefill after cached tokens, no padding
        attention_mask = _causal_offset_mask(q_len, kv_len, query.device)
    # Packing is read from 2-D text positions only (Qwen-VL's text model passes its text row here);
    # 3-D mRoPE rows give image tokens equal positions, which would look like example boundaries.
    if (attention_mask is not None or position_ids is None or position_ids.ndim != 2
            or q_len != kv_len or q_len == 1):
        kwargs.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if position_ids.shape[0] != query.shape[0]:
        position_ids = position_ids.expand(query.shape[0], -1)

    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dv = value.shape[-1]
    if dv < query.shape[-1]:
        value = F.pad(value, (0, query.shape[-1] - dv))
    p = dropout if module.training else 0.0

    # unbind/split rather than slicing: their backward is one stack/cat, where every slice's
    # backward would write into its own zero-filled copy of the whole tensor
    pos_rows = position_ids.tolist()
    rows = []
    for qb, kb, vb, bounds, pos in zip(query.unbind(0), key.unbind(0), value.unbind(0),
                                       segment_bounds(position_ids), pos_rows):
        rows.append(_row_attention(qb, kb, vb, bounds, [pos[b] for b in bounds[:-1]], p, scaling))
    out = torch.stack(rows, dim=0)[..., :dv]
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `thinkvl_varlen` a valid `attn_implementation` for transformers models (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if VARLEN not in AttentionInterface._global_mapping:
        AttentionInterface.register(VARLEN, varlen_attention_forward)
    if VARLEN not in AttentionMaskInterface._global_mapping:
        # without a mask function transformers passes no mask at all to a custom attention
        # (not even the padding mask of a left-padded generation batch)
        AttentionMaskInterface.register(VARLEN, varlen_mask)


def uses_varlen(model) -> bool:
    """Whether the (language) model attends with `thinkvl_varlen`, which reads shared-prefix rows."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    return getattr(cfg, "_attn_implementation", None) == VARLEN


def set_attention(model, implementation: str) -> None:
    """Set the language model's attention implementation.

    `varlen` applies thinkvl's per-example SDPA to the language model only; a VLM's vision tower
    keeps SDPA (its encoders already attend within each image). Other names go to transformers as
    they are.
    """
    if implementation not in CHOICES:
        raise ValueError(f"model.attn_implementation: {implementation!r} is not one of {', '.join(CHOICES)}")
    if implementation != "varlen":
        model.set_attn_implementation(implementation)  # dispatched to every sub-model
        return
    register()
    if not model._can_set_attn_implementation():
        # e.g. remote code that does not dispatch through transformers' AttentionInterface
        log.warning("%s does not take a custom attention implementation; keeping %s (packed rows then pay "
                    "for cross-example attention)", type(model).__name__, model.config._attn_implementation)
        return
    if "text_config" in getattr(model.config, "sub_configs", {}):
        model.set_attn_implementation({"text_config": VARLEN})
    else:
        model.set_attn_implementation(VARLEN)
