"""A hand-written sampling loop over any transformers VLM or causal LM (CPU or one GPU).

Why not `model.generate`: we need the per-token log-probs of exactly the distribution the trainer
recomputes, banned tokens that can never be sampled, per-sample seeds that do not depend on batching,
and finished sequences that stop costing compute. The loop, per chunk of at most `batch_size`
sequences:

1. Prefill each distinct prompt of the chunk once: prompts left-padded, an attention mask, the
   images (`pixel_values`, `image_grid_thw`) and position ids that start at 0 at each prompt's first
   real token (or the prompt's own 3-row mRoPE ids for Qwen-VL). Only the last position's logits are
   computed.
2. Copy each prompt's KV cache rows to its n samples (`Cache.batch_select_indices` with repeated
   indices), so the vision tower and the prompt run once per prompt, not once per sample.
3. Decode one token per step with the cache. A row that emits EOS or completes a stop string is
   dropped from the batch (cache rows, attention mask and positions are index-selected).

Sampling: logits / temperature -> banned tokens to -inf -> top-k -> top-p -> inverse-CDF draw with a
uniform number from the row's own `torch.Generator` (seeded from (seed, prompt index, sample index)).
The recorded log-prob is log softmax(logits / temperature) over the full vocabulary (see
`thinkvl.rollout.types`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from thinkvl.data.chat import Example
from thinkvl.models.load import Loaded
from thinkvl.rollout.cache import fill_holes_order, preallocated_cache
from thinkvl.rollout.engine import SamplingParams
from thinkvl.rollout.types import Rollout

Unit = tuple[int, int]  # (prompt index, sample index)


@dataclass
class GenerationStats:
    """Counters of the last `generate` call, for logs and benchmarks."""

    prompts: int = 0
    sequences: int = 0
    new_tokens: int = 0
    decode_rows: int = 0  # rows fed through decode forwards, summed over steps (finished rows leave)
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Pure sampling helpers
# ---------------------------------------------------------------------------------------------


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set all but the k largest logits of each row to -inf; k = 0 or k >= V is a no-op. [B, V]"""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sum >= p. [B, V]

    A token is dropped when the probability mass strictly before it (in descending order) already
    reaches p; the most likely token is always kept.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V]
    drop_sorted = mass_before >= p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def inverse_cdf_sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw one index per row: the first index whose cumulative probability exceeds u * total.

    probs [B, V] (need not be normalised), u [B] uniform in [0, 1). A zero-probability token has an
    empty CDF interval, so it is never drawn; u rounding up to 1 falls back to the last token with
    positive probability, not onto trailing zeros.
    """
    cdf = probs.double().cumsum(dim=-1)  # [B, V]
    target = (u.to(cdf) * cdf[:, -1]).unsqueeze(-1)  # [B, 1]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # [B]
    last_positive = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)  # [B]
    return torch.minimum(idx, last_positive)


def choose_tokens(
    logits: torch.Tensor, sampling: SamplingParams, u: torch.Tensor | None, banned: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its log-prob: (tokens [B], logprobs [B]).

    logits [B, V] are the model's raw last-position logits; u [B] the rows' uniform draws (unused when
    greedy); banned [n_banned] token ids that get -inf before any choice.
    """
    scaled = logits.float() / sampling.temperature  # [B, V]
    logp = torch.log_softmax(scaled, dim=-1)
    allowed = scaled if banned is None or banned.numel() == 0 else scaled.index_fill(-1, banned, float("-inf"))
    if sampling.greedy:
        tokens = allowed.argmax(dim=-1)
    else:
        filtered = top_p_filter(top_k_filter(allowed, sampling.top_k), sampling.top_p)
        probs = torch.softmax(filtered, dim=-1)
        tokens = inverse_cdf_sample(probs, u)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def row_generator(seed: int, prompt_index: int, sample_index: int) -> torch.Generator:
    """A CPU generator for one sequence, well mixed from (seed, prompt index, sample index)."""
    state = np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(2, dtype=np.uint32)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g


# ---------------------------------------------------------------------------------------------
# Model-facing helpers
# ---------------------------------------------------------------------------------------------


