"""Benchmark 3: one RL step, k responses for each of P prompts, up to `max_new` new tokens.

thinkvl: one policy-mirror-descent iteration as `thinkvl.rl.loop.train` runs it: `HFEngine.generate`
(KV cache shared across a prompt's k samples, finished rows dropped, log-probs recorded) -> `score`
(verifier + length reward) -> `update` (packed forward/backward with each prompt packed once for its
k responses, 16 responses per micro-batch, squared mirror-descent loss).
`run_thinkvl_vllm` (bench `rl_step_vllm`): the same iteration with `VLLMEngine` generating (vLLM in
its own environment, $THINKVL_VLLM_PYTHON), the weights synced to it before every generation and the
reference log-probs recomputed by the trainer, as `rollout.engine: vllm` runs; the worker's start-up
is reported apart (`vllm_startup_s`), not in any step.
TRL: `GRPOTrainer`, HF `model.generate` (no vLLM), beta = 0 (no reference model), one optimiser step
per generation round, 64 responses per micro-batch (TRL with 16 measured no faster). Same policy
weights, prompts, sampling (temperature 1, no top-k/top-p) and learning rate. The policy is random,
so most responses run to max_new tokens in both: equal work.
"""

from __future__ import annotations

import functools
import tempfile
import time

import torch

from bench.common import set_threads, thinkvl_adamw, thinkvl_defaults
from bench.data import rl_problems
from bench.models import TEXT_SIZES, build_text_model, n_params, text_tokenizer, weights_checksum

LR = 1e-5
MICRO = 64  # TRL's responses per forward/backward: its faster setting here (16 was not faster, 2026-11-29)


def run_thinkvl_vllm(size: str, prompts: int, k: int, max_new: int, steps: int = 1, seed: int = 0) -> dict:
    return run_thinkvl(size, prompts, k, max_new, steps, seed, engine="vllm")


def run_thinkvl(size: str, prompts: int, k: int, max_new: int, steps: int = 1, seed: int = 0,
                engine: str = "hf") -> dict:
    from thinkvl.models.load import wrap
    from thinkvl.rewards.verifiers import get_verifier
    from thinkvl.rl.loop import LossConfig, RLConfig, RolloutConfig, banned_tokens, recompute_logprobs, score, update
    from thinkvl.rl.losses import get_loss
    from thinkvl.rollout.engine import SamplingParams
    from thinkvl.rollout.hf_engine import HFEngine
    from thinkvl.train import distributed as D

    threads = set_threads()
    tok = text_tokenizer()
    model = build_text_model(TEXT_SIZES[size], tok, seed)
    checksum = weights_checksum(model)
    loaded = wrap(model, tok)
    attention = thinkvl_defaults(model)
    problems = rl_problems(max(prompts * steps, prompts), seed)
    examples = [loaded.render(p["messages"], add_generation_prompt=True) for p in problems]
    for p, ex in zip(problems, examples):
        ex.extra["id"] = p["id"]
    cfg = RLConfig(rollout=RolloutConfig(prompts_per_iter=prompts, k=k, max_new_tokens=max_new,
                                         batch_size=prompts * k),
                   loss=LossConfig(lr=LR))  # thinkvl's defaults: 16 responses per micro-batch, shared prompts
    d = D.setup("cpu")
    tmp = tempfile.TemporaryDirectory()
    if engine == "vllm":
        from thinkvl.rollout.engine import VLLMSettings
        from thinkvl.rollout.vllm_engine import VLLMEngine

        model.save_pretrained(tmp.name)
        tok.save_pretrained(tmp.name)
        settings = VLLMSettings(dtype="float32", max_model_len=1024, kv_cache_gib=1.0)
        gen = VLLMEngine(loaded, tmp.name, settings, seed=seed)
    else:
        gen = HFEngine(loaded, batch_size=prompts * k)
    verifier = get_verifier(cfg.verifier)
    loss_fn = functools.partial(get_loss("mirror_descent"), tau=cfg.loss.tau)
    optim = thinkvl_adamw(model, LR, (0.9, 0.95), cfg.loss.weight_decay)  # as the loop
    banned = banned_tokens(loaded)
    out = {"gen_s": [], "score_s": [], "update_s": [], "step_s": [], "gen_tokens": [], "attention": attention}
    if engine == "vllm":
        out.update(vllm_startup_s=round(gen.startup_s, 1), sync_s=[], recompute_s=[], logprob_gap_max=[])
    for it in range(steps):
        batch = list(range(it * prompts, (it + 1) * prompts))
        sampling = SamplingParams(max_new_tokens=max_new, temperature=1.0, seed=seed + it, banned_token_ids=banned)
        t0 = time.perf_counter()
        model.eval()
        with torch.no_grad():
            if engine == "vllm":
                out["sync_s"].append(round(gen.sync_weights(model), 3))
            rollouts = gen.generate([examples[i] for i in batch], k, sampling)
        t1 = time.perf_counter()
        model.train()
        score(rollouts, [problems[i] for i in batch], verifier, cfg.length_penalty, it)
        flat = [r for g in rollouts for r in g]
        if engine == "vllm":  # as the loop does for vllm (rollout.recompute_logprobs), counted in score_s
            tr = time.perf_counter()
            gap = recompute_logprobs(model, flat, k, loaded, cfg)
            out["recompute_s"].append(round(time.perf_counter() - tr, 3))
            out["logprob_gap_max"].append(round(gap["logprob_gap/max"], 6))
        # The random policy's groups are all wrong, and `update` skips a batch without signal; give each
        # group differing rewards so the step does its full work, as TRL's does.
        for j, r in enumerate(flat):
            r.reward = r.correct = float(j % 2)
        t2 = time.perf_counter()
        update(model, optim, flat, k, loaded, cfg, d, loss_fn, len(flat))
        t3 = time.perf_counter()
        for key, v in (("gen_s", t1 - t0), ("score_s", t2 - t1), ("update_s", t3 - t2), ("step_s", t3 - t0)):
            out[key].append(round(v, 3))
        out["gen_tokens"].append(sum(r.length for r in flat))
    if engine == "vllm":
        gen.close()
    tmp.cleanup()
    return _summary("thinkvl" if engine == "hf" else "thinkvl_vllm", size, model, checksum, threads, out)


