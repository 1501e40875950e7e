"""The pipeline end to end at toy size: stage markers and lineage, eval summaries, skipping finished
stages, re-running a changed stage and everything after it, continuing an interrupted stage, and the
report's stage table.

The tests share one pipeline directory and run in file order: each starts from "every stage done
with the current config" and leaves it so. Stage recipes are the demo ones (recipes/demo/*.yaml),
shrunk by overrides.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from thinkvl.pipeline import RECIPES, EvalSpec, PipelineConfig, StageSpec, _fingerprint, run_pipeline

torch.set_num_threads(1)

STAGES = ["data", "joint_sft", "label", "distill", "longcot_sft", "rl"]
DIRS = {name: f"{i + 1:02d}_{name}" for i, name in enumerate(STAGES)}
DEMO = RECIPES / "demo"


def pipeline_config(out_dir: Path, model_dir: Path, longcot_extra: list[str]) -> PipelineConfig:
    """synth 40/8/8 -> joint SFT (2 steps, eval) -> label (n=1) -> distill -> long-CoT SFT (2 steps)
    -> RL (1 iteration, eval); eval on 4 problems, k=1, 16 new tokens. The model flows through {model}
    except into RL, which names the long-CoT stage's folder."""
    return PipelineConfig(
        out_dir=str(out_dir),
        seed=0,
        eval=EvalSpec(problems="{data}/eval.jsonl", limit=4, k=1, max_new_tokens=16, verifier="math"),
        stages=[
            StageSpec(name="data", kind="synth", args={"n_sft": 40, "n_rl": 8, "n_eval": 8}),
            StageSpec(name="joint_sft", kind="sft", recipe=str(DEMO / "sft.yaml"), eval=True, overrides=[
                f"model.path={model_dir}", "data.sources.0.path={data}/sft.jsonl", "seed={seed}",
                "max_steps=2", "save_every=0"]),
            StageSpec(name="label", kind="label", recipe=str(DEMO / "label.yaml"), overrides=[
                "model={model}", "problems={data}/rl.jsonl", "out={out}/rl_labelled.jsonl", "seed={seed}",
                "n=1", "max_new_tokens=16"]),
            StageSpec(name="distill", kind="distill", recipe=str(DEMO / "distill.yaml"), overrides=[
                "problems={stage:label}/rl_labelled.jsonl", "out={out}/longcot.jsonl", "seed={seed}"]),
            StageSpec(name="longcot_sft", kind="sft", recipe=str(DEMO / "longcot_sft.yaml"), overrides=[
                "model.path={model}", "data.sources.0.path={stage:distill}/longcot.jsonl", "seed={seed}",
                "max_steps=2", "save_every=0", *longcot_extra]),
            # {stage:NAME} of a training stage: its folder gets later stages' log lines and the report's
            # plots, which must not count as a changed input
            StageSpec(name="rl", kind="rl", recipe=str(DEMO / "rl.yaml"), eval=True, overrides=[
                "model.path={stage:longcot_sft}/final", "data.problems={stage:label}/rl_labelled.jsonl", "seed={seed}",
                "iterations=1", "rollout.prompts_per_iter=2", "rollout.k=2", "rollout.max_new_tokens=16",
                "save_every=0"]),
        ],
    )


@pytest.fixture(scope="module")
def pipe(tiny_dir, tmp_path_factory) -> dict:
    """The shared pipeline: its directory, the model it starts from, the current long-CoT overrides."""
    root = tmp_path_factory.mktemp("pipeline")
    state = {"dir": root / "pipe", "model": tiny_dir, "longcot_extra": []}
    run(state)
    return state


def run(state: dict, caplog=None) -> tuple[set[str], set[str]]:
    """Run the pipeline; returns (stages that ran, stages skipped) as read from the log."""
    if caplog is not None:
        caplog.clear()
    run_pipeline(pipeline_config(state["dir"], state["model"], state["longcot_extra"]))
    if caplog is None:
        return set(), set()
    ran, skipped = set(), set()
    for rec in caplog.records:
        msg = rec.getMessage()
        if m := re.match(r"stage (\w+) \(\w+\) -> ", msg):
            ran.add(m.group(1))
        if m := re.match(r"stage (\w+): done with the same config and inputs, skipped", msg):
            skipped.add(m.group(1))
    return ran, skipped


def marker(pipe_dir: Path, name: str) -> dict:
    return json.loads((pipe_dir / DIRS[name] / "stage.json").read_text())


def snapshot(pipe_dir: Path) -> dict[str, dict[str, int]]:
    """Per stage: mtime_ns of stage.json, of every file under final/ and of metrics.jsonl / eval/."""
    out = {}
    for name in STAGES:
        d = pipe_dir / DIRS[name]
        files = [d / "stage.json", d / "metrics.jsonl", *sorted((d / "final").glob("*")),
                 *sorted((d / "eval").glob("*"))]
        out[name] = {str(f.relative_to(d)): f.stat().st_mtime_ns for f in files if f.is_file()}
    return out


