"""The vLLM engine against the HF engine on the same weights: greedy responses equal token for token
(text and image prompts), weight syncs reach vLLM (a changed model changes its responses, vision
tower included), log-probs equal the trainer's by their definition, stop strings and truncation
agree, and RL iterations with engine=vllm give the HF engine's losses on the same tokens.

The vLLM tests need vLLM's own environment (`scripts/vllm_venv.sh`; $THINKVL_VLLM_PYTHON points at
its python). They are skipped only when $THINKVL_VLLM_PYTHON is unset and the script's default
folder is empty; a set variable that points at no working vLLM fails them (CI sets it).
Tiny Qwen2 / Qwen2.5-VL with head_dim 32: vLLM's CPU attention refuses head_dim 16.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from _vllm_models import save_qwen2, save_qwen_vl, vllm_python
from conftest import write_png

from thinkvl.config import ConfigError
from thinkvl.models.load import Loaded, load
from thinkvl.rl import loop as rl_loop
from thinkvl.rl.loop import RLConfig, banned_tokens, response_logprobs, train
from thinkvl.rollout.engine import SamplingParams, VLLMSettings, build_engine
from thinkvl.rollout.hf_engine import HFEngine, media_token_ids
from thinkvl.rollout.types import Rollout
from thinkvl.rollout.vllm_engine import SharedWeights, VLLMEngine, collapse_image_runs

torch.set_num_threads(1)

PY = vllm_python()
needs_vllm = pytest.mark.skipif(PY is None, reason="no vLLM environment: THINKVL_VLLM_PYTHON is unset and "
                                                   "scripts/vllm_venv.sh's default folder is empty")
TEXT_PROMPTS = ["How many red circles are there?", "List the shapes.", "What is 3 + 4 * 2?"]


def settings() -> VLLMSettings:
    return VLLMSettings(python=PY or "", dtype="float32", max_model_len=512, kv_cache_gib=0.25)


def render(loaded: Loaded, contents: list) -> list:
    return [loaded.render([{"role": "user", "content": c}], add_generation_prompt=True) for c in contents]


def perturbed(loaded: Loaded, seed: int, scale: float = 0.05) -> Loaded:
    """A copy of the model with every weight moved by N(0, scale^2) noise."""
    model = copy.deepcopy(loaded.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return dataclasses.replace(loaded, model=model)


def ids(groups: list[list[Rollout]]) -> list[list[list[int]]]:
    return [[r.response_ids for r in g] for g in groups]


def forced_logprobs(loaded: Loaded, r: Rollout, temperature: float, banned: tuple[int, ...]) -> tuple[list, list]:
    """One plain forward over prompt + response (no packing, no cache): the response tokens'
    log softmax(logits / T) over the full vocabulary, and over the tokens not in `banned`."""
    ex = r.to_example()
    kw = {}
    if ex.pixel_values is not None:
        kw = {"pixel_values": ex.pixel_values, "image_grid_thw": ex.image_grid_thw,
              "mm_token_type_ids": torch.tensor([ex.extra["mm_token_type_ids"]])}
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([ex.input_ids]), use_cache=False, **kw).logits[0].float()
    p = len(r.prompt_ids)
    z = logits[p - 1 : p - 1 + r.length] / temperature  # [R, V]
    tok = torch.tensor(r.response_ids).unsqueeze(-1)
    full = torch.log_softmax(z, -1).gather(-1, tok).squeeze(-1)
    allowed = torch.log_softmax(z.index_fill(-1, torch.tensor(banned or [0]), float("-inf")) if banned else z, -1)
    return full.tolist(), allowed.gather(-1, tok).squeeze(-1).tolist()


# --- without vLLM -------------------------------------------------------------------------------------


def test_collapse_image_runs():
    assert collapse_image_runs([1, 9, 9, 9, 2, 9, 3, 9, 9], 9) == [1, 9, 2, 9, 3, 9]
    assert collapse_image_runs([1, 9, 9], None) == [1, 9, 9]


def test_shared_weights_round_trip():
    tensors = [("a", torch.arange(6, dtype=torch.float32).reshape(2, 3)),
               ("b", torch.tensor([1, 2], dtype=torch.bfloat16)),
               ("c", torch.randn(3, 5)[:, 1:4])]  # not contiguous
    shm = SharedWeights()
    try:
        manifest = shm.write(iter(tensors))
        view = torch.from_file(shm.path, shared=True, size=shm.size, dtype=torch.uint8)
        for (name, t), (m_name, dtype, shape, offset, nbytes) in zip(tensors, manifest):
            got = view[offset : offset + nbytes].view(getattr(torch, dtype)).view(shape)
            assert m_name == name and offset % 64 == 0 and torch.equal(got, t)
    finally:
        shm.close()
    assert not Path(shm.path).exists()


def test_missing_vllm_is_a_config_error(monkeypatch, qwen):
    with pytest.raises(ConfigError, match=r"rollout\.engine: vllm: the vLLM python '/nonexistent/python' does not "
                                          r"exist; install vLLM in its own environment"):
        build_engine("vllm", qwen, "unused", vllm=VLLMSettings(python="/nonexistent/python"))
    monkeypatch.delenv("THINKVL_VLLM_PYTHON", raising=False)
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm fails, as in thinkvl's own environment
    with pytest.raises(ConfigError, match=r"rollout\.engine: vllm: vLLM is not importable here"):
        build_engine("vllm", qwen, "unused")
    with pytest.raises(ConfigError, match=r"rollout\.engine: 'sglang' unknown"):
        build_engine("sglang", qwen, "unused")


# --- text: tiny Qwen2 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    folder = save_qwen2(tmp_path_factory.mktemp("vllm_qwen2") / "model")
    loaded = load(str(folder))
    loaded.model.eval()
    engine = VLLMEngine(loaded, str(folder), settings())
    yield loaded, engine, str(folder)
    engine.close()


@needs_vllm
def test_text_greedy_equals_hf_and_follows_weight_sync(text):
    loaded, engine, _ = text
    prompts = render(loaded, TEXT_PROMPTS)
    greedy = SamplingParams(max_new_tokens=12, greedy=True)
    engine.sync_weights(loaded.model)
    v, h = engine.generate(prompts, 1, greedy), HFEngine(loaded).generate(prompts, 1, greedy)
    assert ids(v) == ids(h)
    for gv, gh in zip(v, h):
        assert gv[0].finished == gh[0].finished and gv[0].truncated == gh[0].truncated
        assert gv[0].response_text == gh[0].response_text
        assert torch.allclose(torch.tensor(gv[0].logprobs), torch.tensor(gh[0].logprobs), atol=1e-4)
    other = perturbed(loaded, seed=1)
    engine.sync_weights(other.model)
    v2 = engine.generate(prompts, 1, greedy)
    assert ids(v2) == ids(HFEngine(other).generate(prompts, 1, greedy))
    assert ids(v2) != ids(v)
    engine.sync_weights(loaded.model)
    assert ids(engine.generate(prompts, 1, greedy)) == ids(v)


@needs_vllm
def test_lora_policy_syncs_merged(text):
    """RL under model.lora: vLLM holds the base model, the sync sends W + s B A under the base names
    (rl.loop.policy_weights), and greedy responses equal the HF engine's on the adapted model."""
    from thinkvl.train import lora as lora_

    loaded, engine, _ = text
    adapted = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
    lora_.attach(adapted.model, lora_.LoraSettings(rank=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in adapted.model.named_parameters():
            if ".lora_B." in name:  # peft starts B at 0 (no change); move it so the merge matters
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    names = [name for name, _ in rl_loop.policy_weights(adapted.model, lora=True)]
    assert names == list(loaded.model.state_dict()) and not any("lora" in n or "base_layer" in n for n in names)
    prompts = render(loaded, TEXT_PROMPTS)
    greedy = SamplingParams(max_new_tokens=12, greedy=True)
    base = ids(HFEngine(loaded).generate(prompts, 1, greedy))
    engine.sync_weights(rl_loop.policy_weights(adapted.model, lora=True))
    v = ids(engine.generate(prompts, 1, greedy))
    assert v == ids(HFEngine(adapted).generate(prompts, 1, greedy)) and v != base
    engine.sync_weights(loaded.model)


@needs_vllm
def test_text_sampled_logprobs_are_the_trainers(text):
    loaded, engine, _ = text
    engine.sync_weights(loaded.model)
    sampling = SamplingParams(max_new_tokens=10, temperature=0.7)
    out = engine.generate(render(loaded, TEXT_PROMPTS), 4, sampling)
    assert [len(g) for g in out] == [4, 4, 4] and [r.sample_index for r in out[0]] == [0, 1, 2, 3]
    flat = [r for g in out for r in g]
    assert len({tuple(r.response_ids) for r in flat}) > 3  # n samples, not one copied
    logp = response_logprobs(loaded.model, flat, loaded, 0.7)
    for i, r in enumerate(flat):
        assert r.length == len(r.response_ids) == len(r.logprobs)
        assert torch.allclose(torch.tensor(r.logprobs), logp[i, : r.length], atol=1e-4)
        assert r.truncated == (r.length == 10 and r.response_ids[-1] not in engine.stop_ids)
        assert r.finished != r.truncated


@needs_vllm
def test_text_stop_strings_and_truncation_equal_hf(text):
    loaded, engine, _ = text
    engine.sync_weights(loaded.model)
    prompts = render(loaded, TEXT_PROMPTS)
    long = HFEngine(loaded).generate(prompts, 1, SamplingParams(max_new_tokens=12, greedy=True))
    stop = long[0][0].response_text[3:5]  # a string the first greedy response contains
    assert len(stop) == 2
    stopping = SamplingParams(max_new_tokens=12, greedy=True, stop_strings=(stop,))
    v, h = engine.generate(prompts, 1, stopping), HFEngine(loaded).generate(prompts, 1, stopping)
    assert ids(v) == ids(h)
    assert v[0][0].finished and stop in v[0][0].response_text and v[0][0].length < long[0][0].length
    short = engine.generate(prompts, 2, SamplingParams(max_new_tokens=3))
    assert all(r.length <= 3 and r.truncated == (r.length == 3 and r.response_ids[-1] not in engine.stop_ids)
               for g in short for r in g)


# --- images: tiny Qwen2.5-VL ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_qwen_vl")
    folder = save_qwen_vl(root / "model")
    loaded = load(str(folder))
    loaded.model.eval()
    red = write_png(root / "red.png", (56, 84), (255, 0, 0))
    green = write_png(root / "green.png", (112, 84), (0, 160, 0))
    contents = ["What is 3 + 4 * 2?",
                [{"type": "image", "image": red}, {"type": "text", "text": "How many red circles?"}],
                [{"type": "image", "image": green}, {"type": "text", "text": "List the shapes."}]]
    engine = VLLMEngine(loaded, str(folder), settings())
    yield loaded, engine, render(loaded, contents)
    engine.close()


@needs_vllm
def test_image_prompts_equal_hf_and_ban_placeholders(vl):
    loaded, engine, prompts = vl
    assert prompts[1].pixel_values is not None and prompts[2].image_grid_thw.prod() > prompts[1].image_grid_thw.prod()
    greedy = SamplingParams(max_new_tokens=10, greedy=True)
    banned = media_token_ids(loaded)
    assert banned, "the VL model has image/video placeholders to ban"
    for weights in (loaded, perturbed(loaded, seed=2, scale=0.2)):  # the second also changes the vision tower
        engine.sync_weights(weights.model)
        v, h = engine.generate(prompts, 1, greedy), HFEngine(weights).generate(prompts, 1, greedy)
        assert ids(v) == ids(h)
        for gv, gh in zip(v, h):
            full, allowed = forced_logprobs(weights, gv[0], 1.0, banned)
            assert torch.allclose(torch.tensor(gh[0].logprobs), torch.tensor(full), atol=1e-4)
            # vLLM's processed log-probs are renormalised over the tokens the ban bias leaves
            assert torch.allclose(torch.tensor(gv[0].logprobs), torch.tensor(allowed), atol=1e-4)
            assert not set(banned) & set(gv[0].response_ids)
    assert ids(engine.generate(prompts, 1, greedy)) == ids(v)  # cached prompts and images: same answer


# --- RL with engine=vllm ------------------------------------------------------------------------------

VERIFIER_SRC = '''
def distinct_chars(response: str, reference: str) -> float:
    """A graded reward random responses disagree on: distinct characters / 12, at most 1."""
    return min(len(set(response)) / 12, 1.0)
'''


def rl_config(text_dir: str, root: Path, engine: str) -> RLConfig:
    cfg = RLConfig()
    cfg.model.path = text_dir
    cfg.data.problems = str(root / "problems.jsonl")
    cfg.verifier = "thinkvl_vllm_test_verifier:distinct_chars"
    cfg.rollout.prompts_per_iter, cfg.rollout.k, cfg.rollout.max_new_tokens = 3, 4, 8
    cfg.rollout.engine, cfg.rollout.vllm = engine, settings()
    cfg.loss.lr, cfg.loss.tau = 1e-2, 1.0  # big steps: a vLLM that missed a sync would be far off
    cfg.loss.responses_per_micro_batch = 4
    cfg.iterations, cfg.seed = 3, 0
    cfg.out_dir = str(root / f"run_{engine}")
    return cfg


@needs_vllm
def test_rl_with_vllm_matches_hf_losses_on_the_same_tokens(text, tmp_path, monkeypatch):
    """engine=vllm and engine=hf cannot draw the same samples (different generators), so the hf run
    replays the vllm run's tokens through the HF model: same tokens, same rewards. At each
    iteration vLLM's recorded log-probs must equal the HF model's (renormalised over the allowed
    tokens) to 1e-4 -- with lr 1e-2 a missed weight sync is off by far more -- and the per-iteration
    loss and grad norm of the two runs must agree to 1e-5 relative."""
    loaded, _, text_dir = text
    (tmp_path / "problems.jsonl").write_text("".join(
        json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": q}], "answer": "x"}) + "\n"
        for i, q in enumerate(TEXT_PROMPTS)))
    (tmp_path / "thinkvl_vllm_test_verifier.py").write_text(VERIFIER_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    recorded: list[list[list[Rollout]]] = []
    real_generate = VLLMEngine.generate

    def recording(self, prompts, n, sampling):
        out = real_generate(self, prompts, n, sampling)
        recorded.append(copy.deepcopy(out))  # before the loop recomputes the log-probs in place
        return out

    monkeypatch.setattr(VLLMEngine, "generate", recording)
    run_v = train(rl_config(text_dir, tmp_path, "vllm"))
    assert len(recorded) == 3
    banned = banned_tokens(loaded)
    replayed = iter(recorded)

    def replay(self, prompts, n, sampling):
        out = next(replayed)
        for p, group in zip(prompts, out):
            for r in group:
                assert r.prompt_ids == p.input_ids
                full, allowed = forced_logprobs(dataclasses.replace(loaded, model=self.model), r,
                                                sampling.temperature, banned)
                assert torch.allclose(torch.tensor(r.logprobs), torch.tensor(allowed), atol=1e-4)
                r.logprobs = full  # what the HF engine records
        return out

    monkeypatch.setattr(HFEngine, "generate", replay)
    run_h = train(rl_config(text_dir, tmp_path, "hf"))
    mv = [json.loads(line) for line in Path(run_v.metrics_path).read_text().splitlines()]
    mh = [json.loads(line) for line in Path(run_h.metrics_path).read_text().splitlines()]
    assert len(mv) == len(mh) == 3
    for a, b in zip(mv, mh):
        assert a["reward"] == b["reward"] and a["response_length/mean"] == b["response_length/mean"]
        assert a["logprob_gap/max"] < 0.05 and "logprob_gap/max" not in b  # only vllm recomputes
        for key in ("loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-5)  # ~0 at the first step: float noise only
    assert len({m["reward"] for m in mv}) > 1 or mv[0]["loss"] > 0  # a run that had signal


TAGGER_SRC = '''
def tag(problem: dict, response: str) -> dict:
    return {"short": len(response) < 20}
'''


# --- label, distill and eval with engine=vllm -----------------------------------------------------------


@needs_vllm
def test_label_distill_and_eval_run_on_vllm(text, tmp_path, monkeypatch):
    """Each stage reaches a VLLMEngine through its `rollout.engine` key (eval: --engine), and eval's
    greedy responses equal those of the HF engine."""
    from thinkvl.config import load_config
    from thinkvl.distill.longcot import DistillConfig, build
    from thinkvl.eval.evaluate import main as eval_main
    from thinkvl.rl.difficulty import LabelConfig, label

    _, _, text_dir = text
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(
        json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": q}], "answer": "3"}) + "\n"
        for i, q in enumerate(TEXT_PROMPTS)))
    calls: list[int] = []
    real_generate = VLLMEngine.generate

    def counting(self, prompts, n, sampling):
        calls.append(len(prompts) * n)
        return real_generate(self, prompts, n, sampling)

    monkeypatch.setattr(VLLMEngine, "generate", counting)
    vllm_keys = ["rollout.engine=vllm", f"rollout.vllm.python={PY}", "rollout.vllm.kv_cache_gib=0.25"]
    out = label(load_config(LabelConfig, None, [f"model={text_dir}", f"problems={problems}", "n=2",
                                                 f"out={tmp_path / 'labelled.jsonl'}", "max_new_tokens=6", *vllm_keys]))
    rates = [json.loads(line)["difficulty"] for line in out.read_text().splitlines()]
    assert calls == [6] and len(rates) == 3 and all(r in (0.0, 0.5, 1.0) for r in rates)
    build(load_config(DistillConfig, None, [f"problems={problems}", "teacher.kind=local", f"teacher.model={text_dir}",
                                            "teacher.max_tokens=6", "k=2", f"out={tmp_path / 'longcot.jsonl'}",
                                            *vllm_keys]))
    assert calls == [6, 6] and json.loads((tmp_path / "longcot.jsonl.stats.json").read_text())["samples"] == 6
    (tmp_path / "thinkvl_vllm_test_tagger.py").write_text(TAGGER_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    for engine in ("vllm", "hf"):
        # vllm also samples k=2 and tags: avg@n, its standard error and the tag shares come through it
        sampled = ["--k", "2", "--tagger", "thinkvl_vllm_test_tagger:tag"] if engine == "vllm" else ["--k", "0"]
        assert eval_main(["--model", text_dir, "--data", str(problems), *sampled, "--max-new-tokens", "8",
                          "--engine", engine, "--vllm-python", PY, "--out", str(tmp_path / engine)]) == 0
    assert calls == [6, 6, 3, 6]  # greedy (3 problems), then 3 x 2 samples
    greedy = {e: [json.loads(line)["greedy_response"]
                  for line in (tmp_path / e / "responses.jsonl").read_text().splitlines()] for e in ("vllm", "hf")}
    assert greedy["vllm"] == greedy["hf"] and len(greedy["hf"]) == 3
    overall = json.loads((tmp_path / "vllm" / "summary.json").read_text())["overall"]
    rows = [json.loads(line) for line in (tmp_path / "vllm" / "responses.jsonl").read_text().splitlines()]
    assert overall["avg@n"] == pytest.approx(sum(sum(x >= 0.5 for x in r["sample_scores"]) / 2 for r in rows) / 3)
    assert overall["avg@n_se"] is not None and overall["pass@k"] is not None
    assert overall["tags"]["short"] == pytest.approx(sum(len(g) < 20 for g in greedy["vllm"]) / 3)
    assert set(overall["sample_tags"]) == {"short"} and all(len(r["sample_tags"]) == 2 for r in rows)
