"""One forward pass for training and scoring: token log-probs of a (packed) batch.

The language-model head is applied chunk by chunk to the supervised positions only, so a large
vocabulary never materialises full float32 logits for the whole batch. The cache is always off:
with a cache transformers skips the packed-sequence mask and packed examples attend to each other.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

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


# model -> a weak reference to its last decoder MLP (or None): found once, not on every forward
# pass. The value must not hold the MLP strongly: the MLP is part of the key, so a strong value
# keeps the model (and, under FSDP2, its process group) alive until the interpreter exits, where
# gloo's threads then crash the process ("terminate called without an active exception").
_LAST_MLP: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def last_decoder_mlp(model: torch.nn.Module) -> torch.nn.Module | None:
    """The MLP (dense or MoE) of the language model's last decoder layer, or None if not found.

    The decoder stack is the ``ModuleList`` named ``layers`` whose blocks are ``*DecoderLayer``
    (a vision tower's ``layers`` hold encoder blocks), as in Qwen2, Qwen2.5-VL, Qwen3-VL and the
    DeepseekV3 LM of Kimi-VL."""
    if model in _LAST_MLP:
        ref = _LAST_MLP[model]
        return None if ref is None else ref()
    found = None
    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers" and len(module)
                and type(module[-1]).__name__.endswith("DecoderLayer") and hasattr(module[-1], "mlp")):
            found = module[-1].mlp
    _LAST_MLP[model] = None if found is None else weakref.ref(found)
    return found


@contextlib.contextmanager
def last_mlp_only_at(model: torch.nn.Module, keep: torch.Tensor | None) -> Iterator[None]:
    """Within the block, the last decoder layer's MLP runs only at the ``keep`` positions [R, T].

    The same values at every read position (up to float rounding: the MLP's matmuls see fewer
    rows, so their summation order can differ): the last layer's MLP output at position t reaches nothing but
    the final hidden state at t (attention mixes positions before the MLP), so positions whose
    final state is never read (prompts, images, padding: no LM head is applied there) can skip it.
    Elsewhere the MLP's output is 0. With a deep model this saves little; with the tiny demo models
    (4 layers, ~40% of packed positions unsupervised) it is ~1/10 of the MLP work."""
    mlp = last_decoder_mlp(model) if keep is not None else None
    if mlp is None or bool(keep.all()):
        yield
        return
    idx = keep.reshape(-1).nonzero().squeeze(1)
    full_shape: list[torch.Size] = []

    def gather(_module, args):
        x = args[0]
        full_shape.append(x.shape)
        return (x.reshape(-1, x.shape[-1]).index_select(0, idx.to(x.device)).unsqueeze(0), *args[1:])

    def scatter(_module, _args, out):
        shape = full_shape.pop()
        h = out[0] if isinstance(out, tuple) else out
        h = h.new_zeros(shape[:-1].numel(), h.shape[-1]).index_copy(0, idx.to(h.device), h.reshape(-1, h.shape[-1]))
        h = h.view(*shape[:-1], h.shape[-1])
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handles = [mlp.register_forward_pre_hook(gather), mlp.register_forward_hook(scatter)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def hidden_states(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Final hidden states [R, T, H] of the base model (no LM head, no cache).

    With ``keep`` ([R, T] bool), only those positions' states are exact: the last layer's MLP is
    skipped elsewhere (see :func:`last_mlp_only_at`)."""
    device = next(model.parameters()).device
    inputs = model_inputs(batch, device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    base = model.model if hasattr(model, "model") else model.base_model
    with last_mlp_only_at(model, None if keep is None else keep.to(device).bool()):
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
    mask = batch["target_mask"]
    h = hidden_states(model, batch, keep=mask)
    head = model.get_output_embeddings()
    mask = mask.to(h.device)
    logp, ent = token_logprobs_and_entropy(
        h, head.weight, batch["targets"].to(h.device), chunk_size=chunk_size, temperature=temperature,
        bias=getattr(head, "bias", None), mask=mask, with_entropy=with_entropy,
    )
    return (logp, ent) if with_entropy else logp