def metric_lines(pipe_dir: Path, name: str) -> list[dict]:
    path = pipe_dir / DIRS[name] / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


# --- first run ------------------------------------------------------------------------------


def test_first_run_markers_lineage_and_evals(pipe):
    p = pipe["dir"]
    path = {name: str(p / DIRS[name]) for name in STAGES}
    final = {name: str(p / DIRS[name] / "final") for name in ("joint_sft", "longcot_sft", "rl")}
    markers = {name: marker(p, name) for name in STAGES}
    for name, m in markers.items():
        assert m["status"] == "done" and m["name"] == name and re.fullmatch(r"[0-9a-f]{16}", m["key"]), name
        # recorded fingerprints are those of the inputs as they are now
        assert all(fp == _fingerprint(Path(inp)) for inp, fp in m["inputs"].items()), name
    # lineage: each stage names the folders it read, the latest model first of all
    assert set(markers["data"]["inputs"]) == set()
    assert set(markers["joint_sft"]["inputs"]) == {path["data"]}
    assert set(markers["label"]["inputs"]) == {final["joint_sft"], path["data"]}
    assert set(markers["distill"]["inputs"]) == {path["label"]}
    assert set(markers["longcot_sft"]["inputs"]) == {final["joint_sft"], path["distill"]}
    assert set(markers["rl"]["inputs"]) == {path["longcot_sft"], path["label"]}
    assert [markers[n]["model"] for n in STAGES] == [None, final["joint_sft"], None, None, final["longcot_sft"],
                                                     final["rl"]]
    assert markers["rl"]["resolved"]["config"]["model"]["path"] == final["longcot_sft"]
    assert markers["rl"]["resolved"]["config"]["out_dir"] == path["rl"]

    # what each stage produced
    labelled = [json.loads(ln) for ln in (p / DIRS["label"] / "rl_labelled.jsonl").read_text().splitlines()]
    assert len(labelled) == 8 and all(0.0 <= r["difficulty"] <= 1.0 for r in labelled)
    assert (p / DIRS["distill"] / "longcot.jsonl").stat().st_size > 0
    for name in ("joint_sft", "longcot_sft", "rl"):
        assert (p / DIRS[name] / "final" / "model.safetensors").is_file()
    assert [m["step"] for m in metric_lines(p, "longcot_sft") if "loss" in m] == [1, 2]
    assert [m["step"] for m in metric_lines(p, "rl")] == [1]

    # eval: true -> eval/summary.json on the 4 held-out problems; eval: false -> none
    for name in ("joint_sft", "rl"):
        summary = json.loads((p / DIRS[name] / "eval" / "summary.json").read_text())
        assert summary["settings"]["k"] == 1 and summary["settings"]["n_problems"] == 4
        assert summary["settings"]["max_new_tokens"] == 16
    for name in ("data", "label", "distill", "longcot_sft"):
        assert not (p / DIRS[name] / "eval").exists()


def test_report_has_a_row_per_evaluated_stage(pipe):
    from thinkvl.report.report import write_report

    report = write_report(pipe["dir"], machine="test machine")
    text = report.read_text()
    lines = text.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("| stage | greedy acc |"))
    table_rows = []  # the stage table: the rows under its header, up to the blank line
    for ln in lines[head + 2:]:
        if not ln.startswith("|"):
            break
        table_rows.append(ln)
    assert [r.split("|")[1].strip() for r in table_rows] == [DIRS["joint_sft"], DIRS["rl"]]
    for name, row in zip(("joint_sft", "rl"), table_rows):
        overall = json.loads((pipe["dir"] / DIRS[name] / "eval" / "summary.json").read_text())["overall"]
        assert row.startswith(f"| {DIRS[name]} | {100 * overall['greedy_pass@1']:.1f}% ± "
                              f"{100 * overall['greedy_pass@1_se']:.1f} | {100 * overall['avg@n']:.1f}% ± "
                              f"{100 * overall['avg@n_se']:.1f} | {100 * overall['pass@k']:.1f}% |")
        assert f"| {overall['mean_length']:.1f} |" in row
    assert "| stage | greedy acc | avg@1 | pass@1 |" in text


# --- re-runs --------------------------------------------------------------------------------


def test_second_run_skips_every_stage(pipe, caplog):
    before = snapshot(pipe["dir"])
    with caplog.at_level(logging.INFO, logger="thinkvl"):
        ran, skipped = run(pipe, caplog)
    assert ran == set() and skipped == set(STAGES)
    assert snapshot(pipe["dir"]) == before  # no file rewritten, no metric line added


