"""The long-CoT builder: rejection sampling keeps exactly the verified samples; filters count what
they drop; a remote-teacher build resumes from its cache without paying twice."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from thinkvl.data.formats import DataError, read_records
from thinkvl.demo.tasks import synth
from thinkvl.distill.longcot import DistillConfig, TeacherConfig, build, select
from thinkvl.distill.openai_server import ServerFaults, serve, stop
from thinkvl.rewards.verifiers import format_ok, math_verifier

GOOD = "<think>\nPlan: add.\n3 + 4 = 7.\nCheck: 7 - 4 = 3.\n</think>\nThe answer is \\boxed{7}."


@pytest.fixture(scope="module")
def problems(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distill_data")
    return synth(out, seed=3, n_sft=7, n_rl=36, n_eval=6)["rl"]


def test_select_keeps_exactly_verified_and_counts_reasons():
    cfg = DistillConfig(problems="x", selection="all", min_chars=10)
    candidates = [
        (GOOD, "7"),                                                    # kept
        (GOOD.replace("{7}", "{8}"), "7"),                             # wrong answer
        ("The answer is \\boxed{7}.", "7"),                            # no think block
        ("<think>\nhm\n</think>\nno answer here at all", "7"),        # no answer: fails the format
        ("short", "7"),                                                 # too short
        (GOOD, "7"),                                                    # exact duplicate
    ]
    kept, why = select(candidates, cfg)
    assert kept == [GOOD]
    assert dict(why) == {"wrong_answer": 1, "bad_format": 2, "too_short": 1, "near_duplicate": 1}
    # Without the format requirement an answer-less response is counted as such.
    _, why = select([("just some words and no final answer", "7")], DistillConfig(problems="x", require_format=False))
    assert dict(why) == {"no_answer": 1}


def test_select_policies():
    longer = GOOD.replace("Plan: add.", "Plan: add the two numbers, then check by subtracting.")
    cands = [(longer, "7"), (GOOD, "7")]
    assert select(cands, DistillConfig(problems="x", selection="shortest", dedup_jaccard=1.0))[0] == [GOOD]
    kept, why = select(cands, DistillConfig(problems="x", selection="max_per_problem", max_per_problem=1,
                                            dedup_jaccard=1.0))
    assert kept == [GOOD] and why["over_selection_limit"] == 1
    # sampled: the first verified ones in the order they came (shortest-first would always pick a
    # shortcut that happened to be right)
    kept, why = select(cands, DistillConfig(problems="x", selection="sampled", max_per_problem=1, dedup_jaccard=1.0))
    assert kept == [longer] and why["over_selection_limit"] == 1


def test_teacher_program_is_an_import_path(problems, tmp_path):
    from thinkvl.config import ConfigError
    from thinkvl.distill.longcot import make_teacher

    cfg = DistillConfig(problems=str(problems), teacher=TeacherConfig(kind="program", program="no_such_module:X"))
    with pytest.raises(ConfigError, match="teacher.program: cannot import 'no_such_module:X'"):
        make_teacher(cfg)
    cfg = DistillConfig(problems=str(problems), teacher=TeacherConfig(kind="program", glance_rate=1.0,
                                                                      glance_accuracy=1.0))
    rec = read_records(problems, "problem")[0]
    (trace,) = make_teacher(cfg).sample_batch([rec], 1)[0]
    assert trace.startswith("<think>\nQuick answer:")  # the knobs reach the demo's teacher
    cfg.teacher.glance_tasks = ["arith"]  # ... and the task list; a count problem is worked out
    count = next(r for r in read_records(problems, "problem") if r["task"] == "count_color")
    (trace,) = make_teacher(cfg).sample_batch([count], 1)[0]
    assert not trace.startswith("<think>\nQuick answer:")
    cfg.teacher.glance_tasks = ["counting"]
    with pytest.raises(ConfigError, match=r"teacher: glance_tasks: unknown .*\['counting'\]"):
        make_teacher(cfg)
    cfg.teacher.glance_tasks = "arith"
    with pytest.raises(ConfigError, match="teacher.glance_tasks: must be a list of task names"):
        cfg.check("")
    cfg = DistillConfig(problems=str(problems), teacher=TeacherConfig(kind="program", name_hits=True))
    (trace,) = make_teacher(cfg).sample_batch([count], 1)[0]
    assert f"{count['meta']['target']['colors'][0].capitalize()} ones: " in trace  # names each row's hits
    cfg.teacher.name_hits = "yes"
    with pytest.raises(ConfigError, match="teacher.name_hits: must be true or false, got 'yes'"):
        cfg.check("")
    cfg.teacher.program = "thinkvl.distill.longcot:DistillConfig"  # a class without the knob
    cfg.teacher.name_hits = True
    with pytest.raises(ConfigError, match="teacher.name_hits: .* takes no name_hits"):
        make_teacher(cfg)
    cfg = DistillConfig(problems=str(problems), teacher=TeacherConfig(kind="program", check_form="redo",
                                                                       check_rate=1.0))
    (trace,) = make_teacher(cfg).sample_batch([count], 1)[0]
    assert re.search(r"Check: \d+ shapes? - \d+ others = \d+\.", trace)  # found again, not undone
    cfg.teacher.check_form = "twice"
    with pytest.raises(ConfigError, match=r"teacher: check_form must be one of \['inverse', 'redo'\]"):
        make_teacher(cfg)
    cfg.teacher.check_form = 2
    with pytest.raises(ConfigError, match="teacher.check_form: must be a string"):
        cfg.check("")
    cfg.teacher.program = "thinkvl.distill.longcot:DistillConfig"
    cfg.teacher.check_form = "redo"
    with pytest.raises(ConfigError, match="teacher.check_form: .* takes no check_form"):
        make_teacher(cfg)


def test_program_teacher_build_keeps_only_verified(problems, tmp_path):
    out = tmp_path / "longcot.jsonl"
    cfg = DistillConfig(problems=str(problems), out=str(out), k=4, selection="all", dedup_jaccard=1.01,
                        teacher=TeacherConfig(kind="program", wrong_rate=0.5, mistake_rate=0.3))
    build(cfg)
    stats = json.loads(Path(str(out) + ".stats.json").read_text())
    recs = read_records(out, "conversation")
    probs = {p["id"]: p for p in read_records(problems, "problem")}
    assert stats["samples"] == 4 * len(probs)
    # Half the traces carry an uncaught mistake: some are rejected, and every kept one verifies.
    assert stats["rejected"]["wrong_answer"] > 0
    assert len(recs) == stats["accepted"] == stats["kept"]
    for r in recs:
        trace = r["messages"][-1]["content"]
        assert format_ok(trace) and math_verifier(trace, probs[r["id"]]["answer"]) == 1.0
        # The eliciting wrapper is not part of the SFT conversation.
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]


def test_build_from_sft_conversations(tmp_path):
    """SFT conversations as prompts: the answer turn is dropped, traces must reach the record's
    answer; a conversation without an answer is an error naming its line."""
    sft = synth(tmp_path / "data", seed=4, n_sft=14, n_rl=0, n_eval=0, tasks=("arith", "count_color"))["sft"]
    out = tmp_path / "longcot.jsonl"
    cfg = DistillConfig(problems=str(sft), out=str(out), from_conversations=True, k=2, max_per_problem=1,
                        teacher=TeacherConfig(kind="program", wrong_rate=0.0))
    build(cfg)
    recs = read_records(out, "conversation")
    sources = {r["id"]: r for r in read_records(sft, "conversation")}
    assert len(recs) == 14
    for rec in recs:
        source = sources[rec["id"]]
        assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
        assert rec["messages"][0] == source["messages"][0]
        assert rec["messages"][1]["content"] != source["messages"][1]["content"]  # the trace, not the answer
        assert math_verifier(rec["messages"][1]["content"], source["answer"]) == 1.0
    rows = [json.loads(line) for line in sft.read_text().splitlines()]
    del rows[2]["answer"]
    bad = sft.parent / "bad.jsonl"  # next to the images its rows point at
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"bad.jsonl:3.answer"):
        build(DistillConfig(problems=str(bad), out=str(tmp_path / "x.jsonl"), from_conversations=True))
    with pytest.raises(DataError, match="must end with a user turn"):
        build(DistillConfig(problems=str(sft), out=str(tmp_path / "y.jsonl")))


def test_tasks_filter_skips_and_counts(tmp_path):
    """`tasks` keeps only the named tasks; the rest are counted by task in the stats file, the
    kept problems get the same traces as without the filter (the program teacher seeds per
    record), and a filter that matches nothing is a config error naming the key."""
    from thinkvl.config import ConfigError

    sft = synth(tmp_path / "data", seed=5, n_sft=21, n_rl=0, n_eval=0,
                tasks=("arith", "describe", "count_color"))["sft"]
    by_task = {}
    for r in read_records(sft, "conversation"):
        by_task[r["task"]] = by_task.get(r["task"], 0) + 1

    def run(name, **kw):
        out = tmp_path / f"{name}.jsonl"
        build(DistillConfig(problems=str(sft), out=str(out), from_conversations=True, k=2, max_per_problem=1, **kw))
        return read_records(out, "conversation"), json.loads(Path(str(out) + ".stats.json").read_text())

    every, every_stats = run("all")
    some, stats = run("some", tasks=["arith", "count_color"])
    assert every_stats["skipped_by_task"] == {}
    assert stats["skipped_by_task"] == {"describe": by_task["describe"]}
    assert stats["problems"] == by_task["arith"] + by_task["count_color"]
    assert "bad_format" in every_stats["rejected"] and "bad_format" not in stats["rejected"]  # describe's
    assert [r["messages"] for r in some] == [r["messages"] for r in every if r["task"] != "describe"]
    with pytest.raises(ConfigError, match=r"tasks: none of \['word'\].*its tasks: \['arith', 'count_color', 'describe'\]"):
        run("none", tasks=["word"])
    with pytest.raises(ConfigError, match="tasks: must be a list"):
        DistillConfig(problems=str(sft), tasks="arith").check("")


def test_remote_build_resumes_without_paying_twice(problems, tmp_path):
    from thinkvl.demo.teacher import ProgramTeacher

    teacher = ProgramTeacher(seed=1, wrong_rate=0.2)
    by_question = {}
    for p in read_records(problems, "problem"):
        text = p["messages"][-1]["content"]
        text = text if isinstance(text, str) else " ".join(x["text"] for x in text if x["type"] == "text")
        by_question[text] = p
    rng = random.Random(0)

    def generate(messages, n, temperature, max_tokens):
        content = messages[-1]["content"]
        text = content if isinstance(content, str) else " ".join(x["text"] for x in content if x["type"] == "text")
        return teacher.sample(by_question[text], n + rng.randrange(3))[:n]

    faults = ServerFaults()
    server, thread, url = serve(generate, faults=faults)
    try:
        out = tmp_path / "remote.jsonl"
        cfg = DistillConfig(problems=str(problems), out=str(out), k=2, limit=10,
                            teacher=TeacherConfig(kind="remote", base_url=url, model="thinkvl-tiny",
                                                  concurrency=4, timeout_s=10.0))
        build(cfg)
        first = out.read_text()
        asked = faults.requests
        assert asked == 20
        # Interrupted build: drop half the cache; the rerun asks only for the missing samples.
        cache = Path(str(out) + ".cache.jsonl")
        lines = cache.read_text().splitlines(keepends=True)
        cache.write_text("".join(lines[:12]) + lines[12][: len(lines[12]) // 2])
        build(cfg)
        assert faults.requests - asked == 8
        assert out.read_text() == first
    finally:
        stop(server, thread)
