"""One forward pass for training and scoring: token log-probs of a (packed) batch.

The language-model head is applied chunk by chunk to the supervised positions only, so a large
vocabulary never materialises full float32 logits for the whole batch. The cache is always off:
with a cache transformers skips the packed-sequence mask and packed examples attend to each other.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from thinkvl.rl.logprobs import token_logprobs_and_entropy

MODEL_KEYS = ("input_ids", "position_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | str | None = None) -> dict:
    """The keys of a collated batch that the model's forward takes, moved to device."""
    out = {k: batch[k] for k in MODEL_KEYS if k in batch}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


def hidden_states(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states [R, T, H] of the base model (no LM head, no cache)."""
    device = next(model.parameters()).device
    inputs = model_inputs(batch, device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    base = model.model if hasattr(model, "model") else model.base_model
    out = base(**inputs, use_cache=False)
    return out.last_hidden_state


# Name under which train/distributed.shard registers `_token_logprobs` as an FSDP2 forward method of
# the root module: this pass calls the base model and the LM head weight directly, never
# `model.forward`, so without it the root's parameters (embeddings, LM head, norms) stay sharded.
FSDP_FORWARD = "thinkvl_token_logprobs"


def token_logprobs(
    model: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(targets) [R, T] at target_mask positions (0 elsewhere); optionally the entropy too."""
    fsdp_forward = getattr(model, FSDP_FORWARD, None)
    if fsdp_forward is not None:
        return fsdp_forward(batch, temperature, chunk_size, with_entropy)
    return _token_logprobs(model, batch, temperature, chunk_size, with_entropy)


def _token_logprobs(
    model: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    h = hidden_states(model, batch)
    head = model.get_output_embeddings()
    mask = batch["target_mask"].to(h.device)
    logp, ent = token_logprobs_and_entropy(
        h, head.weight, batch["targets"].to(h.device), chunk_size=chunk_size, temperature=temperature,
        bias=getattr(head, "bias", None), mask=mask, with_entropy=with_entropy,
    )
    return (logp, ent) if with_entropy else logp