def test_changed_override_reruns_that_stage_and_the_later_ones(pipe, caplog):
    p = pipe["dir"]
    before = snapshot(p)
    old_markers = {name: marker(p, name) for name in STAGES}
    old_weights = load_file(p / DIRS["longcot_sft"] / "final" / "model.safetensors")
    pipe["longcot_extra"] = ["stages.0.lr_peak=5.0e-3"]
    with caplog.at_level(logging.INFO, logger="thinkvl"):
        ran, skipped = run(pipe, caplog)
    assert skipped == {"data", "joint_sft", "label", "distill"}
    assert ran == {"longcot_sft", "rl"}
    after = snapshot(p)
    for name in ("data", "joint_sft", "label", "distill"):
        assert after[name] == before[name], name
    for name in ("longcot_sft", "rl"):
        assert marker(p, name)["key"] != old_markers[name]["key"] and marker(p, name)["status"] == "done"
    # RL's config is unchanged, but its input model is not
    fp_key = str(p / DIRS["longcot_sft"])
    assert marker(p, "rl")["resolved"] == old_markers["rl"]["resolved"]
    assert marker(p, "rl")["inputs"][fp_key] != old_markers["rl"]["inputs"][fp_key]

    # The changed stage trained afresh with the new setting (not resumed from the old run's checkpoint):
    # new weights, and a metrics file holding only the new run.
    lines = metric_lines(p, "longcot_sft")
    assert [m["step"] for m in lines if "loss" in m] == [1, 2]
    assert lines[1]["lr"] == pytest.approx(5.0e-3)  # 2 steps: no warm-up step, step 1 runs at the new peak
    new_weights = load_file(p / DIRS["longcot_sft"] / "final" / "model.safetensors")
    assert any(not torch.equal(old_weights[k], new_weights[k]) for k in old_weights)
    assert [m["step"] for m in metric_lines(p, "rl")] == [1]
    for name in ("longcot_sft", "rl"):
        assert "resumed from" not in (p / DIRS[name] / "train.log").read_text()


def test_interrupted_stage_is_run_again(pipe, caplog):
    p = pipe["dir"]
    rl = p / DIRS["rl"]
    # Interrupted after its last checkpoint, before the export and the eval: marker still "running".
    m = marker(p, "rl")
    (rl / "stage.json").write_text(json.dumps(dict(m, status="running")))
    shutil.rmtree(rl / "final")
    shutil.rmtree(rl / "eval")
    before = snapshot(p)
    with caplog.at_level(logging.INFO, logger="thinkvl"):
        ran, skipped = run(pipe, caplog)
    assert ran == {"rl"} and skipped == set(STAGES) - {"rl"}
    for name in STAGES[:-1]:
        assert snapshot(p)[name] == before[name]
    m2 = marker(p, "rl")
    assert m2["status"] == "done" and m2["key"] == m["key"]
    assert "resumed from" in (rl / "train.log").read_text()  # continued from its own checkpoint
    assert [x["step"] for x in metric_lines(p, "rl")] == [1]
    assert (rl / "final" / "model.safetensors").is_file() and (rl / "eval" / "summary.json").is_file()

    # An interrupted SFT stage continues from its checkpoint too (same weights as the run it continues),
    # and the stages after it run again because their input was rewritten.
    lc = p / DIRS["longcot_sft"]
    weights = load_file(lc / "final" / "model.safetensors")
    (lc / "stage.json").write_text(json.dumps(dict(marker(p, "longcot_sft"), status="running")))
    shutil.rmtree(lc / "final")
    with caplog.at_level(logging.INFO, logger="thinkvl"):
        ran, skipped = run(pipe, caplog)
    assert ran == {"longcot_sft", "rl"} and skipped == {"data", "joint_sft", "label", "distill"}
    assert "resumed from" in (lc / "train.log").read_text()
    resumed = load_file(lc / "final" / "model.safetensors")
    assert weights.keys() == resumed.keys() and all(torch.equal(weights[k], resumed[k]) for k in weights)
    assert marker(p, "longcot_sft")["status"] == marker(p, "rl")["status"] == "done"


@pytest.mark.parametrize("name", ["pipeline.yaml", "pipeline_quick.yaml"])
def test_demo_pipelines_resolve_every_stage(name, tmp_path):
    """`thinkvl demo` runs pipeline.yaml, which CI never runs whole: every stage's recipe and
    overrides must resolve to a valid config, each placeholder naming an earlier stage."""
    from thinkvl.config import load_config
    from thinkvl.pipeline import Context, _stage_config

    cfg = load_config(PipelineConfig, DEMO / name, [f"out_dir={tmp_path}"])
    ctx = Context(cfg, DEMO)
    ctx.values["data"] = str(tmp_path / "01_data")
    for i, spec in enumerate(cfg.stages):
        out = ctx.stage_dir(i, spec)
        if spec.kind != "synth":
            resolved = _stage_config(spec, ctx, out)
            if spec.name == "longcot_sft":  # both distilled sets, from the stages before it
                paths = [s.path for s in resolved.data.sources]
                assert paths == [str(tmp_path / f"{j + 1:02d}_{n}" / "longcot.jsonl")
                                 for j, n in enumerate(s.name for s in cfg.stages) if n.startswith("distill")]
        ctx.values[f"stage:{spec.name}"] = str(out)
        if spec.kind in ("sft", "rl"):
            ctx.values["model"] = str(out / "final")
