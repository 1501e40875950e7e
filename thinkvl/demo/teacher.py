"""A program that writes long chain-of-thought traces for the synthetic tasks.

It stands in for the large teacher model of the long-CoT stage in the CPU demo. Its traces
show the recipe's four behaviours with fixed, short templates a tiny model can learn:

- planning: ``Plan: I check the count of the red ones against the shapes listed, then answer.``
- evaluation: ``Check: 2 counted + 2 others = 4. That matches.`` / ``Check: 11 - 8 = 3.`` at the
  end (``check_rate`` of the traces; with ``check_form="redo"`` the result worked out again so the
  line ends on the answer: ``Check: 4 shapes - 2 others = 2. That matches.`` /
  ``Check: 3 + 8 = 11.``), and the failed check that exposes a slip
  (``Check: 17 - 6 = 11, not 3.``) before its repair
- reflection (a mistake caught and repaired): ``Wait, I skipped the red square in row 4.
  Let me list row 4 again: ...`` / ``Wait, the blue circle is not red. Let me count row 2 again: ...``
- exploration: ``Another way: count by shape. Circles: 1. ... Same result.``
- re-reading (``reread_rate``): ``Let me read it again: blue square; nothing; red triangle.
  Same reading.``,
  the input read a second time before the working goes on. It changes no number the answer is built
  from, so it is the long-but-harmless behaviour the length penalty is for: without the penalty RL
  has no reason to drop it, with it the shorter traces of the same accuracy win.

Image traces enumerate the scene row by row before they count or add, because
enumerate-then-count is what a tiny model can learn; counting traces count each row on the line
that lists it (see ``_counted_rows``). Every trace starts the way joint SFT's worked answers start
(the reading, the restated expression, the start of a word problem) and plans second: the tiny
model copies from the image or the question only at the distance joint SFT taught it. With the
plan line first, long-CoT SFT unlearnt the reading (colours read right in 31 of 120 held-out
scenes, against 105 with the plan after the reading) and the copying of text problems (from a
joint-SFT model at 47% arithmetic and 35% word problems to 3% and 0%: ``What is 2 + 4 * 1 * 2?``
restated as ``Expression: 2 + 5 * 4.``). Every trace has the form
``<think>\\n...\\n</think>\\nThe answer is \\boxed{X}.`` (``describe``: the object list).

A trace is written from a *perceived* problem: normally the true one; for an uncaught
mistake (``wrong=True``) a misread one (a colour, shape, digit or number read wrongly, or an
object missed), so every later step, check included, is consistent and the final answer is
wrong. Rejection sampling must filter those out.

The final check of the result is optional (``check_rate``) because it costs a tiny model its
answers: measured from the demo's joint-SFT model (53.9%), long-CoT SFT on these traces with a
final check reached 34.1% and without it 36.9% and 39.9% (two draws; same problems, about 1,060
traces each, greedy, 960 held-out problems); with the check, 72 of 240 final answers differed from
the number the trace itself concluded (the model copied a number of the check line instead),
without it 11-16.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from thinkvl.demo.tasks import (
    SHAPES,
    VERIFIABLE_TASKS,
    count_phrase,
    expression_text,
    reduce_steps,
    short_response,
    word_change,
    word_question,
)

__all__ = ["GLANCE", "REREAD", "ProgramTeacher", "trace", "trace_answer", "worked_response"]

Lines = list[str]


# ----------------------------------------------------------------------------- teacher

def _by_level(record: dict[str, Any], at_level_1: float, per_level: float, *, floor: float) -> float:
    """A probability that falls linearly with the record's difficulty level, never under ``floor``."""
    level = int(record.get("difficulty_level") or 1)
    return max(floor, at_level_1 - per_level * (level - 1))


