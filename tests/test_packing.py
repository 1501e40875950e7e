"""Best-fit-decreasing packing, and the SFT loss and gradients being independent of packing,
padding and micro-batching on both position schemes (1-D positions: Kimi; 4-row mRoPE: Qwen2.5-VL)."""

from __future__ import annotations

import pytest
import torch

from thinkvl.data.chat import ChatRenderer
from thinkvl.data.formats import read_records
from thinkvl.data.packing import bfd_pack, collate_rows
from thinkvl.demo.tasks import synth
from thinkvl.models.forward import model_inputs, token_logprobs
from thinkvl.models.tiny import build_processor, build_tokenizer
from thinkvl.train import distributed as D
from thinkvl.train.sft import SFTConfig, fit_length, sft_step

# --- bfd_pack ---------------------------------------------------------------------------------


def test_bfd_best_fit_hand_worked():
    # Longest first: 7 -> row A (room 3); 5 -> row B (room 5); 4 does not fit A -> B (room 1);
    # 1 fits A (room 3) and B (room 1): best fit takes B, first fit would take A.
    assert bfd_pack([1, 7, 4, 5], capacity=10) == [[1], [3, 2, 0]]
    # 5 -> A (3); 4 -> B (4); 3 -> A (exact, full); 3 -> B (1); 2 -> C (6); 2 -> C (4); 1 -> B (full).
    assert bfd_pack([5, 4, 3, 3, 2, 2, 1], capacity=8) == [[0, 2], [1, 3, 6], [4, 5]]
    # Ties between equal rooms go to the older row; equal lengths keep index order.
    assert bfd_pack([3, 3, 3, 3], capacity=6) == [[0, 1], [2, 3]]
    assert bfd_pack([], capacity=4) == []
    assert bfd_pack([4], capacity=4) == [[0]]


def test_bfd_uses_every_index_once_within_capacity():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 100, (500,), generator=g).tolist()
    rows = bfd_pack(lengths, capacity=128)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    # No two rows could be merged (a best-fit packing never leaves that), so all but one row is
    # more than half full.
    fill = sorted(sum(lengths[i] for i in r) for r in rows)
    assert all(a + b > 128 for a, b in zip(fill, fill[1:]))


def test_bfd_rejects_item_over_capacity():
    with pytest.raises(ValueError, match="item 1 has length 9 > capacity 8"):
        bfd_pack([3, 9, 2], capacity=8)


def test_bfd_efficiency_on_demo_mix(tmp_path):
    """The demo's joint-SFT data (300 conversations, tiny Kimi tokenizer) packs >= 95% full at 512."""
    paths = synth(tmp_path, seed=0, n_sft=300, n_rl=0, n_eval=0)
    tok = build_tokenizer()
    renderer = ChatRenderer(build_processor(tok))
    examples = [renderer.render(r["messages"]) for r in read_records(paths["sft"])]
    assert len(examples) == 300
    examples, keep, counts = fit_length(examples, 512, "truncate", renderer.image_token_id)
    assert counts == {"truncated": 0, "dropped": 0, "overlong_image": 0, "no_supervised_left": 0}
    lengths = [len(examples[i]) for i in keep]
    rows = bfd_pack(lengths, 512)
    batch = collate_rows(examples, [[keep[j] for j in r] for r in rows], renderer.tokenizer.pad_token_id)
    eff = sum(lengths) / batch["input_ids"].numel()
    print(f"BFD efficiency on demo mix: {eff:.4f} ({len(rows)} rows, lower bound {sum(lengths) / 512:.2f})")
    assert eff >= 0.95


# --- packing invariance -----------------------------------------------------------------------


def conversations(images: dict[str, str], kind: str) -> list[list[dict]]:
    text = [
        [{"role": "user", "content": "What is 3 + 4 * 2?"},
         {"role": "assistant", "content": "First 4 * 2 = 8, then 3 + 8 = 11."}],
        [{"role": "system", "content": "Think step by step."},
         {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "How many?"}, {"role": "assistant", "content": "The answer is \\boxed{3}."}],
        [{"role": "user", "content": "List the shapes: red circle, blue square."},
         {"role": "assistant", "content": "red circle, blue square"}],
    ]
    if kind == "text":
        return text
    return [
        [{"role": "user", "content": [{"type": "text", "text": "How many red circles? "},
                                      {"type": "image", "image": images["red"]}]},
         {"role": "assistant", "content": "There are 3 red circles."}],
        text[0],
        [{"role": "user", "content": [{"type": "image", "image": images["green"]},
                                      {"type": "image", "image": images["blue"]},
                                      {"type": "text", "text": "List the shapes."}]},
         {"role": "assistant", "content": "green triangle, blue square"},
         {"role": "user", "content": "And the count?"},
         {"role": "assistant", "content": "\\boxed{2}"}],
    ]


