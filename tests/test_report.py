"""Plots and the Markdown report, on synthetic run directories."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from thinkvl.report.plots import detect_kind, ema, find_stages, plot_run, read_metrics
from thinkvl.report.report import (
    before_after_stages,
    pick_examples,
    stage_table_markdown,
    task_table_markdown,
    truncate_middle,
    write_report,
)

LONG_TAIL = "so the final answer is \\boxed{7}"


# --- fixtures --------------------------------------------------------------------------------
def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _sft_rows(n: int = 40, eval_every: int = 10, start_event: bool = True) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [{"step": 0, "event": "start", "model": "tiny", "world_size": 1}] if start_event else []
    for s in range(1, n + 1):
        row = {"step": s, "stage": "sft", "loss": 3.0 * math.exp(-s / 15) + 0.2 * math.sin(s), "lr": 1e-4 * min(1, s / 5),
               "supervised_tokens": 900, "tokens": 2048, "tokens_per_s": 5000.0, "packing_efficiency": 0.93,
               "grad_norm": 1.0 + 0.1 * (s % 3), "time/step": 0.4}
        if s % eval_every == 0:
            row.update({"eval/loss": 2.5 * math.exp(-s / 20), "eval/accuracy": s / (n + 5), "eval/format": 0.9,
                        "eval/response_length": 120.0 + s})
        rows.append(row)
    return rows


def _rl_rows(n: int = 30) -> list[dict[str, Any]]:
    rows = []
    for s in range(1, n + 1):
        row = {"step": s, "reward": 0.2 + s / 60, "reward/correct": 0.25 + s / 60, "reward/length": -0.05,
               "accuracy": 0.3 + s / 80, "response_length/mean": 300 - s, "response_length/max": 512,
               "response_length/correct_mean": 250 - s, "truncated_frac": 0.1 - s / 400, "zero_var_groups": 2,
               "kl": 0.001 * s, "entropy": 1.2 - s / 100, "lr": 1e-6, "gen_tokens_per_s": 800.0,
               "train_tokens_per_s": 3000.0, "sampler/pool": 64, "time/gen": 3.0}
        if s % 10 == 0:
            row["eval/accuracy"] = 0.4 + s / 100
        rows.append(row)
    return rows


SUMMARIES = {
    "01_sft_stage1": {"greedy_pass1": 0.25, "sampled_pass1": 0.2, "pass_at_k": 0.5, "k": 8, "mean_length": 123.4,
                      "median_length": 110, "format_rate": 0.9, "truncated_frac": 0.05,
                      "by_task": {"arith": {"n": 20, "greedy_pass1": 0.3}, "count": {"n": 12, "greedy_pass1": 0.2}}},
    "04_longcot_sft": {"greedy_pass1": 0.375, "sampled_pass1": 0.33, "pass_at_k": 0.625, "k": 8, "mean_length": 456.7,
                       "median_length": 400, "format_rate": 0.95, "truncated_frac": 0.125,
                       "by_task": {"arith": {"n": 20, "greedy_pass1": 0.4}, "count": {"n": 12, "greedy_pass1": 0.35}}},
    "05_rl": {"greedy_pass1": 0.5, "sampled_pass1": 0.45, "pass_at_k": 0.75, "k": 8, "mean_length": 321.0,
              "median_length": 300, "format_rate": 1.0, "truncated_frac": 0.0,
              "by_task": {"arith": {"n": 20, "greedy_pass1": 0.55}, "count": {"n": 12, "greedy_pass1": 0.5}}},
}
EXPECTED_ROWS = [
    "| 01_sft_stage1 | 25.0% | — | 50.0% | 90.0% | 123.4 | 5.0% |",
    "| 04_longcot_sft | 37.5% | — | 62.5% | 95.0% | 456.7 | 12.5% |",
    "| 05_rl | 50.0% | — | 75.0% | 100.0% | 321.0 | 0.0% |",
]


def _responses(image: Path, solved: set[str]) -> list[dict[str, Any]]:
    long_reasoning = "Let me think step by step. " * 60 + LONG_TAIL
    return [
        {"id": "p0", "task": "count", "image": str(image), "question": "How many red squares are in the image?",
         "response": long_reasoning, "extracted": "7", "score": float("p0" in solved)},
        {"id": "p1", "task": "arith", "image": None, "question": "What is 12 + 30?",
         "response": "<think>12 + 30 = 42</think> The answer is 42.", "extracted": "42" if "p1" in solved else "41",
         "score": float("p1" in solved)},
        {"id": "p2", "task": "arith", "image": None, "question": "What is 3 * 3?",
         "response": "9", "extracted": "9", "score": float("p2" in solved)},
        {"id": "p3", "task": "shape", "image": "/nonexistent/shape.png", "question": "Which shape is larger?",
         "response": "The circle.", "extracted": None, "score": float("p3" in solved)},
    ]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "images" / "p0.png"
    path.parent.mkdir(parents=True)
    Image.new("RGB", (640, 480), (200, 30, 30)).save(path)
    return path


@pytest.fixture
def pipeline(tmp_path: Path, image: Path) -> Path:
    root = tmp_path / "demo"
    solved = {"01_sft_stage1": {"p2"}, "04_longcot_sft": {"p2", "p3"}, "05_rl": {"p0", "p1", "p2"}}
    for name, summary in SUMMARIES.items():
        stage = root / name
        _write_jsonl(stage / "metrics.jsonl", _rl_rows() if name == "05_rl" else _sft_rows())
        (stage / "eval").mkdir(parents=True)
        (stage / "eval" / "summary.json").write_text(json.dumps(summary))
        _write_jsonl(stage / "eval" / "responses.jsonl", _responses(image, solved[name]))
    (root / "02_distill").mkdir()  # a stage folder without metrics or eval: not a stage
    return root


def _assert_png(path: Path, min_w: int = 400, min_h: int = 250) -> None:
    assert path.is_file() and path.suffix == ".png"
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] >= min_w and im.size[1] >= min_h, im.size


# --- metrics reading -------------------------------------------------------------------------
def test_read_metrics_skips_events_and_non_numeric(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "metrics.jsonl", _sft_rows(n=5))
    rows = read_metrics(path)
    assert rows[0] == {"step": 0.0, "world_size": 1.0}  # the start event keeps only its numbers
    assert len([r for r in rows if "loss" in r]) == 5
    assert "stage" not in rows[1] and rows[1]["loss"] > 0
    assert detect_kind(rows) == "sft"
    assert detect_kind(read_metrics(_write_jsonl(tmp_path / "rl.jsonl", _rl_rows(3)))) == "rl"


def test_empty_metrics_names_the_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match=re.escape(str(run / "metrics.jsonl"))):
        plot_run(run)
    _write_jsonl(run / "metrics.jsonl", [{"step": 0, "event": "start"}])
    with pytest.raises(ValueError, match="metrics.jsonl"):
        plot_run(run)


def test_no_metrics_and_no_stages(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        plot_run(tmp_path)


def test_ema() -> None:
    assert ema([2.0] * 20) == pytest.approx([2.0] * 20)
    assert ema([1.0, 5.0, 3.0]) == [1.0, 5.0, 3.0]  # too short to smooth
    noisy = [float(i % 2) for i in range(100)]
    smooth = ema(noisy)
    assert smooth[0] == 0.0
    assert max(smooth[50:]) - min(smooth[50:]) < 0.2


# --- plots -----------------------------------------------------------------------------------
def test_plot_sft_run(tmp_path: Path) -> None:
    run = tmp_path / "sft"
    _write_jsonl(run / "metrics.jsonl", _sft_rows())
    paths = plot_run(run)
    assert paths == [run / "plots" / "sft_curves.png"]
    _assert_png(paths[0])


def test_plot_rl_run(tmp_path: Path) -> None:
    run = tmp_path / "rl"
    _write_jsonl(run / "metrics.jsonl", _rl_rows())
    paths = plot_run(str(run))
    assert paths == [run / "plots" / "rl_curves.png"]
    _assert_png(paths[0], min_w=800, min_h=500)  # a 2 x 3 grid


def test_missing_keys_do_not_crash(tmp_path: Path) -> None:
    sft = tmp_path / "sft"
    _write_jsonl(sft / "metrics.jsonl", [{"loss": 2.0 - i / 10} for i in range(5)])  # no step, no lr, no eval
    _assert_png(plot_run(sft)[0], min_w=300)
    rl = tmp_path / "rl"
    rows = [{"step": i, "reward": i / 10, "kl": None, "entropy": "nan"} for i in range(12)]
    rows[3]["kl"] = 0.01
    rows += [{"step": 12, "reward/length": float("nan")}, {"step": 13}]
    _write_jsonl(rl / "metrics.jsonl", rows)
    _assert_png(plot_run(rl)[0], min_w=300)


def test_unknown_keys_only_is_a_clear_error(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1, "time/step": 0.3}])
    with pytest.raises(ValueError, match="none of the SFT keys"):
        plot_run(tmp_path)


def test_plot_pipeline(pipeline: Path) -> None:
    assert [n for n, _ in find_stages(pipeline)] == list(SUMMARIES)
    paths = plot_run(pipeline)
    assert set(paths) == {pipeline / "01_sft_stage1" / "plots" / "sft_curves.png",
                          pipeline / "04_longcot_sft" / "plots" / "sft_curves.png",
                          pipeline / "05_rl" / "plots" / "rl_curves.png",
                          pipeline / "plots" / "stages.png"}
    for p in paths:
        _assert_png(p)


def _drop_metrics(pipeline: Path) -> None:
    """Only the eval summaries stay: fewer figures to draw where the curves are not the point."""
    for stage in SUMMARIES:
        (pipeline / stage / "metrics.jsonl").unlink()


def test_pipeline_skips_a_broken_stage(pipeline: Path, caplog: pytest.LogCaptureFixture) -> None:
    _drop_metrics(pipeline)
    (pipeline / "04_longcot_sft" / "metrics.jsonl").write_text("")
    with caplog.at_level(logging.WARNING):
        paths = plot_run(pipeline)
    assert paths == [pipeline / "plots" / "stages.png"]
    assert "04_longcot_sft" in caplog.text and "metrics.jsonl" in caplog.text
    for stage in SUMMARIES:
        (pipeline / stage / "eval" / "summary.json").unlink()
    (pipeline / "04_longcot_sft" / "metrics.jsonl").unlink()
    (pipeline / "05_rl" / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_run(pipeline)


# --- report ----------------------------------------------------------------------------------
def test_stage_table_markdown() -> None:
    table = stage_table_markdown(list(SUMMARIES.items()))
    lines = table.splitlines()
    assert lines[0] == "| stage | greedy acc | avg@8 | pass@8 | format | mean length | truncated |"
    assert lines[2:] == EXPECTED_ROWS
    mixed = stage_table_markdown([("a", {"pass_at_k": 0.5, "k": 4}), ("b", {"pass_at_k": 0.25, "k": 16}), ("c", {})])
    assert mixed.splitlines()[2:] == ["| a | — | — | 50.0% (k=4) | — | — | — |",
                                      "| b | — | — | 25.0% (k=16) | — | — | — |", "| c | — | — | — | — | — | — |"]
    with_se = stage_table_markdown([("a", {"greedy_pass1": 0.5, "greedy_pass@1_se": 0.0323, "avg@n": 0.25,
                                           "avg@n_se": 0.011, "n_samples": 8, "k": 8})]).splitlines()
    assert with_se[0].startswith("| stage | greedy acc | avg@8 | pass@8 |")
    assert with_se[2].startswith("| a | 50.0% ± 3.2 | 25.0% ± 1.1 | — |")
    assert "pass@k" in mixed.splitlines()[0]
    vision = stage_table_markdown([("a", {"image_reliance": 0.513}), ("b", {"image_reliance": None})]).splitlines()
    assert vision[0].endswith("| truncated | image reliance |")
    assert vision[2:] == ["| a | — | — | — | — | — | — | 0.51 |", "| b | — | — | — | — | — | — | — |"]
    top = stage_table_markdown([("a", {"top_answer_share": 0.925, "image_reliance": 0.1})]).splitlines()
    assert top[0].endswith("| truncated | top answer | image reliance |")
    assert top[2] == "| a | — | — | — | — | — | — | 92.5% | 0.10 |"
    reads = stage_table_markdown([("a", {"top_answer_share": 0.5, "reading_colors": 0.875}), ("b", {})]).splitlines()
    assert reads[0].endswith("| truncated | top answer | reads colours |")
    assert reads[2:] == ["| a | — | — | — | — | — | — | 50.0% | 87.5% |",
                        "| b | — | — | — | — | — | — | — | — |"]


def test_task_table_shows_the_majority_answer_once() -> None:
    rows = [("sft", {"by_task": {"count": {"n": 40, "greedy_pass1": 0.55, "majority_answer": 0.6}}}),
            ("rl", {"by_task": {"count": {"n": 40, "greedy_pass1": 0.6, "majority_answer": 0.6}}})]
    lines = task_table_markdown(rows).splitlines()
    assert lines[0] == "| task | n | majority answer | sft | rl |"
    assert lines[2] == "| count | 40 | 60.0% | 55.0% | 60.0% |"
    assert task_table_markdown([("sft", {"by_task": {"count": {"n": 4, "greedy_pass1": 0.5}}})]).splitlines()[0] == \
        "| task | n | sft |"


def test_truncate_middle_keeps_the_answer() -> None:
    text = "x" * 2000 + LONG_TAIL
    cut = truncate_middle(text)
    assert len(cut) < 700 and cut.endswith(LONG_TAIL) and "chars omitted" in cut
    assert truncate_middle("short") == "short"


def test_pick_examples_prefers_flips_and_task_variety() -> None:
    def rec(i: str, task: str, score: float) -> dict[str, Any]:
        return {"id": i, "task": task, "score": score}

    before = {"a": rec("a", "t1", 0), "b": rec("b", "t1", 0), "c": rec("c", "t2", 1), "d": rec("d", "t3", 1)}
    after = {"a": rec("a", "t1", 1), "b": rec("b", "t1", 1), "c": rec("c", "t2", 0), "d": rec("d", "t3", 1),
             "e": rec("e", "t4", 1)}
    got = [b["id"] for b, _ in pick_examples(before, after, 3)]
    assert got == ["a", "c", "d"]  # a fix, a regression, then a different task before a second t1 fix
    assert [b["id"] for b, _ in pick_examples(before, after, 10)] == ["a", "b", "c", "d"]


def test_before_after_stages(pipeline: Path) -> None:
    stages = find_stages(pipeline)
    (b_name, _), (a_name, _) = before_after_stages(stages)
    assert (b_name, a_name) == ("04_longcot_sft", "05_rl")
    assert before_after_stages(stages[:1]) is None


def test_write_report(pipeline: Path, image: Path) -> None:
    out = write_report(pipeline, machine="test box, 2 CPUs")
    assert out == pipeline / "report.md"
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# thinkvl demo\n")
    assert f"Date: {dt.date.today().isoformat()}" in text and "Machine: test box, 2 CPUs" in text
    for row in EXPECTED_ROWS:
        assert row + "\n" in text
    assert "| arith | 20 | 30.0% | 40.0% | 55.0% |" in text

    links = re.findall(r"\]\(<?([^)>]+)>?\)", text)
    assert "plots/stages.png" in links and "05_rl/plots/rl_curves.png" in links
    assert "01_sft_stage1/plots/sft_curves.png" in links
    for link in links:
        assert not Path(link).is_absolute() and (pipeline / link).is_file(), link

    # examples: 04_longcot_sft -> 05_rl, fixes first, one per task first
    assert "## Examples before and after RL" in text
    assert "4 shared problems: 2 fixed, 1 broken." in text
    assert "`p0` (count): ✗ → ✓" in text and "`p1` (arith): ✗ → ✓" in text and "`p3` (shape): ✓ → ✗" in text
    assert "> How many red squares are in the image?" in text
    assert "**After (05_rl)**: extracted `7` ✓" in text and "**Before (04_longcot_sft)**: extracted `41` ✗" in text
    assert "**After (05_rl)**: extracted _none_ ✗" in text
    assert "chars omitted" in text and LONG_TAIL in text
    assert "image not found: `/nonexistent/shape.png`" in text
    thumb = pipeline / "report_assets" / "p0.png"
    assert "report_assets/p0.png" in links
    with Image.open(thumb) as im:
        assert max(im.size) == 256


def test_write_report_default_machine_and_named_stages(pipeline: Path) -> None:
    _drop_metrics(pipeline)
    stages = [("SFT", pipeline / "01_sft_stage1"), ("RL", pipeline / "05_rl")]
    text = write_report(pipeline, title="custom", stages=stages).read_text(encoding="utf-8")
    assert text.startswith("# custom\n")
    assert re.search(r"Machine: \d+ CPUs, .*torch .*transformers ", text)
    assert "| SFT | 25.0% | — | 50.0% | 90.0% | 123.4 | 5.0% |" in text
    assert "| RL | 50.0% | — | 75.0% | 100.0% | 321.0 | 0.0% |" in text
    assert "04_longcot_sft" not in text
    assert "**Before (SFT)**" in text


def test_write_report_without_responses(pipeline: Path) -> None:
    _drop_metrics(pipeline)
    for stage in SUMMARIES:
        (pipeline / stage / "eval" / "responses.jsonl").unlink()
    text = write_report(pipeline, machine="m").read_text(encoding="utf-8")
    assert "## Examples" not in text and EXPECTED_ROWS[0] in text
