"""All stages of the recipe in one run: each stage's output feeds the next.

A pipeline YAML lists stages; each names a kind (synth | sft | distill | label | rl) and a recipe
with overrides. Strings in a stage may refer to earlier results:
    {out}          this stage's run directory
    {data}         the synth stage's folder
    {model}        the final/ model of the latest model-producing stage (sft or rl)
    {stage:NAME}   the run directory of stage NAME
    {seed}         the pipeline seed
Every stage directory gets `stage.json`: its kind, resolved config, input fingerprints (lineage),
and status. Re-running skips stages that finished with the same config and inputs, and resumes an
interrupted one (SFT/RL continue from their latest checkpoint). With `eval: true` a stage's final
model is evaluated on the pipeline's held-out problems into `<stage>/eval/`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from thinkvl.config import ConfigError, apply_overrides, from_dict, load_config, to_dict
from thinkvl.rollout.engine import EngineConfig, build_engine

log = logging.getLogger("thinkvl")
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class StageSpec:
    name: str = ""
    kind: Literal["synth", "sft", "distill", "label", "rl"] = "sft"
    recipe: str | None = None  # YAML recipe of this stage (relative to the pipeline file)
    overrides: list[str] = field(default_factory=list)  # key=value, with {placeholders}
    args: dict = field(default_factory=dict)  # synth: n_sft, n_rl, n_eval
    eval: bool = False  # evaluate the stage's final model on the held-out problems

    def check(self, prefix: str) -> None:
        if not self.name:
            raise ConfigError(f"{prefix}.name: every stage needs a name")


@dataclass
class EvalSpec:
    problems: str = "{data}/eval.jsonl"  # held-out problems
    limit: int = 200
    k: int = 4  # samples per problem: avg@k (their mean correctness) and pass@k
    temperature: float = 1.0  # of the samples; the rollout temperature is the usual choice
    max_new_tokens: int = 256
    verifier: str = "math"
    require_format: bool = False  # a response without the think-then-answer format scores 0
    tagger: str = ""  # module:function tagging each response (behaviour shares), e.g. the demo's
    swap_images: bool = False  # also greedy accuracy with each image problem shown another's image
    rollout: EngineConfig = field(default_factory=EngineConfig)  # eval.rollout.engine: hf | vllm


@dataclass
class PipelineConfig:
    out_dir: str = "runs/pipeline"
    seed: int = 0
    stages: list[StageSpec] = field(default_factory=list)
    eval: EvalSpec = field(default_factory=EvalSpec)

    def check(self, prefix: str) -> None:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError("stages: stage names must be unique")


# Top-level entries of a stage folder that are not its product: its marker, the run log (later stages'
# lines land there too) and the report's plots. They change after the stage is done.
NOT_CONTENT = ("stage.json", "train.log", "plots")


def _fingerprint(path: Path) -> str:
    """Cheap identity of an input: size + mtime (ns) of every file (recursively for folders, without
    the NOT_CONTENT entries)."""
    if not path.exists():
        return "missing"
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.relative_to(path).parts[0] not in NOT_CONTENT)
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class Context:
    def __init__(self, cfg: PipelineConfig, base: Path):
        self.cfg = cfg
        self.base = base
        self.out = Path(cfg.out_dir)
        self.values: dict[str, str] = {"seed": str(cfg.seed)}
        self.inputs: list[str] = []

    def stage_dir(self, i: int, spec: StageSpec) -> Path:
        return self.out / f"{i + 1:02d}_{spec.name}"

    def fill(self, text: str) -> str:
        for key, val in self.values.items():
            placeholder = "{" + key + "}"
            if placeholder in text:
                text = text.replace(placeholder, val)
                if key in ("model", "data") or key.startswith("stage:"):
                    self.inputs.append(val)
        left = re.search(r"\{(model|data|stage:[^}]*)\}", text)
        if left:
            raise ConfigError(f"{left.group(0)} in {text!r} refers to a stage that has not run (yet)")
        return text


def _stage_config(spec: StageSpec, ctx: Context, out: Path):
    """Resolved config object of a training stage (placeholders filled, out_dir set)."""
    from thinkvl.distill.longcot import DistillConfig
    from thinkvl.rl.difficulty import LabelConfig
    from thinkvl.rl.loop import RLConfig
    from thinkvl.train.sft import SFTConfig

    cls = {"sft": SFTConfig, "rl": RLConfig, "distill": DistillConfig, "label": LabelConfig}[spec.kind]
    data: dict = {}
    if spec.recipe:
        p = Path(spec.recipe)
        p = p if p.is_absolute() else ctx.base / p
        if not p.is_file():
            raise ConfigError(f"stages.{spec.name}.recipe: no such file {p}")
        data = yaml.safe_load(p.read_text()) or {}
    ctx.values["out"] = str(out)
    data = apply_overrides(data, [ctx.fill(o) for o in spec.overrides])
    if spec.kind in ("sft", "rl"):
        data["out_dir"] = str(out)
    return from_dict(cls, data, f"stages.{spec.name}")


def _run_stage(spec: StageSpec, cfg_obj, out: Path, seed: int) -> str | None:
    """Run one stage; returns the produced model folder, if any."""
    if spec.kind == "synth":
        from thinkvl.demo.tasks import synth

        synth(out, seed=seed, **spec.args)
        return None
    if spec.kind == "sft":
        from thinkvl.train.sft import train

        return str(train(cfg_obj).final_dir)
    if spec.kind == "rl":
        from thinkvl.rl.loop import train as rl_train

        return str(rl_train(cfg_obj).final_dir)
    if spec.kind == "distill":
        from thinkvl.distill.longcot import build

        build(cfg_obj)
        return None
    from thinkvl.rl.difficulty import label

    label(cfg_obj)
    return None


def evaluate_stage(model_dir: str, ctx: Context, out: Path) -> dict:
    from thinkvl.data.formats import read_records
    from thinkvl.eval.evaluate import evaluate, load_tagger, write_eval
    from thinkvl.models.load import load

    e = ctx.cfg.eval
    problems = read_records(ctx.fill(e.problems), "problem", limit=e.limit)
    loaded = load(model_dir)
    loaded.model.eval()
    tagger = load_tagger(e.tagger)  # before the engine: a bad name fails without starting vLLM
    engine = build_engine(e.rollout.engine, loaded, model_dir, vllm=e.rollout.vllm, seed=ctx.cfg.seed)
    try:
        res = evaluate(loaded, problems, verifier=e.verifier, k=e.k, max_new_tokens=e.max_new_tokens,
                       temperature=e.temperature, seed=ctx.cfg.seed, require_format=e.require_format,
                       tagger=tagger, engine=engine, swap_images=e.swap_images)
    finally:
        getattr(engine, "close", lambda: None)()
    write_eval(res, out / "eval")
    return json.loads((out / "eval" / "summary.json").read_text())


def run_pipeline(recipe: str | Path | PipelineConfig, overrides: list[str] | None = None) -> Path:
    """Run (or continue) a pipeline; returns its directory."""
    if isinstance(recipe, PipelineConfig):
        cfg, base = recipe, Path.cwd()
    else:
        cfg, base = load_config(PipelineConfig, recipe, overrides), Path(recipe).resolve().parent
    ctx = Context(cfg, base)
    ctx.out.mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(cfg.stages):
        out = ctx.stage_dir(i, spec)
        ctx.inputs = []
        cfg_obj = None if spec.kind == "synth" else _stage_config(spec, ctx, out)
        # The held-out eval settings belong to the key of the stages they evaluate.
        resolved = {"kind": spec.kind, "args": spec.args, "config": to_dict(cfg_obj),
                    "eval": to_dict(cfg.eval) if spec.eval else False, "seed": cfg.seed}
        lineage = {p: _fingerprint(Path(p)) for p in sorted(set(ctx.inputs))}
        key = hashlib.sha256(json.dumps([resolved, lineage], sort_keys=True, default=str).encode()).hexdigest()[:16]
        marker = out / "stage.json"
        prev = json.loads(marker.read_text()) if marker.exists() else None
        if prev and prev.get("status") == "done" and prev.get("key") == key:
            log.info("stage %s: done with the same config and inputs, skipped", spec.name)
            produced = prev.get("model")
        else:
            if prev and prev.get("key") != key and out.exists():
                # Another config or other inputs: that run's checkpoints, metrics and outputs must go, or
                # SFT/RL would resume from them and silently reproduce the old model. Only an interrupted
                # run with the same key is continued.
                log.info("stage %s: config or inputs changed since the last run; discarding it and starting again",
                         spec.name)
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"name": spec.name, "status": "running", "key": key, "resolved": resolved,
                                          "inputs": lineage, "started": time.time()}, indent=1, default=str))
            log.info("stage %s (%s) -> %s", spec.name, spec.kind, out)
            t0 = time.time()
            produced = _run_stage(spec, cfg_obj, out, cfg.seed)
            if spec.eval and produced:
                evaluate_stage(produced, ctx, out)
            marker.write_text(json.dumps({"name": spec.name, "status": "done", "key": key, "resolved": resolved,
                                          "inputs": lineage, "model": produced, "seconds": round(time.time() - t0, 1)},
                                         indent=1, default=str))
        if spec.kind == "synth":
            ctx.values["data"] = str(out)
        if produced:
            ctx.values["model"] = produced
        ctx.values[f"stage:{spec.name}"] = str(out)
    return ctx.out


def run_demo(out: str = "runs/demo", quick: bool = False, seed: int = 0) -> Path:
    """The embedded default through every stage on a CPU; prints the stage table."""
    recipe = RECIPES / "demo" / ("pipeline_quick.yaml" if quick else "pipeline.yaml")
    t0 = time.time()
    path = run_pipeline(recipe, [f"out_dir={out}", f"seed={seed}"])
    from thinkvl.report.plots import find_stages
    from thinkvl.report.report import load_stage_rows, stage_table_markdown, write_report

    report = write_report(path)
    print()
    print(stage_table_markdown(load_stage_rows(find_stages(path))))
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    print(f"run directory: {path}\nplots: {path / 'plots'}\nreport: {report}")
    return path
