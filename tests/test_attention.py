"""thinkvl's varlen attention: the same numbers as transformers' masked SDPA on packed rows, as each
example run alone, and as SDPA in cached generation, on both position schemes and with GQA."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from thinkvl.data.packing import collate_rows
from thinkvl.models import attention as A
from thinkvl.models.attention import VARLEN, segment_bounds, set_attention
from thinkvl.models.forward import token_logprobs
from thinkvl.rollout.engine import SamplingParams
from thinkvl.rollout.hf_engine import HFEngine

from test_packing import conversations, loss_and_grads, max_rel_diff, mean_token_loss


@contextlib.contextmanager
def attention(model, name: str):
    """Switch a (session-scoped) model's LM attention and restore SDPA afterwards."""
    set_attention(model, name)
    try:
        yield
    finally:
        set_attention(model, "sdpa")


def lm_attention_impls(model) -> set[str]:
    return {m.config._attn_implementation for n, m in model.named_modules()
            if n.endswith("self_attn") and "vision" not in n and "visual" not in n}


def test_segment_bounds_hand_values():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7], [5, 6, 0, 1, 2, 3, 9, 10]])
    assert segment_bounds(pos) == [[0, 3, 5, 6, 8], [0, 8], [0, 2, 6, 8]]


def test_set_attention_targets_only_the_language_model(vlm):
    model = vlm.model
    with attention(model, "varlen"):
        assert lm_attention_impls(model) == {VARLEN}
        vision = model.config.vision_config._attn_implementation
        assert vision == "sdpa", vision
    assert lm_attention_impls(model) == {"sdpa"}
    with pytest.raises(ValueError, match="model.attn_implementation: 'flash' is not one of varlen, sdpa"):
        set_attention(model, "flash")


@pytest.mark.parametrize("kind", ["text", "image"])
def test_varlen_matches_masked_sdpa_and_examples_alone(vlm, images, kind, monkeypatch):
    loaded, model = vlm, vlm.model
    examples = [loaded.render(c) for c in conversations(images, kind)]
    packed = collate_rows(examples, [[0, 1, 2]], loaded.pad_id, loaded.positions)
    # a padded tail on the packed row: positions restart at 0 for the padding segment
    two_rows = collate_rows(examples, [[0, 2], [1]], loaded.pad_id, loaded.positions)
    alone = collate_rows(examples, [[0], [1], [2]], loaded.pad_id, loaded.positions)

    loss_sdpa, g_sdpa = loss_and_grads(model, lambda: mean_token_loss(model, packed))
    with torch.no_grad():
        lp_sdpa = token_logprobs(model, packed)
    seen = []  # the varlen path really runs: it cuts the packed row at every example
    real_bounds = A.segment_bounds
    monkeypatch.setattr(A, "segment_bounds", lambda p: seen.append(real := real_bounds(p)) or real)
    with attention(model, "varlen"):
        loss_v, g_v = loss_and_grads(model, lambda: mean_token_loss(model, packed))
        loss_v2, g_v2 = loss_and_grads(model, lambda: mean_token_loss(model, two_rows))
        loss_alone, g_alone = loss_and_grads(model, lambda: mean_token_loss(model, alone))
        with torch.no_grad():
            lp_v = token_logprobs(model, packed)
    diffs = dict(loss_sdpa=abs(loss_v - loss_sdpa), loss_rows=abs(loss_v2 - loss_v), loss_alone=abs(loss_alone - loss_v),
                 grad_sdpa=max_rel_diff(g_sdpa, g_v), grad_rows=max_rel_diff(g_v, g_v2),
                 grad_alone=max_rel_diff(g_v, g_alone), logp=float((lp_v - lp_sdpa).abs().max()))
    print(type(model).__name__, kind, {k: f"{v:.1e}" for k, v in diffs.items()})
    assert loss_v > 0.5  # a real loss, not a degenerate zero
    n_layers = model.config.text_config.num_hidden_layers
    lens = [len(e) for e in examples]
    assert seen[0] == [[0, lens[0], lens[0] + lens[1], sum(lens)]]
    assert len(seen) == n_layers * 4  # per layer: packed, two_rows, alone and the no-grad packed pass
    assert all(v < 2e-5 for v in diffs.values()), diffs


def test_varlen_gqa_text_model():
    """An LM-only model with grouped KV heads (Qwen2, 4 query heads on 2 KV heads)."""
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (1, 40))
    pos = torch.cat([torch.arange(17), torch.arange(15), torch.arange(8)])[None]
    with torch.no_grad():
        ref = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        alone = torch.cat([model(input_ids=ids[:, s:e], use_cache=False).logits
                           for s, e in [(0, 17), (17, 32), (32, 40)]], dim=1)
        set_attention(model, "varlen")
        assert model.config._attn_implementation == VARLEN
        out = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        # cached prefill of a second chunk without a padding mask (queries after 20 cached keys)
        cache = DynamicCache(config=cfg)
        model(input_ids=ids[:, :20], use_cache=True, cache=cache)
        chunk = model(input_ids=ids[:, 20:], use_cache=True, cache=cache).logits
        whole = model(input_ids=ids, use_cache=False).logits
    assert float((out - ref).abs().max()) < 1e-5
    assert float((out - alone).abs().max()) < 1e-5
    assert float((chunk - whole[:, 20:]).abs().max()) < 1e-5


def test_generation_unchanged_by_varlen(vlm, images):
    """Cached, left-padded generation takes the SDPA fallback with an explicit causal+padding mask."""
    loaded, model = vlm, vlm.model
    prompts = [loaded.render(c[:1], add_generation_prompt=True) for c in conversations(images, "image")]
    params = SamplingParams(max_new_tokens=12, greedy=True)
    model.eval()
    try:
        ref = HFEngine(loaded).generate(prompts, 1, params)
        with attention(model, "varlen"):
            out = HFEngine(loaded).generate(prompts, 1, params)
    finally:
        model.train()
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: the batch is left-padded
    assert all(r[0].response_ids for r in ref)
    assert [r[0].response_ids for r in out] == [r[0].response_ids for r in ref]
    # the recorded log-probs are the reference policy of the RL loss: they must agree too
    # (without a registered mask function transformers would drop the padding mask here)
    diff = max(abs(a - b) for o, r in zip(out, ref) for a, b in zip(o[0].logprobs, r[0].logprobs))
    assert diff < 1e-5, diff


def test_config_rejects_an_unknown_attention_name():
    from thinkvl.config import ConfigError, load_config
    from thinkvl.train.sft import SFTConfig

    assert load_config(SFTConfig, None, []).model.attn_implementation == "varlen"
    with pytest.raises(ConfigError, match=r"model.attn_implementation: 'flash' is not one of varlen, sdpa, eager"):
        load_config(SFTConfig, None, ["model.attn_implementation=flash"])
