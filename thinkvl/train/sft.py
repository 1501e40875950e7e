"""Joint SFT (stage 1 of the Kimi-VL recipe) and long-CoT SFT (stage 2) — one plain loop.

Conversations from a weighted mixture of sources are rendered with the chat template (loss on
assistant tokens only), packed best-fit-decreasing into rows of the stage's context length, and
trained for one epoch per context stage with the stage's warm-up + cosine schedule.

Loss aggregation: the loss of an optimiser step is
    L = - sum over supervised tokens t of the whole step of log p(t) / N_step
where N_step counts the supervised tokens of every micro-batch on every rank of that step. Each
micro-batch contributes its token sum divided by N_step (times world size, since FSDP averages
gradients across ranks), so packing, padding, micro-batch split and process count do not change
the loss or the gradients.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm import tqdm

from thinkvl.config import ConfigError
from thinkvl.data.chat import Example
from thinkvl.data.formats import ReadStats, read_records
from thinkvl.data.mixture import mix
from thinkvl.data.packing import bfd_pack, collate_rows
from thinkvl.models.forward import token_logprobs
from thinkvl.models.load import Loaded, load
from thinkvl.train import distributed as D
from thinkvl.train import lora as lora_
from thinkvl.train import precision as P
from thinkvl.train.common import ModelConfig, RunDir, Timer, adamw, param_groups, set_lr
from thinkvl.train.schedule import Segment, lr_at

log = logging.getLogger("thinkvl")


@dataclass
class SourceConfig:
    """One data source of the mixture."""

    path: str  # JSONL file, Parquet file or saved `datasets` folder of conversations
    weight: float = 1.0  # passes over this source per epoch (0.5 = a random half, 2 = twice)
    columns: dict = field(default_factory=dict)  # our name -> source column (problem, answer, images, prompt, completion)
    limit: int | None = None  # read at most this many records


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)  # the training mixture
    eval: str | None = None  # held-out conversations: loss logged at each eval
    eval_problems: str | None = None  # held-out problems: greedy accuracy logged at each eval
    eval_limit: int = 64  # problems scored per eval
    on_error: Literal["raise", "skip"] = "raise"  # bad records: stop with the file:line, or skip and count
    overlong: Literal["truncate", "drop"] = "truncate"  # examples longer than the stage's max_length
    packing: bool = True  # pack examples into rows (False: one padded example per row)
    pack_window: int = 1024  # examples packed together at a time (0: the whole epoch at once)

    def check(self, prefix: str) -> None:
        if not self.sources:
            raise ConfigError(f"{prefix}.sources: at least one source is required")
        for i, s in enumerate(self.sources):
            if s.weight < 0:
                raise ConfigError(f"{prefix}.sources[{i}].weight: must be >= 0")


@dataclass
class StageConfig:
    """One context stage: one epoch at this sequence length with its own LR curve."""

    name: str = "stage1"
    max_length: int = 512  # tokens per packed row
    lr_peak: float = 2e-5  # reached after warm-up
    lr_end: float = 2e-6  # reached on the stage's last step (cosine)
    warmup_frac: float = 0.03  # fraction of the stage's steps spent warming up
    epochs: float = 1.0  # passes over the mixture

    def check(self, prefix: str) -> None:
        if self.max_length < 8:
            raise ConfigError(f"{prefix}.max_length: must be >= 8")
        if not (0.0 <= self.warmup_frac < 1.0):
            raise ConfigError(f"{prefix}.warmup_frac: must be in [0, 1)")


@dataclass
class OptimConfig:
    rows_per_micro_batch: int = 1  # packed rows per forward pass
    grad_accum: int = 1  # micro-batches per optimiser step (per process)
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    clip_grad: float = 1.0  # max global grad norm (0 = off)
    # Removed: bf16 compute is `model.precision: bf16_mixed`; the key stays only to say so (with
    # `model.dtype: bfloat16` it trained bf16 weights without an fp32 master copy).
    autocast: str | None = None

    def check(self, prefix: str) -> None:
        if self.autocast is not None:
            raise ConfigError(
                f"{prefix}.autocast: removed; set model.precision instead: bf16_mixed (fp32 master weights "
                "and optimiser state, bf16 compute), fp32, or bf16_pure (bf16 weights without a master copy, "
                "where updates below ~1/256 of a weight are lost)")


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    optim: OptimConfig = field(default_factory=OptimConfig)
    out_dir: str = "runs/sft"  # run directory
    seed: int = 0  # data order and mixture sampling
    log_every: int = 1  # steps between metric lines
    save_every: int = 0  # steps between checkpoints (0: at the end of each stage only)
    eval_every: int = 0  # steps between evaluations (0: at the end only)
    max_steps: int | None = None  # stop after this many steps in all (smoke tests, --quick)
    resume: bool = True  # continue from the latest checkpoint in out_dir if there is one
    logging_backend: str = "none"  # none | tensorboard | wandb | trackio

    def check(self, prefix: str) -> None:
        if not self.stages:
            raise ConfigError("stages: at least one stage is required")


# --- data -------------------------------------------------------------------------------------


def load_mixture(cfg: DataConfig, loaded: Loaded) -> tuple[list[Example], list[int], ReadStats]:
    """Read and render every source once; returns examples and their source index."""
    stats = ReadStats()
    examples: list[Example] = []
    source_of: list[int] = []
    for s_i, src in enumerate(cfg.sources):
        recs = read_records(src.path, "conversation", cfg.on_error, src.columns, src.limit, stats)
        for r in recs:
            try:
                examples.append(loaded.render(r["messages"]))
            except ValueError as e:
                raise ValueError(f"{r['_where']}: cannot render: {e}") from None
            source_of.append(s_i)
    return examples, source_of, stats


def fit_length(
    examples: list[Example], max_length: int, policy: str, image_token_id: int | None
) -> tuple[list[Example], list[int], dict[str, int]]:
    """Examples as used at max_length (over-long ones truncated or dropped, and counted) and the
    indices usable; the input list is not modified (a later, longer stage sees the originals).

    Truncation never cuts through an image's placeholder run (that would break the image-feature
    count); such examples are dropped and counted as `overlong_image`, and so are truncations that
    would leave no supervised token (`no_supervised_left`).
    """
    examples = list(examples)
    keep, counts = [], {"truncated": 0, "dropped": 0, "overlong_image": 0, "no_supervised_left": 0}
    for i, ex in enumerate(examples):
        if len(ex) <= max_length:
            keep.append(i)
            continue
        if policy == "drop":
            counts["dropped"] += 1
            continue
        ids = ex.input_ids
        if image_token_id is not None and ids[max_length - 1] == image_token_id == ids[max_length]:
            counts["overlong_image"] += 1
            continue
        if not any(ex.loss_mask[1:max_length]):
            counts["no_supervised_left"] += 1
            continue
        examples[i] = _truncate(ex, max_length, _image_runs(ids[:max_length], image_token_id))
        counts["truncated"] += 1
        keep.append(i)
    return examples, keep, counts


def _image_runs(ids: list[int], image_token_id: int | None) -> int:
    """Number of image placeholder runs (= whole images) in ids."""
    if image_token_id is None:
        return 0
    return sum(1 for j, t in enumerate(ids) if t == image_token_id and (j == 0 or ids[j - 1] != t))


def _truncate(ex: Example, n: int, n_images: int) -> Example:
    out = Example(input_ids=ex.input_ids[:n], loss_mask=ex.loss_mask[:n], extra=dict(ex.extra))
    if "mm_token_type_ids" in out.extra:
        out.extra["mm_token_type_ids"] = out.extra["mm_token_type_ids"][:n]
    if n_images and ex.image_grid_thw is not None:
        grid = ex.image_grid_thw[:n_images]
        out.image_grid_thw = grid
        out.pixel_values = ex.pixel_values[: int(grid.prod(-1).sum())]
    return out


def plan_rows(
    lengths: list[int], indices: list[int], capacity: int, packing: bool, seed: int, window: int = 0
) -> list[list[int]]:
    """Rows of example indices for one epoch: BFD-packed (or one per row), in a seeded random order.

    With `window` > 0 the (already shuffled) indices are packed `window` at a time: BFD over a whole
    epoch sorts by length, so rows, and hence steps, would hold examples of correlated lengths
    (and, in a mixture, correlated sources); packing within windows keeps steps representative.
    """
    if not packing:
        rows = [[i] for i in indices]
    else:
        span = window if window > 0 else max(len(indices), 1)
        rows = []
        for w in range(0, len(indices), span):
            chunk = indices[w : w + span]
            rows.extend([chunk[j] for j in r] for r in bfd_pack([lengths[i] for i in chunk], capacity))
    random.Random(seed).shuffle(rows)
    return rows


def split_steps(rows: list[list[int]], rows_per_step: int) -> list[list[list[int]]]:
    return [rows[i : i + rows_per_step] for i in range(0, len(rows), rows_per_step)]


# --- training ---------------------------------------------------------------------------------


def micro_batches(step_rows: list[list[int]], d: D.Dist, rows_per_mb: int) -> list[list[list[int]]]:
    """This rank's micro-batches of a step; every rank gets the same count (a short rank gets empty ones)."""
    mine = step_rows[d.rank :: d.world]
    mbs = [mine[i : i + rows_per_mb] for i in range(0, len(mine), rows_per_mb)]
    n_max = math.ceil(math.ceil(len(step_rows) / d.world) / rows_per_mb)
    while len(mbs) < n_max:
        mbs.append([])  # a rank with fewer rows still joins every collective
    return mbs


