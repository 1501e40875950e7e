"""Long-CoT warm-up set: prompt a teacher for reasoning traces, keep only verified ones.

For each problem, the teacher is asked (with prompt wrappers that elicit planning, evaluation,
reflection and exploration) for k responses; a response is kept when the shared verifier accepts
its final answer and it passes the format and length filters; near-duplicates are dropped; a
selection policy (all / shortest / at most m per problem) picks what goes into the SFT set. The
output is SFT-ready JSONL (the problem's own messages, without the eliciting wrapper, plus the
trace as the assistant turn) and a stats file with every count.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Protocol

from tqdm import tqdm

from thinkvl.config import ConfigError
from thinkvl.data.formats import read_records, validate_record, write_jsonl
from thinkvl.rewards.verifiers import extract_answer, format_ok, get_verifier, safe_score
from thinkvl.rollout.engine import EngineConfig

log = logging.getLogger("thinkvl")

BEHAVIOUR_PROMPT = (
    "Think step by step inside <think> and </think> before answering. Plan first: outline how you "
    "will solve the problem. Evaluate: check each intermediate result. Reflect: if a step looks "
    "wrong, say so and repair it. Explore: when useful, try a second way and compare. After </think>, "
    "give the final answer as \\boxed{...}."
)


class Teacher(Protocol):
    def sample_batch(self, records: list[dict], n: int) -> list[list[str]]: ...


@dataclass
class TeacherConfig:
    kind: Literal["program", "local", "remote"] = "program"  # program: a trace-writing program (below)
    # program: `module:Class` of the trace writer; it is built with the *_rate / glance_* keys below
    # (whichever its __init__ takes) and samples with `sample(record, n)`. Default: the demo's teacher.
    program: str = "thinkvl.demo.teacher:ProgramTeacher"
    model: str = ""  # local: a model folder; remote: the served model's name
    base_url: str = ""  # remote: OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "THINKVL_TEACHER_API_KEY"  # remote: env var holding the key
    concurrency: int = 8
    max_retries: int = 4
    timeout_s: float = 120.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    cache: str | None = None  # remote: resumable sample cache (default: <out>.cache.jsonl)
    mistake_rate: float = 0.25  # program: traces with a caught-and-repaired mistake
    wrong_rate: float = 0.15  # program: traces with an uncaught mistake (rejection sampling drops them)
    explore_rate: float = 0.4  # program: traces that also try a second way
    check_rate: float = 1.0  # program: traces that end by checking their result
    plan_rate: float = 1.0  # program: traces with a plan line
    glance_rate: float = 0.0  # program: traces that answer at a glance, with no working (a shortcut)
    glance_accuracy: float = 1.0  # program: how often a glance is right on the easiest problems
    glance_decay: float = 0.0  # program: ... and how much less often per difficulty level above
    glance_rate_decay: float = 0.0  # program: how much less often a trace glances per level above 1
    reread_rate: float = 0.0  # program: worked traces that read their input a second time
    # program: the tasks the teacher may glance at (empty: every task whose answer is checkable)
    glance_tasks: list[str] = field(default_factory=list)
    # program: counting traces name each row's matches before the row's count (`Red ones: red
    # triangle. 1, so far 2.`) instead of the count alone (docs/demo.md, session 25)
    name_hits: bool = False
    # program: how a final check is written, e.g. `inverse` (undo the steps) or `redo` (work the
    # result out again, so the check ends on the answer); empty: the program's own default
    check_form: str = ""


@dataclass
class DistillConfig:
    problems: str = ""  # problem file to build traces for (the RL prompt set)
    # read `problems` as SFT conversations: each one's trailing assistant turn is dropped and the
    # rest is the prompt (the record's `answer` is still what a trace must reach)
    from_conversations: bool = False
    out: str = "runs/distill/longcot.jsonl"  # SFT-ready output; stats go to <out>.stats.json
    columns: dict = field(default_factory=dict)
    limit: int | None = None  # read the first N records (before the `tasks` filter)
    # keep only problems whose record `task` is one of these (empty: all). Skipped problems are
    # counted by task in the stats file; e.g. leave out tasks whose answer is not a checkable value
    tasks: list[str] = field(default_factory=list)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    k: int = 4  # samples per problem
    verifier: str = "math"  # accepts the final answer
    require_format: bool = True  # keep only <think>...</think> then an answer
    # all: every verified trace; shortest: the shortest one; max_per_problem: the shortest m;
    # sampled: the first m in the order they were sampled (keeps the teacher's mix of behaviours:
    # shortest-first would always prefer a shortcut that happened to be right)
    selection: Literal["all", "shortest", "max_per_problem", "sampled"] = "max_per_problem"
    max_per_problem: int = 2
    min_chars: int = 20
    max_chars: int = 8000
    dedup_jaccard: float = 0.9  # drop a trace whose word-3-gram Jaccard with a kept one is above this
    system_prompt: str = BEHAVIOUR_PROMPT  # wrapper shown to the teacher (not kept in the SFT set)
    keep_system_prompt: bool = False  # also put the wrapper into the SFT conversations
    seed: int = 0
    rollout: EngineConfig = field(default_factory=EngineConfig)  # local teacher: rollout.engine hf | vllm

    def check(self, prefix: str) -> None:
        if not self.problems:
            raise ConfigError(f"{prefix + '.' if prefix else ''}problems: a problem file is required")
        if self.k < 1:
            raise ConfigError("k: must be >= 1")
        if not isinstance(self.tasks, list) or not all(isinstance(t, str) and t for t in self.tasks):
            raise ConfigError(f"tasks: must be a list of task names, got {self.tasks!r}")
        glance_tasks = self.teacher.glance_tasks
        if not isinstance(glance_tasks, list) or not all(isinstance(t, str) and t for t in glance_tasks):
            raise ConfigError(f"teacher.glance_tasks: must be a list of task names, got {glance_tasks!r}")
        if not isinstance(self.teacher.name_hits, bool):
            raise ConfigError(f"teacher.name_hits: must be true or false, got {self.teacher.name_hits!r}")
        if not isinstance(self.teacher.check_form, str):
            raise ConfigError(f"teacher.check_form: must be a string such as 'inverse' or 'redo', "
                              f"got {self.teacher.check_form!r}")
        for name in (f.name for f in fields(TeacherConfig) if f.name.endswith(("_rate", "_accuracy", "_decay"))):
            rate = getattr(self.teacher, name)
            if not 0.0 <= rate <= 1.0:
                raise ConfigError(f"teacher.{name}: must be in [0, 1], got {rate}")


def make_teacher(cfg: DistillConfig) -> Teacher:
    t = cfg.teacher
    if t.kind == "program":
        import inspect

        from thinkvl.config import import_object

        try:
            cls = import_object(t.program, "teacher class", "'package.module:Class'")
        except ValueError as e:
            raise ConfigError(f"teacher.program: cannot import {t.program!r} (want 'module:Class'): {e}") from e
        takes = inspect.signature(cls).parameters
        knobs = {f.name: getattr(t, f.name) for f in fields(TeacherConfig)
                 if f.name.endswith(("_rate", "_accuracy", "_decay")) and f.name in takes}
        if t.glance_tasks:
            if "glance_tasks" not in takes:
                raise ConfigError(f"teacher.glance_tasks: {t.program} takes no glance_tasks")
            knobs["glance_tasks"] = list(t.glance_tasks)
        if t.name_hits:
            if "name_hits" not in takes:
                raise ConfigError(f"teacher.name_hits: {t.program} takes no name_hits")
            knobs["name_hits"] = True
        if t.check_form:
            if "check_form" not in takes:
                raise ConfigError(f"teacher.check_form: {t.program} takes no check_form")
            knobs["check_form"] = t.check_form
        try:
            return _PerRecord(cls(seed=cfg.seed, **knobs))
        except ValueError as e:
            raise ConfigError(f"teacher: {e}") from e
    if t.kind == "remote":
        import os

        from thinkvl.distill.remote import RemoteTeacher

        if not t.base_url:
            raise ConfigError("teacher.base_url: required for a remote teacher")
        cache = Path(t.cache) if t.cache else Path(str(cfg.out) + ".cache.jsonl")
        return RemoteTeacher(t.base_url, t.model, api_key=os.environ.get(t.api_key_env),
                             concurrency=t.concurrency, max_retries=t.max_retries, timeout_s=t.timeout_s,
                             cache_path=cache, temperature=t.temperature, top_p=t.top_p, max_tokens=t.max_tokens)
    if not t.model:
        raise ConfigError("teacher.model: required for a local teacher")
    return _LocalTeacher(t, cfg.seed, cfg.rollout)


class _PerRecord:
    """Adapts a teacher with `sample(record, n)` to the batch interface."""

    def __init__(self, teacher):
        self.teacher = teacher

    def sample_batch(self, records: list[dict], n: int) -> list[list[str]]:
        return [self.teacher.sample(r, n) for r in records]


class _LocalTeacher:
    """Any model thinkvl can load, sampled with the HF or the vLLM engine (`rollout.engine`)."""

    def __init__(self, t: TeacherConfig, seed: int, rollout: EngineConfig | None = None):
        from thinkvl.models.load import load
        from thinkvl.rollout.engine import SamplingParams, build_engine

        rollout = rollout or EngineConfig()
        self.loaded = load(t.model)
        self.loaded.model.eval()
        self.engine = build_engine(rollout.engine, self.loaded, t.model, vllm=rollout.vllm, seed=seed)
        self.sampling = SamplingParams(max_new_tokens=t.max_tokens, temperature=t.temperature, top_p=t.top_p,
                                       seed=seed)

    def sample_batch(self, records: list[dict], n: int) -> list[list[str]]:
        import torch

        prompts = [self.loaded.render(r["messages"], add_generation_prompt=True) for r in records]
        with torch.no_grad():
            outs = self.engine.generate(prompts, n, self.sampling)
        return [[r.response_text for r in group] for group in outs]

    def close(self) -> None:
        getattr(self.engine, "close", lambda: None)()  # the vLLM worker, if any


def _with_wrapper(messages: list[dict], system_prompt: str) -> list[dict]:
    if not system_prompt:
        return messages
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": system_prompt + "\n" + _text(messages[0])}] + messages[1:]
    return [{"role": "system", "content": system_prompt}] + messages


def _text(msg: dict) -> str:
    c = msg["content"]
    return c if isinstance(c, str) else " ".join(p.get("text", "") for p in c if p["type"] == "text")


def _ngrams(text: str, n: int = 3) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i : i + n]) for i in range(max(len(words) - n + 1, 1))}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / max(len(a | b), 1)


def select(candidates: list[tuple[str, str]], cfg: DistillConfig) -> tuple[list[str], Counter]:
    """Filter one problem's (response, reference) samples; returns kept traces and rejection counts."""
    reasons: Counter = Counter()
    verifier = get_verifier(cfg.verifier)
    ok: list[str] = []
    for resp, ref in candidates:
        if len(resp) < cfg.min_chars:
            reasons["too_short"] += 1
        elif len(resp) > cfg.max_chars:
            reasons["too_long"] += 1
        elif cfg.require_format and not format_ok(resp):
            reasons["bad_format"] += 1
        elif extract_answer(resp) is None:
            reasons["no_answer"] += 1
        elif safe_score(verifier, resp, ref) < 0.5:
            reasons["wrong_answer"] += 1
        else:
            ok.append(resp)
    kept: list[str] = []
    grams: list[set] = []
    for resp in sorted(ok, key=len) if cfg.selection not in ("all", "sampled") else ok:
        g = _ngrams(resp)
        if any(_jaccard(g, h) > cfg.dedup_jaccard for h in grams):
            reasons["near_duplicate"] += 1
            continue
        kept.append(resp)
        grams.append(g)
    limit = {"all": len(kept), "shortest": 1, "max_per_problem": cfg.max_per_problem,
             "sampled": cfg.max_per_problem}[cfg.selection]
    if len(kept) > limit:
        reasons["over_selection_limit"] += len(kept) - limit
    return kept[:limit], reasons


