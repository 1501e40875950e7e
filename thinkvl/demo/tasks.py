"""Synthetic verifiable tasks for the CPU demo (text and image).

Every record is drawn from a seeded :class:`random.Random`; nothing touches global random
state, so the same seed gives byte-identical JSONL files and PNG images.

Images are a grid of 28x28-pixel cells (default 4x4 cells = 112x112 px) on a white
background. The tiny Kimi-VL-style model cuts images into 14x14 patches and merges 2x2 of
them, so one cell is exactly one language-model image token. Every object fills its cell
(up to a 2-pixel margin) and objects are listed in reading order: row by row, left to right.

Tasks (``difficulty_level`` runs from 1 to :data:`MAX_LEVEL`):

===========  =====  ==========================================  =================================
task         input  question                                    level knob
===========  =====  ==========================================  =================================
describe     image  List the shapes in the image.               number of objects = level
count_color  image  How many red shapes are there?              number of objects = level
count_shape  image  How many circles are there?                 number of objects = level
sum_colors   image  How many red and blue shapes ... in total?  number of objects = level
digit_sum    image  What is the sum of the digits?              2 digits (1-3), 3 digits (4-6)
arith        text   What is 3 + 4 * 2?                          operands 2/3/4, operators, size
word         text   Ann has 3 apples and buys 4 more. ...       steps 1/2/3, multiplication
===========  =====  ==========================================  =================================

``describe`` is a grounding task for joint SFT only (its answer is the object list, not a
number); the other six are verifiable and go into the RL and evaluation sets.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

__all__ = [
    "ANSWER_STYLES",
    "ARITH_MAX",
    "BACKGROUND",
    "CELL",
    "COLORS",
    "DEFAULT_COLORS",
    "DEFAULT_GRID",
    "DIGIT_FONT",
    "GLYPH_SCALE",
    "IMAGE_TASKS",
    "INK",
    "MAX_LEVEL",
    "SHAPES",
    "TASKS",
    "TEXT_TASKS",
    "VERIFIABLE_TASKS",
    "apply_op",
    "cell_box",
    "count_phrase",
    "expression_text",
    "make_problem",
    "question_text",
    "read_rows",
    "reading_scores",
    "reduce_steps",
    "render_scene",
    "scene_rows",
    "short_response",
    "split_counts",
    "synth",
    "vocabulary_corpus",
    "word_change",
    "word_phrase",
    "word_question",
    "write_split",
]

# ----------------------------------------------------------------------------- constants

CELL = 28
"""Cell size in pixels: 2x2 ViT patches of 14 px = one merged image token."""
DEFAULT_GRID: tuple[int, int] = (4, 4)
"""(rows, cols) of cells: 112x112 pixels."""
MARGIN = 2
"""White border inside a cell, so neighbouring objects stay apart."""
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
INK: tuple[int, int, int] = (0, 0, 0)
"""Digit colour."""
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (20, 160, 40),
    "blue": (30, 70, 230),
    "yellow": (240, 200, 0),
}
DEFAULT_COLORS: tuple[str, ...] = ("red", "green", "blue")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
MAX_LEVEL = 6

TASKS: tuple[str, ...] = (
    "describe", "count_color", "count_shape", "sum_colors", "digit_sum", "arith", "word",
)
IMAGE_TASKS: tuple[str, ...] = ("describe", "count_color", "count_shape", "sum_colors", "digit_sum")
TEXT_TASKS: tuple[str, ...] = ("arith", "word")
VERIFIABLE_TASKS: tuple[str, ...] = tuple(t for t in TASKS if t != "describe")

# Our own 5x7 bitmap digits ('#' = ink), drawn with GLYPH_SCALE-pixel blocks (15x21 px).
DIGIT_FONT: dict[int, tuple[str, ...]] = {
    0: (" ### ", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "),
    1: ("  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    2: (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    3: ("#### ", "    #", "    #", " ### ", "    #", "    #", "#### "),
    4: ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    5: ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    6: (" ### ", "#    ", "#    ", "#### ", "#   #", "#   #", " ### "),
    7: ("#####", "    #", "   # ", "  #  ", "  #  ", "  #  ", "  #  "),
    8: (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    9: (" ### ", "#   #", "#   #", " ####", "    #", "    #", " ### "),
}
GLYPH_SCALE = 3
GLYPH_OFFSET: tuple[int, int] = ((CELL - 5 * GLYPH_SCALE) // 2, (CELL - 7 * GLYPH_SCALE) // 2)
"""(x, y) of a glyph's top-left corner inside its cell."""

