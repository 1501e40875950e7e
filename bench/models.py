"""The models under test, built from configs with seeded random weights (nothing downloaded).

Each builder is deterministic in its seed, so the thinkvl run and the TRL run of a benchmark start
from bit-identical weights; `weights_checksum` lets the results prove it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from thinkvl.models.tiny import build_processor, build_tokenizer, tiny_config


@dataclass(frozen=True)
class TextSize:
    """A Qwen2 decoder size. vocab is the embedding size (rounded up like real checkpoints pad it);
    ids above the tokenizer's ~750 tokens are never seen but cost their full share of the LM head."""

    layers: int = 4
    hidden: int = 256
    intermediate: int = 1024
    heads: int = 4
    kv_heads: int = 4
    vocab: int = 8192


TEXT_SIZES = {
    "toy": TextSize(layers=2, hidden=64, intermediate=128, heads=2, kv_heads=2, vocab=1024),
    "4L-256": TextSize(),
    "50M": TextSize(layers=8, hidden=512, intermediate=2048, heads=8, kv_heads=8, vocab=32768),
    "rl": TextSize(layers=2, hidden=128, intermediate=512, heads=2, kv_heads=2, vocab=1024),
}


def text_tokenizer() -> PreTrainedTokenizerFast:
    """thinkvl's byte-level BPE (trained on the synthetic corpus) with its ChatML template."""
    return build_tokenizer()


def build_text_model(size: TextSize, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(
        vocab_size=max(size.vocab, len(tokenizer)),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _seeded(Qwen2ForCausalLM, cfg, tokenizer, seed)


def _seeded(model_cls, config, tokenizer, seed: int):
    """`model_cls(config)` with SDPA attention, initialised from `seed`, EOS/pad from the tokenizer."""
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = model_cls(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# Qwen2-VL chat template: default system prompt, <|vision_start|><|image_pad|><|vision_end|> per image.
QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]


def qwen_vl_processor() -> Qwen2_5_VLProcessor:
    from thinkvl.demo.tasks import vocabulary_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=QWEN_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(vocabulary_corpus(seed=0), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = QWEN_TEMPLATE
    # 112x112 synthetic images -> 8x8 patches of 14 px -> 16 merged image tokens
    image_processor = Qwen2VLImageProcessor(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=fast,
                               video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_TEMPLATE)


def build_qwen_vl(processor: Qwen2_5_VLProcessor, toy: bool = False, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """Tiny Qwen2.5-VL (mRoPE): a 4-layer 256-wide LM and a 2-block 128-wide ViT (toy: narrower)."""
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids
    h, layers, vh = (64, 2, 32) if toy else (256, 4, 128)
    head_dim = h // 4
    section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]  # sums to head_dim / 2
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=h, intermediate_size=4 * h, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
                         pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=True),
        vision_config=dict(depth=1 if toy else 2, hidden_size=vh, intermediate_size=4 * vh, num_heads=4,
                           out_hidden_size=h, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=112, fullatt_block_indexes=[0]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    return _seeded(Qwen2_5_VLForConditionalGeneration, config, tok, seed)


def build_kimi(toy: bool = False, seed: int = 0):
    """thinkvl's tiny Kimi-VL-architecture model (the demo default) and its processor."""
    from transformers import Kimi_K25ForConditionalGeneration

    tok = build_tokenizer()
    processor = build_processor(tok, max_side=112)
    kw = dict(vision_width=32, vision_layers=1, text_width=64, text_layers=2, experts=4) if toy else {}
    torch.manual_seed(seed)
    model = Kimi_K25ForConditionalGeneration(tiny_config(tok, **kw))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, processor


def weights_checksum(model: torch.nn.Module) -> float:
    """Sum of |w| over all parameters: equal across runs iff the initial weights are (in practice)."""
    with torch.no_grad():
        return round(float(sum(p.detach().double().abs().sum() for p in model.parameters())), 6)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
