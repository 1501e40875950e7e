"""docs/scale.md's memory and FLOP formulas (thinkvl.report.memory_plan) against hand-computed values."""

from __future__ import annotations

import pytest

from thinkvl.report.memory_plan import (
    GiB,
    KIMI_VL_A3B,
    QWEN25_VL_7B,
    Arch,
    kv_cache_gib,
    lora_params,
    memory,
    replica_gib,
    train_flops_per_token,
)

# 2 dense layers of width 4, MLP 8, 2 heads of 2, one KV head, attention projections 40, tied vocab 10
TOY = Arch("toy", vocab=10, hidden=4, layers=2, heads=2, qk_dim=2, v_dim=2, kv_heads=1, q_params=40,
           dense_layers=2, dense_ffn=8, tied=True)


def test_toy_counts_by_hand():
    assert TOY.lm_params == 2 * 40 + 2 * (3 * 4 * 8) + 10 * 4 == 312
    assert TOY.active_matmul_params == 312  # the tied head multiplies as the embedding's transpose
    assert TOY.largest_block == 40 + 96
    # attention 3*4 + 2*2 (q) + 2*1*2 (k, v) + 2*2 (output) = 24; MLP 2*4 + 2*4 + 3*8 = 40; bf16
    assert TOY.block_act_bytes() == 2 * (24 + 40) == 128
    assert TOY.kv_bytes_per_token() == 2 * 2 * (2 * 1 * 2) == 16


def test_toy_memory_by_hand():
    m = memory(TOY, seq_len=16, gpus=2, chunk=4)
    want = {"states": 312 * 16 / 2, "gathered": 136 * 10, "root": 40 * 8, "checkpoints": 2 * 16 * 4 * 2,
            "activations": 16 * 128, "lm_head": 3 * 4 * 10 * 4}
    for k, v in want.items():
        assert m[k] * GiB == pytest.approx(v), k
    assert m["total"] * GiB == pytest.approx(6960)
    no_gc = memory(TOY, seq_len=16, gpus=2, chunk=4, checkpointing=False)
    assert no_gc["checkpoints"] == 0 and no_gc["activations"] * GiB == pytest.approx(2 * 16 * 128)
    lora = memory(TOY, seq_len=16, gpus=2, chunk=4, lora_rank=1)
    # adapters: per layer 4 attention Linears r*(4+4) + one MLP's 3 Linears r*(4+8)
    assert lora_params(TOY, 1) == 2 * (4 * 8 + 3 * 12) == 136
    assert lora["states"] * GiB == pytest.approx((312 * 4 + 136 * 16) / 2)


def test_toy_flops_by_hand():
    # attention 2 * (16/2) * 2 heads * (2+2) * 2 layers = 256; matmuls 2 * 312; x4 with recompute
    assert train_flops_per_token(TOY, 16) == 4 * (2 * 312 + 256)
    assert train_flops_per_token(TOY, 16, checkpointing=False) == 3 * (2 * 312 + 256)


def test_real_models_match_their_published_sizes():
    # Kimi-VL-A3B: 16.4B total (model card), 2.8B activated in the LM (ours counts the matmuls a
    # token passes through, LM head included); Qwen2.5-VL-7B: 8.29B (model card)
    assert KIMI_VL_A3B.total_params / 1e9 == pytest.approx(16.4, abs=0.1)
    assert 2.4e9 < KIMI_VL_A3B.active_matmul_params < 3.0e9
    assert QWEN25_VL_7B.total_params / 1e9 == pytest.approx(8.29, abs=0.05)
    assert replica_gib(QWEN25_VL_7B) == pytest.approx(QWEN25_VL_7B.total_params * 2 / GiB)
    # Qwen2.5-7B caches 4 KV heads of 128 in 28 layers: 57,344 bytes a token in bf16
    assert kv_cache_gib(QWEN25_VL_7B, 1, GiB // 57344) == pytest.approx(1.0, rel=1e-4)