def read_problems(cfg: DistillConfig) -> tuple[list[dict], Counter]:
    """The problems of ``cfg.problems`` and the count of those the ``tasks`` filter skipped, by
    task (``<none>`` for records without one). With ``from_conversations``: SFT conversations
    whose trailing assistant turns are dropped, then checked as problems (a reference ``answer``,
    a final user turn) by the same validator as a problem file."""
    kind = "conversation" if cfg.from_conversations else "problem"
    records = read_records(cfg.problems, kind, columns=cfg.columns, limit=cfg.limit)
    skipped: Counter = Counter()
    if cfg.tasks:
        wanted = set(cfg.tasks)
        kept = [r for r in records if r.get("task") in wanted]
        skipped.update(str(r.get("task") or "<none>") for r in records if r.get("task") not in wanted)
        if not kept:
            raise ConfigError(f"tasks: none of {sorted(wanted)} in {cfg.problems} "
                              f"(its tasks: {sorted(skipped)})")
        records = kept
    if not cfg.from_conversations:
        return records, skipped
    base = Path(cfg.problems).parent
    out = []
    for rec in records:
        messages = list(rec["messages"])
        while len(messages) > 1 and messages[-1]["role"] == "assistant":
            messages.pop()
        out.append(validate_record(dict(rec, messages=messages), base, rec["_where"], "problem", None))
    return out, skipped