def sft_step(
    model, examples: list[Example], step_rows: list[list[int]], loaded: Loaded, cfg: SFTConfig, d: D.Dist
) -> dict[str, float]:
    """Forward/backward over one step's rows on this rank; returns loss and token counts."""
    n_sup = max(sum(sum(examples[i].loss_mask[1:]) for r in step_rows for i in r), 1)  # supervised targets
    n_tok = sum(len(examples[i]) for r in step_rows for i in r)
    local_sum, local_slots = 0.0, 0
    for mb in micro_batches(step_rows, d, cfg.optim.rows_per_micro_batch):
        rows = mb or [step_rows[0][:1]]  # filler: any real row, loss-free
        batch = collate_rows(examples, rows, loaded.pad_id, loaded.positions)
        if not mb:
            batch["target_mask"].zero_()
        local_slots += batch["input_ids"].numel() if mb else 0
        with P.compute(cfg.model.precision, d):
            logp = token_logprobs(model, batch)
        tok_sum = -(logp * batch["target_mask"].to(logp.device)).sum()
        (tok_sum * d.world / n_sup).backward()
        local_sum += float(tok_sum.detach())
    total = D.all_reduce_sum(local_sum, d)
    slots = D.all_reduce_sum(local_slots, d)
    return {"loss": total / n_sup, "supervised_tokens": n_sup, "tokens": n_tok,
            "packing_efficiency": n_tok / max(slots, 1)}


