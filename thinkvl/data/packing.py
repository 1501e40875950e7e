"""Packing: best-fit-decreasing into fixed-capacity rows, and the collation of packed rows.

In a packed row every example keeps its own positions (restarting at 0, or its own 3-row mRoPE ids
with a text row on top for Qwen-VL models). transformers derives a block-diagonal causal mask from
position_ids that restart at 0 when no attention mask is passed and no cache is in use, so examples
never attend to each other (`use_cache=False` is mandatory: with a cache the packed mask is skipped).
Targets are next tokens within the same example only; the last token of an example predicts nothing.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import torch

from thinkvl.data.chat import Example


def bfd_pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: indices grouped into rows of total length <= capacity.

    Longest first; each goes into the open row with the least room that still fits it, else a new
    row. Every index appears exactly once. Raises if one item alone exceeds the capacity.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row index)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} has length {n} > capacity {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            rows.append([])
            room, r = capacity, len(rows) - 1
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


PositionFn = Callable[[Example], torch.Tensor]  # -> [L] or [P, L]


def text_positions(ex: Example) -> torch.Tensor:
    return torch.arange(len(ex), dtype=torch.long)


def collate_rows(
    examples: Sequence[Example],
    rows: Sequence[Sequence[int]],
    pad_id: int,
    position_fn: PositionFn = text_positions,
    pad_to: int | None = None,
) -> dict[str, torch.Tensor]:
    """Build one micro-batch from rows of example indices.

    Returns input_ids [R, T], position_ids [R, T] or [P, R, T], targets [R, T] (the next token),
    target_mask [R, T] (True where the next token is a supervised token of the same example),
    pixel_values / image_grid_thw concatenated in the order their placeholders appear, and
    mm_token_type_ids [R, T] when the examples carry them.
    """
    width = max(sum(len(examples[i]) for i in row) for row in rows)
    width = max(width, pad_to or 0)
    n_pos_rows = None
    ids_rows, pos_rows, tgt_rows, tmask_rows, tt_rows = [], [], [], [], []
    pixels, grids = [], []
    for row in rows:
        ids: list[int] = []
        tgt: list[int] = []
        tmask: list[bool] = []
        pos: list[torch.Tensor] = []
        tt: list[int] = []
        for i in row:
            ex = examples[i]
            ids.extend(ex.input_ids)
            tgt.extend(ex.input_ids[1:] + [pad_id])
            tmask.extend(ex.loss_mask[1:] + [False])
            p = position_fn(ex)
            pos.append(p if p.dim() == 2 else p.unsqueeze(0))
            tt.extend(ex.extra.get("mm_token_type_ids", [0] * len(ex)))
            if ex.pixel_values is not None:
                pixels.append(ex.pixel_values)
                grids.append(ex.image_grid_thw)
        n_pad = width - len(ids)
        p_rows = pos[0].shape[0]
        n_pos_rows = n_pos_rows or p_rows
        if n_pad:
            # Padding is its own segment with positions from 0: nothing real attends to it (it comes
            # last, attention is causal) and it carries no loss.
            pos.append(torch.arange(n_pad, dtype=torch.long).expand(p_rows, n_pad))
        ids_rows.append(ids + [pad_id] * n_pad)
        tgt_rows.append(tgt + [pad_id] * n_pad)
        tmask_rows.append(tmask + [False] * n_pad)
        tt_rows.append(tt + [0] * n_pad)
        pos_rows.append(torch.cat(pos, dim=1))
    position_ids = torch.stack(pos_rows, dim=1)  # [P, R, T]
    batch = {
        "input_ids": torch.tensor(ids_rows, dtype=torch.long),
        "position_ids": position_ids[0] if n_pos_rows == 1 else position_ids,
        "targets": torch.tensor(tgt_rows, dtype=torch.long),
        "target_mask": torch.tensor(tmask_rows, dtype=torch.bool),
    }
    if pixels:
        batch["pixel_values"] = torch.cat(pixels, dim=0)
        batch["image_grid_thw"] = torch.cat(grids, dim=0)
    if any(any(r) for r in tt_rows):
        batch["mm_token_type_ids"] = torch.tensor(tt_rows, dtype=torch.long)
    return batch


def packing_efficiency(batch: dict[str, torch.Tensor], lengths: Sequence[int]) -> float:
    """Non-pad tokens over all tokens of a batch."""
    return sum(lengths) / batch["input_ids"].numel()
