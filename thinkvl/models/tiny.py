"""The embedded default: a tiny model of Kimi-VL's architecture, built offline.

Kimi-VL = MoonViT (native-resolution ViT, 14x14 patches, 2-D RoPE) -> 2x2 patch merge -> MLP
projector -> DeepSeek-V3-style MoE language model. transformers ships this family as
`Kimi_K25ForConditionalGeneration`; we instantiate it from a config with random weights, so nothing
is downloaded. The tokenizer is a byte-level BPE trained on the synthetic corpus (every byte string
stays encodable), with ChatML and media special tokens and a ChatML chat template. Everything saved
here loads with plain `transformers` Auto classes, no thinkvl code imported.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    DeepseekV3Config,
    Kimi_K25Config,
    Kimi_K25ForConditionalGeneration,
    Kimi_K25ImageProcessor,
    Kimi_K25Processor,
    Kimi_K25VideoProcessor,
    PreTrainedTokenizerFast,
)

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
MEDIA_BEGIN, MEDIA_CONTENT, MEDIA_END = "<|media_begin|>", "<|media_content|>", "<|media_end|>"
IMAGE_TOKEN, VIDEO_TOKEN = "<|media_pad|>", "<|kimi_k25_video_placeholder|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, MEDIA_BEGIN, MEDIA_CONTENT, IMAGE_TOKEN, MEDIA_END, VIDEO_TOKEN]
# Think tags are ordinary (non-special) added tokens: they survive decoding with
# skip_special_tokens=True, which verifiers and the format check rely on.
THINK_TOKENS = ["<think>", "</think>"]

# ChatML; an image part becomes one placeholder that the processor expands to one token per merged
# 2x2 patch group. Text parts and string content are emitted verbatim.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|media_begin|>image<|media_content|><|media_pad|><|media_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the synthetic tasks' prompts, answers and traces."""
    from thinkvl.demo.tasks import vocabulary_corpus

    return vocabulary_corpus(seed=0)


def build_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML/media special tokens and a ChatML chat template."""
    texts = list(texts) if texts is not None else default_corpus()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN},
    )
    fast.add_tokens(THINK_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer: PreTrainedTokenizerFast, max_side: int = 448) -> Kimi_K25Processor:
    """Kimi-K2.5 processor around the tiny tokenizer; images up to max_side pixels a side."""
    image_processor = Kimi_K25ImageProcessor(size={"max_height": max_side, "max_width": max_side})
    # The processor class insists on a video processor although thinkvl trains on images only.
    video_processor = Kimi_K25VideoProcessor()
    return Kimi_K25Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(
    tokenizer: PreTrainedTokenizerFast,
    vision_width: int = 128,
    vision_layers: int = 2,
    text_width: int = 256,
    text_layers: int = 4,
    experts: int = 8,
    max_positions: int = 4096,
) -> Kimi_K25Config:
    """Config of a few-million-parameter Kimi-VL-architecture model for CPU training."""
    text = DeepseekV3Config(
        vocab_size=len(tokenizer),
        hidden_size=text_width,
        intermediate_size=text_width * 3,
        moe_intermediate_size=text_width // 2,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=experts,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        routed_scaling_factor=1.0,
        # A q LoRA rank keeps the LM attention free of a bare `q_proj`, which transformers 5.24's
        # kimi_k25 checkpoint conversion would otherwise fuse into a vision-style `wqkv` on save.
        q_lora_rank=64,
        kv_lora_rank=64,
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        rope_interleave=False,
    )
    vision = {
        "patch_size": 14,
        "hidden_size": vision_width,
        "intermediate_size": vision_width * 4,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": 4,
        "pos_emb_height": 32,
        "pos_emb_width": 32,
        "merge_kernel_size": [2, 2],
    }
    return Kimi_K25Config(
        text_config=text.to_dict(),
        vision_config=vision,
        projection_hidden_size=vision_width,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_start_token_id=tokenizer.convert_tokens_to_ids(MEDIA_BEGIN),
        vision_end_token_id=tokenizer.convert_tokens_to_ids(MEDIA_END),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_tiny(seed: int = 0, **config_kwargs) -> tuple[Kimi_K25ForConditionalGeneration, Kimi_K25Processor]:
    """A freshly initialised tiny Kimi-VL model and its processor (deterministic from seed)."""
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    torch.manual_seed(seed)
    model = Kimi_K25ForConditionalGeneration(tiny_config(tokenizer, **config_kwargs))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def save_tiny(out_dir: str | Path, seed: int = 0, **config_kwargs) -> Path:
    """Build the tiny model and write it, with its processor, in Hugging Face format."""
    out = Path(out_dir)
    model, processor = build_tiny(seed, **config_kwargs)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