def loss_and_grads(model, loss_fn) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    if isinstance(loss, torch.Tensor):
        loss.backward()
        loss = float(loss.detach())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss, grads


def mean_token_loss(model, batch) -> torch.Tensor:
    logp = token_logprobs(model, batch)
    mask = batch["target_mask"]
    return -(logp * mask).sum() / mask.sum()


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    scale = max(float(g.abs().max()) for g in a.values())
    return max(float((a[k] - b[k]).abs().max()) for k in a) / scale


@pytest.mark.parametrize("kind", ["text", "image"])
def test_loss_and_grads_independent_of_packing(vlm, images, kind):
    loaded, model = vlm, vlm.model
    examples = [loaded.render(c) for c in conversations(images, kind)]
    pos = loaded.positions
    packed = collate_rows(examples, [[0, 1, 2]], loaded.pad_id, pos)
    padded = collate_rows(examples, [[0], [1], [2]], loaded.pad_id, pos)
    assert packed["input_ids"].shape[0] == 1 and padded["input_ids"].shape[0] == 3
    assert int(packed["target_mask"].sum()) == int(padded["target_mask"].sum()) == sum(
        sum(e.loss_mask[1:]) for e in examples)

    two_rows = collate_rows(examples, [[0, 2], [1]], loaded.pad_id, pos)  # packed rows, padded to a batch
    loss_a, g_a = loss_and_grads(model, lambda: mean_token_loss(model, packed))
    loss_b, g_b = loss_and_grads(model, lambda: mean_token_loss(model, padded))
    loss_d, g_d = loss_and_grads(model, lambda: mean_token_loss(model, two_rows))
    cfg = SFTConfig()
    cfg.optim.rows_per_micro_batch = 1  # rows [0, 1] and [2]: two micro-batches, one of them packed
    loss_c, g_c = loss_and_grads(model, lambda: sft_step(model, examples, [[0, 1], [2]], loaded, cfg, D.Dist())["loss"])

    print(f"{type(model).__name__} {kind}: loss {loss_a:.6f}; |b-a| {abs(loss_b - loss_a):.2e} "
          f"|c-a| {abs(loss_c - loss_a):.2e} |d-a| {abs(loss_d - loss_a):.2e}; grad rel b {max_rel_diff(g_a, g_b):.2e} "
          f"c {max_rel_diff(g_a, g_c):.2e} d {max_rel_diff(g_a, g_d):.2e}")
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert loss_c == pytest.approx(loss_a, rel=1e-5)
    assert max_rel_diff(g_a, g_b) < 1e-5
    assert max_rel_diff(g_a, g_c) < 1e-5
    assert loss_d == pytest.approx(loss_a, rel=1e-5)
    assert max_rel_diff(g_a, g_d) < 1e-5
    if kind == "image":  # the vision tower is really in the graph
        vision = [g for n, g in g_a.items() if "vision_tower" in n or "visual." in n]
        assert vision and any(float(g.abs().max()) > 0 for g in vision)


def test_mrope_packing_needs_the_text_position_row(qwen, images):
    """Packing on Qwen2.5-VL with only the 3 mRoPE rows lets examples attend to each other."""
    examples = [qwen.render(c) for c in conversations(images, "image")]
    packed = collate_rows(examples, [[0, 1, 2]], qwen.pad_id, qwen.positions)
    padded = collate_rows(examples, [[0], [1], [2]], qwen.pad_id, qwen.positions)
    assert packed["position_ids"].shape == (4, 1, packed["input_ids"].shape[1])
    with torch.no_grad():
        right = float(mean_token_loss(qwen.model, packed))
        alone = float(mean_token_loss(qwen.model, padded))
        three_rows = dict(packed, position_ids=packed["position_ids"][1:])
        wrong = float(mean_token_loss(qwen.model, three_rows))
        token_diff = (token_logprobs(qwen.model, three_rows) - token_logprobs(qwen.model, packed)).abs()
    n0 = len(examples[0])
    print(f"qwen packed loss {right:.6f}, alone {alone:.6f}, 3-row packed {wrong:.6f}; "
          f"3-row token log-prob diff: first example {float(token_diff[0, :n0].max()):.1e}, "
          f"later ones {float(token_diff[0, n0:].max()):.1e}")
    assert right == pytest.approx(alone, rel=1e-5)
    assert abs(wrong - right) > 1e-4 * right  # 10x the tolerance the equalities above use
    assert float(token_diff[0, :n0].max()) < 1e-5  # the first example sees nothing before it
    assert float(token_diff[0, n0:].max()) > 1e-2