QUESTIONS: dict[str, str] = {
    "describe": "List the shapes in the image.",
    "count_color": "How many {color} shapes are there?",
    "count_shape": "How many {shape}s are there?",
    "sum_colors": "How many {color_a} and {color_b} shapes are there in total?",
    "digit_sum": "What is the sum of the digits?",
    "arith": "What is {expression}?",
}

# Word problems: a person, an item (plural, singular) and a few kinds of change.
NAMES: tuple[tuple[str, str], ...] = (
    ("Ann", "she"), ("Ben", "he"), ("Cara", "she"), ("Dan", "he"),
    ("Eva", "she"), ("Finn", "he"), ("Gina", "she"), ("Hugo", "he"),
)
ITEMS: tuple[tuple[str, str], ...] = (
    ("apples", "apple"), ("pears", "pear"), ("books", "book"), ("pens", "pen"),
    ("stamps", "stamp"), ("marbles", "marble"), ("cards", "card"), ("shells", "shell"),
)
ADD_KINDS: tuple[str, ...] = ("buy", "find", "get")
SUB_KINDS: tuple[str, ...] = ("give", "lose")
ARITH_MAX = 60
"""Every intermediate value of an arithmetic problem lies in 0..ARITH_MAX."""


# ----------------------------------------------------------------------------- helpers

def count_phrase(n: int, singular: str, plural: str) -> str:
    """``There is 1 red shape`` / ``There are 2 red shapes`` (numbers always as digits)."""
    return f"There is 1 {singular}" if n == 1 else f"There are {n} {plural}"


def _boxed(answer: str) -> str:
    return f"The answer is \\boxed{{{answer}}}."


def _derive_seed(seed: int, *parts: object) -> int:
    """A stable integer seed from ``seed`` and labels (independent of PYTHONHASHSEED)."""
    text = "/".join(str(p) for p in (seed, *parts))
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def _record_id(task: str, index: int) -> str:
    return f"{task}-{index:06d}"


