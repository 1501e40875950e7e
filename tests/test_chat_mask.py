"""Assistant-only loss masks: the exact supervised text for three chat templates, images included."""

from __future__ import annotations

import pytest

from thinkvl.data.chat import ChatRenderer
from thinkvl.models.load import wrap


def conversation(images: dict[str, str]) -> list[dict]:
    """System + two user/assistant exchanges; an image mid-way through the first user turn and one
    at the start of the second."""
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [
            {"type": "text", "text": "Look at this: "},
            {"type": "image", "image": images["red"]},
            {"type": "text", "text": " How many red circles?"},
        ]},
        {"role": "assistant", "content": "There are 3 red circles. \\boxed{3}"},
        {"role": "user", "content": [
            {"type": "image", "image": images["green"]},
            {"type": "text", "text": "And here?"},
        ]},
        {"role": "assistant", "content": [{"type": "text", "text": "List the shapes: green square."}]},
    ]


def supervised_runs(loaded, ex) -> list[str]:
    """Each maximal run of supervised tokens, decoded with special tokens kept."""
    runs, cur = [], []
    for t, m in zip(ex.input_ids, ex.loss_mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [loaded.tokenizer.decode(r, skip_special_tokens=False) for r in runs]


def check_common(loaded, ex, n_image_tokens: int) -> None:
    img = loaded.renderer.image_token_id
    assert len(ex.input_ids) == len(ex.loss_mask)
    assert ex.input_ids.count(img) == n_image_tokens
    assert not any(m for t, m in zip(ex.input_ids, ex.loss_mask) if t == img)
    n_grid_tokens = int(ex.image_grid_thw.prod(-1).sum()) // loaded.renderer.merge**2
    assert n_grid_tokens == n_image_tokens


def test_kimi_chatml_mask(kimi, images):
    ex = kimi.render(conversation(images))
    assert supervised_runs(kimi, ex) == [
        "There are 3 red circles. \\boxed{3}<|im_end|>",
        "List the shapes: green square.<|im_end|>",
    ]
    # 56x56 -> 4x4 patches -> 4 tokens; 112x84 -> 8x6 patches -> 12 tokens
    check_common(kimi, ex, 4 + 12)
    assert ex.image_grid_thw.tolist() == [[1, 4, 4], [1, 6, 8]]
    # The unsupervised rest is exactly system, user turns and role headers.
    text = kimi.tokenizer.decode(ex.input_ids, skip_special_tokens=False)
    pad4, pad12 = "<|media_pad|>" * 4, "<|media_pad|>" * 12
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\nLook at this: <|media_begin|>image<|media_content|>{pad4}<|media_end|> How many red circles?<|im_end|>\n"
        "<|im_start|>assistant\nThere are 3 red circles. \\boxed{3}<|im_end|>\n"
        f"<|im_start|>user\n<|media_begin|>image<|media_content|>{pad12}<|media_end|>And here?<|im_end|>\n"
        "<|im_start|>assistant\nList the shapes: green square.<|im_end|>\n"
    )


def test_qwen_template_mask(qwen, images):
    ex = qwen.render(conversation(images))
    assert supervised_runs(qwen, ex) == [
        "There are 3 red circles. \\boxed{3}<|im_end|>",
        "List the shapes: green square.<|im_end|>",
    ]
    check_common(qwen, ex, 4 + 12)
    tt = ex.extra["mm_token_type_ids"]
    assert [i for i, v in enumerate(tt) if v] == [i for i, t in enumerate(ex.input_ids) if t == qwen.renderer.image_token_id]


def test_qwen_default_system_prompt_is_not_supervised(qwen):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    ex = qwen.render(msgs)
    text = qwen.tokenizer.decode(ex.input_ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert supervised_runs(qwen, ex) == ["Hello.<|im_end|>"]


LLAMA_LIKE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>\n"
    "{% elif m['role'] == 'user' %}[INST] "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|media_begin|>image<|media_content|><|media_pad|><|media_end|>"
    "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %} [/INST]"
    "{% else %} {% if m['content'] is string %}{{ m['content'] }}{% else %}{{ m['content'][0]['text'] }}{% endif %}</s>"
    "{% endif %}{% endfor %}"
)


def test_custom_jinja_template_mask(kimi, images):
    loaded = wrap(kimi.model, kimi.processor, chat_template=LLAMA_LIKE)
    ex = loaded.render(conversation(images))
    # The space the template puts before an answer belongs to the answer's characters; "</s>" is
    # this template's end-of-turn marker (plain bytes for this tokenizer) and is supervised.
    assert supervised_runs(loaded, ex) == [
        " There are 3 red circles. \\boxed{3}</s>",
        " List the shapes: green square.</s>",
    ]
    check_common(loaded, ex, 4 + 12)
    text = loaded.tokenizer.decode(ex.input_ids, skip_special_tokens=False)
    assert text.startswith("<<SYS>>You are a helpful assistant.<</SYS>>\n[INST] Look at this: <|media_begin|>")


def test_generation_prompt_has_no_supervision(kimi, images):
    msgs = conversation(images)[:2]
    ex = kimi.render(msgs, add_generation_prompt=True)
    assert not any(ex.loss_mask)
    assert kimi.tokenizer.decode(ex.input_ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_template_that_rewrites_prefixes_raises(kimi):
    # A header that counts the turns changes as the conversation grows: prefixes are not prefixes.
    bad = ("Conversation of {{ messages|length }} turns\n"
           "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    r = ChatRenderer(kimi.processor, chat_template=bad)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(ValueError, match=r"does not render conversation prefixes.*assistant turn 1"):
        r.render(msgs)