def build(cfg: DistillConfig) -> Path:
    """Build the warm-up set; returns the output path. Stats in <out>.stats.json."""
    problems, skipped = read_problems(cfg)
    if skipped:
        log.info("distill: %d problems skipped by `tasks` (%s)", sum(skipped.values()),
                 ", ".join(f"{t} {n}" for t, n in sorted(skipped.items())))
    teacher = make_teacher(cfg)
    out_records: list[dict] = []
    reasons: Counter = Counter()
    per_problem: dict[str, float] = {}
    tried = accepted = 0
    lengths: list[int] = []
    bar = tqdm(total=len(problems), desc="distill", dynamic_ncols=True)
    batch = 16
    for start in range(0, len(problems), batch):
        chunk = problems[start : start + batch]
        asked = [dict(p, messages=_with_wrapper(p["messages"], cfg.system_prompt)) for p in chunk]
        samples = teacher.sample_batch(asked, cfg.k)
        for prob, resps in zip(chunk, samples):
            kept, why = select([(r, prob["answer"]) for r in resps], cfg)
            n_ok = len(resps) - sum(v for kk, v in why.items() if kk not in ("near_duplicate", "over_selection_limit"))
            per_problem[prob["id"]] = n_ok / max(len(resps), 1)
            reasons.update(why)
            tried += len(resps)
            accepted += n_ok
            msgs = _with_wrapper(prob["messages"], cfg.system_prompt) if cfg.keep_system_prompt else prob["messages"]
            for resp in kept:
                lengths.append(len(resp))
                rec = {k: v for k, v in prob.items() if not k.startswith("_") and k != "messages"}
                out_records.append(dict(rec, messages=msgs + [{"role": "assistant", "content": resp}]))
        bar.update(len(chunk))
        bar.set_postfix(accept=f"{accepted / max(tried, 1):.0%}", kept=len(out_records))
    bar.close()
    getattr(teacher, "close", lambda: None)()
    out = Path(cfg.out)
    write_jsonl(out, out_records)
    stats = {
        "problems": len(problems), "skipped_by_task": dict(skipped), "samples": tried, "accepted": accepted,
        "pass_rate": accepted / max(tried, 1), "kept": len(out_records),
        "problems_with_a_kept_trace": len({r["id"] for r in out_records}),
        "rejected": dict(reasons),
        "length_chars": ({"mean": statistics.fmean(lengths), "median": statistics.median(lengths),
                          "min": min(lengths), "max": max(lengths)} if lengths else {}),
        "pass_rate_per_problem": per_problem,
    }
    Path(str(out) + ".stats.json").write_text(json.dumps(stats, indent=1))
    log.info("distill: %d samples, %.0f%% verified, %d kept from %d problems -> %s",
             tried, 100 * stats["pass_rate"], len(out_records), len(problems), out)
    return out
