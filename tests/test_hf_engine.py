"""HFEngine: batched == alone == model.generate, log-probs == teacher forcing, bans, stops, seeds."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image
from transformers import Kimi_K25ForConditionalGeneration

from thinkvl.data.packing import collate_rows
from thinkvl.models.forward import token_logprobs
from thinkvl.models.load import Loaded, wrap
from thinkvl.models.tiny import IMAGE_TOKEN, build_processor, build_tokenizer, tiny_config
from thinkvl.rollout.engine import SamplingParams
from thinkvl.rollout.hf_engine import (
    HFEngine,
    generate_texts,
    inverse_cdf_sample,
    media_token_ids,
    top_k_filter,
    top_p_filter,
)

torch.set_num_threads(1)

TEXTS = [
    "how many red circles are there? the answer is 3. <think> one two three </think> \\boxed{3}",
    "count the blue squares: first, second. so there are 2 squares. \\boxed{2}",
]
EOS_BIAS = 5.0  # makes greedy responses of this random model end at different steps (3..16 tokens)


def _tiny_loaded() -> Loaded:
    """A 2-layer tiny Kimi-VL with a wide init (diverse tokens) and an LM head bias we can steer."""
    tok = build_tokenizer(TEXTS * 20, vocab_size=400)
    proc = build_processor(tok)
    torch.manual_seed(0)
    cfg = tiny_config(tok, text_layers=2, vision_layers=1)
    cfg.initializer_range = cfg.text_config.initializer_range = 0.2
    model = Kimi_K25ForConditionalGeneration(cfg).eval()
    # A biased head sharing the tied weight: token_logprobs and model.generate both honour the bias.
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight = model.lm_head.weight
    torch.nn.init.zeros_(head.bias)
    model.lm_head = head
    loaded = wrap(model, proc)
    set_bias(loaded, {loaded.tokenizer.eos_token_id: EOS_BIAS})
    return loaded


def set_bias(loaded: Loaded, bias: dict[int, float]) -> None:
    with torch.no_grad():
        loaded.model.lm_head.bias.zero_()
        for t, b in bias.items():
            loaded.model.lm_head.bias[t] = b


@pytest.fixture(scope="module")
def loaded() -> Loaded:
    return _tiny_loaded()


@pytest.fixture(autouse=True)
def _restore_bias(loaded: Loaded):
    yield
    set_bias(loaded, {loaded.tokenizer.eos_token_id: EOS_BIAS})


@pytest.fixture(scope="module")
def prompts(loaded: Loaded, tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    Image.new("RGB", (56, 56), (255, 0, 0)).save(d / "red.png")
    Image.new("RGB", (84, 56), (0, 0, 255)).save(d / "blue.png")
    convs = [
        [{"role": "user", "content": "how many red circles?"}],
        [{"role": "user", "content": [{"type": "image", "image": str(d / "red.png")},
                                      {"type": "text", "text": "how many red circles are there?"}]}],
        [{"role": "system", "content": "think first"},
         {"role": "user", "content": [{"type": "image", "image": str(d / "blue.png")},
                                      {"type": "text", "text": "count"}]}],
        [{"role": "user", "content": "count the blue squares: first, second. so there are how many squares?"}],
    ]
    return [loaded.render(c, add_generation_prompt=True) for c in convs]


GREEDY = SamplingParams(max_new_tokens=16, greedy=True)


def test_greedy_batched_equals_alone_and_hf_generate(loaded, prompts):
    engine = HFEngine(loaded, batch_size=8)
    batched = engine.generate(prompts, n=2, sampling=GREEDY)
    lengths = [g[0].length for g in batched]
    # The scenario must exercise row dropping: some rows stop early, others run to the limit.
    assert min(lengths) < GREEDY.max_new_tokens and max(lengths) == GREEDY.max_new_tokens, lengths
    assert engine.stats.decode_rows < 8 * (GREEDY.max_new_tokens - 1)
    alone_engine = HFEngine(loaded, batch_size=1)
    for p, group in zip(prompts, batched):
        alone = alone_engine.generate([p], n=1, sampling=GREEDY)[0][0]
        for r in group:
            assert r.response_ids == alone.response_ids
            # float32 sums in another order (batch of 8 vs 1): 1.2e-5 seen with transformers 5.25
            assert r.logprobs == pytest.approx(alone.logprobs, abs=3e-5)
            assert r.finished == (r.response_ids[-1] in engine.stop_ids) and r.truncated != r.finished
    # Same as transformers' own greedy decoding, for a text and an image prompt.
    for k in (0, 2):
        p = prompts[k]
        extra = {} if p.pixel_values is None else {"pixel_values": p.pixel_values, "image_grid_thw": p.image_grid_thw}
        ref = loaded.model.generate(
            input_ids=torch.tensor([p.input_ids]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=GREEDY.max_new_tokens, do_sample=False, eos_token_id=sorted(engine.stop_ids),
            pad_token_id=loaded.pad_id, **extra,
        )
        assert ref[0, len(p):].tolist() == batched[k][0].response_ids


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=50)])
def test_logprobs_equal_teacher_forced_forward(loaded, prompts, sampling):
    rollouts = [r for g in HFEngine(loaded, batch_size=8).generate(prompts, n=2, sampling=sampling) for r in g]
    examples = [r.to_example() for r in rollouts]
    batch = collate_rows(examples, [[i] for i in range(len(examples))], loaded.pad_id, loaded.positions)
    ref = token_logprobs(loaded.model, batch, temperature=sampling.temperature)  # [R, T]
    for k, r in enumerate(rollouts):
        got = ref[k][batch["target_mask"][k]]
        assert got.shape[0] == r.length == len(r.logprobs)
        torch.testing.assert_close(torch.tensor(r.logprobs), got, atol=1e-4, rtol=0)


def test_banned_tokens_never_sampled(loaded, prompts):
    img = loaded.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert img in media_token_ids(loaded)
    set_bias(loaded, {img: 20.0})  # the placeholder becomes by far the likeliest token
    sampled = SamplingParams(max_new_tokens=8, seed=1)

    def count(engine: HFEngine, sampling: SamplingParams) -> int:
        return sum(r.response_ids.count(img) for g in engine.generate(prompts, 2, sampling) for r in g)

    # Without any ban the bias really makes the placeholder likely (so the checks below can fail).
    assert count(HFEngine(loaded, ban_media_tokens=False), sampled) > 10
    explicit = SamplingParams(max_new_tokens=8, seed=1, banned_token_ids=(img,))
    assert count(HFEngine(loaded, ban_media_tokens=False), explicit) == 0
    assert count(HFEngine(loaded), sampled) == 0  # media tokens are banned by default
    assert count(HFEngine(loaded), GREEDY) == 0


def test_max_new_tokens_truncates(loaded, prompts):
    engine = HFEngine(loaded)
    sampling = SamplingParams(max_new_tokens=7, banned_token_ids=tuple(engine.stop_ids))
    for r in (r for g in engine.generate(prompts, 2, sampling) for r in g):
        assert r.truncated and not r.finished
        assert r.length == len(r.response_ids) == len(r.logprobs) == 7


def test_eos_stops(loaded, prompts):
    eos = loaded.tokenizer.eos_token_id
    set_bias(loaded, {eos: 100.0})
    for r in (r for g in HFEngine(loaded).generate(prompts, 2, SamplingParams(max_new_tokens=9)) for r in g):
        assert r.response_ids == [eos] and r.finished and not r.truncated and r.length == 1
        assert r.response_text == ""


def test_stop_strings(loaded, prompts):
    engine = HFEngine(loaded)
    no_eos = tuple(engine.stop_ids)
    free = engine.generate(prompts[:1], 1, SamplingParams(max_new_tokens=16, greedy=True, banned_token_ids=no_eos))
    ids = free[0][0].response_ids

    def text(t: list[int]) -> str:
        return loaded.tokenizer.decode(t, skip_special_tokens=True)

    stop = text(ids[3:6])  # text completed by the 6th token
    assert stop and stop not in text(ids[:5])
    sampling = SamplingParams(max_new_tokens=16, greedy=True, stop_strings=(stop,), banned_token_ids=no_eos)
    r = engine.generate(prompts[:1], 1, sampling)[0][0]
    assert r.response_ids == ids[:6]
    assert r.finished and not r.truncated and r.response_text.endswith(stop)


def test_seeded_sampling_reproducible(loaded, prompts):
    sampling = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7)

    def ids(engine: HFEngine, s: SamplingParams) -> list[list[list[int]]]:
        return [[r.response_ids for r in g] for g in engine.generate(prompts, 3, s)]

    first = ids(HFEngine(loaded, batch_size=12), sampling)
    assert first == ids(HFEngine(loaded, batch_size=12), sampling)
    # A sample depends on (seed, prompt, sample index) only, not on how rows are batched.
    assert first == ids(HFEngine(loaded, batch_size=2), sampling)
    assert first != ids(HFEngine(loaded, batch_size=12), SamplingParams(max_new_tokens=10, seed=8))
    assert any(g[0] != g[1] for g in first)  # samples of one prompt differ


def test_generate_texts_shape(loaded):
    convs = [[{"role": "user", "content": "hi"}]] * 2
    texts = generate_texts(loaded, convs, n=3, sampling=SamplingParams(max_new_tokens=4))
    assert len(texts) == 2 and all(len(t) == 3 and all(isinstance(s, str) for s in t) for t in texts)


def test_rollout_to_example_masks_response_only(loaded, prompts):
    r = HFEngine(loaded).generate(prompts[1:2], 1, GREEDY)[0][0]
    ex = r.to_example()
    assert ex.input_ids == r.prompt_ids + r.response_ids
    assert ex.loss_mask == [False] * len(r.prompt_ids) + [True] * r.length
    assert ex.pixel_values is prompts[1].pixel_values


# ---- pure sampling helpers, against hand-computed values ----


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    inf = float("-inf")
    assert top_k_filter(logits, 2).isinf().tolist() == [[False, False, True, True]]
    assert top_k_filter(logits, 0) is logits
    # mass before each token: 0, .5, .8, .95 -> p=0.8 keeps {.5, .3}; p=0.81 keeps three; tiny p keeps one
    assert top_p_filter(logits, 0.8).isinf().tolist() == [[False, False, True, True]]
    assert top_p_filter(logits, 0.81).isinf().tolist() == [[False, False, False, True]]
    assert top_p_filter(logits, 0.01).isinf().tolist() == [[False, True, True, True]]
    shuffled = logits[:, [2, 0, 3, 1]]
    assert top_p_filter(shuffled, 0.8).isinf().tolist() == [[True, False, True, False]]
    assert torch.equal(top_p_filter(torch.tensor([[inf, 0.0]]), 0.5).isinf(), torch.tensor([[True, False]]))


def test_inverse_cdf_sample_hits_intervals_and_skips_zero_probability():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]]).expand(5, -1)
    u = torch.tensor([0.0, 0.2499, 0.25, 0.9999999, 1.0])  # 1.0: a draw that rounded up
    assert inverse_cdf_sample(probs, u).tolist() == [1, 1, 3, 3, 3]


def test_sampling_params_validation():
    for bad in ({"temperature": 0}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -1}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


def test_qwen_mrope_batched_equals_alone_and_hf_generate(qwen, images):
    """Qwen2.5-VL (3-row mRoPE positions): same checks as for Kimi, on conftest's tiny model."""
    loaded = copy.deepcopy(qwen)  # scaled weights give diverse tokens; the session fixture stays intact
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    convs = [
        [{"role": "user", "content": "How many red circles?"}],
        [{"role": "user", "content": [{"type": "image", "image": images["red"]},
                                      {"type": "text", "text": "How many?"}]}],
        [{"role": "user", "content": [{"type": "image", "image": images["green"]}, {"type": "text", "text": "List"}]}],
    ]
    prompts = [loaded.render(c, add_generation_prompt=True) for c in convs]
    sampling = SamplingParams(max_new_tokens=10, greedy=True)
    batched = HFEngine(loaded, batch_size=8).generate(prompts, 2, sampling)
    loaded.model.eval()
    for p, group in zip(prompts, batched):
        alone = HFEngine(loaded, batch_size=1).generate([p], 1, sampling)[0][0]
        assert group[0].response_ids == group[1].response_ids == alone.response_ids
        extra = {} if p.pixel_values is None else {
            "pixel_values": p.pixel_values, "image_grid_thw": p.image_grid_thw,
            "mm_token_type_ids": torch.tensor([p.extra["mm_token_type_ids"]])}
        ref = loaded.model.generate(
            input_ids=torch.tensor([p.input_ids]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=10, do_sample=False, eos_token_id=loaded.tokenizer.eos_token_id,
            pad_token_id=loaded.pad_id, **extra,
        )
        assert ref[0, len(p):].tolist() == alone.response_ids
    rollouts = [g[0] for g in batched]
    examples = [r.to_example() for r in rollouts]
    batch = collate_rows(examples, [[i] for i in range(len(examples))], loaded.pad_id, loaded.positions)
    ref_lp = token_logprobs(loaded.model, batch)
    for k, r in enumerate(rollouts):
        torch.testing.assert_close(torch.tensor(r.logprobs), ref_lp[k][batch["target_mask"][k]], atol=1e-4, rtol=0)
