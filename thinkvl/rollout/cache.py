"""A KV cache that writes each decoded token into preallocated room instead of concatenating.

transformers' `DynamicLayer` grows by `torch.cat` at every decode step, so generating T tokens
copies the whole cache T times: in thinkvl's RL benchmark that `cat` was 44% of generation time.
`PreallocatedLayer` keeps a buffer with room for the prompt plus every new token (the engine knows
both), writes new keys/values into it in place and hands attention a view of the filled part. It
grows by doubling if a caller writes past the room it asked for. Dropping batch rows (finished
sequences) works in place when the selection allows it: the generation engine fills each hole with
a row from the tail (`fill_holes_order`), so only as many [H, length, D] slices move as rows leave.
Gathering into a fresh buffer instead cost more than ten decode steps per drop in the RL benchmark
(a new multi-MB allocation is page-faulted on first write), and rows finish one by one.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def in_place_ok(keep: list[int], rows: int) -> bool:
    """Whether selecting rows `keep` out of `rows` can be done by copying row keep[i] to row i in
    order: no repeats, and each source is a row no earlier copy overwrites (strictly increasing, or
    taken from beyond the new size)."""
    if len(set(keep)) != len(keep) or any(not 0 <= k < rows for k in keep):
        return False
    n = len(keep)
    increasing = all(b > a for a, b in zip(keep, keep[1:]))
    return increasing or all(k == i or k >= n for i, k in enumerate(keep))


def fill_holes_order(keep: list[int]) -> list[int]:
    """A selection of the rows in `keep` (sorted batch indices) that moves the fewest rows: the kept
    rows below len(keep) stay, and the holes there are filled with the kept rows above it."""
    n = len(keep)
    kept = set(keep)
    order = list(range(n))
    for hole, src in zip((i for i in range(n) if i not in kept), (k for k in keep if k >= n)):
        order[hole] = src
    return order


class PreallocatedLayer(DynamicLayer):
    """One layer's keys/values in a [B, H, capacity, D] buffer; `keys`/`values` view [:, :, :length]."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = max(int(capacity), 1)
        self.length = 0
        self._k = self._v = None

    def _room(self, k: torch.Tensor, v: torch.Tensor, need: int) -> None:
        if self._k is not None and need <= self._k.shape[-2]:
            return
        cap = max(need, self.capacity if self._k is None else 2 * self._k.shape[-2])
        new_k = k.new_empty(*k.shape[:-2], cap, k.shape[-1])
        new_v = v.new_empty(*v.shape[:-2], cap, v.shape[-1])
        if self.length:
            new_k[..., : self.length, :] = self._k[..., : self.length, :]
            new_v[..., : self.length, :] = self._v[..., : self.length, :]
        self._k, self._v = new_k, new_v

    def _views(self) -> None:
        self.keys = self._k[..., : self.length, :]
        self.values = self._v[..., : self.length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self._room(key_states, value_states, self.length + n)
        self._k[..., self.length : self.length + n, :] = key_states
        self._v[..., self.length : self.length + n, :] = value_states
        self.length += n
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def _reindex(self, index_fn) -> None:
        if not self.length:
            return
        k, v = index_fn(self._k[..., : self.length, :]), index_fn(self._v[..., : self.length, :])
        self._k = self._v = None
        saved, self.length = self.length, 0
        self._room(k, v, saved)  # a fresh buffer of max(capacity, saved) positions
        self._k[..., :saved, :], self._v[..., :saved, :] = k, v
        self.length = saved
        self._views()

    def _compact(self, keep: list[int]) -> None:
        # in_place_ok(keep): a source row is never a row already written
        n = self.length
        for dst, src in enumerate(keep):
            if dst != src:
                self._k[dst, ..., :n, :] = self._k[src, ..., :n, :]
                self._v[dst, ..., :n, :] = self._v[src, ..., :n, :]
        self._k, self._v = self._k[: len(keep)], self._v[: len(keep)]
        self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        keep = indices.tolist()
        if self._k is not None and in_place_ok(keep, self._k.shape[0]):
            self._compact(keep)  # rows leaving the batch: move kept rows into the holes
        else:
            self._reindex(lambda t: t[indices])  # repeats or reordering: gather into a new buffer

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._reindex(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop: pass a negative number of tokens to remove")
        if tokens_to_remove and self.length:
            self.length = max(self.length + tokens_to_remove, 0)
            self._views()

    def reset(self) -> None:
        self._k = self._v = None
        self.length = 0
        super().reset()


def preallocated_cache(config, capacity: int) -> DynamicCache:
    """A DynamicCache for `config` whose full-attention layers preallocate `capacity` positions.
    Sliding-window (or other special) layers keep transformers' own class."""
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
