"""A Markdown report of a pipeline run: machine, held-out table, plots, examples before / after RL.

``write_report(pipeline_dir)`` writes ``pipeline_dir/report.md``. Links are relative to that file,
so the directory can be moved or zipped as a whole; problem images are copied as thumbnails into
``pipeline_dir/report_assets/`` because the responses point at them by absolute path.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import os
import platform
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from thinkvl.report.plots import (
    METRICS_FILE,
    PLOTS_DIR,
    RESPONSES_FILE,
    Stage,
    detect_kind,
    find_stages,
    load_summary,
    plot_pipeline,
    read_jsonl,
    read_metrics,
)

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
ASSETS_DIR = "report_assets"
THUMBNAIL_PX = 256
RESPONSE_CHARS = 600
MISSING = "—"

Summary = Mapping[str, Any]
Record = dict[str, Any]


# --- formatting helpers ----------------------------------------------------------------------
def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _pct(v: Any) -> str:
    x = _num(v)
    return MISSING if x is None else f"{100 * x:.1f}%"


def _pm(v: Any, se: Any) -> str:
    """``41.2% ± 3.1`` (the standard error in points), or just the percentage without one."""
    x, e = _num(v), _num(se)
    return _pct(v) if x is None or e is None else f"{_pct(v)} ± {100 * e:.1f}"


def behaviour_table_markdown(rows: Sequence[tuple[str, Summary]]) -> str:
    """Share of sampled responses with each tag (a tagger's behaviours), stages as columns; "" if none."""
    names = sorted({t for _, s in rows for t in (s.get("sample_tags") or {})})
    if not names:
        return ""
    lines = ["| behaviour (share of samples) | " + " | ".join(n for n, _ in rows) + " |",
             "|---|" + "---:|" * len(rows)]
    for t in names:
        lines.append(f"| {t} | " + " | ".join(_pct((s.get("sample_tags") or {}).get(t)) for _, s in rows) + " |")
    return "\n".join(lines)


def _length(v: Any) -> str:
    x = _num(v)
    return MISSING if x is None else f"{x:.1f}"


def _link(target: Path, base: Path) -> str:
    """A relative Markdown link target; <...> when it holds spaces."""
    rel = Path(os.path.relpath(target, base)).as_posix()
    return f"<{rel}>" if " " in rel else rel


def _inline_code(text: str) -> str:
    """Text as one inline code span, whatever backticks it holds."""
    text = " ".join(text.split("\n"))
    run = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * (run + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _code_block(text: str) -> str:
    """Text in a fenced block whose fence is longer than any backtick run inside."""
    run = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, run + 1)
    return f"{fence}text\n{text}\n{fence}"


def truncate_middle(text: str, limit: int = RESPONSE_CHARS) -> str:
    """Text cut to about ``limit`` chars, keeping the start and the end (where the answer is)."""
    if len(text) <= limit:
        return text
    head, tail = text[: limit * 2 // 3], text[-(limit // 3):]
    return f"{head}\n… [{len(text) - len(head) - len(tail)} chars omitted] …\n{tail}"


# --- header ----------------------------------------------------------------------------------
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def describe_machine() -> str:
    """CPU count, platform, Python / torch / transformers versions, and the GPU when torch is loaded."""
    parts = [f"{os.cpu_count()} CPUs", platform.platform(), f"Python {platform.python_version()}",
             f"torch {_version('torch')}", f"transformers {_version('transformers')}"]
    torch = sys.modules.get("torch")  # never import torch just for this line: it takes seconds
    if torch is not None and torch.cuda.is_available():
        parts.append(f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}")
    return ", ".join(parts)


def _header(title: str, pipeline_dir: Path, machine: str | None) -> str:
    return "\n".join([
        f"# {title}",
        "",
        f"- Date: {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- Machine: {machine if machine is not None else describe_machine()}",
        f"- Run directory: `{pipeline_dir.resolve()}`",
    ])


# --- tables ----------------------------------------------------------------------------------
def load_stage_rows(stages: Sequence[Stage]) -> list[tuple[str, dict[str, Any]]]:
    """(stage name, eval summary) of each stage that has an eval/summary.json, in stage order."""
    return [(name, s) for name, d in stages if (s := load_summary(d)) is not None]


def stage_table_markdown(rows: Sequence[tuple[str, Summary]]) -> str:
    """The held-out table: stage | greedy acc | pass@k | format | mean length | truncated.

    Accuracies and rates are shown in percent, lengths with one decimal, a missing value as "—".
    The pass@k header names k when every stage used the same k, else each cell does.
    """
    ks = {int(k) for _, s in rows if (k := _num(s.get("k"))) is not None}
    same_k = len(ks) == 1
    header = f"pass@{ks.pop()}" if same_k else "pass@k"
    # image reliance (thinkvl.eval.evaluate.image_reliance) only when some stage measured it
    vision = any(_num(s.get("image_reliance")) is not None for _, s in rows)
    top = any(_num(s.get("top_answer_share")) is not None for _, s in rows)
    reads = any(_num(s.get("reading_colors")) is not None for _, s in rows)
    swap = any(isinstance(s.get("image_swap"), Mapping) for _, s in rows)
    ns = {int(n) for _, s in rows if (n := _num(s.get("n_samples", s.get("k")))) is not None}
    avg_header = f"avg@{ns.pop()}" if len(ns) == 1 else "avg@n"
    lines = [f"| stage | greedy acc | {avg_header} | {header} | format | mean length | truncated |"
             + (" top answer |" if top else "") + (" reads colours |" if reads else "")
             + (" image reliance |" if vision else "") + (" image swap |" if swap else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if top else "") + ("---:|" if reads else "")
             + ("---:|" if vision else "") + ("---:|" if swap else "")]
    for name, s in rows:
        pass_k = _pct(s.get("pass_at_k"))
        if not same_k and _num(s.get("k")) is not None and pass_k != MISSING:
            pass_k += f" (k={int(s['k'])})"
        line = (f"| {name} | {_pm(s.get('greedy_pass1'), s.get('greedy_pass@1_se'))} "
                f"| {_pm(s.get('avg@n'), s.get('avg@n_se'))} | {pass_k} | {_pct(s.get('format_rate'))} "
                f"| {_length(s.get('mean_length'))} | {_pct(s.get('truncated_frac'))} |")
        if top:
            line += f" {_pct(s.get('top_answer_share'))} |"
        if reads:
            line += f" {_pct(s.get('reading_colors'))} |"
        if vision:
            r = _num(s.get("image_reliance"))
            line += f" {MISSING if r is None else f'{r:.2f}'} |"
        if swap:
            w = s.get("image_swap")
            line += (f" {_pct(w.get('greedy_own'))} -> {_pct(w.get('greedy_swapped'))} |"
                     if isinstance(w, Mapping) else f" {MISSING} |")
        lines.append(line)
    return "\n".join(lines)


def task_table_markdown(rows: Sequence[tuple[str, Summary]]) -> str:
    """Greedy accuracy per task (rows) and stage (columns), from each summary's ``by_task``; "" if none."""
    tasks: dict[str, Any] = {}
    for _, s in rows:
        for task, d in (s.get("by_task") or {}).items():
            if isinstance(d, Mapping):
                tasks.setdefault(task, d.get("n"))
    if not tasks:
        return ""
    def stat(s: Summary, task: str, key: str) -> Any:
        return ((s.get("by_task") or {}).get(task) or {}).get(key)

    # the best constant answer's accuracy: a property of the eval set, the same for every stage
    majority = {task: next((m for _, s in rows if (m := _num(stat(s, task, "majority_answer"))) is not None), None)
                for task in tasks}
    show_majority = any(m is not None for m in majority.values())
    lines = ["| task | n | " + ("majority answer | " if show_majority else "") + " | ".join(n for n, _ in rows) + " |",
             "|---|---:|" + ("---:|" if show_majority else "") + "---:|" * len(rows)]
    for task, n in tasks.items():
        cells = [_pct(stat(s, task, "greedy_pass1")) for _, s in rows]
        cells = ([_pct(majority[task])] if show_majority else []) + cells
        lines.append(f"| {task} | {n if n is not None else MISSING} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _results_section(rows: Sequence[tuple[str, Summary]]) -> str:
    if not rows:
        return "## Held-out evaluation\n\n_No stage has an eval/summary.json._"
    parts = ["## Held-out evaluation", "", stage_table_markdown(rows), "",
             "greedy acc: greedy pass@1 ± its standard error; avg@n: mean correctness of n samples per problem at the "
             "sampling temperature (pass@1 as DeepSeek-R1 reports it) ± its standard error; pass@k: at least one of k samples correct; format: responses in "
             "the expected think-then-answer format; mean length: mean response length in tokens; truncated: responses "
             "that hit the generation limit; image reliance (nats/token): log-prob of the greedy responses to image "
             "problems with their own image minus with another problem's image, about 0 when the model ignores images; "
             "image swap: greedy accuracy on the image problems with their own image -> with another problem's image "
             "of the same task and another answer (scored against their own answers; falls when the image is used); "
             "top answer: share of greedy answers equal to the most common greedy answer of their task (near 100%: "
             "the model answers a constant); reads colours: share of greedy responses to scene problems whose "
             "\"Row k: ...\" lines name every object's colour (digit) in the right row and order (shapes ignored)."]
    majority = next((m for _, s in rows if (m := _num(s.get("majority_answer"))) is not None), None)
    if majority is not None:
        parts += ["", f"Majority-answer baseline: answering every problem with its task's most common reference "
                      f"answer scores {_pct(majority)} on this set; accuracy at or below it shows no skill."]
    tasks = task_table_markdown(rows)
    if tasks:
        parts += ["", "### Greedy accuracy by task", "", tasks]
    behaviours = behaviour_table_markdown(rows)
    if behaviours:
        parts += ["", "### Behaviours", "", behaviours, "",
                  "Share of the sampled responses (avg@n's samples) with each tag of the run's tagger; for the demo: "
                  "glance = answers at a glance with no working, works = works the problem out, checks / repairs / "
                  "explores = a final check, a caught and repaired slip, a second way (thinkvl/demo/behaviours.py)."]
    return "\n".join(parts)


# --- plots -----------------------------------------------------------------------------------
def _plots_section(pipeline_dir: Path, stages: Sequence[Stage], plots: Sequence[Path]) -> str:
    parts = ["## Plots"]
    summary_pngs = [p for p in plots if p.parent == pipeline_dir / PLOTS_DIR]
    for p in summary_pngs:
        parts += ["", "### Stage comparison", "", f"![stage comparison]({_link(p, pipeline_dir)})"]
    for name, stage_dir in stages:
        for p in plots:
            if p.parent == stage_dir / PLOTS_DIR:
                parts += ["", f"### {name}", "", f"![{name} curves]({_link(p, pipeline_dir)})"]
    return "\n".join(parts)


# --- examples --------------------------------------------------------------------------------
def _is_rl_stage(name: str, stage_dir: Path) -> bool:
    """An RL stage by name (an ``rl`` word) or by its metrics (reward keys)."""
    if re.search(r"(^|[^a-z])rl([^a-z]|$)", name.lower()):
        return True
    try:
        return (stage_dir / METRICS_FILE).is_file() and detect_kind(read_metrics(stage_dir / METRICS_FILE)) == "rl"
    except ValueError:
        return False


def before_after_stages(stages: Sequence[Stage]) -> tuple[Stage, Stage] | None:
    """The (before, after) stages to compare: the last RL stage with responses and the one before it,
    else the last two stages with eval/responses.jsonl; None when fewer than two have responses."""
    with_resp = [s for s in stages if (s[1] / RESPONSES_FILE).is_file()]
    rl = [i for i, (name, d) in enumerate(with_resp) if i > 0 and _is_rl_stage(name, d)]
    if rl:
        return with_resp[rl[-1] - 1], with_resp[rl[-1]]
    return (with_resp[-2], with_resp[-1]) if len(with_resp) >= 2 else None


def _load_responses(stage_dir: Path) -> dict[str, Record]:
    out = {}
    for r in read_jsonl(stage_dir / RESPONSES_FILE):
        if "id" in r:
            # thinkvl.eval writes greedy_response / extracted_answer; the report reads response / extracted.
            r.setdefault("response", r.get("greedy_response"))
            r.setdefault("extracted", r.get("extracted_answer"))
            out[str(r["id"])] = r
    return out


def is_correct(record: Mapping[str, Any]) -> bool:
    """A response counts as correct when its score is above 0.5."""
    score = _num(record.get("score"))
    return score is not None and score > 0.5


def pick_examples(before: Mapping[str, Record], after: Mapping[str, Record], n: int) -> list[tuple[Record, Record]]:
    """Up to n (before, after) pairs of the same problem: fixed by the later stage first, then broken,
    then solved by both, then by neither; one per task before a task repeats; stable by id."""
    def category(i: str) -> int:
        b, a = is_correct(before[i]), is_correct(after[i])
        return 0 if a and not b else 1 if b and not a else 2 if a else 3

    ordered = sorted(set(before) & set(after), key=lambda i: (category(i), i))
    picked: list[str] = []
    seen_tasks: set[Any] = set()
    for i in ordered:
        task = before[i].get("task")
        if len(picked) < n and task not in seen_tasks:
            picked.append(i)
            seen_tasks.add(task)
    picked += [i for i in ordered if i not in picked][: n - len(picked)]
    picked.sort(key=lambda i: (category(i), i))
    return [(before[i], after[i]) for i in picked]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "image"


def _thumbnail(image: str, pid: str, pipeline_dir: Path) -> str:
    """A Markdown image of a thumbnail copy under report_assets/, or a note when the file is missing."""
    src = Path(image)
    if not src.is_file():
        return f"_(image not found: `{image}`)_"
    dst = pipeline_dir / ASSETS_DIR / f"{_slug(pid)}.png"
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        from PIL import Image

        with Image.open(src) as im:
            im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            (im if im.mode in ("RGB", "RGBA", "L") else im.convert("RGB")).save(dst, format="PNG")
    except OSError as err:  # not an image PIL reads: copy the file as it is
        log.warning("thumbnail of %s failed (%s); copying it", src, err)
        dst = dst.with_suffix(src.suffix or ".bin")
        shutil.copyfile(src, dst)
    return f"![problem {pid}]({_link(dst, pipeline_dir)})"


def _verdict(record: Mapping[str, Any]) -> str:
    return "✓" if is_correct(record) else "✗"


def _response_block(label: str, record: Mapping[str, Any]) -> str:
    verdict = _verdict(record)
    extracted = record.get("extracted")
    shown = _inline_code(str(extracted)) if extracted not in (None, "") else "_none_"
    score = _num(record.get("score"))
    score_note = f" (score {score:.2f})" if score is not None and score not in (0.0, 1.0) else ""
    response = truncate_middle(str(record.get("response") or ""))
    return f"**{label}**: extracted {shown} {verdict}{score_note}\n\n{_code_block(response)}"


def _example_markdown(k: int, pair: tuple[Record, Record], names: tuple[str, str], pipeline_dir: Path) -> str:
    before, after = pair
    pid = str(before["id"])
    parts = [f"### {k}. `{pid}` ({before.get('task', 'unknown task')}): {_verdict(before)} → {_verdict(after)}"]
    image = before.get("image") or after.get("image")
    if image:
        parts += ["", _thumbnail(str(image), pid, pipeline_dir)]
    question = str(before.get("question") or after.get("question") or "")
    parts += ["", "\n".join("> " + ln for ln in question.splitlines() or [""])]
    parts += ["", _response_block(f"Before ({names[0]})", before), "", _response_block(f"After ({names[1]})", after)]
    return "\n".join(parts)


def _examples_section(pipeline_dir: Path, stages: Sequence[Stage], n: int) -> str:
    pair = before_after_stages(stages)
    if pair is None or n <= 0:
        return ""
    (b_name, b_dir), (a_name, a_dir) = pair
    before, after = _load_responses(b_dir), _load_responses(a_dir)
    examples = pick_examples(before, after, n)
    common = set(before) & set(after)
    fixed = sum(not is_correct(before[i]) and is_correct(after[i]) for i in common)
    broken = sum(is_correct(before[i]) and not is_correct(after[i]) for i in common)
    title = "RL" if _is_rl_stage(a_name, a_dir) else a_name
    parts = [f"## Examples before and after {title}", "",
             f"{b_name} → {a_name}, {len(common)} shared problems: {fixed} fixed, {broken} broken."]
    if not examples:
        parts += ["", "_No problem id appears in both stages' responses._"]
    for k, ex in enumerate(examples, 1):
        parts += ["", _example_markdown(k, ex, (b_name, a_name), pipeline_dir)]
    return "\n".join(parts)


# --- entry point -----------------------------------------------------------------------------
def write_report(pipeline_dir: str | Path, title: str = "thinkvl demo", stages: list[tuple[str, Path]] | None = None,
                 machine: str | None = None, n_examples: int = 4) -> Path:
    """Write ``pipeline_dir/report.md`` (plots are (re)drawn first) and return its path.

    stages: (display name, stage directory) in pipeline order; by default the subfolders that hold
    metrics.jsonl or eval/summary.json. machine: a description to print instead of this machine's.
    """
    pipeline_dir = Path(pipeline_dir)
    stages = find_stages(pipeline_dir) if stages is None else [(n, Path(d)) for n, d in stages]
    if not stages:
        raise ValueError(f"{pipeline_dir}: no stage subfolders with {METRICS_FILE} or eval/summary.json")
    plots = plot_pipeline(pipeline_dir, stages)
    sections = [_header(title, pipeline_dir, machine), _results_section(load_stage_rows(stages)),
                _plots_section(pipeline_dir, stages, plots), _examples_section(pipeline_dir, stages, n_examples)]
    out = pipeline_dir / REPORT_FILE
    out.write_text("\n\n".join(s for s in sections if s) + "\n", encoding="utf-8")
    return out