def _summary(framework: str, size: str, model, checksum: float, threads: int, out: dict) -> dict:
    last = -1  # the last step: with steps > 1 the first one is a warm-up
    return {"framework": framework, "size": size, "params": n_params(model), "weights_checksum": checksum,
            "threads": threads, **out, "step_seconds": out["step_s"][last], "gen_seconds": out["gen_s"][last],
            "gen_tokens_per_s": round(out["gen_tokens"][last] / out["gen_s"][last], 1)}


def run_trl(size: str, prompts: int, k: int, max_new: int, steps: int = 1, seed: int = 0) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from bench.trl_hooks import quiet, silence_libraries
    from thinkvl.rewards.verifiers import get_verifier, safe_score

    silence_libraries()
    threads = set_threads()
    tok = text_tokenizer()
    model = build_text_model(TEXT_SIZES[size], tok, seed)
    checksum = weights_checksum(model)
    problems = rl_problems(max(prompts * steps, prompts), seed)
    verifier = get_verifier("math")

    def reward(completions, answer, **_):
        return [safe_score(verifier, c[0]["content"], a) for c, a in zip(completions, answer)]

    n = prompts * k
    out = {"gen_s": [], "step_s": [], "gen_tokens": []}
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(
            output_dir=tmp, per_device_train_batch_size=min(MICRO, n), gradient_accumulation_steps=max(n // MICRO, 1),
            num_generations=k, max_completion_length=max_new, temperature=1.0, top_p=1.0, top_k=0,
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95,
            max_grad_norm=1.0, beta=0.0, max_steps=steps, logging_steps=1, save_strategy="no", report_to="none",
            use_cpu=True, seed=seed, dataloader_num_workers=0, disable_tqdm=True, bf16=False, fp16=False,
            shuffle_dataset=False, gradient_checkpointing=False,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tok,
                              train_dataset=Dataset.from_list([{"prompt": p["messages"], "answer": p["answer"]}
                                                               for p in problems]))
        quiet(trainer)
        generate = trainer._generate

        def timed_generate(*a, **kw):
            t = time.perf_counter()
            res = generate(*a, **kw)
            out["gen_s"].append(round(time.perf_counter() - t, 3))
            return res

        trainer._generate = timed_generate
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                self.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                out["step_s"].append(round(time.perf_counter() - self.t, 3))

        trainer.add_callback(Clock())
        trainer.train()
        lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    out["gen_tokens"] = [round(x * n) for x in lengths]
    return _summary("trl", size, model, checksum, threads, out)
