"""Tiny models built offline for the tests: a Kimi-VL-architecture model and a Qwen2.5-VL model.

Both are a few hundred thousand parameters with byte-level BPE tokenizers trained on a handful of
sentences, so every test runs on a CPU in seconds. Fixtures are session-scoped (building the
tokenizers and models once); tests that backpropagate zero the gradients they create.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from thinkvl.models.load import Loaded, wrap
from thinkvl.models.tiny import Kimi_K25ForConditionalGeneration, build_processor, build_tokenizer, tiny_config

torch.set_num_threads(1)

TEXTS = [
    "How many red circles are there in the image?",
    "There are 3 red circles. The answer is \\boxed{3}.",
    "What is 3 + 4 * 2? First 4 * 2 = 8, then 3 + 8 = 11.",
    "List the shapes: red circle, blue square, green triangle.",
    "You are a helpful assistant. Think step by step.",
]

# A small Kimi-VL-architecture config: what the defaults build, only narrower and shallower.
KIMI_SMALL = dict(vision_width=32, vision_layers=1, text_width=64, text_layers=2, experts=4)

# The Qwen2-VL / Qwen2.5-VL chat template (default system prompt, vision_start/image_pad/vision_end).
QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]


def kimi_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(TEXTS, vocab_size=400)


def build_kimi(seed: int = 0) -> Loaded:
    """Tiny Kimi model + processor (images up to 112 px a side) wrapped as thinkvl loads them."""
    tok = kimi_tokenizer()
    processor = build_processor(tok, max_side=112)
    torch.manual_seed(seed)
    model = Kimi_K25ForConditionalGeneration(tiny_config(tok, **KIMI_SMALL))
    model.train()
    return wrap(model, processor)


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = QWEN_TEMPLATE
    return fast


def build_qwen(seed: int = 0) -> Loaded:
    """Tiny Qwen2.5-VL (mRoPE) model + processor; images between 4 and 36 merged tokens."""
    tok = qwen_tokenizer()
    image_processor = Qwen2VLImageProcessor(min_pixels=4 * 28 * 28, max_pixels=36 * 28 * 28)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_TEMPLATE)
    ids = tok.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=tok.eos_token_id),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[0]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.train()
    return wrap(model, processor)


@pytest.fixture(scope="session")
def kimi() -> Loaded:
    return build_kimi()


@pytest.fixture(scope="session")
def qwen() -> Loaded:
    return build_qwen()


@pytest.fixture(params=["kimi", "qwen"])
def vlm(request) -> Loaded:
    """Both tiny VLMs in turn."""
    return request.getfixturevalue(request.param)


def write_png(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> str:
    """A two-colour PNG (left half `color`, right half white) so patches differ."""
    w, h = size
    im = Image.new("RGB", (w, h), (255, 255, 255))
    im.paste(Image.new("RGB", (w // 2, h), color), (0, 0))
    im.save(path)
    return str(path)


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, str]:
    """Three small PNGs of different sizes (different image-token counts)."""
    d = tmp_path_factory.mktemp("images")
    return {
        "red": write_png(d / "red.png", (56, 56), (255, 0, 0)),
        "blue": write_png(d / "blue.png", (84, 56), (0, 0, 255)),
        "green": write_png(d / "green.png", (112, 84), (0, 160, 0)),
    }


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny Kimi model (demo tokenizer, KIMI_SMALL sizes) saved in Hugging Face format."""
    from thinkvl.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0, **KIMI_SMALL)


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory) -> Path:
    """24 synthetic joint-SFT conversations (text and image tasks) as sft.jsonl + images/."""
    from thinkvl.demo.tasks import synth

    return synth(tmp_path_factory.mktemp("data"), seed=0, n_sft=24, n_rl=0, n_eval=0)["sft"]


def assert_models_released() -> None:
    """After a stage's `train` returns, no module holding parameters may still be alive: a trained
    model that outlives its run keeps its memory and, under FSDP2, its process group until the
    interpreter exits, where tearing gloo down aborted a finished 2-process run (SIGABRT)."""
    import gc

    held = [type(o).__name__ for o in gc.get_objects()
            if isinstance(o, torch.nn.Module) and next(o.parameters(recurse=False), None) is not None]
    assert not held, f"{len(held)} modules with parameters still alive after train(): {sorted(set(held))[:8]}"


def sft_config(model_dir: Path, data: Path, out_dir: Path, **overrides):
    """A small two-stage SFT config on the tiny model: stage 1 at 128 tokens, stage 2 at 256."""
    from thinkvl.train.sft import SFTConfig, SourceConfig, StageConfig

    cfg = SFTConfig()
    cfg.model.path = str(model_dir)
    cfg.data.sources = [SourceConfig(path=str(data))]
    cfg.stages = [StageConfig(name="s1", max_length=128, lr_peak=1e-3, lr_end=1e-4, warmup_frac=0.2),
                  StageConfig(name="s2", max_length=256, lr_peak=5e-4, lr_end=5e-5, warmup_frac=0.2)]
    cfg.optim.rows_per_micro_batch = 1
    cfg.optim.grad_accum = 2
    cfg.optim.weight_decay = 0.1
    cfg.out_dir = str(out_dir)
    for k, v in overrides.items():
        obj = cfg
        *path, last = k.split(".")
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, last, v)
    return cfg
