"""Render conversations to token ids with an assistant-only loss mask, images included.

Works with any Jinja chat template that renders a conversation's prefixes as string prefixes of the
whole (ChatML, Qwen, Kimi and most others): the characters an assistant turn adds are found by
rendering the conversation up to that turn with and without it, and the tokens that start inside
those characters are supervised. Everything else (system and user turns, the role headers the
template writes, image placeholders, padding) carries no loss. Image placeholders are expanded to
one token per merged patch group after tokenisation, so their count always matches the vision
tower's output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image


@dataclass
class Example:
    """One rendered conversation or prompt."""

    input_ids: list[int]  # [L]
    loss_mask: list[bool]  # [L], True on supervised (assistant) tokens
    pixel_values: torch.Tensor | None = None  # [n_patches, ...] in the processor's own layout
    image_grid_thw: torch.Tensor | None = None  # [n_images, 3]
    extra: dict = field(default_factory=dict)  # e.g. mm_token_type_ids for Qwen-VL, images (paths / PIL)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_supervised(self) -> int:
        return sum(self.loss_mask)


def _to_template_messages(messages: list[dict]) -> tuple[list[dict], list[str]]:
    """Strip image paths from parts (templates only need the part type); collect the paths in order."""
    images: list[str] = []
    out = []
    for m in messages:
        if isinstance(m["content"], str):
            out.append({"role": m["role"], "content": m["content"]})
            continue
        parts = []
        for p in m["content"]:
            if p["type"] == "image":
                images.append(p["image"])
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": p["text"]})
        out.append({"role": m["role"], "content": parts})
    return out, images


def load_image(path_or_image: str | Path | Image.Image) -> Image.Image:
    if isinstance(path_or_image, Image.Image):
        return path_or_image.convert("RGB")
    with Image.open(path_or_image) as im:
        return im.convert("RGB")


class ChatRenderer:
    """Turns messages into `Example`s with a processor (VLM) or a tokenizer (text LM)."""

    def __init__(self, processor, chat_template: str | None = None):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_processor = getattr(processor, "image_processor", None)
        self.chat_template = chat_template or getattr(processor, "chat_template", None) or self.tokenizer.chat_template
        if self.chat_template is None:
            raise ValueError("the tokenizer has no chat template; set `data.chat_template` in the recipe")
        self.image_token = getattr(processor, "image_token", None)
        self.image_token_id = getattr(processor, "image_token_id", None)
        self.merge = getattr(self.image_processor, "merge_size", 1) if self.image_processor is not None else 1

    def _text(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _assistant_spans(self, messages: list[dict], full: str) -> list[tuple[int, int]]:
        """Character spans [start, end) of each assistant turn's content and end-of-turn marker."""
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._text(messages[:i], add_generation_prompt=True)
            upto = self._text(messages[: i + 1], add_generation_prompt=False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ValueError(
                    "the chat template does not render conversation prefixes as string prefixes "
                    f"(assistant turn {i}); assistant-only loss cannot be located"
                )
            end = len(upto.rstrip())  # the newline after an end-of-turn marker is the next turn's
            spans.append((len(before), end))
        return spans

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> Example:
        """Render messages; with add_generation_prompt the result is a prompt for generation."""
        tmpl_msgs, image_paths = _to_template_messages(messages)
        full = self._text(tmpl_msgs, add_generation_prompt=add_generation_prompt)
        spans = [] if add_generation_prompt else self._assistant_spans(tmpl_msgs, full)
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        mask = [any(s <= start < e for s, e in spans) for start, _ in offsets]
        pixel_values = grid = None
        if image_paths:
            ids, mask, pixel_values, grid = self._expand_images(ids, mask, image_paths)
        ex = Example(input_ids=ids, loss_mask=mask, pixel_values=pixel_values, image_grid_thw=grid)
        if image_paths:
            ex.extra["images"] = image_paths  # the sources, for engines that process images themselves (vLLM)
        return ex

    def _expand_images(
        self, ids: list[int], mask: list[bool], image_paths: list[str]
    ) -> tuple[list[int], list[bool], torch.Tensor, torch.Tensor]:
        if self.image_processor is None or self.image_token_id is None:
            raise ValueError("the conversation has images but the model's processor has no image processor")
        n_slots = ids.count(self.image_token_id)
        if n_slots != len(image_paths):
            raise ValueError(f"the chat template wrote {n_slots} image placeholders for {len(image_paths)} images")
        feats = self.image_processor(images=[load_image(p) for p in image_paths], return_tensors="pt")
        grid = feats["image_grid_thw"]
        counts = (grid.prod(-1) // (self.merge**2)).tolist()
        out_ids: list[int] = []
        out_mask: list[bool] = []
        k = 0
        for t, m in zip(ids, mask):
            if t == self.image_token_id:
                out_ids.extend([t] * counts[k])
                out_mask.extend([False] * counts[k])
                k += 1
            else:
                out_ids.append(t)
                out_mask.append(m)
        return out_ids, out_mask, feats["pixel_values"], grid

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
