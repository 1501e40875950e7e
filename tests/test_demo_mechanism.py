"""The mechanism the demo's RL stage relies on, at a size a test can afford.

A start model that mixes a reliable behaviour (read the number from the question, then answer it)
and an unreliable one (a guess that is right one time in ten), chosen at the first token of its
thought, the way the demo's long-CoT model chooses between working a problem out and answering at a
glance. A short run of policy mirror descent must move the choice away from the guess (at this
test's seed, to the reliable behaviour), and so raise *greedy* accuracy on held-out problems (phrasings it never trained or sampled on). This can
fail: RL that only sharpens sampling, or that does not carry the choice over to new prompts, leaves
greedy where it started.

The start is built the way the demo builds its long-CoT model: the skill the reliable behaviour
needs (copying the number) is drilled first on other prompts, the way the demo's base stage teaches
the working, and the SFT mixture only sets how often each behaviour is chosen. Measured on the
2026-12-05 CI machine (session 14): without the drill the 2-layer model copied the number on ~30%
of prompts even when made to take the reliable path, so RL had nothing reliable to choose; a guess
of a random digit let RL teach the guess itself to copy (right answers without the choice moving);
a drill answered in its own format leaked onto question-shaped held-out prompts (so the held-out
phrasings here are commands like the training ones); and without a format check in the verifier RL
found answers without a thought. Seeds 0-4 of this setup (docs/demo.md): accuracy rose by 0.7-0.9 at
four; at one, RL collapsed (a grad-norm spike, answers grew to the token cap, reward 0 from then
on), so the test keeps seed 0, where it goes 0.10 -> 1.00.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import KIMI_SMALL, sft_config

from thinkvl.eval.evaluate import evaluate
from thinkvl.models.load import load
from thinkvl.models.tiny import Kimi_K25ForConditionalGeneration, build_processor, build_tokenizer, tiny_config
from thinkvl.rl.loop import RLConfig
from thinkvl.rl.loop import train as rl_train
from thinkvl.train.sft import train as sft_train

torch.set_num_threads(1)

TRAIN_TEMPLATES = ["Say {d}.", "Please say {d}.", "Write {d}."]
HELD_OUT_TEMPLATES = ["Now say {d}.", "Please write {d}."]
# The copy drill: other prompts, no thought, only the skill the reliable behaviour needs.
DRILL_TEMPLATES = ["copy: {d}", "copy this: {d}", "echo: {d}", "repeat: {d}", "read out: {d}", "note: {d}"]
GUESS = 5
VERIFIER_MODULE = "thinkvl_toy_verifier_mechanism"
VERIFIER_SRC = '''
def final_answer(response: str, reference: str) -> float:
    """1 for a thought, then 'The answer is <reference>.' at the end (the thought's content does not count)."""
    r = response.strip()
    return 1.0 if r.startswith("<think>") and r.endswith(f"The answer is {reference}.") else 0.0
'''


def reliable(d: int) -> str:
    return f"<think>\nIt says {d}.\n</think>\nThe answer is {d}."


def guess() -> str:
    return f"<think>\nGuess.\n</think>\nThe answer is {GUESS}."


def problems(templates: list[str]) -> list[dict]:
    return [{"id": f"{t.split()[0]}-{d}", "messages": [{"role": "user", "content": t.format(d=d)}], "answer": str(d)}
            for t in templates for d in range(10)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def verifier(tmp_path_factory):
    root = tmp_path_factory.mktemp("mechanism_verifier")
    (root / f"{VERIFIER_MODULE}.py").write_text(VERIFIER_SRC)
    sys.path.insert(0, str(root))
    module = __import__(VERIFIER_MODULE)
    yield f"{VERIFIER_MODULE}:final_answer", module.final_answer
    sys.path.remove(str(root))
    sys.modules.pop(VERIFIER_MODULE, None)


def greedy(model_dir: Path, probs: list[dict], verify) -> tuple[float, float, float]:
    """Held-out greedy accuracy, and the shares of greedy answers that guess and that read the number."""
    loaded = load(str(model_dir))
    loaded.model.eval()
    res = evaluate(loaded, probs, verifier=verify, k=0, max_new_tokens=24, check_images=False)
    responses = [p.greedy_response or "" for p in res.problems]
    guesses = sum(r.startswith("<think>\nGuess.") for r in responses) / len(responses)
    reads = sum(r.startswith("<think>\nIt says") for r in responses) / len(responses)
    return res.greedy_pass1, guesses, reads


def test_rl_moves_the_choice_to_the_reliable_behaviour(tmp_path, verifier):
    verifier_name, verify = verifier
    train_probs, held_out = problems(TRAIN_TEMPLATES), problems(HELD_OUT_TEMPLATES)
    # The start model: 30% of its SFT answers read the number, 70% guess, so its greedy choice is
    # the guess, and sampling still tries the reliable behaviour. The drill teaches the copy.
    convs = []
    for p in train_probs:
        d = int(p["answer"])
        for i in range(10):
            text = reliable(d) if i < 3 else guess()
            convs.append({"messages": p["messages"] + [{"role": "assistant", "content": text}]})
    for t in DRILL_TEMPLATES:
        for d in range(10):
            drill = [{"role": "user", "content": t.format(d=d)}, {"role": "assistant", "content": f"It says {d}."}]
            convs += [{"messages": drill}] * 3
    texts = [m["content"] for c in convs for m in c["messages"]] + [t.format(d=d) for t in HELD_OUT_TEMPLATES
                                                                    for d in range(10)]
    tok = build_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    start = tmp_path / "random"
    Kimi_K25ForConditionalGeneration(tiny_config(tok, **KIMI_SMALL)).save_pretrained(start)
    build_processor(tok, max_side=112).save_pretrained(start)
    sft_cfg = sft_config(start, write_jsonl(tmp_path / "sft.jsonl", convs), tmp_path / "sft")
    sft_cfg.stages = sft_cfg.stages[:1]
    sft_cfg.stages[0].epochs, sft_cfg.stages[0].lr_peak, sft_cfg.stages[0].lr_end = 20.0, 3e-3, 3e-4
    sft_cfg.optim.grad_accum = 1
    sft = sft_train(sft_cfg)
    before, guesses_before, reads_before = greedy(sft.final_dir, held_out, verify)

    cfg = RLConfig()
    cfg.model.path = str(sft.final_dir)
    cfg.data.problems = str(write_jsonl(tmp_path / "rl.jsonl", train_probs))
    cfg.verifier = verifier_name
    cfg.rollout.prompts_per_iter, cfg.rollout.k, cfg.rollout.max_new_tokens = 8, 8, 24
    cfg.rollout.temperature = 1.0
    cfg.loss.name, cfg.loss.tau, cfg.loss.lr = "mirror_descent", 0.1, 1e-3
    cfg.iterations = 24
    cfg.out_dir = str(tmp_path / "rl")
    run = rl_train(cfg)
    after, guesses_after, reads_after = greedy(run.final_dir, held_out, verify)
    print(f"held-out greedy accuracy: start {before:.2f}, after RL {after:.2f}; greedy answers that guess "
          f"{guesses_before:.2f} -> {guesses_after:.2f}, that read the number {reads_before:.2f} -> {reads_after:.2f}")
    assert before <= 0.5 and guesses_before >= 0.5  # the start mostly guesses ...
    assert after - before >= 0.3  # ... RL makes it right on new phrasings ...
    # ... by leaving the guess: for the reliable behaviour at this seed (reads 0 -> 1); at other seeds
    # RL sometimes found a third behaviour no SFT answer had (an empty thought, then the copied
    # number), which is right too, so the assertion allows either (docs/demo.md, session 14).
    assert guesses_before - guesses_after >= 0.3
