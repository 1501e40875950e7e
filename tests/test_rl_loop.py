"""The RL loop (policy mirror descent): a short run that must learn, resume == uninterrupted, each
phase against hand-computed values, guardrails, banned tokens, and 1 vs 2 processes on one update.

The toy task: problems "Say 7." whose reference answer is "7", scored by a user verifier given as
"module:function" (1 if the response contains the reference). A random tiny model emits "7"
somewhere in 8 tokens a few percent of the time; RL has to make it (nearly) always do so.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import torch
from _torchrun import torchrun
from conftest import KIMI_SMALL
from safetensors.torch import load_file

from thinkvl.models.load import load
from thinkvl.models.tiny import Kimi_K25ForConditionalGeneration, build_processor, build_tokenizer, tiny_config
from thinkvl.rl.loop import (
    GuardrailConfig,
    Guardrails,
    LengthPenaltyConfig,
    RLConfig,
    banned_tokens,
    check_no_banned,
    response_logprobs,
    score,
    train,
    update,
)
from thinkvl.rl.losses import get_loss
from thinkvl.rollout.engine import SamplingParams
from thinkvl.rollout.hf_engine import HFEngine
from thinkvl.rollout.types import Rollout
from thinkvl.train import distributed as D
from thinkvl.train.common import param_groups

torch.set_num_threads(1)

TOY_TEXTS = ["Say 7.", "7", "Say the number 7.", "The answer is 7.", "Please say 7.", "What is 7?"]
QUESTIONS = ["Say 7.", "Say the number 7.", "Please say 7.", "What is 7?",
             "Say 7 now.", "Say 7 please.", "Answer 7.", "Write 7."]
VERIFIER_MODULE = "thinkvl_toy_verifier_rl"
VERIFIER = f"{VERIFIER_MODULE}:contains_reference"
VERIFIER_SRC = '''
def contains_reference(response: str, reference: str) -> float:
    """1 if the reference string occurs in the response (never for an empty reference)."""
    return 1.0 if reference and reference in response else 0.0


def never(response: str, reference: str) -> float:
    """0 for every response: every group is tied."""
    return 0.0


def broken(response: str, reference: str) -> float:
    raise KeyError("a field the verifier expected")


def says_seven(problem: dict, response: str) -> dict:
    """A tagger: does the response say 7?"""
    return {"says7": "7" in response}
'''


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    """A tiny Kimi model with a tokenizer trained on a few texts, 8 problems, and the verifier module."""
    root = tmp_path_factory.mktemp("toy_rl")
    tok = build_tokenizer(TOY_TEXTS, vocab_size=300)
    processor = build_processor(tok, max_side=112)
    torch.manual_seed(0)
    model = Kimi_K25ForConditionalGeneration(tiny_config(tok, **KIMI_SMALL))
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    problems = root / "problems.jsonl"
    problems.write_text("".join(
        json.dumps({"id": f"say7-{i}", "messages": [{"role": "user", "content": q}], "answer": "7"}) + "\n"
        for i, q in enumerate(QUESTIONS)))
    (root / f"{VERIFIER_MODULE}.py").write_text(VERIFIER_SRC)
    sys.path.insert(0, str(root))
    yield {"root": root, "model": model_dir, "problems": problems}
    sys.path.remove(str(root))
    sys.modules.pop(VERIFIER_MODULE, None)


def rl_config(toy: dict, out_dir: Path, **overrides) -> RLConfig:
    """4 prompts x 8 responses of at most 8 tokens per iteration, mirror descent."""
    cfg = RLConfig()
    cfg.model.path = str(toy["model"])
    cfg.data.problems = str(toy["problems"])
    cfg.verifier = VERIFIER
    cfg.rollout.prompts_per_iter = 4
    cfg.rollout.k = 8
    cfg.rollout.max_new_tokens = 8
    cfg.loss.name = "mirror_descent"
    cfg.loss.tau = 0.1
    cfg.loss.lr = 1e-2
    cfg.iterations = 15
    cfg.out_dir = str(out_dir)
    for key, value in overrides.items():
        obj = cfg
        *path, last = key.split(".")
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, last, value)
    return cfg


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


# --- a short run that must learn ---------------------------------------------------------------


def test_short_run_raises_reward(toy, tmp_path):
    run = train(rl_config(toy, tmp_path / "run"))
    rewards = [m["reward"] for m in metrics(run.path)]
    print("reward per iteration:", [round(r, 2) for r in rewards])
    assert len(rewards) == 15
    first, last = statistics.fmean(rewards[:3]), statistics.fmean(rewards[-3:])
    assert first < 0.3  # the random model rarely says 7 ...
    assert last > 0.8 and last - first > 0.5  # ... and RL teaches it to
    assert (run.final_dir / "model.safetensors").is_file()
    assert [m["verifier_failures"] for m in metrics(run.path)] == [0] * 15


def test_verifier_failures_are_in_the_metrics(toy, tmp_path):
    # A verifier that raises scores 0 (safe_score), and the metrics say so: 4 prompts x 8 responses.
    run = train(rl_config(toy, tmp_path / "run", iterations=2, verifier=f"{VERIFIER_MODULE}:broken"))
    assert [m["verifier_failures"] for m in metrics(run.path)] == [32, 32]
    assert [m["accuracy"] for m in metrics(run.path)] == [0.0, 0.0]


def test_rollout_tagger_logs_behaviour_shares(toy, tmp_path):
    run = train(rl_config(toy, tmp_path / "run", iterations=2, rollout_tagger=f"{VERIFIER_MODULE}:says_seven"))
    for m in metrics(run.path):
        # the toy verifier pays exactly the responses that say 7, so the tag's share is the accuracy
        assert m["tags/says7"] == pytest.approx(m["accuracy"])


# --- resume equals uninterrupted -----------------------------------------------------------


RESUME_KEYS = ("reward", "accuracy", "loss", "grad_norm", "entropy", "kl", "length_weight", "zero_var_groups",
               "sampler/success_mean", "sampler/seen_frac", "update_skipped")


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resume_equals_uninterrupted(toy, tmp_path, optimizer):
    # Prioritized sampling over 8 problems, 2 per iteration: which problems come next depends on the
    # sampler's RNG and success statistics, so those must be restored, as must the optimiser state
    # (Adam's moments; SGD's momentum buffers).
    over = {"iterations": 6, "save_every": 2, "rollout.prompts_per_iter": 2, "rollout.k": 4,
            "sampler.kind": "prioritized", "loss.updates_per_iter": 2, "loss.tau": 0.5,
            "length_penalty.weight": 0.2, "length_penalty.warmup_iters": 2, "loss.optimizer": optimizer}
    if optimizer == "sgd":
        over["loss.lr"] = 0.5
    full = train(rl_config(toy, tmp_path / "full", **over)).path
    part = tmp_path / "part"
    train(rl_config(toy, part, **dict(over, iterations=3)))  # "interrupted" after iteration 3
    train(rl_config(toy, part, **over))  # same out_dir: resumes from checkpoints/step-3
    assert "resumed from" in (part / "train.log").read_text()

    m_full, m_part = metrics(full), metrics(part)
    print("update skipped per iteration:", [m["update_skipped"] for m in m_full])
    assert [m["step"] for m in m_full] == [m["step"] for m in m_part] == [1, 2, 3, 4, 5, 6]  # no duplicates
    for a, b in zip(m_full, m_part):
        assert {k: a[k] for k in RESUME_KEYS} == {k: b[k] for k in RESUME_KEYS}, a["step"]
    assert any(m["sampler/seen_frac"] < 1 for m in m_full)  # the sampler really had choices to make
    # iterations without signal (every group all wrong) skip their step, here before the interruption
    # too, and later iterations still step: the resumed run skips and steps alike
    assert any(m["update_skipped"] for m in m_full[:3]) and not all(m["update_skipped"] for m in m_full[3:])
    w_full = load_file(full / "final" / "model.safetensors")
    w_part = load_file(part / "final" / "model.safetensors")
    assert w_full.keys() == w_part.keys()
    assert all(torch.equal(w_full[k], w_part[k]) for k in w_full)
    w0 = load_file(toy["model"] / "model.safetensors")
    assert any(not torch.equal(w0[k], w_full[k]) for k in w0)  # and the runs did train


def test_run_without_signal_never_steps(toy, tmp_path):
    # A reward that is 0 for everything and no length penalty: every iteration is skipped and counted,
    # the exported weights are the start's, and a run resumed from the never-stepped optimiser does too.
    over = {"iterations": 2, "rollout.prompts_per_iter": 2, "rollout.k": 4, "verifier": f"{VERIFIER_MODULE}:never",
            "loss.updates_per_iter": 2}
    out = tmp_path / "run"
    train(rl_config(toy, out, **over))
    ckpt = out / "checkpoints" / "step-2"  # no optimiser state to save: only the model's
    assert json.loads((ckpt / "trainer.json").read_text())["optimizer_state"] is False
    assert not (ckpt / "optim").exists() and (ckpt / "model" / ".metadata").is_file()
    train(rl_config(toy, out, **dict(over, iterations=3)))  # resumes from the empty optimiser state
    lines = metrics(out)
    assert [(m["step"], m["update_skipped"], m["zero_var_groups"]) for m in lines] == [(i, 1, 1.0) for i in (1, 2, 3)]
    assert all(m["loss"] is None and m["grad_norm"] is None and m["train_tokens_per_s"] is None for m in lines)
    log_text = (out / "train.log").read_text()
    assert log_text.count("every group's rewards are tied (all advantages 0): no optimiser step") == 3
    w0 = load_file(toy["model"] / "model.safetensors")
    w1 = load_file(out / "final" / "model.safetensors")
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)


# --- phases ---------------------------------------------------------------------------------


def _rollout(text: str, length: int) -> Rollout:
    return Rollout(prompt_id="p", prompt_ids=[1, 2], response_ids=[9] * length, response_text=text,
                   logprobs=[-1.0] * length, length=length)


def test_score_fills_correctness_and_k15_length_reward():
    verifier = lambda response, reference: float(reference in response)  # noqa: E731
    lp = LengthPenaltyConfig(weight=0.2, warmup_iters=3)

    def groups():
        # lengths 2, 4, 6, 10 (min 2, max 10): lambda = 0.5 - (len - 2) / 8 = 0.5, 0.25, 0.0, -0.5
        g0 = [_rollout("7", 2), _rollout("six", 4), _rollout("x 7 x", 6), _rollout("no", 10)]
        g1 = [_rollout("7", 5), _rollout("8", 5), _rollout("7", 5), _rollout("9", 5)]  # equal lengths: lambda 0
        return [g0, g1]

    problems = [{"answer": "7"}, {"answer": "7"}]
    before = groups()
    score(before, problems, verifier, lp, it=2)  # still warming up: weight 0
    after = groups()
    score(after, problems, verifier, lp, it=3)  # from iteration 3 on: weight 0.2

    for rollouts in (before, after):
        assert [r.correct for r in rollouts[0]] == [1.0, 0.0, 1.0, 0.0]
        assert [r.correct for r in rollouts[1]] == [1.0, 0.0, 1.0, 0.0]
        # correct: lambda; wrong: min(0, lambda)
        assert [r.length_reward for r in rollouts[0]] == pytest.approx([0.5, 0.0, 0.0, -0.5])
        assert [r.length_reward for r in rollouts[1]] == [0.0, 0.0, 0.0, 0.0]
        assert [r.group for r in rollouts[0]] == [0] * 4 and [r.group for r in rollouts[1]] == [1] * 4
    assert [r.reward for r in before[0]] == [1.0, 0.0, 1.0, 0.0]
    assert [r.reward for r in after[0]] == pytest.approx([1.0 + 0.2 * 0.5, 0.0, 1.0, -0.2 * 0.5])
    assert [r.reward for r in after[1]] == [1.0, 0.0, 1.0, 0.0]


def _hand_loss(logp: torch.Tensor, flat: list[Rollout], k: int, tau: float) -> tuple[float, float, float]:
    """(mirror-descent loss, mean (r - rbar)^2, mean d_j) written out from the recorded log-probs."""
    residuals, adv_sq, log_ratios = [], [], []
    for g in range(0, len(flat), k):
        group = flat[g : g + k]
        rbar = sum(r.reward for r in group) / k
        for j, r in enumerate(group):
            seq_theta = float(logp[g + j, : r.length].double().sum())
            seq_ref = sum(r.logprobs)  # log pi_i(y|x), recorded at sampling time
            d = seq_theta - seq_ref
            residuals.append((r.reward - rbar - tau * d) ** 2)
            adv_sq.append((r.reward - rbar) ** 2)
            log_ratios.append(d)
    n = len(flat)
    return sum(residuals) / n, sum(adv_sq) / n, sum(log_ratios) / n


def test_update_loss_is_mirror_descent_from_recorded_logprobs(toy):
    loaded = load(str(toy["model"]))
    k, tau = 4, 0.5
    prompts = [loaded.render([{"role": "user", "content": q}], add_generation_prompt=True) for q in QUESTIONS[:3]]
    with torch.no_grad():
        groups = HFEngine(loaded, batch_size=64).generate(prompts, k, SamplingParams(max_new_tokens=6, seed=7))
    flat = [r for g in groups for r in g]
    for i, r in enumerate(flat):
        r.reward = [1.0, 0.0, 0.0, 1.1, 0.0, 0.0, 0.0, 0.0, 0.3, 1.0, -0.1, 0.0][i]  # group 1: zero variance
    # 3 micro-batches of one group each: the step still normalises by all 12 responses
    cfg = RLConfig()
    cfg.loss.tau, cfg.rollout.k, cfg.loss.responses_per_micro_batch, cfg.loss.clip_grad = tau, k, 4, 0.0
    model = loaded.model
    model.train()
    optim = torch.optim.AdamW(param_groups(model, cfg.model, 1e-2, 0.0), betas=(0.9, 0.95), foreach=False)
    loss_fn = functools.partial(get_loss("mirror_descent"), tau=tau)
    d = D.Dist()

    with torch.no_grad():
        logp0 = response_logprobs(model, flat, loaded, 1.0)
    expected0, adv_sq, ratio0 = _hand_loss(logp0, flat, k, tau)
    out0 = update(model, optim, flat, k, loaded, cfg, d, loss_fn, n_global=len(flat))
    print("step 1:", out0, "hand:", expected0, "mean adv^2:", adv_sq)
    # First step: pi_theta = pi_i, so log pi_theta - log pi_i = 0 up to float noise and L = mean (r - rbar)^2.
    assert abs(ratio0) < 1e-4 and abs(out0["kl"]) < 1e-4
    # rel 1e-5: the recorded and the recomputed float32 log-probs differ in summation order; on the
    # 2026-12-05 CI machine (AMD EPYC) the first-step loss differed from the formula by 2.5e-6 relative
    assert out0["loss"] == pytest.approx(expected0, rel=1e-5)
    assert out0["loss"] == pytest.approx(adv_sq, abs=1e-4)

    with torch.no_grad():
        logp1 = response_logprobs(model, flat, loaded, 1.0)
    expected1, _, ratio1 = _hand_loss(logp1, flat, k, tau)
    out1 = update(model, optim, flat, k, loaded, cfg, d, loss_fn, n_global=len(flat))
    print("step 2:", out1, "hand:", expected1)
    # Second step against the same pi_i: the log-ratio term now matters, and is taken from the recorded log-probs.
    assert abs(expected1 - adv_sq) > 1e-3
    assert out1["loss"] == pytest.approx(expected1, rel=1e-5)
    assert out1["kl"] == pytest.approx(-ratio1, rel=1e-4, abs=1e-6)  # KL(pi_i || pi_theta) ~ -E[log ratio]


def test_update_grpo_normalises_by_response_tokens(toy):
    # GRPO's loss is a token mean (losses.grpo_loss); across micro-batches the step must divide by the
    # global token count. Lengths differ within groups, else the first-step loss would be 0 anyway.
    loaded = load(str(toy["model"]))
    k = 4
    prompts = [loaded.render([{"role": "user", "content": q}], add_generation_prompt=True) for q in QUESTIONS[:2]]
    with torch.no_grad():
        groups = HFEngine(loaded, batch_size=64).generate(prompts, k, SamplingParams(max_new_tokens=6, seed=3))
    flat = [r for g in groups for r in g]
    for r, n, reward in zip(flat, [1, 3, 5, 6, 2, 6, 4, 6], [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]):
        n = min(n, r.length)
        r.response_ids, r.logprobs, r.length, r.reward = r.response_ids[:n], r.logprobs[:n], n, reward
        r.correct = reward  # the whole reward is correctness: GRPO scales by its spread
    cfg = RLConfig()
    cfg.loss.name, cfg.rollout.k, cfg.loss.responses_per_micro_batch, cfg.loss.clip_grad = "grpo", k, 4, 0.0
    model = loaded.model
    model.train()
    optim = torch.optim.SGD(param_groups(model, cfg.model, 1e-2, 0.0))
    loss_fn = functools.partial(get_loss("grpo"), clip_eps=0.2)
    out = update(model, optim, flat, k, loaded, cfg, D.Dist(), loss_fn, n_global=len(flat))
    # first step: every ratio is 1, so L = -(1/N_tokens) sum_b A_b * len_b, A = (r - rbar) / (std + 1e-4)
    total = 0.0
    for g in range(0, len(flat), k):
        rs = [r.reward for r in flat[g : g + k]]
        mean = sum(rs) / k
        std = (sum((x - mean) ** 2 for x in rs) / k) ** 0.5
        total += sum((r.reward - mean) / (std + 1e-4) * r.length for r in flat[g : g + k])
    n_tokens = sum(r.length for r in flat)
    print("grpo loss", out["loss"], "hand", -total / n_tokens, "lengths", [r.length for r in flat])
    assert abs(total) > 0.5
    assert out["loss"] == pytest.approx(-total / n_tokens, rel=1e-4)


def _state_copy(model, optim) -> tuple[dict, dict]:
    return ({n: p.detach().clone() for n, p in model.named_parameters()}, copy.deepcopy(optim.state_dict()))


def _assert_same_state(a, b) -> None:
    """Bit-identical parameters and optimiser state (moments, step counts, hyperparameters)."""
    (pa, oa), (pb, ob) = a, b
    assert pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i, st in oa["state"].items():
        assert st.keys() == ob["state"][i].keys()
        assert all(torch.equal(v, ob["state"][i][key]) for key, v in st.items()), i


def test_update_without_signal_leaves_weights_and_optimiser_untouched(toy):
    # Issue 22: with every advantage 0 the gradient is rounding noise, yet AdamW took a full-size step.
    loaded = load(str(toy["model"]))
    k = 4
    prompts = [loaded.render([{"role": "user", "content": q}], add_generation_prompt=True) for q in QUESTIONS[:3]]
    with torch.no_grad():
        groups = HFEngine(loaded, batch_size=64).generate(prompts, k, SamplingParams(max_new_tokens=6, seed=11))
    flat = [r for g in groups for r in g]
    model = loaded.model
    model.train()
    cfg = RLConfig()
    cfg.rollout.k, cfg.loss.responses_per_micro_batch, cfg.loss.clip_grad = k, 4, 0.0
    optim = torch.optim.AdamW(param_groups(model, cfg.model, 1e-2, 0.1), betas=(0.9, 0.95), foreach=False)
    losses = {"mirror_descent": functools.partial(get_loss("mirror_descent"), tau=0.5),
              "grpo": functools.partial(get_loss("grpo"), clip_eps=0.2)}

    def set_rewards(correct: list[float], rewards: list[float] | None = None) -> None:
        for r, c, total in zip(flat, correct, rewards or correct):
            r.correct, r.reward = c, total

    # a batch with signal steps (and gives AdamW moments to keep intact below)
    set_rewards([1.0, 0.0, 0.0, 1.0] * 3)
    before = _state_copy(model, optim)
    out = update(model, optim, flat, k, loaded, cfg, D.Dist(), losses["mirror_descent"], n_global=len(flat))
    assert out["update_skipped"] == 0 and out["loss"] > 0.1
    after = _state_copy(model, optim)
    assert any(not torch.equal(before[0][n], after[0][n]) for n in before[0])

    # every group tied (all right, all wrong, all 0.3: not a dyadic float): no step, for both losses, twice
    set_rewards([1.0] * 4 + [0.0] * 4 + [0.3] * 4)
    for name, loss_fn in losses.items():
        for _ in range(2):  # updates_per_iter 2: the policy is still pi_i, so the second skips too
            out = update(model, optim, flat, k, loaded, cfg, D.Dist(), loss_fn, n_global=len(flat))
            assert out == {"loss": None, "grad_norm": None, "entropy": None, "kl": None, "update_skipped": 1}, name
            _assert_same_state(after, _state_copy(model, optim))

    # GRPO: correctness tied everywhere but the length terms differ in one group -> a (small) real step
    set_rewards([1.0] * 4 + [0.0] * 4 + [0.3] * 4, [1.05, 1.0, 1.0, 0.95] + [0.0] * 4 + [0.3] * 4)
    out = update(model, optim, flat, k, loaded, cfg, D.Dist(), losses["grpo"], n_global=len(flat))
    assert out["update_skipped"] == 0 and out["grad_norm"] > 0
    moved = _state_copy(model, optim)
    assert any(not torch.equal(after[0][n], moved[0][n]) for n in after[0])


def test_guardrails_warn_then_stop_with_the_reason(caplog):
    guard = Guardrails(GuardrailConfig(max_truncated_frac=0.5, max_zero_var_frac=0.6, patience=2, stop=True))
    ok = {"truncated_frac": 0.5, "zero_var_groups": 0.6}  # at the thresholds: fine
    truncated = {"truncated_frac": 0.75, "zero_var_groups": 0.0}
    with caplog.at_level(logging.WARNING, logger="thinkvl"):
        guard.check(ok, 1)
        assert not caplog.records
        guard.check(truncated, 2)  # first bad iteration: a warning, no stop yet
        assert "75% of responses hit max_new_tokens" in caplog.text and "iteration 2" in caplog.text
        guard.check(ok, 3)  # the streak resets
        guard.check(truncated, 4)
        stop = r"stopped by guardrail at iteration 5: 75% of responses hit max_new_tokens"
        with pytest.raises(RuntimeError, match=stop):
            guard.check(truncated, 5)

    caplog.clear()
    guard = Guardrails(GuardrailConfig(max_zero_var_frac=0.6, patience=3, stop=True))
    zero_var = {"truncated_frac": 0.0, "zero_var_groups": 1.0}
    with caplog.at_level(logging.WARNING, logger="thinkvl"):
        guard.check(zero_var, 1)
        guard.check(zero_var, 2)
        assert caplog.text.count("100% of groups have identical rewards: no learning signal") == 2
        with pytest.raises(RuntimeError, match="iteration 3: 100% of groups have identical rewards"):
            guard.check(zero_var, 3)

    guard = Guardrails(GuardrailConfig(max_zero_var_frac=0.6, patience=1, stop=False))  # warn only
    for it in range(5):
        guard.check(zero_var, it)


def test_guardrail_stops_a_run(toy, tmp_path):
    # Every response hits max_new_tokens=2; stop after 2 such iterations, with the reason.
    cfg = rl_config(toy, tmp_path / "stop", iterations=5, **{"rollout.max_new_tokens": 2, "rollout.k": 2,
                                                            "guardrails.max_truncated_frac": 0.5,
                                                            "guardrails.patience": 2, "guardrails.stop": True})
    with pytest.raises(RuntimeError, match="stopped by guardrail at iteration 2: .* hit max_new_tokens"):
        train(cfg)


def test_banned_tokens_hold_the_media_placeholders(toy):
    loaded = load(str(toy["model"]))
    tok = loaded.tokenizer
    banned = banned_tokens(loaded)
    image = tok.convert_tokens_to_ids("<|media_pad|>")
    assert image == loaded.model.config.image_token_id and image in banned
    assert loaded.model.config.video_token_id in banned
    assert tok.eos_token_id not in banned  # the policy must still be able to stop
    assert tok.convert_tokens_to_ids("7") not in banned


def test_a_placeholder_in_a_response_stops_with_the_reason(toy):
    loaded = load(str(toy["model"]))
    banned = banned_tokens(loaded)
    image = loaded.model.config.image_token_id
    seven = loaded.tokenizer.convert_tokens_to_ids("7")
    ok = Rollout(prompt_id="p1", prompt_ids=[1, 2], response_ids=[seven, seven], response_text="", length=2)
    check_no_banned([ok], banned)  # nothing banned: no error
    bad = Rollout(prompt_id="p2", prompt_ids=[1, 2], response_ids=[seven, image], response_text="", length=2,
                  sample_index=3)
    with pytest.raises(RuntimeError, match=rf"problem p2 \(sample 3\).*\[{image}\].*image-feature count"):
        check_no_banned([ok, bad], banned)


# --- 1 process vs 2 -------------------------------------------------------------------------


def test_two_processes_update_equals_one(toy, tmp_path):
    """The same fixed batch: 1 process (all 4 prompts, one micro-batch) vs torchrun with 2 gloo
    processes under FSDP2 (2 prompts each). Loss, grad norm and the updated weights must agree."""
    from _dist_rl import run_update

    out = tmp_path / "two.json"
    torchrun("_dist_rl.py", "update", str(toy["model"]), str(out), tmp_dir=tmp_path / "tmp", timeout=240)
    two = json.loads(out.read_text())
    w2 = torch.load(str(out) + ".pt", weights_only=True)

    one, w1 = run_update(str(toy["model"]))
    print("1 process:", one, "\n2 processes:", two)
    assert (one["world"], two["world"]) == (1, 2) and one["n_global"] == two["n_global"] == 16
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    assert two["entropy"] == pytest.approx(one["entropy"], rel=1e-5)
    assert w1.keys() == w2.keys()
    init = load(str(toy["model"])).model.state_dict()
    assert init.keys() == w1.keys()
    moved = min(max(float((w[k] - init[k]).abs().max()) for k in init) for w in (w1, w2))
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    checksum = [sum(float(w[k].double().sum()) for k in sorted(w)) for w in (w1, w2)]
    print(f"moved {moved:.2e}, max |1-proc - 2-proc| {worst:.2e}, checksums {checksum}")
    assert moved > 1e-2 > worst * 1000  # both updates moved the weights, and moved them alike
    assert checksum[0] == pytest.approx(checksum[1], rel=1e-6)


def test_two_processes_skip_together(toy, tmp_path):
    """Under FSDP2 the ranks agree on skipping a step without signal: all tied -> both skip (weights and
    AdamW state untouched, also by saving a checkpoint); only rank 1 with signal -> both step."""
    out = tmp_path / "skip.json"
    torchrun("_dist_rl.py", "skip", str(toy["model"]), str(out), tmp_dir=tmp_path / "tmp", timeout=240)
    ranks = json.loads(out.read_text())
    print(ranks)
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["tied"]["update_skipped"] == 1 and r["tied"]["loss"] is None
        assert r["tied_optim_state_len"] == r["loaded_optim_state_len"] == 0 and r["tied_saved_optim"] is False
        assert r["rank1_signal"]["update_skipped"] == 0 and r["rank1_signal"]["loss"] > 1e-3
        assert r["rank1_signal_optim_state_len"] > 0
    # the full weights, compared on rank 0: untouched by the skipped update, moved by the real one
    assert ranks[0]["tied_same_weights"] is True and ranks[0]["rank1_signal_same_weights"] is False
    assert ranks[0]["loaded_same_weights"] is True
    assert ranks[0]["rank1_signal"]["loss"] == pytest.approx(ranks[1]["rank1_signal"]["loss"])


def test_two_process_train_with_uneven_generation(toy, tmp_path):
    """`train` under torchrun (FSDP2, gloo) when the ranks' rollouts end at different steps.

    Half the vocabulary is made a stop token, so responses end after 1-8 tokens and each rank's
    generation runs a different number of forward passes. The policy must not be the sharded model
    during generation (each of its forwards is a collective: the ranks would wait on each other
    forever); the update's forward count must not depend on this rank's lengths either."""
    model = tmp_path / "model"
    shutil.copytree(toy["model"], model)
    gen_cfg = json.loads((model / "generation_config.json").read_text())
    vocab = json.loads((model / "config.json").read_text())["text_config"]["vocab_size"]
    gen_cfg["eos_token_id"] = [gen_cfg["eos_token_id"], *range(20, vocab, 2)]
    (model / "generation_config.json").write_text(json.dumps(gen_cfg))
    out = tmp_path / "run"
    torchrun("_dist_rl.py", "train", str(model), str(toy["problems"]), str(out), VERIFIER, tmp_dir=tmp_path / "tmp",
             timeout=180, pythonpath=toy["root"])
    lines = metrics(out)
    print([(m["step"], m["reward"], m["response_length/mean"], m["loss"]) for m in lines])
    assert [m["step"] for m in lines] == [1, 2]
    assert all(1 <= m["response_length/mean"] < 7 for m in lines)  # the responses did end early
    assert all(m["loss"] > 1e-3 for m in lines)  # length rewards differ within groups: a real update
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    w0 = load_file(toy["model"] / "model.safetensors")
    w1 = load_file(out / "final" / "model.safetensors")
    assert w0.keys() == w1.keys() and max(float((w0[k] - w1[k]).abs().max()) for k in w0) > 1e-3


@pytest.mark.parametrize("kind", ["image", "text"])
def test_shared_prompt_packing_equals_repeated_prompts(vlm, images, kind):
    # The update packs a group's prompt once and hangs the k responses off it (varlen attention reads
    # a segment starting at position s > 0 as a branch of the prompt). Log-probs and gradients must
    # equal those with the prompt repeated in front of every response, images included.
    from test_packing import conversations

    from thinkvl.models.attention import set_attention
    from thinkvl.rl.loop import packed_responses

    loaded, model = vlm, vlm.model
    prompts = [loaded.render(c[:1], add_generation_prompt=True) for c in conversations(images, kind)][:3]
    model.eval()
    with torch.no_grad():
        groups = HFEngine(loaded, batch_size=16).generate(prompts, 3, SamplingParams(max_new_tokens=7, seed=5))
    model.train()
    flat = [r for g in groups for r in g]
    shared, where = packed_responses(flat, loaded, share_prompt=True)
    assert len(shared) == len(prompts) and [len(w) for w in where] == [3, 3, 3]
    n_prompt = sum(len(p) for p in prompts)
    assert sum(len(e) for e in shared) == sum(len(r.prompt_ids) + r.length for r in flat) - 2 * (n_prompt - 3)
    if kind == "image":
        # one copy of each prompt's images per group (the second prompt is text only)
        assert [e.pixel_values is not None for e in shared] == [True, False, True]
        assert [e.pixel_values is flat[3 * g].pixel_values for g, e in enumerate(shared)] == [True] * 3

    weights = torch.linspace(0.5, 1.5, 7)
    out = {}
    set_attention(model, "varlen")  # the session fixture attends with SDPA; put it back after
    try:
        for share in (False, True):
            model.zero_grad(set_to_none=True)
            logp = response_logprobs(model, flat, loaded, 1.0, share_prompt=share)
            (logp * weights).sum().backward()
            out[share] = logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        set_attention(model, "sdpa")
    (lp0, g0), (lp1, g1) = out[False], out[True]
    assert (lp0 != 0).sum() == sum(r.length for r in flat)
    assert torch.allclose(lp0, lp1, atol=2e-6), (lp0 - lp1).abs().max()
    assert g0.keys() == g1.keys()
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-6), (n, (g0[n] - g1[n]).abs().max())
    model.zero_grad(set_to_none=True)


def test_shared_prompt_needs_varlen_attention(toy):
    # transformers' own packed masks would read a branch as a new example: the update falls back to
    # one example per response when the model does not attend with thinkvl's varlen function.
    from thinkvl.models.attention import uses_varlen

    assert uses_varlen(load(str(toy["model"])).model)
    assert not uses_varlen(load(str(toy["model"]), attn_implementation="sdpa").model)