def test_packed_forward_with_cache_leaks_across_examples(vlm, images):
    """transformers skips the packed mask when a cache exists; token_logprobs (no cache) must not."""
    loaded, model = vlm, vlm.model
    examples = [loaded.render(c) for c in conversations(images, "image")[:2]]
    packed = collate_rows(examples, [[0, 1]], loaded.pad_id, loaded.positions)
    alone = collate_rows(examples, [[1]], loaded.pad_id, loaded.positions)
    n0 = len(examples[0])
    model.eval()
    try:
        with torch.no_grad():
            cached = model(**model_inputs(packed), use_cache=True).logits[0, n0:]
            uncached = model(**model_inputs(packed), use_cache=False).logits[0, n0:]
            ref = model(**model_inputs(alone), use_cache=False).logits[0]
            lp_packed = token_logprobs(model, packed)[0, n0:]
            lp_alone = token_logprobs(model, alone)[0]
    finally:
        model.train()
    print(f"{type(model).__name__}: cached diff {float((cached - ref).abs().max()):.3f}, "
          f"uncached {float((uncached - ref).abs().max()):.1e}")
    assert float((cached - ref).abs().max()) > 1e-2  # the trap is still there in this transformers
    assert torch.allclose(uncached, ref, atol=1e-5)
    assert torch.allclose(lp_packed, lp_alone, atol=1e-5)
    assert int(alone["target_mask"].sum()) > 0


@pytest.mark.parametrize("kind", ["text", "image"])
def test_last_mlp_runs_only_where_read(vlm, images, kind):
    """Skipping the last layer's MLP at unread positions changes no log-prob and no gradient."""
    from thinkvl.models.forward import hidden_states, last_decoder_mlp

    loaded, model = vlm, vlm.model
    examples = [loaded.render(c) for c in conversations(images, kind)]
    batch = collate_rows(examples, [[0, 2], [1]], loaded.pad_id, loaded.positions)
    mask = batch["target_mask"].bool()
    mlp = last_decoder_mlp(model)
    assert mlp is not None and mlp is model.model.language_model.layers[-1].mlp
    rows_seen: list[int] = []
    # a forward hook registered before the gather/scatter pair sees what the MLP really computed
    handle = mlp.register_forward_hook(
        lambda _m, _a, out: rows_seen.append((out[0] if isinstance(out, tuple) else out).shape[:-1].numel()))
    try:
        loss_full, g_full = loss_and_grads(model, lambda: -(hidden_states(model, batch).sum(-1) * mask).sum())
        loss_kept, g_kept = loss_and_grads(
            model, lambda: -(hidden_states(model, batch, keep=mask).sum(-1) * mask).sum())
        _, g_lp_full = loss_and_grads(model, lambda: -(token_logprobs(model, {**batch, "target_mask": torch.ones_like(
            batch["target_mask"])}) * mask).sum())
        _, g_lp = loss_and_grads(model, lambda: mean_token_loss(model, batch) * mask.sum())
    finally:
        handle.remove()
    assert rows_seen[0] == mask.numel() and rows_seen[1] == int(mask.sum()) < mask.numel()
    assert rows_seen[2] == mask.numel() and rows_seen[3] == int(mask.sum())
    assert loss_kept == pytest.approx(loss_full, rel=1e-6)
    assert max_rel_diff(g_full, g_kept) < 1e-5
    assert max_rel_diff(g_lp_full, g_lp) < 1e-5
    h_full = hidden_states(model, batch).detach()
    h_kept = hidden_states(model, batch, keep=mask).detach()
    assert torch.allclose(h_full[mask], h_kept[mask], atol=1e-6)
    assert not torch.allclose(h_full[~mask], h_kept[~mask], atol=1e-3)  # really skipped elsewhere
