"""Load any Hugging Face VLM or causal LM with its processor, plus what training needs to know of it.

`load("tiny")` builds the embedded tiny Kimi-VL-architecture model (nothing downloaded); any other
string is a local folder or a hub id resolved from the local HF cache (set HF_HUB_OFFLINE=1 to be
sure nothing is fetched). VLMs load through `AutoModelForImageTextToText` + `AutoProcessor`, text
models through `AutoModelForCausalLM` + `AutoTokenizer`; `trust_remote_code` stays off unless asked.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
)

from thinkvl.data.chat import ChatRenderer, Example
from thinkvl.models.attention import set_attention

TINY = "tiny"


@dataclass
class Loaded:
    """A model with its processor and the per-family pieces training needs."""

    model: PreTrainedModel
    processor: object  # a ProcessorMixin for VLMs, a tokenizer for text LMs
    renderer: ChatRenderer
    is_vlm: bool
    uses_mrope: bool  # Qwen-VL style 3-row positions (plus a text row when packing)

    @property
    def tokenizer(self):
        return self.renderer.tokenizer

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def positions(self, ex: Example) -> torch.Tensor:
        """Position ids of one example: [L], or [4, L] (text row + 3 mRoPE rows) for Qwen-VL."""
        n = len(ex)
        text = torch.arange(n, dtype=torch.long)
        if not self.uses_mrope:
            return text
        ids = torch.tensor([ex.input_ids])
        tt = torch.tensor([ex.extra["mm_token_type_ids"]])
        rope, _ = self.model.model.get_rope_index(
            ids, tt, image_grid_thw=ex.image_grid_thw, attention_mask=torch.ones_like(ids)
        )
        return torch.cat([text[None], rope[:, 0]], dim=0)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> Example:
        ex = self.renderer.render(messages, add_generation_prompt=add_generation_prompt)
        if self.uses_mrope:
            img = self.renderer.image_token_id
            ex.extra["mm_token_type_ids"] = [1 if t == img else 0 for t in ex.input_ids]
        return ex


def _is_vlm(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def load(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = "varlen",
    chat_template: str | None = None,
    seed: int = 0,
    meta: bool = False,
) -> Loaded:
    """Load a model and its processor by name (`tiny`), local folder or cached hub id.

    attn_implementation: the language model's attention (`thinkvl.models.attention.CHOICES`);
    `varlen` (default) is SDPA run per packed example, None keeps what the checkpoint says.
    meta: build the model on the meta device (shapes only, no memory, weights not read); under
    torchrun the ranks other than 0 do this and get their shards of rank 0's weights when the model
    is sharded (`train.distributed.shard_from_rank0`).
    """
    # `auto`: the checkpoint's own dtype (config.json), float32 for the tiny model
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    if name_or_path == TINY:
        from thinkvl.models.tiny import build_tiny

        with torch.device("meta") if meta else contextlib.nullcontext():
            model, processor = build_tiny(seed=seed)
        if dtype != "auto":
            model.to(dtype)
        is_vlm = True
    else:
        src = str(Path(name_or_path).expanduser()) if Path(name_or_path).expanduser().exists() else name_or_path
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
        is_vlm = _is_vlm(config)
        kw = {"dtype": dtype, "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kw["attn_implementation"] = "sdpa" if attn_implementation == "varlen" else attn_implementation
        auto = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
        if meta:
            if kw["dtype"] == "auto":  # from_config takes a dtype, not `auto`: the one in config.json
                kw["dtype"] = getattr(config, "dtype", None) or torch.float32
            with torch.device("meta"):
                model = auto.from_config(config, **kw)
            model.generation_config = _generation_config(src, model.generation_config)
        else:
            model = auto.from_pretrained(src, **kw)
        processor_cls = AutoProcessor if is_vlm else AutoTokenizer
        processor = processor_cls.from_pretrained(src, trust_remote_code=trust_remote_code)
    if attn_implementation:
        set_attention(model, attn_implementation)
    return wrap(model, processor, chat_template=chat_template)


def _generation_config(src: str, default):
    """The checkpoint's generation_config.json (what from_pretrained would set), else `default`."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(src)
    except OSError:
        return default


def wrap(model: PreTrainedModel, processor, chat_template: str | None = None) -> Loaded:
    """Describe an already-built model/processor pair (used by `load` and by tests)."""
    is_vlm = _is_vlm(model.config)
    uses_mrope = is_vlm and hasattr(getattr(model, "model", model), "get_rope_index")
    return Loaded(
        model=model,
        processor=processor,
        renderer=ChatRenderer(processor, chat_template=chat_template),
        is_vlm=is_vlm,
        uses_mrope=uses_mrope,
    )
