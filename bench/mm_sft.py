"""Benchmark 2: multimodal SFT on the synthetic image tasks (112x112 px images, short answers and
long-CoT traces mixed), on a tiny Qwen2.5-VL (mRoPE) and on thinkvl's tiny Kimi-VL model.

thinkvl: images processed once at load, examples BFD-packed into rows (4-row mRoPE positions for
Qwen-VL), assistant-only loss. TRL: `SFTTrainer` refuses packing and padding-free for image data,
so it pads a batch of examples and processes the images on the fly in its collator; prompt-completion
rows give completion-only loss. Same examples per step on average (TRL batch = thinkvl's mean
examples per packed row x rows per step), same optimiser and LR.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from bench.common import set_threads, thinkvl_adamw, thinkvl_defaults, throughput
from bench.data import mm_conversations, mm_trl_rows
from bench.models import build_kimi, build_qwen_vl, n_params, qwen_vl_processor, weights_checksum
from bench.text_sft import HP, N_HELDOUT, heldout_loss, thinkvl_steps, trl_common_args


def _model(model_name: str, toy: bool, seed: int):
    if model_name == "qwen2.5-vl":
        processor = qwen_vl_processor()
        return build_qwen_vl(processor, toy=toy, seed=seed), processor
    if model_name == "kimi":
        return build_kimi(toy=toy, seed=seed)
    raise ValueError(f"model: {model_name!r} unknown; choose qwen2.5-vl or kimi")


def _examples(loaded, jsonl: Path, capacity: int):
    from thinkvl.train.sft import DataConfig, SourceConfig, fit_length, load_mixture

    examples, _, _ = load_mixture(DataConfig(sources=[SourceConfig(path=str(jsonl))]), loaded)
    return fit_length(examples, capacity, "drop", loaded.renderer.image_token_id)


def _heldout(loaded, tmp: str, seed: int, capacity: int):
    jsonl = mm_conversations(Path(tmp) / "heldout", N_HELDOUT, seed + 1000)
    examples, idx, _ = _examples(loaded, jsonl, capacity)
    return [examples[i] for i in idx]


def run_thinkvl(model_name: str, n_conv: int, capacity: int, rows_per_step: int, steps: int,
                toy: bool = False, seed: int = 0) -> dict:
    from thinkvl.models.load import wrap
    from thinkvl.train import distributed as D
    from thinkvl.train.sft import OptimConfig, SFTConfig, plan_rows, split_steps

    threads = set_threads()
    model, processor = _model(model_name, toy, seed)
    checksum = weights_checksum(model)
    loaded = wrap(model, processor)
    attention = thinkvl_defaults(model)  # after the checksum: same weights as TRL's
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = mm_conversations(Path(tmp), n_conv, seed)
        held = _heldout(loaded, tmp, seed, capacity)
        t0 = time.perf_counter()
        examples, idx, _ = _examples(loaded, jsonl, capacity)
    rows = plan_rows([len(e) for e in examples], idx, capacity, packing=True, seed=seed)
    plan = split_steps(rows, rows_per_step)
    setup_s = time.perf_counter() - t0
    cfg = SFTConfig(optim=OptimConfig(rows_per_micro_batch=1, grad_accum=rows_per_step, clip_grad=HP["clip"]))
    d = D.setup("cpu")
    model.train()
    optim = thinkvl_adamw(model, HP["lr"], HP["betas"], HP["weight_decay"])
    clock, tokens, sup, slots, losses = thinkvl_steps(model, optim, examples, plan[:steps], loaded, cfg, d)
    n_ex = [sum(len(r) for r in step_rows) for step_rows in plan[:steps]]
    return {"framework": "thinkvl", "model": model_name, "params": n_params(model), "weights_checksum": checksum,
            "threads": threads, "attention": attention, "setup_s": round(setup_s, 2), "rows": len(rows),
            "examples": len(idx),
            "examples_per_row": round(len(idx) / len(rows), 2), "examples_per_step": n_ex,
            "losses": [round(x, 4) for x in losses], **throughput(clock, tokens, sup, slots),
            "heldout_loss": heldout_loss(model, loaded, held, capacity)}


def run_trl(model_name: str, n_conv: int, capacity: int, batch: int, steps: int, toy: bool = False,
            seed: int = 0) -> dict:
    """batch: padded examples per optimiser step (the thinkvl run's examples per step)."""
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from bench.trl_hooks import BatchCounter, ClockCallback, counting, losses, quiet, silence_libraries
    from thinkvl.models.load import wrap

    silence_libraries()
    threads = set_threads()
    model, processor = _model(model_name, toy, seed)
    checksum = weights_checksum(model)
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = mm_conversations(Path(tmp), n_conv, seed)
        # the same examples thinkvl keeps (those that fit `capacity` whole)
        loaded = wrap(model, processor)
        held = _heldout(loaded, tmp, seed, capacity)
        _, idx, _ = _examples(loaded, jsonl, capacity)
        rows = [mm_trl_rows(jsonl)[i] for i in idx]
        t0 = time.perf_counter()
        args = TRLSFTConfig(
            output_dir=tmp, max_length=None, packing=False, completion_only_loss=True,
            per_device_train_batch_size=batch, gradient_accumulation_steps=1, max_steps=steps,
            **trl_common_args(seed),
        )
        counter = BatchCounter()
        cb = ClockCallback(counter)
        trainer = counting(SFTTrainer)(model=model, args=args, processing_class=processor, callbacks=[cb],
                                       train_dataset=Dataset.from_list(rows))
        trainer.bench_counter = counter
        quiet(trainer)
        setup_s = time.perf_counter() - t0
        trainer.train()
    return {"framework": "trl", "model": model_name, "params": n_params(model), "weights_checksum": checksum,
            "threads": threads, "setup_s": round(setup_s, 2), "examples": len(rows), "batch": batch,
            "losses": [round(x, 4) for x in losses(trainer)],
            **throughput(cb.clock, counter.tokens, counter.supervised, counter.slots),
            "heldout_loss": heldout_loss(trainer.model, wrap(trainer.model, processor), held, capacity)}
