"""Synthetic tasks: determinism, formats, and answers re-derived from the PNG pixels."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thinkvl.demo.tasks import (
    BACKGROUND,
    CELL,
    COLORS,
    DIGIT_FONT,
    GLYPH_OFFSET,
    GLYPH_SCALE,
    IMAGE_TASKS,
    INK,
    MAX_LEVEL,
    TASKS,
    TEXT_TASKS,
    VERIFIABLE_TASKS,
    make_problem,
    render_scene,
    short_response,
    synth,
    vocabulary_corpus,
    write_split,
)

BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def question(record: dict) -> str:
    content = record["messages"][0]["content"]
    return content if isinstance(content, str) else content[-1]["text"]


def image_path(jsonl: Path, record: dict) -> Path:
    return jsonl.parent / record["messages"][0]["content"][0]["image"]


# ----------------------------------------------------------------------------- pixel decoding
# Independent of the generator's drawing code: colour from the cell's centre pixel, shape from
# how much of the cell that colour fills (square > circle > triangle), digits by sampling the
# centre of every glyph block.

def decode_shapes(pixels: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> list[dict]:
    rows, cols = pixels.shape[0] // CELL, pixels.shape[1] // CELL
    found = []
    for r in range(rows):
        for c in range(cols):
            cell = pixels[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
            centre = tuple(int(v) for v in cell[CELL // 2, CELL // 2])
            if centre == BACKGROUND:
                continue
            names = [n for n, rgb in palette.items() if rgb == centre]
            assert len(names) == 1, f"centre pixel {centre} of cell ({r},{c}) is not a palette colour"
            fill = (cell == np.array(centre)).all(axis=-1).mean()
            shape = "square" if fill > 0.65 else "circle" if fill > 0.45 else "triangle"
            found.append({"row": r, "col": c, "color": names[0], "shape": shape})
    return found


def decode_digits(pixels: np.ndarray) -> list[dict]:
    rows, cols = pixels.shape[0] // CELL, pixels.shape[1] // CELL
    glyphs = {tuple(v): k for k, v in DIGIT_FONT.items()}
    found = []
    for r in range(rows):
        for c in range(cols):
            ox, oy = c * CELL + GLYPH_OFFSET[0], r * CELL + GLYPH_OFFSET[1]
            bitmap = tuple(
                "".join("#" if tuple(pixels[oy + gy * GLYPH_SCALE + 1, ox + gx * GLYPH_SCALE + 1]) == INK
                        else " " for gx in range(5))
                for gy in range(7))
            if any("#" in line for line in bitmap):
                assert bitmap in glyphs, f"unreadable glyph in cell ({r},{c})"
                found.append({"row": r, "col": c, "digit": glyphs[bitmap]})
    return found


def load_pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def count_from_pixels(record: dict, objects: list[dict]) -> int:
    """The answer to the record's question, computed from the decoded scene and question text."""
    text = question(record)
    if record["task"] == "count_color":
        color = re.fullmatch(r"How many (\w+) shapes are there\?", text).group(1)
        return sum(o["color"] == color for o in objects)
    if record["task"] == "count_shape":
        shape = re.fullmatch(r"How many (\w+)s are there\?", text).group(1)
        return sum(o["shape"] == shape for o in objects)
    a, b = re.fullmatch(r"How many (\w+) and (\w+) shapes are there in total\?", text).groups()
    return sum(o["color"] in (a, b) for o in objects)


# ----------------------------------------------------------------------------- word problems

def solve_word(text: str) -> int:
    """Re-solve a word problem from its text alone."""
    value = int(re.search(r"has (\d+) ", text).group(1))
    for m in re.finditer(r"(buys|finds|gets|gives|loses) (\d+)(?: (more|away|bags of (\d+)))?", text):
        verb, n, tail, per = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        if per is not None:
            value += n * int(per)
        elif verb in ("gives", "loses"):
            value -= n
        else:
            assert tail == "more"
            value += n
    return value


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("synth")
    return synth(out, seed=0, n_sft=70, n_rl=60, n_eval=30)


# ----------------------------------------------------------------------------- tests

