"""Difficulty labels (k1.5): a model answers each problem n times at a high temperature; the pass
rate is the label (high = easy). The curriculum sampler orders problems by it."""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from thinkvl.config import ConfigError
from thinkvl.data.formats import read_records, write_jsonl
from thinkvl.models.load import load
from thinkvl.rewards.verifiers import get_verifier, safe_score
from thinkvl.rollout.engine import EngineConfig, GenerationEngine, SamplingParams, build_engine

log = logging.getLogger("thinkvl")


@dataclass
class LabelConfig:
    model: str = ""  # the (SFT) model whose pass rate labels the problems
    problems: str = ""  # problem file to label
    out: str | None = None  # labelled file (default: overwrite `problems`)
    columns: dict = field(default_factory=dict)
    n: int = 10  # samples per problem (k1.5 uses 10)
    temperature: float = 1.0  # high, so the pass rate is graded rather than 0/1
    max_new_tokens: int = 256
    verifier: str = "math"
    batch_size: int = 64  # problems x n per generate call (and sequences decoded together by the hf engine)
    seed: int = 0
    rollout: EngineConfig = field(default_factory=EngineConfig)  # rollout.engine: hf | vllm

    def check(self, prefix: str) -> None:
        if not self.model or not self.problems:
            raise ConfigError("model and problems: both are required")
        if self.n < 1:
            raise ConfigError("n: must be >= 1")


def pass_rates(loaded, problems: list[dict], n: int, sampling: SamplingParams, verifier, batch_size: int,
               engine: GenerationEngine | None = None) -> list[float]:
    """Fraction of n samples per problem that the verifier accepts (engine: default an HF engine)."""
    engine = engine or build_engine("hf", loaded, None, batch_size)
    rates: list[float] = []
    step = max(batch_size // n, 1)
    for s in tqdm(range(0, len(problems), step), desc="label", dynamic_ncols=True):
        chunk = problems[s : s + step]
        prompts = [loaded.render(p["messages"], add_generation_prompt=True) for p in chunk]
        with torch.no_grad():
            outs = engine.generate(prompts, n, sampling)
        for p, group in zip(chunk, outs):
            rates.append(statistics.fmean(float(safe_score(verifier, r.response_text, p["answer"]) >= 0.5)
                                          for r in group))
    return rates


def label(cfg: LabelConfig) -> Path:
    loaded = load(cfg.model)
    loaded.model.eval()
    problems = read_records(cfg.problems, "problem", columns=cfg.columns)
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)
    engine = build_engine(cfg.rollout.engine, loaded, cfg.model, cfg.batch_size, cfg.rollout.vllm, seed=cfg.seed)
    try:
        rates = pass_rates(loaded, problems, cfg.n, sampling, get_verifier(cfg.verifier), cfg.batch_size, engine)
    finally:
        getattr(engine, "close", lambda: None)()
    for p, r in zip(problems, rates):
        p["difficulty"] = round(r, 4)
    out = Path(cfg.out or cfg.problems)
    write_jsonl(out, problems)
    log.info("labelled %d problems (mean pass rate %.2f) -> %s", len(problems), statistics.fmean(rates), out)
    return out