class ProgramTeacher:
    """Samples reasoning traces for synthetic problem records.

    Args:
        seed: base seed; a record's samples depend only on (seed, record id).
        glance_rate, glance_rate_decay: probability that a trace is a glance (the answer with no
            working) at difficulty level 1, and how much less per level above it.
        glance_accuracy, glance_decay: how often a glance is right at level 1, and how much less
            per level above it.
        mistake_rate: probability that a trace makes a mistake it catches and repairs.
        wrong_rate: probability that a trace makes a mistake it does not catch (wrong answer).
        explore_rate: probability that a trace re-derives its answer another way.
        check_rate: probability that a trace ends by checking its result (an inverse computation
            or a recount); failed checks that expose a slip come with ``mistake_rate``.
        check_form: how a final check is written. ``"inverse"`` (default): undo the steps back to
            the input (``Check: 12 - 1 = 11. 11 - 8 = 3.``), so its last number is not the answer;
            ``"redo"``: work the result out again so that the check's last number is the answer
            (``Check: 2 * 4 = 8. 3 + 8 = 11. 11 + 1 = 12.``, ``Check: 4 shapes - 3 others = 1.
            That matches.``). A tiny student boxes the number it wrote last: after an inverse check
            it often boxed a number of the check instead of its conclusion (module docstring).
        reread_rate: probability that a worked trace reads its input a second time (:data:`REREAD`).
        glance_tasks: the tasks the teacher may glance at (default: every task with a checkable
            answer); on the others it always works the problem out, as a careful teacher does where
            shortcuts go wrong (a trace of a task left out draws no glance, so it is the same trace
            as with ``glance_rate`` 0).
        name_hits: counting traces name the matches of each row before they count them
            (``Red ones: red triangle. 1, so far 2.``); false (default): the row's count alone,
            the form of the worked answers (:func:`worked_response`).
    """

    def __init__(self, seed: int = 0, mistake_rate: float = 0.2, wrong_rate: float = 0.0,
                 explore_rate: float = 0.3, check_rate: float = 1.0, plan_rate: float = 1.0,
                 glance_rate: float = 0.0, glance_accuracy: float = 1.0, glance_decay: float = 0.0,
                 glance_rate_decay: float = 0.0, reread_rate: float = 0.0,
                 glance_tasks: Sequence[str] | None = None, name_hits: bool = False,
                 check_form: str = "inverse") -> None:
        for name, rate in (("mistake_rate", mistake_rate), ("wrong_rate", wrong_rate),
                           ("explore_rate", explore_rate), ("check_rate", check_rate),
                           ("plan_rate", plan_rate), ("glance_rate", glance_rate),
                           ("glance_accuracy", glance_accuracy), ("glance_decay", glance_decay),
                           ("glance_rate_decay", glance_rate_decay), ("reread_rate", reread_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {rate}")
        self.seed = seed
        self.mistake_rate = mistake_rate
        self.wrong_rate = wrong_rate
        self.explore_rate = explore_rate
        self.check_rate = check_rate
        self.plan_rate = plan_rate
        self.glance_rate = glance_rate
        self.glance_accuracy = glance_accuracy
        self.glance_decay = glance_decay
        self.glance_rate_decay = glance_rate_decay
        self.reread_rate = reread_rate
        if not isinstance(name_hits, bool):
            raise ValueError(f"name_hits must be true or false, got {name_hits!r}")
        self.name_hits = name_hits
        if check_form not in CHECK_FORMS:
            raise ValueError(f"check_form must be one of {list(CHECK_FORMS)}, got {check_form!r}")
        self.check_form = check_form
        if glance_tasks is None:
            glance_tasks = VERIFIABLE_TASKS
        if isinstance(glance_tasks, str) or not all(isinstance(t, str) for t in glance_tasks):
            raise ValueError(f"glance_tasks must be a list of task names, got {glance_tasks!r}")
        unknown = [t for t in glance_tasks if t not in VERIFIABLE_TASKS]
        if unknown:
            raise ValueError(f"glance_tasks: unknown or unglanceable task(s) {unknown}; "
                             f"choose from {list(VERIFIABLE_TASKS)}")
        self.glance_tasks = frozenset(glance_tasks)

    def glance_prob(self, record: dict[str, Any]) -> float:
        """Probability that a trace for ``record`` is a glance: ``glance_rate`` at level 1,
        ``glance_rate_decay`` less per level above it (floor 0): a teacher that skips the working
        on easy problems and works the hard ones out."""
        return _by_level(record, self.glance_rate, self.glance_rate_decay, floor=0.0)

    def glance_right(self, record: dict[str, Any]) -> float:
        """Probability that the teacher's glance at ``record`` is right: ``glance_accuracy`` at level
        1, ``glance_decay`` less per level above it (floor 0.05): shortcuts work on easy problems."""
        return _by_level(record, self.glance_accuracy, self.glance_decay, floor=0.05)

    def sample(self, record: dict[str, Any], n: int) -> list[str]:
        """``n`` independent traces for one problem record (simple problems may repeat one)."""
        key = record.get("id") or json.dumps(record["meta"], sort_keys=True)
        rng = random.Random(f"program-teacher/{self.seed}/{key}")
        out = []
        for _ in range(n):
            mistake = rng.random() < self.mistake_rate
            wrong = rng.random() < self.wrong_rate
            explore = rng.random() < self.explore_rate
            check = rng.random() < self.check_rate
            # draw only for behaviours that are on, so traces with them off stay as they were
            plan = self.plan_rate == 1.0 or rng.random() < self.plan_rate
            reread = bool(self.reread_rate) and rng.random() < self.reread_rate
            if (self.glance_rate and record["task"] in self.glance_tasks
                    and rng.random() < self.glance_prob(record)):
                out.append(glance_trace(record, rng, right=rng.random() < self.glance_right(record)))
                continue
            out.append(trace(record, rng, mistake=mistake, wrong=wrong, explore=explore, check=check,
                             plan=plan, reread=reread, name_hits=self.name_hits,
                             check_form=self.check_form))
        return out


GLANCE = "Quick answer:"
"""How a shortcut trace starts (the whole thought is this one line)."""

CHECK_FORMS = ("inverse", "redo")
"""How a final check may be written (:class:`ProgramTeacher`'s ``check_form``)."""

REREAD = "Let me read it again:"
"""How a re-reading line starts (the input once more, no new number)."""
SAME_READING = "Same reading."


def glance_trace(record: dict[str, Any], rng: random.Random, *, right: bool) -> str:
    """A shortcut: the answer stated at a glance, with no working, e.g.::

        <think>
        Quick answer: There are 2 red shapes.
        </think>
        The answer is \\boxed{2}.

    The sentence is the instruct model's own direct answer (``short_response``), so the shortcut is
    the skill joint SFT taught. ``right=False``: a nearby wrong value (rejection sampling drops it).
    A big teacher's glance is often right; the tiny student's is right only as often as its direct
    answers are, so the shortcut is the unreliable behaviour RL can learn to avoid on hard problems.
    """
    answer = record["answer"] if right else str(_slip(rng, int(record["answer"])))
    sentence = short_response(dict(record, answer=answer)).split(" The answer is ")[0]
    return f"<think>\n{GLANCE} {sentence}\n</think>\nThe answer is \\boxed{{{answer}}}."


def trace(record: dict[str, Any], rng: random.Random, *, mistake: bool = False,
          wrong: bool = False, explore: bool = False, check: bool = True, plan: bool = True,
          reread: bool = False, name_hits: bool = False, check_form: str = "inverse") -> str:
    """One trace for ``record`` (uses ``record["task"]`` and ``record["meta"]``).

    ``mistake``: a caught and repaired mistake (answer stays right). ``wrong``: an uncaught
    misreading (answer is wrong). ``explore``: an alternative derivation at the end. ``check``:
    the result checked after the conclusion. ``plan``: a ``Plan:`` line after the reading.
    ``reread``: the input read a second time (:data:`REREAD`) before the conclusion / the working.
    ``name_hits``: a counting trace names each row's matches before it counts them (``_row_count``).
    ``check_form``: ``"inverse"`` or ``"redo"`` (:class:`ProgramTeacher`).
    """
    if check_form not in CHECK_FORMS:
        raise ValueError(f"check_form must be one of {list(CHECK_FORMS)}, got {check_form!r}")
    task = record["task"]
    if task not in _BUILDERS:
        raise ValueError(f"the program teacher has no template for task {task!r}")
    build, misread = _BUILDERS[task]
    meta = record["meta"]
    if wrong:
        meta = _misread_until_wrong(misread, meta, rng, record["answer"], build, task)
    lines, answer = build(task, meta, _Style(rng, mistake, explore, check, reread, name_hits,
                                             check_form == "redo"))
    if not plan:
        lines = [line for line in lines if not line.startswith("Plan:")]
    final = answer if task == "describe" else f"The answer is \\boxed{{{answer}}}."
    return "<think>\n" + "\n".join(lines) + "\n</think>\n" + final


def worked_response(record: dict[str, Any]) -> str:
    """The clean trace's working without its plan and checks and without ``<think>`` tags.

    A short answer that still enumerates before it counts or adds, e.g. for ``count_color``::

        Row 1: blue square. Red: 0, so far 0.
        Row 2: nothing. Red: 0, so far 0.
        Row 3: blue square, red triangle. Red: 1, so far 1.
        Row 4: nothing. Red: 0, so far 1.
        That is 3 shapes.
        So there is 1 red shape.
        The answer is \\boxed{1}.

    Joint SFT on these teaches the row-by-row reading the long-CoT traces build on. A row's count is
    one number (the teacher's ``name_hits`` traces name the row's matches first).
    """
    body, final = trace(record, random.Random(0), check=False).split("\n</think>\n")
    lines = [line for line in body.removeprefix("<think>\n").split("\n") if not line.startswith("Plan:")]
    return "\n".join(lines + [final])


def trace_answer(task: str, meta: dict[str, Any]) -> str:
    """The answer a clean trace reaches for ``meta`` (used to verify misreadings)."""
    build, _ = _BUILDERS[task]
    return build(task, meta, _Style(random.Random(0), False, False))[1]


@dataclass
class _Style:
    rng: random.Random
    mistake: bool
    explore: bool
    check: bool = True
    reread: bool = False
    name_hits: bool = False
    redo_check: bool = False  # check_form "redo": the check's last number is the answer


def _misread_until_wrong(misread: Callable[[dict, random.Random], dict], meta: dict[str, Any],
                         rng: random.Random, answer: str, build: Callable, task: str) -> dict:
    """A misread copy of ``meta`` whose clean answer differs from ``answer``."""
    for _ in range(50):
        seen = misread(copy.deepcopy(meta), rng)
        if build(task, seen, _Style(random.Random(0), False, False))[1] != answer:
            return seen
    raise RuntimeError(f"could not misread a {task} problem into a wrong answer")


# ----------------------------------------------------------------------------- text helpers

def _sum_text(values: Sequence[int]) -> str:
    """``0`` / ``3`` / ``3 + 8 = 11``."""
    if not values:
        return "0"
    if len(values) == 1:
        return str(values[0])
    return " + ".join(map(str, values)) + f" = {sum(values)}"


def _sentence_case(text: str) -> str:
    return text[0].lower() + text[1:]


def _slip(rng: random.Random, value: int) -> int:
    """A nearby wrong value, never negative when ``value`` is not (arithmetic steps can go below 0:
    ``2 - 5 = -3``, and then any neighbour will do)."""
    return rng.choice([v for v in (value - 2, value - 1, value + 1, value + 2) if v >= 0 or value < 0])


def _inverse(a: int, op: str, b: int, c: int) -> str:
    """The check of a step ``a op b = c``."""
    if op == "+":
        return f"{c} - {b} = {a}."
    if op == "-":
        return f"{c} + {b} = {a}."
    return f"{b} * {a} = {c}."


def _failed_check(a: int, op: str, b: int, wrong: int) -> str:
    """A check that exposes ``a op b = wrong``."""
    if op == "+":
        return f"Check: {wrong} - {b} = {wrong - b}, not {a}."
    if op == "-":
        return f"Check: {wrong} + {b} = {wrong + b}, not {a}."
    return f"Check: {b} * {a} = {a * b}, not {wrong}."


def _repair(a: int, op: str, b: int, right: int, wrong: int) -> Lines:
    return [_failed_check(a, op, b, wrong),
            f"Wait, {a} {op} {b} = {right}, not {wrong}. Let me redo this step."]


# ----------------------------------------------------------------------------- shape scenes

def _name(obj: dict[str, Any]) -> str:
    return f"{obj['color']} {obj['shape']}"


def _row_lines(items: Sequence[dict[str, Any]], rows: int, label: Callable[[dict], str],
               skip: dict[str, Any] | None, noun: str) -> Lines:
    """``Row 1: red circle, blue square.`` for every row; ``skip`` is left out, then caught."""
    lines: Lines = []
    for r in range(rows):
        in_row = [o for o in items if o["row"] == r]
        shown = [o for o in in_row if o is not skip]
        lines.append(f"Row {r + 1}: " + (", ".join(map(label, shown)) if shown else "nothing") + ".")
        if skip is not None and skip in in_row:
            lines.append(f"Wait, I skipped the {label(skip)} in row {r + 1}. "
                         f"Let me {noun} row {r + 1} again: " + ", ".join(map(label, in_row)) + ".")
    return lines


@dataclass
class _Target:
    """What a counting question counts."""

    matches: Callable[[dict], bool]
    goal: str          # plan: "the red ones"
    singular: str      # "red shape"
    plural: str        # "red shapes"
    negation: str      # "is not red"
    head: str          # row count: "Red", "Red and green", "Circles"
    attribute: str     # the attribute a misreading changes: "color" or "shape"
    values: list[str]  # the counted values of that attribute
    options: list[str]  # all values of that attribute

    @property
    def hits_head(self) -> str:
        """What a row's named matches are headed with: ``Red ones`` / ``Circles``."""
        return self.head if self.attribute == "shape" else f"{self.head} ones"

    def affirm(self, obj: dict[str, Any]) -> str:
        """Why ``obj`` counts: ``is red`` / ``is a circle``."""
        return f"is a {obj['shape']}" if self.attribute == "shape" else f"is {obj['color']}"


def _target(task: str, meta: dict[str, Any]) -> _Target:
    palette = list(meta["palette"])
    if task == "count_shape":
        shape = meta["target"]["shape"]
        return _Target(lambda o: o["shape"] == shape, f"the {shape}s",
                       shape, f"{shape}s", f"is not a {shape}", f"{shape.capitalize()}s", "shape", [shape],
                       list(SHAPES))
    colors = list(meta["target"]["colors"])
    text = " and ".join(colors)
    return _Target(lambda o: o["color"] in colors, f"the {text} ones",
                   f"{text} shape", f"{text} shapes", "is not " + " or ".join(colors),
                   text[0].upper() + text[1:], "color", colors, palette)


def _row_count(in_row: Sequence[dict[str, Any]], target: _Target, before: int,
               slip: dict[str, Any] | None = None, *, name_hits: bool = False) -> tuple[str, int]:
    """The count of one listed row and the new running count: ``Red: 1, so far 3.``, or with
    ``name_hits`` the row's matches named first, ``Red ones: red triangle. 1, so far 3.``
    (``Red ones: none. 0, so far 2.``). ``slip``: an object of the row miscounted, a match left
    out or a non-match counted (and named) with the matches."""
    named = [o for o in in_row if target.matches(o) != (o is slip)]
    counted = len(named)
    tail = f"{counted}, so far {before + counted}."
    if name_hits:
        names = ", ".join(map(_name, named)) if named else "none"
        return f"{target.hits_head}: {names}. {tail}", before + counted
    return f"{target.head}: {tail}", before + counted


def _counted_rows(objs: Sequence[dict[str, Any]], rows: int, target: _Target,
                  skip: dict[str, Any] | None, style: _Style) -> Lines:
    """Every row listed and counted on its own line (``Row 3: blue square, red triangle. Red: 1,
    so far 2.``).

    Each count looks only at the row just listed and the running count just before it. A separate
    tally after the reading (``Counting red: red circle 1, blue square no, ...``) asked the tiny
    model to copy every listed object again, and it copied them wrongly; naming each object again
    with yes/no after its row (``Red: blue square no, red triangle yes, so 1, so far 2.``) was worse
    than counting the row in one number (held-out count colour 33% vs 65%, same 12,000
    conversations); the running sums were right in 479 of 480 rows. Naming only the row's matches
    before its count (``style.name_hits``: ``Red ones: red triangle. 1, so far 2.``) in the long-CoT
    traces alone, the worked answers unchanged, was worse end to end at two seeds (count colour
    after long-CoT SFT 27% and 52% greedy, RL models 47% and 54% overall against the committed
    recipe's 63%; docs/demo.md, session 25).
    ``skip``: an object left out while listing, caught on the next line (the row is listed again).
    ``style.mistake`` (without ``skip``): one row with objects miscounted, caught on the next line.
    """
    slip = style.rng.choice(objs) if style.mistake and skip is None and objs else None
    lines: Lines = []
    total = 0
    for r in range(rows):
        in_row = [o for o in objs if o["row"] == r]
        shown = [o for o in in_row if o is not skip]
        listing = ", ".join(map(_name, shown)) if shown else "nothing"
        if slip is not None and slip in in_row:
            counted, _ = _row_count(in_row, target, total, slip, name_hits=style.name_hits)
            why = (f"I missed that the {_name(slip)} {target.affirm(slip)}" if target.matches(slip)
                   else f"the {_name(slip)} {target.negation}")
            again, total = _row_count(in_row, target, total, name_hits=style.name_hits)
            lines += [f"Row {r + 1}: {listing}. {counted}",
                      f"Wait, {why}. Let me count row {r + 1} again: {again}"]
            continue
        counted, new_total = _row_count(shown, target, total, name_hits=style.name_hits)
        lines.append(f"Row {r + 1}: {listing}. {counted}")
        if skip is not None and skip in in_row:
            again, new_total = _row_count(in_row, target, total, name_hits=style.name_hits)
            lines.append(f"Wait, I skipped the {_name(skip)} in row {r + 1}. Let me list row {r + 1} "
                         f"again: " + ", ".join(map(_name, in_row)) + f". {again}")
        total = new_total
    return lines


def _count_check(counted: int, others: int, listed: int, *, redo: bool = False) -> str:
    """``Check: 1 counted + 3 others = 4. That matches.``; ``redo``: the count found again from
    the shapes listed, so the line's last number is the count: ``Check: 4 shapes - 3 others = 1.
    That matches.``"""
    if redo:  # others = listed - counted, so the line always matches
        shapes = "shape" if listed == 1 else "shapes"
        return f"Check: {listed} {shapes} - {others} others = {counted}. That matches."
    total = counted + others
    tail = "That matches." if total == listed else f"But I listed {listed}."
    return f"Check: {counted} counted + {others} others = {total}. {tail}"


def _explore_shapes(task: str, meta: dict[str, Any], objs: Sequence[dict], target: _Target) -> str:
    hits = [o for o in objs if target.matches(o)]
    if task == "count_color":
        head = "Another way: count by shape."
        parts = [(f"{s.capitalize()}s", sum(o["shape"] == s for o in hits)) for s in SHAPES]
    elif task == "count_shape":
        head = f"Another way: count the {target.plural} by color."
        parts = [(c.capitalize(), sum(o["color"] == c for o in hits)) for c in meta["palette"]]
    else:
        head = "Another way: count each color."
        parts = [(c.capitalize(), sum(o["color"] == c for o in hits)) for c in target.values]
    counts = " ".join(f"{name}: {n}." for name, n in parts)
    numbers = [n for _, n in parts]
    return f"{head} {counts} {' + '.join(map(str, numbers))} = {sum(numbers)}. Same result."


def _shape_trace(task: str, meta: dict[str, Any], style: _Style) -> tuple[Lines, str]:
    objs = meta["objects"]
    rows = meta["grid"][0]
    # A caught mistake is a skipped object while listing or a miscounted row (_counted_rows).
    list_mistake = style.mistake and bool(objs) and (task == "describe" or style.rng.random() < 0.5)
    skip = style.rng.choice(objs) if list_mistake else None
    listed = f"That is {len(objs)} {'shape' if len(objs) == 1 else 'shapes'}."
    # The reading comes first and the plan after it: the reading must start where joint SFT's
    # worked answers start it, right after the question (see the module docstring).
    if task == "describe":
        check = [f"Check: I looked at all {rows} rows."] if style.check else []
        return [*_row_lines(objs, rows, _name, skip, "list"), listed, *check], ", ".join(map(_name, objs))
    target = _target(task, meta)
    hits = [o for o in objs if target.matches(o)]
    counting = _counted_rows(objs, rows, target, skip, style)
    reading = "; ".join(", ".join(_name(o) for o in objs if o["row"] == r) or "nothing" for r in range(rows))
    lines = [*counting, listed, *([f"{REREAD} {reading}. {SAME_READING}"] if style.reread else []),
             f"Plan: I check the count of {target.goal} against the shapes listed, then answer."
             if style.check else f"Plan: I take the last count of {target.goal} as the answer.",
             f"So {_sentence_case(count_phrase(len(hits), target.singular, target.plural))}."]
    if style.check:
        lines.append(_count_check(len(hits), len(objs) - len(hits), len(objs), redo=style.redo_check))
    if style.explore:
        lines.append(_explore_shapes(task, meta, objs, target))
    return lines, str(len(hits))


def _misread_shapes(meta: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Misread one object's colour/shape (across the counted line) or miss one object."""
    objs = meta["objects"]
    if "target" not in meta:  # describe: any misreading changes the list
        obj = rng.choice(objs)
        obj["color"] = rng.choice([c for c in meta["palette"] if c != obj["color"]] or [obj["color"]])
        obj["shape"] = rng.choice([s for s in SHAPES if s != obj["shape"]])
        return meta
    task = "count_shape" if "shape" in meta["target"] else "count_color"
    target = _target(task, meta)
    hits = [o for o in objs if target.matches(o)]
    misses = [o for o in objs if not target.matches(o)]
    outside = [v for v in target.options if v not in target.values]
    choices = (["out"] if hits and outside else []) + (["in"] if misses else [])
    if hits and (len(objs) > 1 or not choices):
        choices.append("drop")
    kind = rng.choice(choices)
    if kind == "drop":
        objs.remove(rng.choice(hits))
    elif kind == "out":
        rng.choice(hits)[target.attribute] = rng.choice(outside)
    else:
        rng.choice(misses)[target.attribute] = rng.choice(target.values)
    return meta


# ----------------------------------------------------------------------------- digits

def _digit_label(item: dict[str, Any]) -> str:
    return str(item["digit"])


def _add_chain(values: Sequence[int], style: _Style, allow_mistake: bool) -> tuple[Lines, Lines]:
    """Lines adding ``values`` left to right, and the check of those steps: the inverse chain, or
    with ``style.redo_check`` the sum again from the last digit (its last number is the sum)."""
    lines: Lines = []
    steps: list[tuple[int, str, int, int]] = []
    slip_at = style.rng.randrange(len(values) - 1) if allow_mistake else -1
    total = values[0]
    for i, v in enumerate(values[1:]):
        right = total + v
        if i == slip_at:
            wrong = _slip(style.rng, right)
            lines += [f"{total} + {v} = {wrong}.", *_repair(total, "+", v, right, wrong)]
        lines.append(f"{total} + {v} = {right}.")
        steps.append((total, "+", v, right))
        total = right
    if style.redo_check:  # the exploration's chain from the last digit, as the check
        again, _ = _add_chain(list(reversed(values)), _Style(style.rng, False, False), False)
        return lines, ["Check: " + " ".join(again)]
    check = "Check: " + " ".join(_inverse(*s) for s in reversed(steps))
    return lines, [check]


def _digit_trace(task: str, meta: dict[str, Any], style: _Style) -> tuple[Lines, str]:
    digits = meta["digits"]
    values = [d["digit"] for d in digits]
    kind = style.rng.choice(["skip", "slip"]) if style.mistake else None
    skip = style.rng.choice(digits) if kind == "skip" else None
    lines = [*_row_lines(digits, meta["grid"][0], _digit_label, skip, "read"),
             "The digits are " + ", ".join(map(str, values[:-1])) + f" and {values[-1]}.",
             *([f"{REREAD} " + "; ".join(", ".join(str(d["digit"]) for d in digits if d["row"] == r)
                                        or "nothing" for r in range(meta["grid"][0])) + f". {SAME_READING}"]
               if style.reread else []),
             "Plan: I add them one at a time, then check by taking them away again."
             if style.check else "Plan: I add them one at a time."]
    adds, check = _add_chain(values, style, kind == "slip")
    lines += adds + (check if style.check else [])
    if style.explore:
        back = list(reversed(values))
        plain, _ = _add_chain(back, _Style(style.rng, False, False), False)
        lines.append("Another way: add from the last digit. " + " ".join(plain) + " Same result.")
    return lines, str(sum(values))


def _misread_digits(meta: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    item = rng.choice(meta["digits"])
    item["digit"] = rng.choice([d for d in (item["digit"] - 1, item["digit"] + 1) if 0 <= d <= 9])
    return meta


# ----------------------------------------------------------------------------- arithmetic

def _arith_trace(task: str, meta: dict[str, Any], style: _Style) -> tuple[Lines, str]:
    values, ops = list(meta["operands"]), list(meta["operators"])
    plan = ("Plan: first I do the multiplications, then I add and subtract from left to right."
            if "*" in ops else "Plan: there is no multiplication, so I add and subtract from left to right.")
    # The restated expression first, where joint SFT's worked answers have it (see the module docstring).
    lines = [f"Expression: {expression_text(values, ops)}.",
             *([f"{REREAD} {expression_text(values, ops)}. {SAME_READING}"] if style.reread else []), plan]
    steps = reduce_steps(values, ops)
    slip_at = style.rng.randrange(len(steps)) if style.mistake else -1
    for k, (a, op, b, c) in enumerate(steps):
        if k == slip_at:
            wrong = _slip(style.rng, c)
            lines += [f"{a} {op} {b} = {wrong}.", *_repair(a, op, b, c, wrong)]
        i = ops.index("*") if "*" in ops else 0
        values[i: i + 2] = [c]
        del ops[i]
        rest = f" Now it is {expression_text(values, ops)}." if ops else ""
        lines.append(f"{a} {op} {b} = {c}.{rest}")
    additive = [s for s in steps if s[1] != "*"]
    checked = list(reversed(additive)) if additive else [steps[-1]]
    if style.check and style.redo_check:
        lines.append("Check: " + " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in steps))
    elif style.check:
        lines.append("Check: " + " ".join(_inverse(*s) for s in checked))
    if style.explore:
        lines.append(_explore_arith(meta["operands"], meta["operators"]))
    return lines, str(steps[-1][3])


def _terms(operands: Sequence[int], operators: Sequence[str]) -> tuple[list[int], list[str]]:
    """The expression's products as signed terms: ``3 + 4 * 2 - 1`` -> [3, 8, 1], [+, -]."""
    terms, term_ops = [operands[0]], []
    for op, value in zip(operators, operands[1:]):
        if op == "*":
            terms[-1] *= value
        else:
            terms.append(value)
            term_ops.append(op)
    return terms, term_ops


def _explore_arith(operands: Sequence[int], operators: Sequence[str]) -> str:
    """Re-derive the value as (sum of plus terms) - (sum of minus terms)."""
    terms, term_ops = _terms(operands, operators)
    if not term_ops:  # a pure product: multiply from the right instead
        vals = list(operands)
        acc, parts = vals[-1], []
        for v in reversed(vals[:-1]):
            parts.append(f"{v} * {acc} = {v * acc}.")
            acc *= v
        return "Another way: multiply from the right. " + " ".join(parts) + " Same result."
    plus = [terms[0]] + [t for op, t in zip(term_ops, terms[1:]) if op == "+"]
    minus = [t for op, t in zip(term_ops, terms[1:]) if op == "-"]
    return (f"Another way: plus terms {_sum_text(plus)}, minus terms {_sum_text(minus)}, "
            f"and {sum(plus)} - {sum(minus)} = {sum(plus) - sum(minus)}. Same result.")


def _misread_operands(meta: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    operands = meta["operands"]
    i = rng.randrange(len(operands))
    operands[i] = rng.choice([v for v in (operands[i] - 1, operands[i] + 1) if v >= 1])
    meta["expression"] = expression_text(operands, meta["operators"])
    return meta


# ----------------------------------------------------------------------------- word problems

_WORD_LABELS = {"buy": "Buys {n} more", "find": "Finds {n} more", "get": "Gets {n} more",
                "give": "Gives {n} away", "lose": "Loses {n}"}


def _word_step_lines(step: dict[str, Any], current: int, style: _Style, slip: bool) -> Lines:
    change = word_change(step)
    new = current + change
    if step["kind"] == "bags":
        head = f"Buys {step['k']} bags of {step['m']}: {step['k']} * {step['m']} = {change}."
        a, op, b = current, "+", change
    else:
        head = _WORD_LABELS[step["kind"]].format(n=step["n"]) + ":"
        a, op, b = current, ("+" if change >= 0 else "-"), abs(change)
    if not slip:
        return [f"{head} {a} {op} {b} = {new}."]
    wrong = _slip(style.rng, new)
    return [f"{head} {a} {op} {b} = {wrong}.", *_repair(a, op, b, new, wrong), f"{a} {op} {b} = {new}."]


def _word_trace(task: str, meta: dict[str, Any], style: _Style) -> tuple[Lines, str]:
    items = meta["items"]
    current = meta["start"]
    lines = [f"Start: {current} {meta['item'] if current == 1 else items}.",  # plan second: module docstring
             *([f"{REREAD} {word_question(meta)} {SAME_READING}"] if style.reread else []),
             "Plan: first I write down each change, then I work it out step by step."]
    slip_at = style.rng.randrange(len(meta["steps"])) if style.mistake else -1
    inverses: Lines = []
    forwards: Lines = []
    for k, step in enumerate(meta["steps"]):
        lines += _word_step_lines(step, current, style, k == slip_at)
        change = word_change(step)
        new = current + change
        inverses.insert(0, _inverse(current, "+" if change >= 0 else "-", abs(change), new))
        forwards.append(f"{current} {'+' if change >= 0 else '-'} {abs(change)} = {new}.")
        current = new
    # The conclusion right after the last step, as in the worked answers; the check after it.
    noun = meta["item"] if current == 1 else items
    lines.append(f"So {meta['name']} has {current} {noun} now.")
    if style.check and style.redo_check:
        lines.append("Check: " + " ".join(forwards))
    elif style.check:
        lines.append("Check: " + " ".join(inverses) + " That is the start.")
    if style.explore:
        changes = [word_change(s) for s in meta["steps"]]
        gained = [c for c in changes if c > 0]
        lost = [-c for c in changes if c < 0]
        lines.append(f"Another way: gained {_sum_text(gained)}, lost {_sum_text(lost)}, and "
                     f"{meta['start']} + {sum(gained)} - {sum(lost)} = {current}. Same result.")
    return lines, str(current)


def _misread_word(meta: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Misread one number of the problem (keeping every amount possible)."""
    for _ in range(20):
        trial = copy.deepcopy(meta)
        slots = [("start", None)] + [(i, "m" if s["kind"] == "bags" else "n")
                                     for i, s in enumerate(trial["steps"])]
        where, key = rng.choice(slots)
        holder = trial if where == "start" else trial["steps"][where]
        key = "start" if where == "start" else key
        holder[key] = rng.choice([v for v in (holder[key] - 1, holder[key] + 1) if v >= 1])
        if _word_values_ok(trial):
            return trial
    meta["start"] += 1  # always possible: more at the start never goes negative
    return meta


def _word_values_ok(meta: dict[str, Any]) -> bool:
    current = meta["start"]
    for step in meta["steps"]:
        current += word_change(step)
        if current < 0:
            return False
    return True


_Builder = Callable[[str, dict[str, Any], _Style], tuple[Lines, str]]
_BUILDERS: dict[str, tuple[_Builder, Callable[[dict, random.Random], dict]]] = {
    "describe": (_shape_trace, _misread_shapes),
    "count_color": (_shape_trace, _misread_shapes),
    "count_shape": (_shape_trace, _misread_shapes),
    "sum_colors": (_shape_trace, _misread_shapes),
    "digit_sum": (_digit_trace, _misread_digits),
    "arith": (_arith_trace, _misread_operands),
    "word": (_word_trace, _misread_word),
}