def cell_box(row: int, col: int, margin: int = 0) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), inclusive, of a cell shrunk by ``margin``."""
    x0, y0 = col * CELL + margin, row * CELL + margin
    return x0, y0, x0 + CELL - 1 - 2 * margin, y0 + CELL - 1 - 2 * margin


def _level_or_draw(level: int | None, rng: random.Random) -> int:
    if level is None:
        return rng.randint(1, MAX_LEVEL)
    if not 1 <= level <= MAX_LEVEL:
        raise ValueError(f"difficulty level must be in 1..{MAX_LEVEL}, got {level}")
    return level


# ----------------------------------------------------------------------------- scenes

def _random_cells(rng: random.Random, n: int, grid: tuple[int, int]) -> list[tuple[int, int]]:
    rows, cols = grid
    if n > rows * cols:
        raise ValueError(f"{n} objects do not fit a {rows}x{cols} grid")
    return [divmod(i, cols) for i in sorted(rng.sample(range(rows * cols), n))]


def _shape_scene(rng: random.Random, n: int, grid: tuple[int, int],
                 colors: Sequence[str]) -> list[dict[str, Any]]:
    """``n`` objects in random cells, in reading order."""
    return [
        {"row": r, "col": c, "color": rng.choice(list(colors)), "shape": rng.choice(SHAPES)}
        for r, c in _random_cells(rng, n, grid)
    ]


def _balanced(rng: random.Random, objects: list[dict[str, Any]], attribute: str,
              wanted: Sequence[str], others: Sequence[str]) -> int:
    """Give ``t`` objects a value from ``wanted`` and the rest one from ``others``, ``t`` uniform in
    0..len(objects) (all of them when ``others`` is empty); returns ``t``.

    Counting answers drawn this way are spread over 0..level: with the colour drawn first and the
    count read off a random scene, 55-60% of the answers were "1" and a constant answer beat every
    trained model (see the README)."""
    t = rng.randint(0, len(objects)) if others else len(objects)
    hits = set(rng.sample(range(len(objects)), t))
    for i, obj in enumerate(objects):
        obj[attribute] = rng.choice(list(wanted if i in hits else others))
    return t


def _describe_list(objects: Sequence[dict[str, Any]]) -> str:
    return ", ".join(f"{o['color']} {o['shape']}" for o in objects)


def _draw_shape(draw: ImageDraw.ImageDraw, obj: dict[str, Any]) -> None:
    x0, y0, x1, y1 = cell_box(obj["row"], obj["col"], MARGIN)
    fill = COLORS[obj["color"]]
    if obj["shape"] == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif obj["shape"] == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj["shape"] == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj['shape']!r}")


def _draw_digit(draw: ImageDraw.ImageDraw, item: dict[str, Any]) -> None:
    x0, y0, _, _ = cell_box(item["row"], item["col"])
    ox, oy = x0 + GLYPH_OFFSET[0], y0 + GLYPH_OFFSET[1]
    s = GLYPH_SCALE
    for gy, line in enumerate(DIGIT_FONT[item["digit"]]):
        for gx, ch in enumerate(line):
            if ch == "#":
                draw.rectangle((ox + gx * s, oy + gy * s, ox + gx * s + s - 1, oy + gy * s + s - 1),
                               fill=INK)


def render_scene(meta: dict[str, Any]) -> Image.Image:
    """Draw an image task's scene (``record["meta"]``) as an RGB image."""
    rows, cols = meta["grid"]
    image = Image.new("RGB", (cols * CELL, rows * CELL), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in meta.get("objects", []):
        _draw_shape(draw, obj)
    for item in meta.get("digits", []):
        _draw_digit(draw, item)
    return image


# ----------------------------------------------------------------------------- image tasks

def _image_task(task: str, rng: random.Random, level: int, grid: tuple[int, int],
                colors: Sequence[str]) -> tuple[str, str, dict[str, Any]]:
    """(question, answer, meta) for a shape-scene task."""
    objects = _shape_scene(rng, level, grid, colors)
    meta: dict[str, Any] = {"grid": list(grid), "palette": list(colors), "objects": objects}
    if task == "describe":
        return QUESTIONS[task], _describe_list(objects), meta
    if task == "count_color":
        color = rng.choice(list(colors))
        meta["target"] = {"colors": [color]}
        answer = _balanced(rng, objects, "color", [color], [c for c in colors if c != color])
        return QUESTIONS[task].format(color=color), str(answer), meta
    if task == "count_shape":
        shape = rng.choice(SHAPES)
        meta["target"] = {"shape": shape}
        answer = _balanced(rng, objects, "shape", [shape], [x for x in SHAPES if x != shape])
        return QUESTIONS[task].format(shape=shape), str(answer), meta
    if task == "sum_colors":
        if len(colors) < 2:
            raise ValueError("sum_colors needs at least two colours")
        pair = sorted(rng.sample(list(colors), 2), key=list(colors).index)
        meta["target"] = {"colors": pair}
        answer = _balanced(rng, objects, "color", pair, [c for c in colors if c not in pair])
        return QUESTIONS[task].format(color_a=pair[0], color_b=pair[1]), str(answer), meta
    raise ValueError(f"not a shape task: {task!r}")


def _digit_task(rng: random.Random, level: int, grid: tuple[int, int]) -> tuple[str, str, dict]:
    n_digits = 2 if level <= 3 else 3
    high = {1: 3, 2: 6, 3: 9, 4: 3, 5: 6, 6: 9}[level]
    low = 0 if high == 9 else 1
    digits = [{"row": r, "col": c, "digit": rng.randint(low, high)}
              for r, c in _random_cells(rng, n_digits, grid)]
    meta = {"grid": list(grid), "digits": digits}
    return QUESTIONS["digit_sum"], str(sum(d["digit"] for d in digits)), meta


# ----------------------------------------------------------------------------- text tasks

def apply_op(a: int, op: str, b: int) -> int:
    """``a op b`` for op in + - *."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operator {op!r}")


def reduce_steps(operands: Sequence[int], operators: Sequence[str]) -> list[tuple[int, str, int, int]]:
    """Evaluation steps (a, op, b, result): multiplications first, then left to right."""
    values, ops = list(operands), list(operators)
    steps: list[tuple[int, str, int, int]] = []
    while ops:
        i = ops.index("*") if "*" in ops else 0
        a, op, b = values[i], ops[i], values[i + 1]
        result = apply_op(a, op, b)
        steps.append((a, op, b, result))
        values[i: i + 2] = [result]
        del ops[i]
    return steps


def expression_text(operands: Sequence[int], operators: Sequence[str]) -> str:
    """``3 + 4 * 2``."""
    parts = [str(operands[0])]
    for op, value in zip(operators, operands[1:]):
        parts += [op, str(value)]
    return " ".join(parts)


def _arith_task(rng: random.Random, level: int) -> tuple[str, str, dict[str, Any]]:
    n_operands = 2 + (level - 1) // 2
    high = 5 if level % 2 else 9
    allowed = ["+"] if level == 1 else ["+", "-"] if level == 2 else ["+", "-", "*"]
    for _ in range(200):
        operands = [rng.randint(1, high) for _ in range(n_operands)]
        operators = [rng.choice(allowed) for _ in range(n_operands - 1)]
        if all(0 <= step[3] <= ARITH_MAX for step in reduce_steps(operands, operators)):
            break
    else:  # pragma: no cover - practically unreachable; a plain sum always fits
        operators = ["+"] * (n_operands - 1)
    expression = expression_text(operands, operators)
    value = reduce_steps(operands, operators)[-1][3]
    meta = {"operands": operands, "operators": operators, "expression": expression}
    return QUESTIONS["arith"].format(expression=expression), str(value), meta


def word_change(step: dict[str, Any]) -> int:
    """Signed change of one word-problem step."""
    if step["kind"] == "bags":
        return step["k"] * step["m"]
    return step["n"] if step["kind"] in ADD_KINDS else -step["n"]


def _word_step(rng: random.Random, current: int, allow_bags: bool, high: int) -> dict[str, Any]:
    kinds = list(ADD_KINDS) + (list(SUB_KINDS) if current >= 1 else []) + (["bags"] if allow_bags else [])
    kind = rng.choice(kinds)
    if kind == "bags":
        return {"kind": kind, "k": rng.randint(2, 3), "m": rng.randint(2, 5)}
    if kind in SUB_KINDS:  # leave at least one where possible: fewer zero answers
        return {"kind": kind, "n": rng.randint(1, max(1, min(current - 1, high)))}
    return {"kind": kind, "n": rng.randint(1, high)}


def word_phrase(step: dict[str, Any], items: str) -> str:
    """The verb phrase of a step: ``buys 4 more``."""
    kind = step["kind"]
    if kind == "bags":
        return f"buys {step['k']} bags of {step['m']} {items}"
    return {"buy": "buys {n} more", "find": "finds {n} more", "get": "gets {n} more from a friend",
            "give": "gives {n} away", "lose": "loses {n}"}[kind].format(n=step["n"])


def word_question(meta: dict[str, Any]) -> str:
    """The problem text of a word-problem scene."""
    name, pronoun, items, item = meta["name"], meta["pronoun"], meta["items"], meta["item"]
    start = f"{meta['start']} {item if meta['start'] == 1 else items}"
    phrases = [word_phrase(s, items) for s in meta["steps"]]
    ask = f"How many {items} does {pronoun} have now?"
    if len(phrases) == 1:
        return f"{name} has {start} and {phrases[0]}. {ask}"
    body = [f"{pronoun.capitalize()} {phrases[0]}."] + [f"Then {pronoun} {p}." for p in phrases[1:]]
    return " ".join([f"{name} has {start}."] + body + [ask])


def _word_task(rng: random.Random, level: int) -> tuple[str, str, dict[str, Any]]:
    n_steps = (level + 1) // 2
    allow_bags = level % 2 == 0
    name, pronoun = rng.choice(NAMES)
    items, item = rng.choice(ITEMS)
    high = 5 if level <= 2 else 9
    current = start = rng.randint(1, high)
    steps = []
    for _ in range(n_steps):
        step = _word_step(rng, current, allow_bags, high)
        current += word_change(step)
        steps.append(step)
    meta = {"name": name, "pronoun": pronoun, "items": items, "item": item,
            "start": start, "steps": steps}
    return word_question(meta), str(current), meta


# ----------------------------------------------------------------------------- records

def make_problem(task: str, index: int, rng: random.Random, level: int | None = None,
                 image_dir: Path | None = None, rel_prefix: str = "images", *,
                 colors: Sequence[str] = DEFAULT_COLORS,
                 grid: tuple[int, int] = DEFAULT_GRID) -> dict[str, Any]:
    """One problem record; an image task's PNG is saved to ``image_dir`` when given.

    The image path in the record is ``f"{rel_prefix}/{id}.png"`` (relative to the JSONL file).
    ``level`` None draws a level from ``rng``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    unknown = [c for c in colors if c not in COLORS]
    if unknown:
        raise ValueError(f"unknown colours {unknown}; choose from {tuple(COLORS)}")
    level = _level_or_draw(level, rng)
    record_id = _record_id(task, index)
    if task == "arith":
        question, answer, meta = _arith_task(rng, level)
    elif task == "word":
        question, answer, meta = _word_task(rng, level)
    elif task == "digit_sum":
        question, answer, meta = _digit_task(rng, level, grid)
    else:
        question, answer, meta = _image_task(task, rng, level, grid, colors)
    if task in IMAGE_TASKS:
        rel = f"{rel_prefix}/{record_id}.png" if rel_prefix else f"{record_id}.png"
        content: Any = [{"type": "image", "image": rel}, {"type": "text", "text": question}]
        if image_dir is not None:
            image_dir.mkdir(parents=True, exist_ok=True)
            render_scene(meta).save(image_dir / f"{record_id}.png", format="PNG")
    else:
        content = question
    return {"id": record_id, "task": task, "messages": [{"role": "user", "content": content}],
            "answer": answer, "difficulty_level": level, "meta": meta}


def question_text(record: dict[str, Any]) -> str:
    """The text of a record's (last) user turn."""
    content = [m for m in record["messages"] if m["role"] == "user"][-1]["content"]
    if isinstance(content, str):
        return content
    return " ".join(part["text"] for part in content if part.get("type") == "text")


def short_response(record: dict[str, Any]) -> str:
    """The direct answer joint SFT trains on, e.g. ``There are 2 red shapes. The answer is \\boxed{2}.``"""
    task, meta, answer = record["task"], record["meta"], record["answer"]
    if task == "describe":
        return answer
    n = int(answer)
    if task == "count_color":
        color = meta["target"]["colors"][0]
        return f"{count_phrase(n, f'{color} shape', f'{color} shapes')}. {_boxed(answer)}"
    if task == "count_shape":
        shape = meta["target"]["shape"]
        return f"{count_phrase(n, shape, shape + 's')}. {_boxed(answer)}"
    if task == "sum_colors":
        a, b = meta["target"]["colors"]
        noun = f"{a} and {b} shape"
        return f"{count_phrase(n, noun, noun + 's')} in total. {_boxed(answer)}"
    if task == "digit_sum":
        return f"The sum of the digits is {answer}. {_boxed(answer)}"
    if task == "arith":
        return f"{meta['expression']} = {answer}. {_boxed(answer)}"
    if task == "word":
        noun = meta["item"] if n == 1 else meta["items"]
        return f"{meta['name']} has {answer} {noun} now. {_boxed(answer)}"
    raise ValueError(f"unknown task {task!r}")


def brief_response(record: dict[str, Any]) -> str:
    """Brief work, as an instruct model answers: the few numbers the answer needs, then the answer,
    without reading the image out object by object or writing each step on a line of its own::

        count_color  Red: row 1 has 1, row 2 has 0, row 3 has 2. There are 3 red shapes. ...
        digit_sum    The digits are 3, 2 and 3. The sum of the digits is 8. ...
        arith        3 + 4 * 2 - 1 = 3 + 8 - 1 = 10. ...
        word         6 - 4 = 2, 2 + 2 * 2 = 6. Dan has 6 books now. ...
    """
    task, meta, answer = record["task"], record["meta"], record["answer"]
    if task == "describe":
        return answer
    short = short_response(record)
    if task in ("count_color", "sum_colors"):
        colors = meta["target"]["colors"]
        head = " and ".join(colors)
        per_row = [sum(o["color"] in colors for o in meta["objects"] if o["row"] == r) for r in range(meta["grid"][0])]
        rows = ", ".join(f"row {r + 1} has {n}" for r, n in enumerate(per_row))
        return f"{head[0].upper() + head[1:]}: {rows}. {short}"
    if task == "digit_sum":
        values = [str(d["digit"]) for d in meta["digits"]]
        return f"The digits are {', '.join(values[:-1])} and {values[-1]}. {short}"
    if task == "arith":
        values, ops = list(meta["operands"]), list(meta["operators"])
        chain = [expression_text(values, ops)]
        for a, op, b, c in reduce_steps(values, ops):
            i = ops.index("*") if "*" in ops else 0
            values[i: i + 2] = [c]
            del ops[i]
            chain.append(expression_text(values, ops))
        return " = ".join(chain) + f". {_boxed(answer)}"
    if task == "word":
        current, parts = meta["start"], []
        for step in meta["steps"]:
            change = word_change(step)
            if step["kind"] == "bags":
                parts.append(f"{current} + {step['k']} * {step['m']} = {current + change}")
            else:
                parts.append(f"{current} {'+' if change >= 0 else '-'} {abs(change)} = {current + change}")
            current += change
        return ", ".join(parts) + ". " + short
    raise ValueError(f"unknown task {task!r}")


ANSWER_STYLES: tuple[str, ...] = ("direct", "brief", "worked", "mixed")
"""``direct``: :func:`short_response`. ``brief``: :func:`brief_response`. ``worked``: the program teacher's clean working without
plan and checks (rows read out, then counted or added; see ``worked_response``). ``describe``
conversations are read out row by row in every style. ``mixed``: half of the problems (by a hash
of the id) ask to work it out (:data:`WORK_IT_OUT` after the question) and get the worked answer,
the other half get the direct one: an instruct model that can work a problem out when asked, and
answers directly when not."""

WORK_IT_OUT = " Work it out step by step."


# A row's list ends at its first full stop (counting traces go on after it on the same line).
_ROW_LINE = re.compile(r"^Row (\d+): ([^.\n]*)\.", re.MULTILINE)
_ROW_AGAIN = re.compile(r"Let me (?:list|read) row (\d+) again: ([^.\n]*)\.", re.MULTILINE)


def scene_rows(meta: dict[str, Any]) -> list[list[str]] | None:
    """What a right reading lists in each row (``["red circle", ...]`` or ``["7", ...]``), top to
    bottom; None for a record without a scene (text tasks)."""
    items = meta.get("objects", meta.get("digits"))
    if items is None or "grid" not in meta:
        return None
    rows: list[list[str]] = [[] for _ in range(meta["grid"][0])]
    for item in items:  # already in reading order
        rows[item["row"]].append(str(item["digit"]) if "digit" in item else f"{item['color']} {item['shape']}")
    return rows


def read_rows(text: str, n_rows: int) -> list[list[str]] | None:
    """The rows a response reads out (``Row 2: red circle, blue square.`` lines; a repaired row,
    ``Let me list row 2 again: ...``, replaces its first reading); None unless every row 1..n_rows
    is read out."""
    found: dict[int, list[str]] = {}
    events = sorted([(m.start(), m) for m in _ROW_LINE.finditer(text)]
                    + [(m.start(), m) for m in _ROW_AGAIN.finditer(text)], key=lambda e: e[0])
    for _, m in events:
        row, listed = int(m.group(1)), m.group(2).strip()
        if 1 <= row <= n_rows and (row not in found or m.re is _ROW_AGAIN):
            found[row] = [] if listed == "nothing" else [x.strip() for x in listed.split(",")]
    return [found[r] for r in range(1, n_rows + 1)] if len(found) == n_rows else None


def reading_scores(record: dict[str, Any], text: str) -> tuple[bool, bool] | None:
    """(every row read exactly right, every row's colours right) for a response to an image
    record; digits count as colours. None for records without a scene. A response that does not
    read out every row scores (False, False)."""
    truth = scene_rows(record.get("meta") or {})
    if truth is None:
        return None
    got = read_rows(text, len(truth))
    if got is None:
        return False, False

    def colours(rows: list[list[str]]) -> list[list[str]]:
        return [[item.split(" ")[0] for item in row] for row in rows]

    return got == truth, colours(got) == colours(truth)


def _ask_to_work(record: dict[str, Any]) -> dict[str, Any]:
    """The record with :data:`WORK_IT_OUT` appended to its question."""
    content = record["messages"][-1]["content"]
    if isinstance(content, str):
        content = content + WORK_IT_OUT
    else:
        content = [dict(part, text=part["text"] + WORK_IT_OUT) if part.get("type") == "text" else part
                   for part in content]
    return dict(record, messages=record["messages"][:-1] + [dict(record["messages"][-1], content=content)])


def _with_response(record: dict[str, Any], answers: str = "direct") -> dict[str, Any]:
    # describe is always read out row by row: the row anchors are what made the colours learnable
    # (a plain object list was learnt in 1 run of 5; recipes/demo/grounding.yaml)
    if answers == "mixed" and record["task"] != "describe":
        if hashlib.sha256(record["id"].encode()).digest()[0] & 1:
            record = _ask_to_work(record)
            answers = "worked"
        else:
            answers = "direct"
    if answers == "worked" or record["task"] == "describe":
        from thinkvl.demo.teacher import worked_response  # distill depends on data

        text = worked_response(record)
    elif answers == "brief":
        text = brief_response(record)
    else:
        text = short_response(record)
    out = dict(record)
    out["messages"] = record["messages"] + [{"role": "assistant", "content": text}]
    return out


def split_counts(total: int, tasks: Sequence[str]) -> dict[str, int]:
    """Share ``total`` records evenly over ``tasks`` (the first tasks take the remainder)."""
    if not tasks:
        return {}
    base, extra = divmod(total, len(tasks))
    return {t: base + (i < extra) for i, t in enumerate(tasks)}


def ask_other_colour(record: dict[str, Any], index: int, color: str) -> dict[str, Any]:
    """The ``count_color`` problem ``record`` asked about ``color`` instead: same scene (and image
    file), its own id ``count_color-{index:06d}``, the question and answer for ``color``."""
    if record["task"] != "count_color":
        raise ValueError("only count_color problems can be asked about another colour, "
                         f"got {record['task']!r}")
    meta = copy.deepcopy(record["meta"])
    meta["target"] = {"colors": [color]}
    question = QUESTIONS["count_color"].format(color=color)
    image = next(part["image"] for part in record["messages"][0]["content"] if part.get("type") == "image")
    content = [{"type": "image", "image": image}, {"type": "text", "text": question}]
    answer = sum(o["color"] == color for o in meta["objects"])
    return dict(record, id=_record_id("count_color", index), answer=str(answer), meta=meta,
                messages=[{"role": "user", "content": content}])


def _check_colours_per_scene(colours_per_scene: int, colors: Sequence[str]) -> None:
    if not 1 <= colours_per_scene <= len(colors):
        raise ValueError(f"colours_per_scene must be between 1 and the number of colours ({len(colors)}), "
                         f"got {colours_per_scene}")


def write_split(out_path: Path, tasks: dict[str, int], seed: int, with_response: bool,
                levels: tuple[int, int] | None = None, *, start_index: int = 0,
                colors: Sequence[str] = DEFAULT_COLORS,
                grid: tuple[int, int] = DEFAULT_GRID, answers: str = "direct",
                colours_per_scene: int = 1) -> dict[str, int]:
    """Write ``tasks`` (task -> count) as JSONL, images in ``images/`` beside it; return counts.

    Records are shuffled across tasks; record ``i`` gets id ``{task}-{start_index + i:06d}`` and
    its own generator seeded from (seed, index). ``levels`` = (low, high) bounds the uniformly
    drawn difficulty levels (default: all levels). ``with_response`` adds the short answer as an
    assistant turn (joint-SFT conversations), in the style ``answers`` (:data:`ANSWER_STYLES`).
    ``colours_per_scene`` > 1: ``count_color`` scenes come in groups that ask the same scene about
    that many colours of its palette (the drawn one first, then the others in palette order); a
    group's records share one image and differ only in the colour asked, so nothing but the
    question's colour tells their answers apart.
    """
    if answers not in ANSWER_STYLES:
        raise ValueError(f"answers must be one of {ANSWER_STYLES}, got {answers!r}")
    _check_colours_per_scene(colours_per_scene, colors)
    low, high = levels if levels is not None else (1, MAX_LEVEL)
    if not 1 <= low <= high <= MAX_LEVEL:
        raise ValueError(f"levels must satisfy 1 <= low <= high <= {MAX_LEVEL}, got {levels}")
    rng = random.Random(_derive_seed(seed, "split"))
    order = [task for task, count in tasks.items() for _ in range(count)]
    rng.shuffle(order)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    image_dir = out_path.parent / "images"
    counts = {task: 0 for task in tasks}
    asked: list[str] = []  # the colours the current count_color scene is still to be asked about
    scene: dict[str, Any] | None = None
    with out_path.open("w", encoding="utf-8", newline="\n") as f:
        for i, task in enumerate(order):
            index = start_index + i
            level = rng.randint(low, high)
            if task == "count_color" and asked and scene is not None:
                record = ask_other_colour(scene, index, asked.pop(0))
            else:
                record = make_problem(task, index, random.Random(_derive_seed(seed, "record", index)),
                                      level, image_dir, "images", colors=colors, grid=grid)
                if task == "count_color" and colours_per_scene > 1:
                    scene = record
                    drawn = record["meta"]["target"]["colors"][0]
                    asked = [c for c in record["meta"]["palette"] if c != drawn][:colours_per_scene - 1]
            if with_response:
                record = _with_response(record, answers)
            f.write(json.dumps(record) + "\n")
            counts[task] += 1
    return counts


def synth(out_dir: Path, seed: int = 0, n_sft: int = 2000, n_rl: int = 600, n_eval: int = 300,
          tasks: Sequence[str] | None = None, *, levels: tuple[int, int] | None = None,
          colors: Sequence[str] = DEFAULT_COLORS,
          grid: tuple[int, int] = DEFAULT_GRID, n_grounding: int = 0,
          answers: str = "direct", n_worked: int = 0, colours_per_scene: int = 1) -> dict[str, Path]:
    """Write ``sft.jsonl``, ``rl.jsonl`` and ``eval.jsonl`` (+ ``images/``) into ``out_dir``.

    Counts are totals per split, shared evenly over the tasks. ``sft`` holds conversations of
    all tasks (describe included) with short answers; ``rl`` and ``eval`` hold problems of the
    verifiable tasks only. With ``n_grounding`` > 0, ``grounding.jsonl`` holds that many
    ``describe`` conversations (list the shapes in reading order), for a perception stage before
    joint SFT. ``answers`` picks the style of the ``sft`` and ``grounding`` answers
    (:data:`ANSWER_STYLES`): ``direct`` states the result, ``worked`` reads the image out row by
    row (or writes out the steps) before it. With ``n_worked`` > 0, ``worked.jsonl`` holds that
    many conversations of the verifiable tasks answered worked (whatever ``answers`` is): the
    demo's stand-in for the worked solutions a real base model saw in pretraining; its
    ``count_color`` scenes are asked about ``colours_per_scene`` colours each (:func:`write_split`).
    Each split draws from its own seed stream and ids never repeat across splits, so ``eval`` is
    held out.
    """
    tasks = tuple(tasks) if tasks is not None else TASKS
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {TASKS}")
    verifiable = [t for t in tasks if t in VERIFIABLE_TASKS]
    out_dir = Path(out_dir)
    if n_grounding < 0:
        raise ValueError(f"n_grounding must be >= 0, got {n_grounding}")
    if n_worked < 0:
        raise ValueError(f"n_worked must be >= 0, got {n_worked}")
    _check_colours_per_scene(colours_per_scene, colors)  # before any split: only the worked one uses it
    plan = [("sft", split_counts(n_sft, tasks), True, 0),
            ("rl", split_counts(n_rl, verifiable), False, n_sft),
            ("eval", split_counts(n_eval, verifiable), False, n_sft + n_rl)]
    if n_grounding:
        plan.append(("grounding", {"describe": n_grounding}, True, n_sft + n_rl + n_eval))
    if n_worked:
        plan.append(("worked", split_counts(n_worked, verifiable), True,
                     n_sft + n_rl + n_eval + n_grounding))
    paths: dict[str, Path] = {}
    for name, counts, with_response, start in plan:
        path = out_dir / f"{name}.jsonl"
        write_split(path, counts, _derive_seed(seed, name), with_response, levels,
                    start_index=start, colors=colors, grid=grid,
                    answers="worked" if name == "worked" else answers,
                    colours_per_scene=colours_per_scene if name == "worked" else 1)
        paths[name] = path
    return paths


def vocabulary_corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """``n`` sample texts (questions, short answers, teacher traces of every task) for a tokenizer."""
    from thinkvl.demo.teacher import glance_trace, trace  # the teacher builds on these tasks

    rng = random.Random(_derive_seed(seed, "vocabulary"))
    texts: list[str] = []
    index = 0
    while len(texts) < n:
        task = TASKS[index % len(TASKS)]
        colors = tuple(COLORS) if index % 5 == 4 else DEFAULT_COLORS
        record = make_problem(task, index, rng, colors=colors)
        texts += [question_text(record), short_response(record),
                  trace(record, rng, mistake=rng.random() < 0.5, wrong=rng.random() < 0.1,
                        explore=rng.random() < 0.5)]
        if task != "describe" and index % 4 == 0:  # the shortcut's words, a quarter as often
            texts.append(glance_trace(record, rng, right=True))
        index += 1
    return texts[:n]
