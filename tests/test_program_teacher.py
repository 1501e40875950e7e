"""The program teacher: right answers, the four behaviours, uncaught mistakes, determinism."""

from __future__ import annotations

import random
import re

import pytest

from thinkvl.demo.tasks import IMAGE_TASKS, MAX_LEVEL, TASKS, VERIFIABLE_TASKS, make_problem
from thinkvl.demo.teacher import ProgramTeacher, trace, worked_response

FORMAT = re.compile(r"<think>\n(.+)\n</think>\nThe answer is \\boxed\{([^{}]+)\}\.", re.DOTALL)
# a chain of integer operations and its stated value, not part of a longer chain
EQUATION = re.compile(r"(?<![\d+*-] )(?<!\d)(\d+(?: [+*-] \d+)+) = (\d+)")
SHAPE_TASKS = ("count_color", "count_shape", "sum_colors")


def records(task: str, per_level: int = 8, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [make_problem(task, level * 100 + i, rng, level=level)
            for level in range(1, MAX_LEVEL + 1) for i in range(per_level)]


def parse(text: str) -> tuple[str, str]:
    m = FORMAT.fullmatch(text)
    assert m, f"bad trace format:\n{text}"
    return m.group(1), m.group(2)


@pytest.mark.parametrize("task", VERIFIABLE_TASKS)
def test_right_answers_and_format(task: str) -> None:
    teacher = ProgramTeacher(seed=0, mistake_rate=0.5, wrong_rate=0.0, explore_rate=0.5)
    for record in records(task):
        for text in teacher.sample(record, 3):
            think, answer = parse(text)
            assert answer == record["answer"], text
            assert "\nCheck:" in think
            if task in IMAGE_TASKS:  # the reading first, at the place joint SFT taught it; the plan after
                lines = think.split("\n")
                last_row = max(i for i, line in enumerate(lines) if line.startswith("Row "))
                assert lines[0].startswith("Row 1: ") and "Plan:" not in "\n".join(lines[:last_row])
                assert any(line.startswith("Plan:") for line in lines[last_row:])
            else:  # the problem restated first, as in the worked answers; the plan second
                first, second = think.split("\n")[:2]
                assert first.startswith(("Expression: ", "Start: ")) and second.startswith("Plan:")
            assert 25 <= len(text.split()) <= 170, len(text.split())


@pytest.mark.parametrize("task", TASKS)
def test_wrong_rate_one_is_always_wrong(task: str) -> None:
    teacher = ProgramTeacher(seed=1, mistake_rate=0.3, wrong_rate=1.0, explore_rate=0.3)
    for record in records(task, per_level=6):
        for text in teacher.sample(record, 2):
            if task == "describe":
                assert text.split("</think>\n")[1] != record["answer"]
            else:
                assert parse(text)[1] != record["answer"], text


@pytest.mark.parametrize("task", VERIFIABLE_TASKS)
def test_clean_traces_do_correct_arithmetic(task: str) -> None:
    rng = random.Random(2)
    for record in records(task, per_level=4):
        for explore in (False, True):
            text = trace(record, rng, explore=explore)
            assert "Wait" not in text
            assert ("Another way:" in text) == explore and ("Same result." in text) == explore
            for lhs, rhs in EQUATION.findall(text):
                assert eval(lhs) == int(rhs), (lhs, rhs, text)  # noqa: S307 - digits and + - *


@pytest.mark.parametrize("task", TASKS)
def test_mistakes_are_caught_and_repaired(task: str) -> None:
    rng = random.Random(3)
    for record in records(task, per_level=4):
        text = trace(record, rng, mistake=True)
        assert "Wait, " in text and "Let me " in text
        final = text.split("</think>\n")[1]
        expected = record["answer"] if task == "describe" else f"The answer is \\boxed{{{record['answer']}}}."
        assert final == expected


def test_a_misread_expression_that_goes_below_zero_can_still_slip() -> None:
    # A misreading (wrong=True) can turn `5 - 2` into `2 - 5`: the step is negative, and a caught
    # slip on it must pick a neighbour below zero. It raised IndexError in `thinkvl demo --seed 1`.
    from thinkvl.demo.teacher import _slip

    rng = random.Random(0)
    assert {_slip(rng, -3) for _ in range(200)} == {-5, -4, -2, -1}
    assert {_slip(rng, 0) for _ in range(200)} == {1, 2}
    record = make_problem("arith", 0, random.Random(0), level=2)
    record["meta"] = {"operands": [2, 5], "operators": ["-"], "expression": "2 - 5"}
    for seed in range(20):
        text = trace(record, random.Random(seed), mistake=True, check=False)
        assert "2 - 5 = -3." in text and "\\boxed{-3}" in text


@pytest.mark.parametrize("task", SHAPE_TASKS + ("describe",))
def test_traces_enumerate_the_scene_before_counting(task: str) -> None:
    rng = random.Random(4)
    for record in records(task, per_level=3):
        text = trace(record, rng, mistake=rng.random() < 0.5)
        listed: dict[int, str] = {}
        for m in re.finditer(r"Row (\d+): ([^.\n]*)\.|list row (\d+) again: ([^.\n]*)\.", text):
            row, items = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            listed[int(row)] = items  # a repaired row replaces its first listing
        objs = record["meta"]["objects"]
        expected = {r + 1: ", ".join(f"{o['color']} {o['shape']}" for o in objs if o["row"] == r)
                    or "nothing" for r in range(record["meta"]["grid"][0])}
        assert listed == expected, text


def test_reading_digits_before_adding() -> None:
    rng = random.Random(5)
    for record in records("digit_sum", per_level=3):
        text = trace(record, rng)
        digits = [str(d["digit"]) for d in record["meta"]["digits"]]
        stated = re.search(r"The digits are ([\d, and]+)\.", text).group(1)
        assert re.findall(r"\d", stated) == digits
        assert text.index("The digits are") < text.index(" = ")


def test_operator_precedence_in_arith_traces() -> None:
    record = make_problem("arith", 0, random.Random(0), level=3)
    record["meta"].update(operands=[3, 4, 2], operators=["+", "*"], expression="3 + 4 * 2")
    record["answer"] = "11"
    text = trace(record, random.Random(0))
    assert text.index("4 * 2 = 8.") < text.index("3 + 8 = 11.")
    assert parse(text)[1] == "11"


def test_sampling_is_deterministic_and_varied() -> None:
    record = make_problem("sum_colors", 1, random.Random(6), level=5)
    a = ProgramTeacher(seed=0, mistake_rate=0.5, explore_rate=0.5).sample(record, 8)
    b = ProgramTeacher(seed=0, mistake_rate=0.5, explore_rate=0.5).sample(record, 8)
    c = ProgramTeacher(seed=1, mistake_rate=0.5, explore_rate=0.5).sample(record, 8)
    assert a == b and a != c and len(set(a)) > 1
    rates = ProgramTeacher(seed=0, mistake_rate=0.0, wrong_rate=0.0, explore_rate=0.0)
    assert all("Wait" not in t and "Another way" not in t for t in rates.sample(record, 5))


@pytest.mark.parametrize("task", TASKS)
def test_final_check_is_optional(task: str) -> None:
    """Without the final check a trace ends at its conclusion (or its exploration); slips are still
    exposed by their failed check, and the answer and the working are the same as with it."""
    for record in records(task, per_level=3):
        for mistake, explore in ((False, False), (True, False), (True, True)):
            seed = f"{record['id']}/{mistake}/{explore}"
            checked = trace(record, random.Random(seed), mistake=mistake, explore=explore)
            plain = trace(record, random.Random(seed), mistake=mistake, explore=explore, check=False)
            final_checks = [line for line in plain.split("\n")
                            if line.startswith("Check:") and ", not " not in line]
            assert final_checks == [], plain
            assert plain.split("</think>\n")[1] == checked.split("</think>\n")[1]
            kept = [line for line in checked.split("\n")
                    if not line.startswith(("Plan:", "Check:")) or ", not " in line]
            assert [line for line in plain.split("\n") if not line.startswith("Plan:")] == kept
            if task != "describe":  # the plan does not promise a check that never comes
                plan = next(line for line in plain.split("\n") if line.startswith("Plan:"))
                assert "check" not in plan, plan
    never = ProgramTeacher(seed=0, mistake_rate=0.0, explore_rate=0.0, check_rate=0.0)
    always = ProgramTeacher(seed=0, mistake_rate=0.0, explore_rate=0.0, check_rate=1.0)
    record = records(task, per_level=1)[-1]
    assert all("Check:" not in t for t in never.sample(record, 4))
    assert all("Check:" in t for t in always.sample(record, 4))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ProgramTeacher(mistake_rate=1.5)
    with pytest.raises(ValueError):
        ProgramTeacher(check_rate=-0.1)
    with pytest.raises(ValueError, match="name_hits"):
        ProgramTeacher(name_hits="yes")
    record = make_problem("arith", 0, random.Random(0))
    record["task"] = "unknown"
    with pytest.raises(ValueError):
        trace(record, random.Random(0))


def test_worked_response_by_hand() -> None:
    record = {"task": "count_color", "answer": "2", "meta": {
        "grid": [4, 4], "palette": ["red", "green", "blue"],
        "objects": [{"row": 0, "col": 1, "color": "red", "shape": "circle"},
                    {"row": 2, "col": 0, "color": "blue", "shape": "square"},
                    {"row": 2, "col": 3, "color": "red", "shape": "triangle"}],
        "target": {"colors": ["red"]}}}
    assert worked_response(record) == (
        "Row 1: red circle. Red: 1, so far 1.\n"
        "Row 2: nothing. Red: 0, so far 1.\n"
        "Row 3: blue square, red triangle. Red: 1, so far 2.\n"
        "Row 4: nothing. Red: 0, so far 2.\n"
        "That is 3 shapes.\nSo there are 2 red shapes.\nThe answer is \\boxed{2}.")


@pytest.mark.parametrize("task", TASKS)
def test_worked_response_is_the_clean_trace_without_plan_and_checks(task: str) -> None:
    """The worked answers are the clean trace's working with each row's count in one number; the
    ``name_hits`` traces name the matches of counting rows (the rest of the trace is the same)."""
    for record in records(task, per_level=4):
        text = worked_response(record)
        named, plain = trace(record, random.Random(0), name_hits=True), trace(record, random.Random(0))
        if task in SHAPE_TASKS:  # every row line differs: "Red ones: red circle. 1, ..." / "Red: 1, ..."
            assert len(named) > len(plain) and ROW_COUNT.search(text).group(5) is None
        assert unname_hits(named) == plain
        think, final = trace(record, random.Random(0)).removeprefix(
            "<think>\n").split("\n</think>\n")
        kept = [line for line in think.split("\n") if not line.startswith(("Plan:", "Check:"))]
        assert text.split("\n") == kept + [final]
        assert "<think>" not in text and "Plan:" not in text and "Check:" not in text
        if task != "describe":
            assert final == f"The answer is \\boxed{{{record['answer']}}}."
        if task in SHAPE_TASKS + ("describe", "digit_sum"):
            assert text.startswith("Row 1: ")


ROW_COUNT = re.compile(r"(?:^Row (\d+): |Let me (?:list|count) row (\d+) again: )(?:([^.\n]*)\. )?"
                       r"([A-Z][a-z ]*): (?:([^.\n]*)\. )?(\d+), so far (\d+)\.$", re.MULTILINE)
"""A row's count: 1 row, 2 row counted again, 3 the objects listed, 4 the head, 5 the matches named
(``name_hits``), 6 the row's count, 7 the running count."""


def unname_hits(text: str) -> str:
    """A ``name_hits`` trace with each row's named matches taken out: ``Red ones: red circle. 1, so
    far 1.`` -> ``Red: 1, so far 1.``."""
    return re.sub(r"( ones)?: [^.:\n]*\. (\d+, so far)", r": \2", text)


@pytest.mark.parametrize("task", SHAPE_TASKS)
@pytest.mark.parametrize("mistake", [False, True])
@pytest.mark.parametrize("name_hits", [False, True])
def test_each_row_is_counted_where_it_is_listed(task: str, mistake: bool, name_hits: bool) -> None:
    """Every row line counts the matches among the objects it lists and adds them to the running
    count of the row before; a repaired row (listed or counted again) replaces its first count,
    every row's last count is right, and the last running count is the answer. With ``name_hits``
    every count is the number of objects it names, all of them from its row; a row's last count
    names exactly the row's matches, in reading order; a miscount names one match too few or one
    other object too many."""
    rng = random.Random(1)
    seen_wait = seen_miscount = 0
    for record in records(task):
        think, answer = parse(trace(record, rng, mistake=mistake, name_hits=name_hits))
        meta = record["meta"]
        target = meta["target"]
        head = (target["shape"].capitalize() + "s" if task == "count_shape"
                else " and ".join(target["colors"]).capitalize() + (" ones" if name_hits else ""))

        def matches(name: str) -> bool:
            color, shape = name.split(" ")
            return shape == target["shape"] if "shape" in target else color in target["colors"]

        running: dict[int, int] = {}
        last: dict[int, int] = {}
        listed: dict[int, list[str]] = {}
        named: dict[int, list[str]] = {}
        for m in ROW_COUNT.finditer(think):
            row = int(m.group(1) or m.group(2))
            assert m.group(4) == head, m.group(0)
            if m.group(3) is not None:
                listed[row] = [] if m.group(3) == "nothing" else m.group(3).split(", ")
            before = running.get(row - 1, 0)
            assert int(m.group(7)) == before + int(m.group(6)), m.group(0)
            if name_hits:
                names = [] if m.group(5) == "none" else m.group(5).split(", ")
                assert len(names) == int(m.group(6)) and set(names) <= set(listed[row]), m.group(0)
                named[row] = names
            else:
                assert m.group(5) is None, m.group(0)
            running[row], last[row] = int(m.group(7)), int(m.group(6))
        rows = meta["grid"][0]
        assert sorted(last) == list(range(1, rows + 1)) and str(running[rows]) == answer, think
        for r in range(1, rows + 1):
            objs = [f"{o['color']} {o['shape']}" for o in meta["objects"] if o["row"] == r - 1]
            assert listed[r] == objs and last[r] == sum(map(matches, objs)), think
            if name_hits:
                assert named[r] == [o for o in objs if matches(o)], think
        for slipped in re.finditer(r"\. ([^.\n]*)\. \d+, so far \d+\.\nWait, (I missed that the|the) ",
                                   think):
            assert name_hits and mistake
            wrongly = slipped.group(1).split(": ")[1]
            wrongly = [] if wrongly == "none" else wrongly.split(", ")
            extra = [o for o in wrongly if not matches(o)]
            assert len(extra) == (slipped.group(2) == "the"), slipped.group(0)
            seen_miscount += 1
        seen_wait += "Wait, " in think
        if not mistake:
            assert "Wait, " not in think
    assert seen_wait > len(records(task)) // 2 if mistake else seen_wait == 0
    assert (seen_miscount > len(records(task)) // 8) == (mistake and name_hits)


def test_glance_is_the_direct_answer_right_or_slipped():
    import random

    from thinkvl.demo.tasks import short_response
    from thinkvl.demo.teacher import GLANCE, glance_trace
    from thinkvl.rewards.verifiers import format_ok, math_verifier

    for task in VERIFIABLE_TASKS:
        rec = make_problem(task, 3, random.Random(5), level=4)
        right = glance_trace(rec, random.Random(0), right=True)
        sentence = short_response(rec).split(" The answer is ")[0]
        assert right == f"<think>\n{GLANCE} {sentence}\n</think>\nThe answer is \\boxed{{{rec['answer']}}}."
        assert format_ok(right) and math_verifier(right, rec["answer"]) == 1.0
        wrong = glance_trace(rec, random.Random(0), right=False)
        assert format_ok(wrong) and math_verifier(wrong, rec["answer"]) == 0.0


def test_glance_rate_and_accuracy_by_level():
    import random

    from thinkvl.demo.teacher import GLANCE
    from thinkvl.rewards.verifiers import math_verifier

    teacher = ProgramTeacher(seed=1, glance_rate=0.5, glance_accuracy=0.9, glance_decay=0.1, plan_rate=0.0)
    assert teacher.glance_right({"difficulty_level": 1}) == 0.9
    assert teacher.glance_right({"difficulty_level": 6}) == pytest.approx(0.4)
    for level, want in ((1, 0.9), (6, 0.4)):
        glances = right = 0
        for i in range(150):
            rec = make_problem("count_color", i, random.Random(i), level=level)
            for t in teacher.sample(rec, 4):
                assert "Plan:" not in t  # plan_rate 0
                if t.startswith(f"<think>\n{GLANCE}"):
                    glances += 1
                    right += math_verifier(t, rec["answer"]) == 1.0
        assert 0.42 < glances / 600 < 0.58  # glance_rate 0.5 of the samples
        assert abs(right / glances - want) < 0.08  # the teacher's glance accuracy at this level


def test_glance_rate_falls_with_level():
    import random

    from thinkvl.demo.teacher import GLANCE

    teacher = ProgramTeacher(seed=2, glance_rate=0.8, glance_rate_decay=0.15, plan_rate=0.0)
    assert teacher.glance_prob({"difficulty_level": 1}) == 0.8
    assert teacher.glance_prob({"difficulty_level": 3}) == pytest.approx(0.5)
    assert teacher.glance_prob({"difficulty_level": 7}) == 0.0  # floor, not negative
    for level, want in ((1, 0.8), (3, 0.5), (6, 0.05)):
        glances = 0
        for i in range(200):
            rec = make_problem("digit_sum", i, random.Random(i), level=level)
            glances += sum(t.startswith(f"<think>\n{GLANCE}") for t in teacher.sample(rec, 4))
        assert abs(glances / 800 - want) < 0.05, (level, glances / 800)
    with pytest.raises(ValueError, match="glance_rate_decay"):
        ProgramTeacher(glance_rate_decay=1.5)
    # 0 (the default) keeps the level-independent rate
    assert ProgramTeacher(glance_rate=0.3).glance_prob({"difficulty_level": 6}) == 0.3


def test_glance_tasks_limits_the_shortcut_to_the_tasks_named():
    import random

    from thinkvl.demo.teacher import GLANCE

    teacher = ProgramTeacher(seed=4, glance_rate=1.0, plan_rate=0.0, glance_tasks=["digit_sum", "arith"])
    never = ProgramTeacher(seed=4, glance_rate=0.0, plan_rate=0.0)
    for task, glances in (("digit_sum", True), ("arith", True), ("count_color", False)):
        for i in range(20):
            rec = make_problem(task, i, random.Random(i), level=1)
            samples = teacher.sample(rec, 3)
            assert all(t.startswith(f"<think>\n{GLANCE}") == glances for t in samples), (task, samples)
            if not glances:  # a task left out draws no glance: its traces are those of glance_rate 0
                assert samples == never.sample(rec, 3)
    with pytest.raises(ValueError, match=r"glance_tasks: unknown or unglanceable task\(s\) \['describe'\]"):
        ProgramTeacher(glance_tasks=["describe"])
    with pytest.raises(ValueError, match="glance_tasks must be a list"):
        ProgramTeacher(glance_tasks="arith")


def test_behaviours_off_keep_the_old_traces():
    import random

    rec = make_problem("arith", 7, random.Random(7), level=5)
    old = ProgramTeacher(seed=3, mistake_rate=0.3, explore_rate=0.3, check_rate=0.5)
    new = ProgramTeacher(seed=3, mistake_rate=0.3, explore_rate=0.3, check_rate=0.5, plan_rate=1.0, glance_rate=0.0)
    assert old.sample(rec, 6) == new.sample(rec, 6)


def test_reread_by_hand():
    import random

    from thinkvl.demo.tasks import make_problem

    # green triangle (row 1), green triangle (row 2), blue circle + red circle (row 3), row 4 empty
    rec = make_problem("count_color", 3, random.Random(3), level=4)
    body, answer = parse(trace(rec, random.Random(0), check=False, plan=False, reread=True))
    assert answer == "2"
    assert body.splitlines()[-2:] == [
        "Let me read it again: green triangle; green triangle; blue circle, red circle; nothing. Same reading.",
        "So there are 2 green shapes."]
    rec = make_problem("digit_sum", 5, random.Random(5), level=3)  # 5 and 8, both in row 3
    body, _ = parse(trace(rec, random.Random(0), check=False, plan=False, reread=True))
    assert "The digits are 5 and 8.\nLet me read it again: nothing; nothing; 5, 8; nothing. Same reading.\n" in body


@pytest.mark.parametrize("task", VERIFIABLE_TASKS)
def test_reread_adds_one_line_and_changes_nothing_else(task: str) -> None:
    from thinkvl.demo.teacher import REREAD

    for i, rec in enumerate(records(task, per_level=3)):
        flags = dict(mistake=i % 3 == 0, explore=i % 2 == 0, check=i % 4 < 2, plan=i % 5 == 0)
        plain = trace(rec, random.Random(i), **flags)
        again = trace(rec, random.Random(i), reread=True, **flags)
        lines = again.split("\n")
        rereads = [line for line in lines if line.startswith(REREAD)]
        assert len(rereads) == 1, again
        assert "\n".join(line for line in lines if not line.startswith(REREAD)) == plain
        assert parse(again)[1] == rec["answer"]


def test_reread_rate_and_its_tag():
    from thinkvl.demo.behaviours import tag_response
    from thinkvl.demo.teacher import GLANCE

    recs = records("arith", per_level=20)
    never = ProgramTeacher(seed=1, reread_rate=0.0, glance_rate=0.3)
    always = ProgramTeacher(seed=1, reread_rate=1.0, glance_rate=0.3)
    half = ProgramTeacher(seed=1, reread_rate=0.5)
    for rec in recs:
        assert not any(tag_response(rec, t)["rereads"] for t in never.sample(rec, 2))
        for t in always.sample(rec, 2):  # every worked trace re-reads; a glance has no working to re-read
            assert tag_response(rec, t)["rereads"] is (not t.startswith(f"<think>\n{GLANCE}"))
    share = sum(tag_response(rec, t)["rereads"] for rec in recs for t in half.sample(rec, 4)) / (4 * len(recs))
    assert abs(share - 0.5) < 0.06
    with pytest.raises(ValueError, match="reread_rate"):
        ProgramTeacher(reread_rate=-0.1)


def test_distill_config_passes_reread_rate_to_the_program_teacher():
    from thinkvl.distill.longcot import DistillConfig, TeacherConfig, make_teacher

    teacher = make_teacher(DistillConfig(problems="p.jsonl", teacher=TeacherConfig(reread_rate=0.7)))
    assert teacher.teacher.reread_rate == 0.7


def test_teacher_names_hits_only_when_asked() -> None:
    """``name_hits`` reaches every counting trace the teacher samples and nothing else: the same
    draws, so the traces are the plain ones with each row's matches named."""
    problems = records("count_color", per_level=2) + records("arith", per_level=2)
    for record in problems:
        plain = ProgramTeacher(seed=3).sample(record, 4)
        named = ProgramTeacher(seed=3, name_hits=True).sample(record, 4)
        assert list(map(unname_hits, named)) == plain
        if record["task"] == "count_color":
            assert all(" ones: " in t for t in named) and not any(" ones: " in t for t in plain)
        else:
            assert named == plain


def final_check(text: str) -> str | None:
    """The trace's final check line (a failed check that exposes a slip has ``, not``)."""
    checks = [line for line in text.split("\n") if line.startswith("Check:") and ", not " not in line]
    assert len(checks) <= 1, text
    return checks[0] if checks else None


@pytest.mark.parametrize("task", TASKS)
def test_redo_check_ends_on_the_answer(task: str) -> None:
    """``check_form="redo"`` changes the final check line only (same draws, same working and answer),
    its arithmetic is right, and its last number is the answer the trace boxes; the inverse check's
    last number is another one (the input it undoes the steps back to)."""
    differs = 0
    for record in records(task, per_level=3):
        for mistake, explore in ((False, False), (True, False), (True, True)):
            seed = f"{record['id']}/{mistake}/{explore}"
            inverse = trace(record, random.Random(seed), mistake=mistake, explore=explore)
            redo = trace(record, random.Random(seed), mistake=mistake, explore=explore, check_form="redo")
            old, new = final_check(inverse), final_check(redo)
            assert inverse.replace(old, new) == redo
            if task == "describe":
                assert new == old
                continue
            for chain, value in EQUATION.findall(new):
                assert eval(chain) == int(value), new  # noqa: S307 - digits and + - * only
            answer = redo.split("\\boxed{")[1].split("}")[0]
            assert re.findall(r"-?\d+", new)[-1] == answer, redo
            differs += re.findall(r"-?\d+", old)[-1] != answer
    if task != "describe":
        assert differs > 0


def test_redo_check_by_hand() -> None:
    arith = {"task": "arith", "meta": {"operands": [3, 2, 4, 1], "operators": ["+", "*", "+"]}}
    digits = {"task": "digit_sum", "meta": {"grid": [3, 3], "digits": [
        {"digit": 3, "row": 0, "col": 0}, {"digit": 1, "row": 1, "col": 0}, {"digit": 1, "row": 1, "col": 2}]}}
    count = {"task": "count_color", "meta": {"grid": [3, 3], "palette": ["red", "green", "blue"],
                                             "target": {"colors": ["red"]}, "objects": [
        {"color": "red", "shape": "circle", "row": 0, "col": 0},
        {"color": "blue", "shape": "square", "row": 1, "col": 1},
        {"color": "green", "shape": "triangle", "row": 2, "col": 2}]}}
    assert final_check(trace(arith, random.Random(0), check_form="redo")) == \
        "Check: 2 * 4 = 8. 3 + 8 = 11. 11 + 1 = 12."
    assert final_check(trace(arith, random.Random(0))) == "Check: 12 - 1 = 11. 11 - 8 = 3."
    assert final_check(trace(digits, random.Random(0), check_form="redo")) == "Check: 1 + 1 = 2. 2 + 3 = 5."
    assert final_check(trace(count, random.Random(0), check_form="redo")) == \
        "Check: 3 shapes - 2 others = 1. That matches."


def test_check_form_reaches_the_samples_and_bad_values_raise() -> None:
    from thinkvl.distill.longcot import DistillConfig, TeacherConfig, make_teacher

    problems = records("digit_sum", per_level=2)
    plain = ProgramTeacher(seed=3, check_rate=1.0)
    redo = ProgramTeacher(seed=3, check_rate=1.0, check_form="redo")
    for record in problems:
        for a, b in zip(plain.sample(record, 3), redo.sample(record, 3)):
            assert a.replace(final_check(a), final_check(b)) == b and final_check(a) != final_check(b)
    with pytest.raises(ValueError, match=r"check_form must be one of \['inverse', 'redo'\], got 'twice'"):
        ProgramTeacher(check_form="twice")
    with pytest.raises(ValueError, match="check_form"):
        trace(problems[0], random.Random(0), check_form="twice")
    teacher = make_teacher(DistillConfig(problems="p.jsonl", teacher=TeacherConfig(check_form="redo")))
    assert teacher.teacher.check_form == "redo"
    assert make_teacher(DistillConfig(problems="p.jsonl")).teacher.check_form == "inverse"