def grad_norm_and_clip(model, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def eval_loss(model, examples: list[Example], loaded: Loaded, capacity: int) -> float:
    """Mean token loss over held-out conversations (packed, no cache)."""
    if not examples:
        return float("nan")
    lengths = [len(e) for e in examples]
    idx = [i for i in range(len(examples)) if lengths[i] <= capacity]
    rows = bfd_pack([lengths[i] for i in idx], capacity)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for r in rows:
            batch = collate_rows(examples, [[idx[j] for j in r]], loaded.pad_id, loaded.positions)
            logp = token_logprobs(model, batch)
            total += float(-(logp * batch["target_mask"]).sum())
            count += int(batch["target_mask"].sum())
    model.train()
    return total / max(count, 1)


def run_eval(model, loaded: Loaded, cfg: SFTConfig, eval_examples, eval_problems, d: D.Dist) -> dict:
    with P.compute(cfg.model.precision, d):
        return _run_eval(model, loaded, cfg, eval_examples, eval_problems)


def _run_eval(model, loaded: Loaded, cfg: SFTConfig, eval_examples, eval_problems) -> dict:
    out: dict[str, float] = {}
    if eval_examples:
        out["eval/loss"] = eval_loss(model, eval_examples, loaded, max(s.max_length for s in cfg.stages))
    if eval_problems:
        from thinkvl.eval.evaluate import greedy_metrics

        out.update(greedy_metrics(loaded, eval_problems, "math", max_new_tokens=256))
    return out


@D.releases_process_group
def train(cfg: SFTConfig) -> RunDir:
    """Run joint / long-CoT SFT as configured; returns the run directory."""
    d = D.setup()
    run = RunDir(cfg.out_dir, d)
    run.add_backend(cfg.logging_backend)
    torch.manual_seed(cfg.seed)
    loaded = load(cfg.model.path, cfg.model.dtype, cfg.model.trust_remote_code,
                  cfg.model.attn_implementation, cfg.model.chat_template, seed=cfg.model.seed,
                  meta=d.enabled and not d.main)  # ranks > 0 get their shards from rank 0 (shard_from_rank0)
    ckpt_dtype = P.prepare(loaded.model, cfg.model.precision)
    cfg.model.dtype = str(ckpt_dtype).removeprefix("torch.")  # `auto` resolved, as final/ is written
    if cfg.model.lora is not None:
        run.lora = lora_.attach(loaded.model, cfg.model.lora, cfg.model.precision, d.world)  # in place: loaded.model gets the adapters
    run.save_config(cfg)
    model = loaded.model
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if run.lora is not None:  # frozen embeddings: recomputed blocks must still pass gradients on
            model.enable_input_require_grads()
    model.train()

    examples, source_of, stats = load_mixture(cfg.data, loaded)
    if d.main:
        log.info("data: %s", stats.describe())
    eval_examples = []
    if cfg.data.eval:
        eval_examples = [loaded.render(r["messages"]) for r in read_records(cfg.data.eval, "conversation")]
    eval_problems = read_records(cfg.data.eval_problems, "problem", limit=cfg.data.eval_limit) if cfg.data.eval_problems else []

    # Plan every stage's steps up front: the schedule needs the counts, resume needs the order.
    rows_per_step = cfg.optim.rows_per_micro_batch * cfg.optim.grad_accum * d.world
    plans, segments, skipped = [], [], {}
    for s_i, st in enumerate(cfg.stages):
        stage_ex, idx, counts = fit_length(examples, st.max_length, cfg.data.overlong,
                                           loaded.renderer.image_token_id)
        lengths = [len(e) for e in stage_ex]
        skipped[st.name] = counts
        usable = set(idx)
        groups = [[i for i in range(len(examples)) if source_of[i] == k and i in usable]
                  for k in range(len(cfg.data.sources))]
        order = mix(groups, [src.weight * st.epochs for src in cfg.data.sources], seed=cfg.seed + s_i)
        steps = split_steps(plan_rows(lengths, order, st.max_length, cfg.data.packing, cfg.seed + 1000 + s_i,
                                      cfg.data.pack_window),
                            rows_per_step)
        plans.append((stage_ex, steps))
        segments.append(Segment(len(steps), st.lr_peak, st.lr_end, int(st.warmup_frac * len(steps))))
        if d.main:
            log.info("stage %s: %d examples -> %d steps at length %d; over-long: %s",
                     st.name, len(order), len(steps), st.max_length, counts)
    total_steps = sum(len(p) for _, p in plans)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    # Shard first: fully_shard replaces the parameters with sharded ones, and the optimiser must
    # hold those (built from the old ones it would update orphans and the model would never move).
    model = D.shard_from_rank0(model, d, P.mp_policy(cfg.model.precision))
    groups = param_groups(model, cfg.model, cfg.stages[0].lr_peak, cfg.optim.weight_decay)
    optim = adamw(groups, (cfg.optim.beta1, cfg.optim.beta2))

    start = 0
    ckpt = run.latest_checkpoint() if cfg.resume else None
    if ckpt is not None:
        state = run.load_checkpoint(ckpt, model, optim)
        start = state["step"]
        run.truncate_metrics(start)
        log.info("resumed from %s at step %d", ckpt, start)
    run.log_metrics({"step": start, "event": "start", "data": stats.describe(), "overlong": skipped}) if start == 0 else None

    flat = [(s_i, ex, rows) for s_i, (ex, p) in enumerate(plans) for rows in p]
    stage_ends = set()
    acc = 0
    for _, p in plans:
        acc += len(p)
        stage_ends.add(acc)
    timer = Timer()
    bar = tqdm(total=total_steps, initial=start, disable=not d.main, desc="sft", dynamic_ncols=True)
    for step in range(start, total_steps):
        s_i, stage_ex, step_rows = flat[step]
        lr = lr_at(step, segments)
        set_lr(optim, lr)
        t0 = time.perf_counter()
        with timer("forward_backward"):
            m = sft_step(model, stage_ex, step_rows, loaded, cfg, d)
        with timer("optimizer"):
            gnorm = grad_norm_and_clip(model, cfg.optim.clip_grad)
            if not math.isfinite(gnorm) or not math.isfinite(m["loss"]):
                raise FloatingPointError(f"step {step + 1}: non-finite loss {m['loss']} or grad norm {gnorm}")
            optim.step()
            optim.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        done = step + 1
        metrics = {"step": done, "stage": cfg.stages[s_i].name, "loss": round(m["loss"], 6), "lr": lr,
                   "supervised_tokens": m["supervised_tokens"], "tokens": m["tokens"],
                   "tokens_per_s": round(m["tokens"] / dt, 1), "packing_efficiency": round(m["packing_efficiency"], 4),
                   "grad_norm": round(gnorm, 4), **timer.pop()}
        last = done == total_steps
        if (cfg.eval_every and done % cfg.eval_every == 0) or last:
            metrics.update(run_eval(model, loaded, cfg, eval_examples, eval_problems, d))
        if done % cfg.log_every == 0 or last:
            run.log_metrics(metrics)
        bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{lr:.1e}")
        bar.update(1)
        if (cfg.save_every and done % cfg.save_every == 0) or done in stage_ends or last:
            run.save_checkpoint(done, model, optim, {"stage": s_i})
    bar.close()
    run.export(loaded, model, ckpt_dtype)
    if d.main:
        log.info("final model in %s", run.final_dir)
    D.cleanup(d)
    return run
