"""Tiny Qwen2 and Qwen2.5-VL checkpoints that vLLM's CPU backend accepts (head_dim >= 32), saved in
Hugging Face format with their tokenizer/processor, and where to find the vLLM environment."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from conftest import QWEN_TEMPLATE, qwen_tokenizer

# Where `scripts/vllm_venv.sh` builds vLLM's environment by default; THINKVL_VLLM_PYTHON overrides it.
DEFAULT_VLLM_PYTHON = "~/.cache/thinkvl/venv-vllm/bin/python"


def vllm_python() -> str | None:
    """The vLLM environment's python, or None: the vLLM tests are then skipped.

    Skipped only when THINKVL_VLLM_PYTHON is unset and the default folder holds no venv (a developer
    machine without vLLM). When the variable is set (CI sets it from scripts/vllm_venv.sh) it is
    returned as it is, so a path that does not exist or a python without vLLM fails the tests
    loudly instead of skipping them."""
    env = os.environ.get("THINKVL_VLLM_PYTHON")
    if env:
        return os.path.expanduser(env)
    path = os.path.expanduser(DEFAULT_VLLM_PYTHON)
    return path if Path(path).exists() else None


def save_qwen2(folder: Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide Qwen2 causal LM (2 heads of 32) with an untied LM head."""
    tok = qwen_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_qwen_vl(folder: Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide Qwen2.5-VL (text and vision heads of 32, tied LM head); images of 4-36
    merged tokens."""
    tok = qwen_tokenizer()
    ids = tok.convert_tokens_to_ids
    image_processor = Qwen2VLImageProcessor(min_pixels=4 * 28 * 28, max_pixels=36 * 28 * 28)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_TEMPLATE)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                         pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=tok.eos_token_id),
        vision_config=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[0]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
