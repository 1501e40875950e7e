"""Benchmark 1: text SFT of a Qwen2 decoder on conversations of mixed length.

thinkvl: render (assistant-only mask) -> BFD packing into rows of `capacity` tokens -> `sft_step`
(chunked LM head, global-token loss) + AdamW, as `thinkvl.train.sft.train` runs it.
TRL: `SFTTrainer` with its best CPU setting: prompt-completion rows (completion-only loss),
`packing=True` with BFD, which turns on padding-free batches.
Same model config and seed, same conversations, same optimiser, LR, clipping and tokens per step.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from bench.common import StepClock, set_threads, thinkvl_adamw, thinkvl_defaults, throughput
from bench.data import as_prompt_completion, text_conversations, write_jsonl
from bench.models import TEXT_SIZES, build_text_model, n_params, text_tokenizer, weights_checksum

HP = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, clip=1.0)


def _data(tok, n: int, seed: int, capacity: int) -> list[list[dict]]:
    """Conversations that fit a row whole (both frameworks would otherwise truncate differently)."""
    convs = text_conversations(n, seed)
    return [c for c in convs if len(tok.apply_chat_template(c, tokenize=True)["input_ids"]) <= capacity - 2]


N_HELDOUT = 16  # held-out conversations for the loss after training (same code for both frameworks)


def heldout_loss(model, loaded, examples, capacity: int) -> float:
    """Mean token loss on held-out examples, computed by thinkvl's `eval_loss` for both frameworks:
    the final training-batch loss alone depends on which examples that batch holds."""
    from thinkvl.train.sft import eval_loss

    return round(eval_loss(model, examples, loaded, capacity), 4)


def _heldout_text(loaded, seed: int, capacity: int):
    tok = loaded.tokenizer
    return [loaded.render(c) for c in _data(tok, N_HELDOUT, seed + 1000, capacity)]


def trl_common_args(seed: int) -> dict:
    """TRL SFTConfig settings every SFT benchmark shares: thinkvl's optimiser, no schedule, fp32,
    no gradient checkpointing (TRL's default would run every forward twice)."""
    return dict(learning_rate=HP["lr"], lr_scheduler_type="constant", warmup_steps=0,
                weight_decay=HP["weight_decay"], adam_beta1=HP["betas"][0], adam_beta2=HP["betas"][1],
                max_grad_norm=HP["clip"], logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                seed=seed, dataloader_num_workers=0, disable_tqdm=True, bf16=False, fp16=False,
                gradient_checkpointing=False)


def thinkvl_steps(model, optim, examples, plan, loaded, cfg, d) -> tuple:
    """thinkvl's SFT steps over a plan: (clock, tokens, supervised, slots, losses) per step."""
    from thinkvl.train.sft import grad_norm_and_clip, sft_step

    clock = StepClock()
    tokens, sup, slots, losses = [], [], [], []
    for step_rows in plan:
        m = sft_step(model, examples, step_rows, loaded, cfg, d)
        grad_norm_and_clip(model, cfg.optim.clip_grad)
        optim.step()
        optim.zero_grad(set_to_none=True)
        clock.tick()
        tokens.append(m["tokens"])
        sup.append(m["supervised_tokens"])
        slots.append(round(m["tokens"] / m["packing_efficiency"]))
        losses.append(m["loss"])
    return clock, tokens, sup, slots, losses


def run_thinkvl(size: str, n_conv: int, capacity: int, rows_per_step: int, steps: int, seed: int = 0) -> dict:
    from thinkvl.models.load import wrap
    from thinkvl.train import distributed as D
    from thinkvl.train.sft import (DataConfig, OptimConfig, SFTConfig, SourceConfig, fit_length, load_mixture,
                                   plan_rows, split_steps)

    threads = set_threads()
    tok = text_tokenizer()
    model = build_text_model(TEXT_SIZES[size], tok, seed)
    convs = _data(tok, n_conv, seed, capacity)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_jsonl(Path(tmp) / "text.jsonl", [{"messages": c} for c in convs])
        loaded = wrap(model, tok)
        attention = thinkvl_defaults(model)
        data = DataConfig(sources=[SourceConfig(path=str(path))])
        examples, _, _ = load_mixture(data, loaded)
    examples, idx, _ = fit_length(examples, capacity, "drop", None)
    rows = plan_rows([len(e) for e in examples], idx, capacity, packing=True, seed=seed)
    plan = split_steps(rows, rows_per_step)
    setup_s = time.perf_counter() - t0
    cfg = SFTConfig(optim=OptimConfig(rows_per_micro_batch=1, grad_accum=rows_per_step, clip_grad=HP["clip"]))
    d = D.setup("cpu")
    checksum = weights_checksum(model)
    model.train()
    optim = thinkvl_adamw(model, HP["lr"], HP["betas"], HP["weight_decay"])
    clock, tokens, sup, slots, losses = thinkvl_steps(model, optim, examples, plan[:steps], loaded, cfg, d)
    return {"framework": "thinkvl", "size": size, "params": n_params(model), "weights_checksum": checksum,
            "threads": threads, "attention": attention, "setup_s": round(setup_s, 2), "rows": len(rows), "examples": len(idx),
            "losses": [round(x, 4) for x in losses], **throughput(clock, tokens, sup, slots),
            "heldout_loss": heldout_loss(model, loaded, _heldout_text(loaded, seed, capacity), capacity)}


def run_trl(size: str, n_conv: int, capacity: int, rows_per_step: int, steps: int, seed: int = 0,
            per_device: int | None = None) -> dict:
    """per_device: packed rows per forward (padding-free flattens them into one sequence); the
    rest of rows_per_step is gradient accumulation. Default 1 (the faster on CPU, see README)."""
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from bench.trl_hooks import BatchCounter, ClockCallback, counting, losses, quiet, silence_libraries

    silence_libraries()
    threads = set_threads()
    tok = text_tokenizer()
    model = build_text_model(TEXT_SIZES[size], tok, seed)
    checksum = weights_checksum(model)
    convs = _data(tok, n_conv, seed, capacity)
    per_device = per_device or 1
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        args = TRLSFTConfig(
            output_dir=tmp, max_length=capacity, packing=True, packing_strategy="bfd", padding_free=True,
            completion_only_loss=True, per_device_train_batch_size=per_device,
            gradient_accumulation_steps=rows_per_step // per_device, max_steps=steps,
            **trl_common_args(seed),
        )
        counter = BatchCounter()
        cb = ClockCallback(counter)
        trainer = counting(SFTTrainer)(model=model, args=args, processing_class=tok, callbacks=[cb],
                                       train_dataset=Dataset.from_list([as_prompt_completion(c) for c in convs]))
        trainer.bench_counter = counter
        quiet(trainer)
        setup_s = time.perf_counter() - t0
        trainer.train()
        rows = len(trainer.train_dataset)
    from thinkvl.models.load import wrap

    loaded = wrap(trainer.model, tok)
    return {"framework": "trl", "size": size, "params": n_params(model), "weights_checksum": checksum,
            "threads": threads, "setup_s": round(setup_s, 2), "rows": rows, "examples": len(convs),
            "losses": [round(x, 4) for x in losses(trainer)],
            **throughput(cb.clock, counter.tokens, counter.supervised, counter.slots),
            "heldout_loss": heldout_loss(trainer.model, loaded, _heldout_text(loaded, seed, capacity), capacity)}