def stop_token_ids(loaded: Loaded) -> set[int]:
    """EOS ids: the tokenizer's EOS, `<|im_end|>` when the vocabulary has it, the generation config's."""
    tok = loaded.tokenizer
    ids: set[int] = set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tok.unk_token_id:
        ids.add(im_end)
    gen = getattr(loaded.model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is not None:
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    if not ids:
        raise ValueError("the tokenizer has no EOS token and the generation config names none")
    return ids


def media_token_ids(loaded: Loaded) -> tuple[int, ...]:
    """Image/video placeholder ids of a VLM: tokens a response must never contain.

    A placeholder in a sampled response makes the next forward pass with images fail ("Image
    features and image tokens do not match"), so the RL loop and evaluation ban them.
    """
    cfg = loaded.model.config
    ids = set()
    for name in ("image_token_id", "video_token_id", "image_token_index", "video_token_index"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value >= 0:
            ids.add(value)
    if loaded.renderer.image_token_id is not None:
        ids.add(int(loaded.renderer.image_token_id))
    return tuple(sorted(ids))


def _left_pad(rows: Sequence[torch.Tensor], width: int, value: int) -> torch.Tensor:
    """Stack [..., L_i] tensors into [B, ..., width], padding on the left."""
    out = []
    for r in rows:
        pad = torch.full((*r.shape[:-1], width - r.shape[-1]), value, dtype=r.dtype)
        out.append(torch.cat([pad, r], dim=-1))
    return torch.stack(out)


class HFEngine:
    """Batched sampling with a KV cache on a `Loaded` model; implements `GenerationEngine`."""

    def __init__(self, loaded: Loaded, batch_size: int = 32, ban_media_tokens: bool = True):
        """batch_size: sequences decoded together (a prompt's n samples count n times).

        ban_media_tokens: also ban the model's image/video placeholder ids (see `media_token_ids`),
        on top of `SamplingParams.banned_token_ids`.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size}")
        self.loaded = loaded
        self.model = loaded.model
        self.batch_size = batch_size
        self.stop_ids = stop_token_ids(loaded)
        self.always_banned = media_token_ids(loaded) if ban_media_tokens else ()
        self.stats = GenerationStats()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- public API ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[Example], n: int, sampling: SamplingParams) -> list[list[Rollout]]:
        """n rollouts per prompt: result[i][j] is sample j of prompt i (see `GenerationEngine`)."""
        if n < 1:
            raise ValueError(f"n: expected an integer >= 1, got {n}")
        self.stats = GenerationStats(prompts=len(prompts), sequences=len(prompts) * n)
        # Shortest prompts first, a prompt's samples together: less padding, one prefill per prompt.
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        units = [(i, j) for i in order for j in range(n)]
        out: list[list[Rollout | None]] = [[None] * n for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(units), self.batch_size):
                chunk = units[start : start + self.batch_size]
                for (i, j), rollout in zip(chunk, self._generate_chunk(prompts, chunk, sampling)):
                    out[i][j] = rollout
        finally:
            self.model.train(was_training)
        return out  # type: ignore[return-value]

    # -- one chunk ---------------------------------------------------------------------------------

    def _positions(self, ex: Example) -> torch.Tensor:
        """Position ids of one prompt: [L] (text) or [3, L] (mRoPE rows only, the mask is explicit)."""
        pos = self.loaded.positions(ex)
        return pos[1:] if self.loaded.uses_mrope else pos

    def _prefill(self, prompts: list[Example], new_tokens: int) -> tuple[torch.Tensor, DynamicCache, torch.Tensor, torch.Tensor]:
        """Run the distinct prompts once. Returns (last logits [U, V], cache, attention mask [U, T],
        next position [U])."""
        width = max(len(p) for p in prompts)
        ids = _left_pad([torch.tensor(p.input_ids) for p in prompts], width, self.loaded.pad_id)
        mask = _left_pad([torch.ones(len(p), dtype=torch.long) for p in prompts], width, 0)
        pos_each = [self._positions(p) for p in prompts]
        positions = _left_pad(pos_each, width, 0)  # [U, T] or [U, 3, T]
        next_pos = torch.stack([p.reshape(-1, p.shape[-1])[:, -1].max() + 1 for p in pos_each])  # [U]
        if positions.dim() == 3:
            positions = positions.transpose(0, 1)  # [3, U, T], as mRoPE models take it
        dev = self.device
        kwargs = {}
        with_images = [p for p in prompts if p.pixel_values is not None]
        if with_images:
            dtype = next(self.model.parameters()).dtype
            kwargs["pixel_values"] = torch.cat([p.pixel_values for p in with_images]).to(dev, dtype)
            kwargs["image_grid_thw"] = torch.cat([p.image_grid_thw for p in with_images]).to(dev)
        cache = preallocated_cache(self.model.config, width + new_tokens)  # no per-token torch.cat
        out = self.model(
            input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev),
            cache=cache, use_cache=True, logits_to_keep=1, **kwargs,
        )
        return out.logits[:, -1], cache, mask.to(dev), next_pos.to(dev)

    def _decode_step(
        self, tokens: torch.Tensor, cache: DynamicCache, mask: torch.Tensor, next_pos: torch.Tensor
    ) -> torch.Tensor:
        """Feed one token per row; returns the next logits [B, V]. mask [B, T+1] already extended."""
        pos = next_pos.unsqueeze(-1)  # [B, 1]
        if self.loaded.uses_mrope:
            pos = pos.unsqueeze(0).expand(3, -1, -1)  # text tokens: all three mRoPE rows are equal
        out = self.model(
            input_ids=tokens.unsqueeze(-1), attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
        )
        return out.logits[:, -1]

    def _generate_chunk(self, prompts: list[Example], chunk: list[Unit], sampling: SamplingParams) -> list[Rollout]:
        """Prefill the chunk's distinct prompts once, then sample every row of the chunk to its end."""
        t0 = time.perf_counter()
        distinct = list(dict.fromkeys(i for i, _ in chunk))
        logits, cache, mask, next_pos = self._prefill([prompts[i] for i in distinct], sampling.max_new_tokens)
        # Each sample starts from a copy of its prompt's cache rows (indices may repeat).
        rows = torch.tensor([distinct.index(i) for i, _ in chunk], device=self.device)
        cache.batch_select_indices(rows)
        t1 = time.perf_counter()
        responses, logps, finished = self._sample(logits[rows], cache, mask[rows], next_pos[rows], chunk, sampling)
        self.stats.prefill_s += t1 - t0
        self.stats.decode_s += time.perf_counter() - t1
        self.stats.new_tokens += sum(len(r) for r in responses)
        return [self._rollout(prompts[i], i, j, responses[c], logps[c], finished[c]) for c, (i, j) in enumerate(chunk)]

    def _sample(
        self,
        logits: torch.Tensor,  # [B, V] next-token logits of every row
        cache: DynamicCache,  # B rows
        mask: torch.Tensor,  # [B, T] attention mask (0 on left padding)
        next_pos: torch.Tensor,  # [B] position of the next token
        chunk: list[Unit],
        sampling: SamplingParams,
    ) -> tuple[list[list[int]], list[list[float]], list[bool]]:
        """The decode loop: per row, the response ids, their log-probs, and whether EOS/stop ended it."""
        dev = self.device
        gens = [row_generator(sampling.seed, i, j) for i, j in chunk]
        banned_ids = sorted(set(sampling.banned_token_ids) | set(self.always_banned))
        banned = torch.tensor(banned_ids, dtype=torch.long, device=dev) if banned_ids else None
        responses: list[list[int]] = [[] for _ in chunk]
        logps: list[list[float]] = [[] for _ in chunk]
        finished = [False] * len(chunk)
        active = list(range(len(chunk)))  # chunk positions of the rows still in the batch
        for step in range(sampling.max_new_tokens):
            u = None if sampling.greedy else torch.stack(
                [torch.rand((), generator=gens[a], dtype=torch.float64) for a in active])
            tokens, token_logp = choose_tokens(logits, sampling, u, banned)
            keep = []
            for b, (a, t, lp) in enumerate(zip(active, tokens.tolist(), token_logp.tolist())):
                responses[a].append(t)
                logps[a].append(lp)
                if t in self.stop_ids or self._hit_stop_string(responses[a], sampling.stop_strings):
                    finished[a] = True
                else:
                    keep.append(b)
            if not keep or step == sampling.max_new_tokens - 1:
                break
            if len(keep) < len(active):
                # Finished rows leave the batch: they no longer cost attention or MLP compute. Rows
                # from the tail fill the holes, so the cache moves one row per row that left.
                keep = fill_holes_order(keep)
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                mask, next_pos, tokens = mask[sel], next_pos[sel], tokens[sel]
                active = [active[b] for b in keep]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            logits = self._decode_step(tokens, cache, mask, next_pos)
            self.stats.decode_rows += len(active)
            next_pos = next_pos + 1
        return responses, logps, finished

    def _hit_stop_string(self, response: list[int], stop_strings: tuple[str, ...]) -> bool:
        """Whether the response's tail text contains a stop string (checked after every token)."""
        if not stop_strings:
            return False
        # A character is at most 4 byte-level tokens; earlier text was checked at earlier steps.
        window = 4 * max(len(s) for s in stop_strings) + 2
        tail = self.loaded.tokenizer.decode(response[-window:], skip_special_tokens=True)
        return any(s in tail for s in stop_strings)

    def _rollout(
        self, prompt: Example, i: int, j: int, response: list[int], logps: list[float], finished: bool
    ) -> Rollout:
        return Rollout(
            prompt_id=str(prompt.extra.get("id", i)),
            prompt_ids=list(prompt.input_ids),
            response_ids=response,
            response_text=self.loaded.tokenizer.decode(response, skip_special_tokens=True),
            pixel_values=prompt.pixel_values,
            image_grid_thw=prompt.image_grid_thw,
            logprobs=logps,
            finished=finished,
            truncated=not finished,
            length=len(response),
            sample_index=j,
            extra={k: v for k, v in prompt.extra.items() if k != "id"},
        )


def render_prompts(loaded: Loaded, messages_list: list[list[dict]]) -> list[Example]:
    """Render each conversation (system?/user turns) as a generation prompt."""
    return [loaded.render(m, add_generation_prompt=True) for m in messages_list]


def generate_texts(
    loaded: Loaded,
    messages_list: list[list[dict]],
    n: int = 1,
    sampling: SamplingParams | None = None,
    batch_size: int = 32,
) -> list[list[str]]:
    """n response texts for each conversation: result[i][j] is sample j of conversation i."""
    engine = HFEngine(loaded, batch_size=batch_size)
    rollouts = engine.generate(render_prompts(loaded, messages_list), n, sampling or SamplingParams())
    return [[r.response_text for r in group] for group in rollouts]
