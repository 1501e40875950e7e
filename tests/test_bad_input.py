"""Bad records and bad recipes fail with messages naming file, line and field (or key and allowed
values); skipped records are counted by reason; over-long examples are truncated or dropped and
counted, never cut through an image."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import write_png

from thinkvl.config import ConfigError, load_config
from thinkvl.distill.longcot import DistillConfig
from thinkvl.data.formats import DataError, ReadStats, read_records
from thinkvl.data.packing import collate_rows
from thinkvl.models.forward import token_logprobs
from thinkvl.train.sft import SFTConfig, fit_length

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def user_image(path: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": path},
                                                      {"type": "text", "text": "What is it?"}]},
                         {"role": "assistant", "content": "A square."}]}


# (line written to the file, expected field in the message, expected text, skip reason)
CONVERSATION_CASES = {
    "malformed_json": ('{"messages": [', None, "malformed JSON", "malformed JSON"),
    "unknown_role": (json.dumps({"messages": [{"role": "robot", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello"}]}),
                     "messages[0].role", "unknown role 'robot'; allowed: system, user, assistant", "unknown role"),
    "missing_image": (json.dumps(user_image("imgs/missing.png")), "messages[0].content[0].image",
                      "missing image file", "missing image"),
    "unreadable_image": (json.dumps(user_image("imgs/garbage.png")), "messages[0].content[0].image",
                         "unreadable image", "unreadable image"),
    "truncated_image": (json.dumps(user_image("imgs/truncated.png")), "messages[0].content[0].image",
                        "unreadable image", "unreadable image"),
    "no_assistant": (json.dumps({"messages": [{"role": "user", "content": "Hi"}]}), "messages",
                     "no assistant turn", "no assistant turn"),
    "content_number": (json.dumps({"messages": [{"role": "user", "content": 3},
                                                {"role": "assistant", "content": "Hello"}]}),
                       "messages[0].content", "expected a string or a list of parts, got int", "expected"),
    "text_not_string": (json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": ["a"]}]},
                                                 {"role": "assistant", "content": "Hello"}]}),
                        "messages[0].content[0].text", "expected a string, got list", "expected"),
}


@pytest.fixture
def data_dir(tmp_path) -> Path:
    (tmp_path / "imgs").mkdir()
    write_png(tmp_path / "imgs" / "ok.png", (56, 56), (255, 0, 0))
    (tmp_path / "imgs" / "garbage.png").write_bytes(b"this is not a png" * 20)
    full = (tmp_path / "imgs" / "ok.png").read_bytes()
    (tmp_path / "imgs" / "truncated.png").write_bytes(full[: len(full) // 2])
    return tmp_path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(ln + "\n" for ln in lines))
    return path


@pytest.mark.parametrize("case", sorted(CONVERSATION_CASES))
def test_bad_conversation_names_file_line_field(data_dir, case):
    line, field, text, _ = CONVERSATION_CASES[case]
    # the bad record is on line 3, after a good one and a blank line (blank lines are skipped, not
    # counted as records, but line numbers stay the file's own)
    path = write_lines(data_dir / "train.jsonl", [json.dumps(GOOD), "", line])
    with pytest.raises(DataError) as e:
        read_records(path)
    msg = str(e.value)
    where = f"{path}:3" + (f".{field}" if field else "")
    assert msg.startswith(where + ":"), msg
    assert text in msg


def test_good_records_resolve_images(data_dir):
    path = write_lines(data_dir / "train.jsonl", [json.dumps(GOOD), json.dumps(user_image("imgs/ok.png"))])
    recs = read_records(path)
    assert [r["_where"] for r in recs] == [f"{path}:1", f"{path}:2"]
    assert recs[1]["messages"][0]["content"][0]["image"] == str((data_dir / "imgs" / "ok.png").resolve())


def test_skip_counts_every_reason(data_dir):
    lines = [json.dumps(GOOD)] + [c[0] for c in CONVERSATION_CASES.values()] + [json.dumps(GOOD)]
    path = write_lines(data_dir / "train.jsonl", lines)
    stats = ReadStats()
    recs = read_records(path, on_error="skip", stats=stats)
    assert [r["_where"] for r in recs] == [f"{path}:1", f"{path}:{len(lines)}"]
    assert stats.read == len(lines) and stats.kept == 2
    assert dict(stats.skipped) == {"malformed JSON": 1, "unknown role": 1, "missing image": 1,
                                   "unreadable image": 2, "no assistant turn": 1, "expected": 2}
    assert stats.describe() == ("read 10, kept 2, skipped 8 (expected: 2, malformed JSON: 1, missing image: 1, "
                                "no assistant turn: 1, unknown role: 1, unreadable image: 2)")


def test_bad_problems(data_dir):
    user = [{"role": "user", "content": "What is 2 + 2?"}]
    cases = [
        ({"messages": user, "answer": ["4"]}, "answer", "expected a string or number, got list", "expected"),
        ({"messages": user}, "answer", "missing reference answer", "missing reference answer"),
        ({"messages": user + [{"role": "assistant", "content": "4"}], "answer": "4"}, "messages",
         "must end with a user turn", "must end with a user turn"),
        ({"messages": user, "answer": "4", "difficulty": 2}, "difficulty", "expected a number in [0, 1]", "expected"),
    ]
    for rec, field, text, _ in cases:
        path = write_lines(data_dir / "rl.jsonl", [json.dumps({"messages": user, "answer": 4}), json.dumps(rec)])
        with pytest.raises(DataError, match=re.escape(f"{path}:2.{field}: ") + ".*" + re.escape(text)):
            read_records(path, kind="problem")
    path = write_lines(data_dir / "rl.jsonl", [json.dumps({"messages": user, "answer": 4})]
                       + [json.dumps(c[0]) for c in cases])
    stats = ReadStats()
    recs = read_records(path, kind="problem", on_error="skip", stats=stats)
    assert [r["answer"] for r in recs] == ["4"]  # a number answer becomes a string
    assert dict(stats.skipped) == {"expected": 2, "missing reference answer": 1, "must end with a user turn": 1}


# --- recipe errors ----------------------------------------------------------------------------


def test_config_unknown_key_names_key_and_allowed(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, overrides=["optim.lr_peek=1e-4"])
    msg = str(e.value)
    assert msg.startswith("optim.lr_peek: unknown key; allowed keys here: ")
    assert "grad_accum" in msg and "weight_decay" in msg
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr_peek: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"^optim\.lr_peek: unknown key"):
        load_config(SFTConfig, recipe)


def test_config_teacher_rate_out_of_range_names_key():
    with pytest.raises(ConfigError, match=r"teacher\.check_rate: must be in \[0, 1\], got 1.5"):
        load_config(DistillConfig, overrides=["problems=p.jsonl", "teacher.check_rate=1.5"])


def test_config_bad_choice_names_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, overrides=["data.overlong=cut"])
    assert str(e.value) == "data.overlong: 'cut' is not allowed; choose one of 'truncate', 'drop'"


@pytest.mark.parametrize("override,message", [
    ("optim.grad_accum=two", "optim.grad_accum: expected an integer, got 'two'"),
    ("optim.grad_accum=1.5", "optim.grad_accum: expected an integer, got 1.5"),
    ("data.packing=maybe", "data.packing: expected true or false, got 'maybe'"),
    ("optim.weight_decay=[1]", "optim.weight_decay: expected a number, got [1]"),
    ("optim.weight_decay=lots", "optim.weight_decay: expected a number, got 'lots'"),
    ("stages=3", "stages: expected a list, got int 3"),
])
def test_config_wrong_type(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, overrides=[override])
    assert str(e.value) == message


def test_config_number_without_a_dot_is_a_number():
    # YAML 1.1 reads 5e-5 as a string; a learning rate written that way must still work.
    cfg = load_config(SFTConfig, overrides=["stages=[{lr_peak: 5e-5}]", "optim.weight_decay=1e-2"])
    assert cfg.stages[0].lr_peak == 5e-5 and cfg.optim.weight_decay == 0.01


def test_config_nested_list_item_key():
    with pytest.raises(ConfigError, match=r"^stages\[0\]\.max_len: unknown key; allowed keys here: .*max_length"):
        load_config(SFTConfig, overrides=["stages=[{max_len: 64}]"])


def test_config_valid_overrides_apply():
    cfg = load_config(SFTConfig, overrides=["data.sources=[{path: a.jsonl, weight: 2}]", "data.overlong=drop",
                                            "optim.grad_accum=4", "stages=[{max_length: 64}]"])
    assert cfg.data.sources[0].weight == 2.0 and cfg.data.overlong == "drop" and cfg.optim.grad_accum == 4 and cfg.stages[0].max_length == 64


# --- over-long examples -----------------------------------------------------------------------


def test_overlong_truncated_or_dropped_never_through_an_image(kimi, images):
    img = kimi.renderer.image_token_id

    def conv(text: str, image: str | None = None) -> list[dict]:
        parts = ([{"type": "image", "image": image}] if image else []) + [{"type": "text", "text": text}]
        return [{"role": "user", "content": parts}, {"role": "assistant", "content": "There are 3 red circles."}]

    short = kimi.render(conv("Hi"))
    long_text = kimi.render(conv("How many red circles are there in the image? " * 3))
    with_image = kimi.render(conv("How many?", images["green"]))  # 12 image tokens
    runs = [i for i, t in enumerate(with_image.input_ids) if t == img]
    first_img, last_img = runs[0], runs[-1]
    examples = [short, long_text, with_image]
    n = long_text.loss_mask.index(True) + 3  # cuts the long text example inside its assistant answer
    assert len(short) <= n < len(long_text)

    # cutting through the image: dropped and counted
    cut = first_img + 5
    out, keep, counts = fit_length([with_image], cut, "truncate", img)
    assert keep == [] and counts == {"truncated": 0, "dropped": 0, "overlong_image": 1, "no_supervised_left": 0}
    # cutting after the whole image but before any answer token: nothing left to learn
    out, keep, counts = fit_length([with_image], last_img + 3, "truncate", img)
    assert keep == [] and counts["no_supervised_left"] == 1

    assert len(with_image) <= n
    out, keep, counts = fit_length(examples, n, "truncate", img)
    assert keep == [0, 1, 2]
    assert counts == {"truncated": 1, "dropped": 0, "overlong_image": 0, "no_supervised_left": 0}
    assert out[0] is short and len(out[1]) == n
    assert out[1].input_ids == long_text.input_ids[:n] and out[1].loss_mask == long_text.loss_mask[:n]
    assert examples[1] is long_text and len(long_text) > n  # the caller's list is not modified

    out, keep, counts = fit_length(examples, n, "drop", img)
    assert keep == [0, 2]
    assert counts == {"truncated": 0, "dropped": 1, "overlong_image": 0, "no_supervised_left": 0}

    # truncating after a whole image keeps the image and its pixels
    n_img = len(with_image) - 3
    out, keep, counts = fit_length([with_image], n_img, "truncate", img)
    assert keep == [0] and counts["truncated"] == 1
    t = out[0]
    assert t.input_ids.count(img) == 12
    assert t.pixel_values.shape == with_image.pixel_values.shape
    assert t.image_grid_thw.tolist() == with_image.image_grid_thw.tolist()
    with torch.no_grad():  # and the model accepts it: image features match the placeholders
        batch = collate_rows([t], [[0]], kimi.pad_id, kimi.positions)
        assert torch.isfinite(token_logprobs(kimi.model, batch)).all()


@pytest.mark.parametrize("override,message", [
    ("loss.optimizer=lion", "loss.optimizer: 'lion' unknown; choose one of adamw, sgd"),
    ("loss.momentum=1.0", "loss.momentum: must be in [0, 1), got 1.0"),
])
def test_rl_optimizer_choice_names_key_and_allowed(override, message):
    from thinkvl.rl.loop import RLConfig

    with pytest.raises(ConfigError) as e:
        load_config(RLConfig, overrides=["data.problems=p.jsonl", override])
    assert str(e.value) == message


def test_override_that_is_not_yaml_names_key_and_how_to_quote():
    from thinkvl.rl.loop import RLConfig

    with pytest.raises(ConfigError, match=r"^model\.trainable: '\[layers\\\\\.\[23\]\\\\\.\]' is not a YAML value "
                                          r"\(while parsing a flow sequence\); quote strings"):
        load_config(RLConfig, overrides=["data.problems=p.jsonl", r"model.trainable=[layers\.[23]\.]"])
    cfg = load_config(RLConfig, overrides=["data.problems=p.jsonl", r"model.trainable=['layers\.[23]\.']"])
    assert cfg.model.trainable == [r"layers\.[23]\."]