def test_task_lists() -> None:
    assert set(IMAGE_TASKS) | set(TEXT_TASKS) == set(TASKS)
    assert not set(IMAGE_TASKS) & set(TEXT_TASKS)
    assert "describe" not in VERIFIABLE_TASKS and len(VERIFIABLE_TASKS) == len(TASKS) - 1


def test_same_seed_gives_identical_bytes(tmp_path: Path, data: dict[str, Path]) -> None:
    again = synth(tmp_path / "again", seed=0, n_sft=70, n_rl=60, n_eval=30)
    for split in ("sft", "rl", "eval"):
        assert again[split].read_bytes() == data[split].read_bytes(), split
    first = sorted(p.name for p in (data["sft"].parent / "images").iterdir())
    second = sorted(p.name for p in (tmp_path / "again" / "images").iterdir())
    assert first == second and first
    for name in first:
        assert (data["sft"].parent / "images" / name).read_bytes() == \
            (tmp_path / "again" / "images" / name).read_bytes(), name


def test_different_seed_differs(tmp_path: Path, data: dict[str, Path]) -> None:
    other = synth(tmp_path / "other", seed=1, n_sft=70, n_rl=60, n_eval=30)
    for split in ("sft", "rl", "eval"):
        assert other[split].read_bytes() != data[split].read_bytes(), split


def test_splits_ids_and_roles(data: dict[str, Path]) -> None:
    records = {split: read_jsonl(path) for split, path in data.items()}
    assert [len(records[s]) for s in ("sft", "rl", "eval")] == [70, 60, 30]
    ids = [r["id"] for rs in records.values() for r in rs]
    assert len(ids) == len(set(ids))
    assert {r["task"] for r in records["sft"]} == set(TASKS)
    for split in ("rl", "eval"):
        assert {r["task"] for r in records[split]} == set(VERIFIABLE_TASKS)
        assert all([m["role"] for m in r["messages"]] == ["user"] for r in records[split])
    # eval is held out: its problems are not the training problems under other ids
    train_q = {json.dumps(r["meta"], sort_keys=True) for s in ("sft", "rl") for r in records[s]}
    overlap = sum(json.dumps(r["meta"], sort_keys=True) in train_q for r in records["eval"])
    assert overlap <= 3  # level-1 text problems can collide by chance, nothing more
    for r in records["sft"]:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"]
        if r["task"] == "describe":  # always read out row by row (the row anchors make colours learnable)
            assert r["messages"][1]["content"].startswith("Row 1: ")
            assert r["messages"][1]["content"].endswith(short_response(r))
        else:
            assert r["messages"][1]["content"] == short_response(r)
        assert r["id"].startswith(r["task"] + "-")
        assert 1 <= r["difficulty_level"] <= MAX_LEVEL


def test_record_format(data: dict[str, Path]) -> None:
    for r in read_jsonl(data["rl"]):
        content = r["messages"][0]["content"]
        if r["task"] in TEXT_TASKS:
            assert isinstance(content, str)
        else:
            assert content[0]["type"] == "image" and content[1]["type"] == "text"
            assert content[0]["image"] == f"images/{r['id']}.png"  # relative to the JSONL folder
            assert image_path(data["rl"], r).is_file()
        assert isinstance(r["answer"], str) and re.fullmatch(r"\d+", r["answer"])


