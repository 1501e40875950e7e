"""Memory and step-time plan of a training run on paper (docs/scale.md), as pure functions.

Per GPU, with FSDP2 over `gpus` ranks, in GiB (2^30 bytes):
  states       = N * (b_w + b_g + b_opt) / gpus       sharded weights, gradients, AdamW m and v
                 full fine-tuning, bf16_mixed: b_w = b_g = 4 (fp32 masters and gradients), b_opt = 8
                 LoRA: frozen N at b_w (fp32 under bf16_mixed, as FSDP2 needs one dtype a block),
                 plus the adapters' N_a * 16
  gathered     = P_block * (2 * 2 + 2 + 4)               two bf16 all-gathered blocks (the next one is
                                                         prefetched), one block's bf16 gradients and
                                                         their fp32 copy for the reduce-scatter
  root         = P_root * (2 + 2 + 4)                    the root group (embeddings, LM head) stays
                                                         gathered through forward and backward
  checkpoints  = L * T * h * 2                           gradient checkpointing: each block's bf16 input
  block        = T * a_block                             one block's activations while it recomputes/backprops
  lm_head      = 3 * C * V * 4                           thinkvl's chunked LM head: C=1024 positions of
                                                         fp32 logits, their softmax and gradient
  (without checkpointing: checkpoints + block become L * T * a_block)
  a_block (bytes a token, bf16) = 2 * (attention elements + MLP elements):
     attention: 3h (norm in/out, residual) + q + k + v + attention output (+ MLA latent)
     MLP: 2h + per active expert (h in, 3f: gate, up, act, h out), shared experts the same way
Training FLOPs a token = (3 + recompute) * (2 * N_active + 2 * T_avg * n_h * (d_qk + d_v) * L):
  forward once, backward twice, recompute = 1 with gradient checkpointing; T_avg = T / 2 (causal).
KV cache a token = L * (cached elements a layer) * 2 bytes. RL under FSDP2 also keeps an unsharded
bf16 rollout replica on each rank: N * 2 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30


@dataclass(frozen=True)
class Arch:
    """A decoder LM (+ vision tower counted by its parameter total) from its config numbers."""

    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    qk_dim: int  # per head (MLA: nope + rope)
    v_dim: int  # per head
    kv_heads: int  # GQA key/value heads (MLA: = heads after decompression)
    q_params: int  # attention projection parameters of one layer
    dense_layers: int
    dense_ffn: int
    moe_layers: int = 0
    experts: int = 0
    shared_experts: int = 0
    top_k: int = 0
    moe_ffn: int = 0
    tied: bool = False
    vision_params: int = 0  # vision tower + projector
    kv_cache_elems: int = 0  # cached elements a layer a token (0: 2 * kv_heads * head dim)
    extra_attn_elems: int = 0  # extra saved elements a token in attention (MLA latent, decompressed kv)

    def mlp_params(self, ffn: int) -> int:
        return 3 * self.hidden * ffn  # SwiGLU: gate, up, down

    @property
    def lm_params(self) -> int:
        moe = self.moe_layers * ((self.experts + self.shared_experts) * self.mlp_params(self.moe_ffn)
                                 + self.experts * self.hidden)
        dense = self.dense_layers * self.mlp_params(self.dense_ffn)
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.q_params + moe + dense + emb

    @property
    def total_params(self) -> int:
        return self.lm_params + self.vision_params

    @property
    def active_matmul_params(self) -> int:
        """Parameters a text token multiplies through (LM head included, embedding lookup not)."""
        moe = self.moe_layers * (self.top_k + self.shared_experts) * self.mlp_params(self.moe_ffn)
        return (self.layers * self.q_params + moe + self.dense_layers * self.mlp_params(self.dense_ffn)
                + self.vocab * self.hidden)

    @property
    def largest_block(self) -> int:
        """Parameters of the largest decoder layer (what FSDP2 gathers at a time)."""
        moe = (self.experts + self.shared_experts) * self.mlp_params(self.moe_ffn) + self.experts * self.hidden
        return self.q_params + max(moe if self.moe_layers else 0, self.mlp_params(self.dense_ffn))

    def block_act_bytes(self) -> int:
        """Saved activation bytes a token of the largest layer (bf16)."""
        h = self.hidden
        attn = 3 * h + self.heads * self.qk_dim + 2 * self.kv_heads * max(self.qk_dim, self.v_dim) \
            + self.heads * self.v_dim + self.extra_attn_elems
        if self.moe_layers:
            mlp = 2 * h + (self.top_k + self.shared_experts) * (2 * h + 3 * self.moe_ffn)
        else:
            mlp = 2 * h + (2 * h + 3 * self.dense_ffn)
        return 2 * (attn + mlp)

    def kv_bytes_per_token(self) -> int:
        per_layer = self.kv_cache_elems or 2 * self.kv_heads * self.v_dim
        return 2 * self.layers * per_layer


def lora_params(arch: Arch, rank: int) -> int:
    """Adapter parameters for attention projections (4 of hidden x hidden-ish) and dense/shared MLPs:
    r * (in + out) per adapted Linear."""
    h = arch.hidden
    attn = 4 * rank * (h + h)
    mlp_ffn = arch.moe_ffn if arch.moe_layers else arch.dense_ffn
    mlp_count = arch.shared_experts if arch.moe_layers else 1
    return arch.layers * (attn + mlp_count * 3 * rank * (h + mlp_ffn))


def memory(arch: Arch, seq_len: int, gpus: int = 8, lora_rank: int | None = None,
           checkpointing: bool = True, chunk: int = 1024) -> dict[str, float]:
    """Per-GPU GiB of each part (module docstring) for one row of seq_len tokens a micro-batch."""
    n = arch.total_params
    if lora_rank is None:
        states = n * 16 / gpus
    else:
        states = (n * 4 + lora_params(arch, lora_rank) * 16) / gpus
    gathered = arch.largest_block * (2 * 2 + 2 + 4)
    root = arch.vocab * arch.hidden * (1 if arch.tied else 2) * (2 + 2 + 4)
    ckpt_bytes = arch.layers * seq_len * arch.hidden * 2 if checkpointing else 0
    block = seq_len * arch.block_act_bytes() * (1 if checkpointing else arch.layers)
    head = 3 * chunk * arch.vocab * 4
    out = {"states": states, "gathered": gathered, "root": root, "checkpoints": ckpt_bytes,
           "activations": block, "lm_head": head}
    out = {k: v / GiB for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def replica_gib(arch: Arch) -> float:
    """An unsharded bf16 copy of the model (RL rollouts under FSDP2)."""
    return arch.total_params * 2 / GiB


def kv_cache_gib(arch: Arch, sequences: int, tokens: int) -> float:
    """KV cache of `sequences` rollouts of `tokens` tokens each (prompt + response)."""
    return sequences * tokens * arch.kv_bytes_per_token() / GiB


def train_flops_per_token(arch: Arch, seq_len: int, checkpointing: bool = True) -> float:
    passes = 3 + (1 if checkpointing else 0)  # forward, backward (2x), recomputed forward
    attn = 2 * (seq_len / 2) * arch.heads * (arch.qk_dim + arch.v_dim) * arch.layers
    return passes * (2 * arch.active_matmul_params + attn)


def step_seconds(arch: Arch, seq_len: int, tokens_per_step: int, gpus: int, peak_flops: float, mfu: float,
                 checkpointing: bool = True) -> float:
    """Seconds per optimiser step at a model FLOP utilisation `mfu` of `peak_flops` per GPU."""
    return tokens_per_step * train_flops_per_token(arch, seq_len, checkpointing) / (gpus * peak_flops * mfu)


# Kimi-VL-A3B: DeepSeek-V3-style LM (Moonlight-16B-A3B shape; MLA without a q low-rank, kv_lora_rank
# 512, qk 128 + 64 rope, v 128, 16 heads; layer 0 dense (11264), 26 MoE layers: 64 routed experts of
# 1408 + 2 shared, top-6; vocab 163840, untied) + MoonViT (27 layers of width 1152, MLP 4304) and a
# 2x2-merge MLP projector (4608 -> 4608 -> 2048).
_KIMI_Q = 2048 * 16 * 192 + 2048 * (512 + 64) + 512 * 16 * (128 + 128) + 16 * 128 * 2048
_MOONVIT = 27 * (4 * 1152 * 1152 + 2 * 1152 * 4304) + 4608 * 4608 + 4608 * 2048
KIMI_VL_A3B = Arch("Kimi-VL-A3B", vocab=163840, hidden=2048, layers=27, heads=16, qk_dim=192, v_dim=128,
                   kv_heads=16, q_params=_KIMI_Q, dense_layers=1, dense_ffn=11264, moe_layers=26, experts=64,
                   shared_experts=2, top_k=6, moe_ffn=1408, tied=False, vision_params=_MOONVIT,
                   # transformers' DeepseekV3 attention caches decompressed k (192) and v (128) per head
                   kv_cache_elems=16 * (192 + 128), extra_attn_elems=576 + 16 * 256)
# Qwen2.5-VL-7B: Qwen2.5-7B LM (3584 wide, 28 layers, 28 heads, 4 KV heads of 128, MLP 18944, vocab
# 152064, untied) + a 32-layer ViT of width 1280 (SwiGLU 3420) and a 2x2 merger (5120 -> 5120 -> 3584).
_QWEN_Q = 3584 * 3584 * 2 + 2 * 3584 * 512
_QWEN_VIT = 32 * (4 * 1280 * 1280 + 3 * 1280 * 3420) + 5120 * 5120 + 5120 * 3584
QWEN25_VL_7B = Arch("Qwen2.5-VL-7B", vocab=152064, hidden=3584, layers=28, heads=28, qk_dim=128, v_dim=128,
                    kv_heads=4, q_params=_QWEN_Q, dense_layers=28, dense_ffn=18944, tied=False,
                    vision_params=_QWEN_VIT)