def test_images_are_cells_filled_by_objects(data: dict[str, Path]) -> None:
    for r in read_jsonl(data["sft"]):
        if r["task"] not in IMAGE_TASKS:
            continue
        pixels = load_pixels(image_path(data["sft"], r))
        assert pixels.shape == (112, 112, 3)
        for obj in r["meta"].get("objects", []):
            cell = pixels[obj["row"] * CELL:(obj["row"] + 1) * CELL, obj["col"] * CELL:(obj["col"] + 1) * CELL]
            rgb = np.array(COLORS[obj["color"]])
            assert (cell[CELL // 2, CELL // 2] == rgb).all()
            assert (cell == rgb).all(axis=-1).mean() > 0.3  # the object fills its cell
            assert (cell == rgb).all(axis=-1).any(axis=0).sum() >= CELL - 6  # spans the width


def test_count_answers_match_the_pixels(data: dict[str, Path]) -> None:
    checked = 0
    for split in ("sft", "rl", "eval"):
        for r in read_jsonl(data[split]):
            if r["task"] not in ("count_color", "count_shape", "sum_colors", "describe"):
                continue
            objects = decode_shapes(load_pixels(image_path(data[split], r)), COLORS)
            assert objects == r["meta"]["objects"]
            if r["task"] == "describe":
                assert r["answer"] == ", ".join(f"{o['color']} {o['shape']}" for o in objects)
            else:
                assert int(r["answer"]) == count_from_pixels(r, objects)
            checked += 1
    assert checked >= 60


def test_digit_sums_match_the_pixels(data: dict[str, Path]) -> None:
    glyphs = list(DIGIT_FONT.values())
    assert len(set(glyphs)) == 10 and all(len(g) == 7 and all(len(x) == 5 for x in g) for g in glyphs)
    checked = 0
    for split in ("sft", "rl", "eval"):
        for r in read_jsonl(data[split]):
            if r["task"] == "digit_sum":
                digits = decode_digits(load_pixels(image_path(data[split], r)))
                assert 2 <= len(digits) <= 3
                assert int(r["answer"]) == sum(d["digit"] for d in digits)
                checked += 1
    assert checked >= 10


def test_text_answers_are_right() -> None:
    rng = random.Random(5)
    for i in range(300):
        r = make_problem("arith", i, rng)
        expr = re.fullmatch(r"What is ([\d +*-]+)\?", question(r)).group(1)
        n_operands = len(expr.split()) // 2 + 1
        assert n_operands == 2 + (r["difficulty_level"] - 1) // 2
        assert int(r["answer"]) == eval(expr)  # noqa: S307 - digits and + - * only
        w = make_problem("word", i, rng)
        assert int(w["answer"]) == solve_word(question(w)) >= 0


def test_short_responses() -> None:
    rng = random.Random(1)
    for task in TASKS:
        for i in range(20):
            r = make_problem(task, i, rng)
            text = short_response(r)
            if task == "describe":
                assert text == r["answer"] and "boxed" not in text
            else:
                assert BOXED.findall(text) == [r["answer"]]
                assert text.endswith(f"The answer is \\boxed{{{r['answer']}}}.")
    one = make_problem("count_color", 0, random.Random(0), level=1)
    assert short_response(one).startswith("There is 1 ")


def test_levels_and_difficulty_knob(tmp_path: Path) -> None:
    path = tmp_path / "lv.jsonl"
    counts = write_split(path, {"count_color": 30, "digit_sum": 10, "arith": 10}, seed=3,
                         with_response=False, levels=(2, 3))
    assert counts == {"count_color": 30, "digit_sum": 10, "arith": 10}
    for r in read_jsonl(path):
        assert r["difficulty_level"] in (2, 3)
        if r["task"] == "count_color":
            assert len(r["meta"]["objects"]) == r["difficulty_level"]
    with pytest.raises(ValueError):
        write_split(tmp_path / "bad.jsonl", {"arith": 1}, seed=0, with_response=False, levels=(0, 9))


@pytest.mark.parametrize("task", ["count_color", "count_shape", "sum_colors"])
def test_counting_answers_are_uniform_over_0_to_level(task: str) -> None:
    rng = random.Random(2)
    for level in (1, 3, 6):
        answers = [make_problem(task, i, rng, level=level)["answer"] for i in range(700)]
        expected = 700 / (level + 1)
        counts = {str(t): answers.count(str(t)) for t in range(level + 1)}
        assert set(answers) == set(counts), (level, set(answers))
        # each value within 5 binomial standard deviations of uniform
        sd = (700 * (1 / (level + 1)) * (1 - 1 / (level + 1))) ** 0.5
        assert all(abs(c - expected) < 5 * sd for c in counts.values()), (level, counts)
    # over all levels no constant answer is right more than about a quarter of the time
    answers = [make_problem(task, i, rng)["answer"] for i in range(1200)]
    assert max(answers.count(a) for a in set(answers)) / len(answers) < 0.3


def test_counting_answer_matches_the_scene() -> None:
    rng = random.Random(5)
    for i in range(200):
        r = make_problem(("count_color", "count_shape", "sum_colors")[i % 3], i, rng)
        target, objs = r["meta"]["target"], r["meta"]["objects"]
        hits = [o for o in objs if (o["shape"] == target["shape"] if "shape" in target else o["color"] in target["colors"])]
        assert str(len(hits)) == r["answer"]


def test_yellow_option_and_render_scene(tmp_path: Path) -> None:
    palette = ("red", "green", "blue", "yellow")
    rng = random.Random(4)
    seen = set()
    for i in range(40):
        r = make_problem("count_color", i, rng, level=6, image_dir=tmp_path, colors=palette)
        pixels = load_pixels(tmp_path / f"{r['id']}.png")
        assert decode_shapes(pixels, COLORS) == r["meta"]["objects"]
        assert (np.asarray(render_scene(r["meta"])) == pixels).all()
        seen |= {o["color"] for o in r["meta"]["objects"]}
    assert "yellow" in seen
    with pytest.raises(ValueError):
        make_problem("count_color", 0, rng, colors=("purple",))


def test_make_problem_is_seeded_locally() -> None:
    random.seed(123)
    a = make_problem("word", 7, random.Random(9))
    random.seed(456)
    b = make_problem("word", 7, random.Random(9))
    assert a == b and a["id"] == "word-000007"
    with pytest.raises(ValueError):
        make_problem("nope", 0, random.Random(0))


def test_vocabulary_corpus() -> None:
    texts = vocabulary_corpus(seed=0, n=210)
    assert len(texts) == 210 and texts == vocabulary_corpus(seed=0, n=210)
    joined = "\n".join(texts)
    for phrase in ("List the shapes", "How many", "sum of the digits", "What is", "Plan:",
                   "Row 1:", "Check:", "Expression:", "Start:", "\\boxed{", "<think>", "yellow"):
        assert phrase in joined, phrase


def test_grounding_split_adds_describe_only_and_leaves_the_rest(tmp_path: Path, data: dict[str, Path]) -> None:
    out = synth(tmp_path / "g", seed=0, n_sft=70, n_rl=60, n_eval=30, n_grounding=25)
    for split in ("sft", "rl", "eval"):  # the other splits are byte-identical with or without it
        assert out[split].read_bytes() == data[split].read_bytes(), split
    grounding = read_jsonl(out["grounding"])
    assert len(grounding) == 25 and {r["task"] for r in grounding} == {"describe"}
    ids = [r["id"] for s in out.values() for r in read_jsonl(s)]
    assert len(ids) == len(set(ids))
    for r in grounding:
        objects = ", ".join(f"{o['color']} {o['shape']}" for o in r["meta"]["objects"])
        assert r["answer"] == objects  # read out row by row, then listed
        assert r["messages"][1]["content"].startswith("Row 1: ") and r["messages"][1]["content"].endswith(objects)
        assert (out["grounding"].parent / r["messages"][0]["content"][0]["image"]).is_file()
    with pytest.raises(ValueError, match="n_grounding"):
        synth(tmp_path / "bad", n_grounding=-1)


def test_worked_answers_change_only_the_sft_answers(tmp_path: Path, data: dict[str, Path]) -> None:
    from thinkvl.demo.teacher import worked_response

    out = synth(tmp_path / "w", seed=0, n_sft=70, n_rl=60, n_eval=30, answers="worked")
    for split in ("rl", "eval"):
        assert out[split].read_bytes() == data[split].read_bytes(), split
    worked, direct = read_jsonl(out["sft"]), read_jsonl(data["sft"])
    assert [r["id"] for r in worked] == [r["id"] for r in direct]
    for w, d in zip(worked, direct):
        assert w["messages"][:-1] == d["messages"][:-1] and w["meta"] == d["meta"]
        assert w["messages"][-1] == {"role": "assistant", "content": worked_response(d)}
        if w["task"] != "describe":
            assert w["messages"][-1]["content"].endswith(f"\\boxed{{{w['answer']}}}.")
    with pytest.raises(ValueError, match="answers must be one of"):
        synth(tmp_path / "bad", n_sft=7, n_rl=0, n_eval=0, answers="long")


def test_reading_scores_by_hand() -> None:
    from thinkvl.demo.tasks import read_rows, reading_scores

    scene = {"task": "count_color", "meta": {"grid": [4, 4], "objects": [
        {"row": 0, "col": 1, "color": "red", "shape": "circle"},
        {"row": 2, "col": 0, "color": "blue", "shape": "square"},
        {"row": 2, "col": 3, "color": "red", "shape": "triangle"}]}}
    right = "Row 1: red circle.\nRow 2: nothing.\nRow 3: blue square, red triangle.\nRow 4: nothing.\nSo 2."
    assert reading_scores(scene, right) == (True, True)
    assert reading_scores(scene, right.replace("red triangle", "red circle")) == (False, True)  # a shape wrong
    assert reading_scores(scene, right.replace("blue square, red", "red square, blue")) == (False, False)  # order
    assert reading_scores(scene, right.replace("Row 4: nothing.\n", "")) == (False, False)  # a row not read out
    assert reading_scores(scene, "There are 2 red shapes.") == (False, False)
    # a repaired row replaces its first reading (the teacher's "Let me list row k again")
    repaired = right.replace("Row 3: blue square.", "").replace(
        "Row 3: blue square, red triangle.", "Row 3: blue square.\nWait, I skipped the red triangle in row 3. "
        "Let me list row 3 again: blue square, red triangle.")
    assert reading_scores(scene, repaired) == (True, True)
    digits = {"task": "digit_sum", "meta": {"grid": [4, 4], "digits": [
        {"row": 1, "col": 0, "digit": 3}, {"row": 1, "col": 2, "digit": 8}]}}
    assert reading_scores(digits, "Row 1: nothing.\nRow 2: 3, 8.\nRow 3: nothing.\nRow 4: nothing.") == (True, True)
    assert reading_scores(digits, "Row 1: nothing.\nRow 2: 3, 9.\nRow 3: nothing.\nRow 4: nothing.") == (False, False)
    assert reading_scores({"task": "arith", "meta": {"expression": "1 + 2"}}, right) is None
    assert read_rows("Row 1: a.\nRow 2: b, c.", 2) == [["a"], ["b", "c"]]


def test_worked_answers_and_teacher_traces_read_right() -> None:
    from thinkvl.demo.tasks import reading_scores
    from thinkvl.demo.teacher import ProgramTeacher, worked_response

    teacher = ProgramTeacher(seed=3, mistake_rate=0.5, wrong_rate=0.0, explore_rate=0.5)
    rng = random.Random(0)
    for i, task in enumerate(IMAGE_TASKS * 8):
        record = make_problem(task, i, rng)
        assert reading_scores(record, worked_response(record)) == (True, True)
        for text in teacher.sample(record, 2):  # caught mistakes included: the repaired row counts
            assert reading_scores(record, text) == (True, True), text


def test_brief_answers_by_hand() -> None:
    from thinkvl.demo.tasks import brief_response

    arith = {"task": "arith", "answer": "10", "meta": {"operands": [3, 4, 2, 1], "operators": ["+", "*", "-"],
                                                       "expression": "3 + 4 * 2 - 1"}}
    assert brief_response(arith) == "3 + 4 * 2 - 1 = 3 + 8 - 1 = 11 - 1 = 10. The answer is \\boxed{10}."
    scene = {"task": "count_color", "answer": "2",
             "meta": {"grid": [3, 3], "target": {"colors": ["red"]},
                      "objects": [{"row": 0, "col": 0, "color": "red", "shape": "circle"},
                                  {"row": 2, "col": 1, "color": "blue", "shape": "square"},
                                  {"row": 2, "col": 2, "color": "red", "shape": "square"}]}}
    assert brief_response(scene) == ("Red: row 1 has 1, row 2 has 0, row 3 has 1. There are 2 red shapes. "
                                     "The answer is \\boxed{2}.")
    word = {"task": "word", "answer": "6", "meta": {"name": "Dan", "pronoun": "he", "items": "books", "item": "book",
                                                    "start": 6, "steps": [{"kind": "lose", "n": 4},
                                                                          {"kind": "bags", "k": 2, "m": 2}]}}
    assert brief_response(word) == "6 - 4 = 2, 2 + 2 * 2 = 6. Dan has 6 books now. The answer is \\boxed{6}."


def test_mixed_answers_work_it_out_when_asked(tmp_path: Path) -> None:
    from thinkvl.demo.tasks import WORK_IT_OUT, question_text, short_response

    paths = synth(tmp_path, seed=3, n_sft=80, n_rl=0, n_eval=0, answers="mixed")
    asked = direct = 0
    for r in read_jsonl(paths["sft"]):
        answer = r["messages"][-1]["content"]
        if r["task"] == "describe":
            assert answer.startswith("Row 1: ")
        elif question_text(r).endswith(WORK_IT_OUT):
            asked += 1
            assert answer != short_response(r) and answer.endswith(f"\\boxed{{{r['answer']}}}.")
        else:
            direct += 1
            assert answer == short_response(r)
    assert asked > 15 and direct > 15  # about half each


def test_worked_split_holds_worked_verifiable_conversations_and_leaves_the_rest(
        tmp_path: Path, data: dict[str, Path]) -> None:
    from thinkvl.demo.teacher import worked_response

    out = synth(tmp_path / "b", seed=0, n_sft=70, n_rl=60, n_eval=30, n_worked=40)
    for split in ("sft", "rl", "eval"):  # direct SFT answers and the problems are unchanged
        assert out[split].read_bytes() == data[split].read_bytes(), split
    worked = read_jsonl(out["worked"])
    assert len(worked) == 40 and {r["task"] for r in worked} == set(VERIFIABLE_TASKS)
    ids = [r["id"] for s in out.values() for r in read_jsonl(s)]
    assert len(ids) == len(set(ids))  # fresh problems, not the SFT or eval ones again
    for r in worked:
        bare = dict(r, messages=r["messages"][:1])
        assert r["messages"][1] == {"role": "assistant", "content": worked_response(bare)}
        assert r["messages"][1]["content"].endswith(f"\\boxed{{{r['answer']}}}.")
    with pytest.raises(ValueError, match="n_worked"):
        synth(tmp_path / "bad", n_worked=-1)


def test_worked_colours_per_scene_ask_one_scene_about_every_colour(tmp_path: Path) -> None:
    """``colours_per_scene=3``: the worked split's count_color scenes come in groups of three
    consecutive count_color records with one image and the three colours of the palette; each
    answer and worked solution is right for the image's pixels; every other record, and every other
    split, is what ``colours_per_scene=1`` writes."""
    from thinkvl.demo.teacher import worked_response

    kwargs = dict(seed=3, n_sft=40, n_rl=20, n_eval=20, n_worked=120, tasks=["count_color", "arith"])
    plain = synth(tmp_path / "plain", **kwargs)
    out = synth(tmp_path / "asked", **kwargs, colours_per_scene=3)
    for split in ("sft", "rl", "eval"):
        assert out[split].read_bytes() == plain[split].read_bytes(), split
    worked, before = read_jsonl(out["worked"]), read_jsonl(plain["worked"])
    assert [r["id"] for r in worked] == [r["id"] for r in before]
    assert [r for r in worked if r["task"] == "arith"] == [r for r in before if r["task"] == "arith"]
    counting = [r for r in worked if r["task"] == "count_color"]
    assert len(counting) == 60 and all(len(r["meta"]["palette"]) == 3 for r in counting)
    answers = set()
    for start in range(0, len(counting), 3):
        group = counting[start:start + 3]
        images = {r["messages"][0]["content"][0]["image"] for r in group}
        assert len(images) == 1 and group[0]["id"] in images.pop()
        assert sorted(r["meta"]["target"]["colors"][0] for r in group) == sorted(group[0]["meta"]["palette"])
        assert group[0] == next(r for r in before if r["id"] == group[0]["id"])  # the drawn colour first
        objects = decode_shapes(load_pixels(image_path(out["worked"], group[0])), COLORS)
        for r in group:
            assert int(r["answer"]) == count_from_pixels(r, objects)
            assert r["messages"][1]["content"] == worked_response(dict(r, messages=r["messages"][:1]))
            answers.add(r["answer"])
    assert len(answers) > 3
    with pytest.raises(ValueError, match="colours_per_scene"):
        synth(tmp_path / "bad", **kwargs, colours_per_scene=4)
    with pytest.raises(ValueError, match="colours_per_scene"):  # refused even with no worked split
        synth(tmp_path / "bad0", **dict(kwargs, n_worked=0), colours_per_scene=0)
