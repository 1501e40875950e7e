"""LoRA adapters through peft (`model.lora`): only the adapters train and carry optimiser state.

peft injects its LoRA layers into the model in place, so the model keeps its class and forward
(thinkvl's packed forward, FSDP2 sharding and generation see the same modules, adapters on). A
LoRA layer computes  y = W x + s * B (A x)  with A [r, in], B [out, r] (B starts at 0) and
s = alpha / rank. Checkpoints hold the adapter weights only; `final/` holds the merged model
W' = W + s * B A (a plain transformers checkpoint, no peft needed) and `final/adapter/` the
adapter as peft saves it.

Default targets: the language model's attention and dense-MLP projections, shared experts
included (Kimi-VL/DeepSeek-V3: q_a/q_b/kv_a/kv_b/o_proj, gate/up/down_proj; Qwen2.5-VL:
q/k/v/o_proj, gate/up/down_proj). Not the vision tower and projector, and not the routed experts:
transformers stores those as fused 3-D tensors, which are not Linear layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from thinkvl.config import ConfigError

log = logging.getLogger("thinkvl")

LM_TARGETS = (r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|"
              r"kv_b_proj|gate_proj|up_proj|down_proj)")


@dataclass
class LoraSettings:
    """`model.lora`: LoRA adapters instead of full fine-tuning."""

    rank: int = 8  # r: the adapters' inner dimension
    alpha: float = 16.0  # scale s = alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input
    # peft's target_modules: a list of module-name suffixes (e.g. [q_proj, v_proj]) or one regular
    # expression matched against whole module names; unset: LM_TARGETS (the LM's projections)
    target_modules: list[str] | str | None = None

    def check(self, prefix: str) -> None:
        if self.rank < 1:
            raise ConfigError(f"{prefix}.rank: must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"{prefix}.alpha: must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{prefix}.dropout: must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError(f"{prefix}.target_modules: an empty list targets nothing; leave it unset for the "
                              "language model's projections")


def attach(model: torch.nn.Module, cfg: LoraSettings, precision: str = "fp32", world: int = 1):
    """Inject LoRA layers into `model` in place (its other weights frozen); returns the PeftModel
    around it, which knows how to save the adapter.

    peft keeps adapters in float32 over a bf16 base (`bf16_pure`: bf16 frozen weights, fp32
    adapters, the leanest setup in one process); FSDP2 needs one dtype per sharded block, so under
    torchrun that combination is refused."""
    if precision == "bf16_pure" and world > 1:
        raise ConfigError("model.precision: bf16_pure with model.lora under torchrun would shard bf16 base weights "
                          "with float32 adapters in one FSDP2 block (it needs one dtype); use bf16_mixed")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("model.lora needs peft: pip install 'thinkvl[lora]'") from None
    targets = cfg.target_modules if cfg.target_modules is not None else LM_TARGETS
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets)
    try:
        peft_model = get_peft_model(model, peft_cfg)
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise ConfigError(f"model.lora.target_modules: {e}") from None
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("model.lora: training %d adapter parameters of %d (rank %d, alpha %g)", n_train, n_all,
             cfg.rank, cfg.alpha)
    return peft_model


def is_adapter_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter weights of a (full) model state dict: what a LoRA checkpoint keeps."""
    return {k: v for k, v in sd.items() if is_adapter_key(k)}


def scalings(model: torch.nn.Module) -> dict[str, float]:
    """Module name -> s of each LoRA layer (peft's own value: alpha / rank, or rsLoRA's)."""
    from peft.tuners.lora import LoraLayer

    return {name: float(m.scaling[m.active_adapters[0]]) for name, m in model.named_modules()
            if isinstance(m, LoraLayer)}


def merged_state(sd: dict[str, torch.Tensor], scale: dict[str, float]) -> dict[str, torch.Tensor]:
    """The plain model's state dict: W' = W + s * B @ A for each LoRA layer (computed in float32,
    stored in W's dtype), `base_layer.` dropped from the names, adapter weights dropped."""
    return dict(merged_items(sd, scale))


def merged_items(sd: dict[str, torch.Tensor], scale: dict[str, float], full=lambda t: t):
    """`merged_state` one (name, tensor) at a time, each tensor passed through `full` first (FSDP2:
    all-gather a DTensor shard), so a consumer that copies them away (the vLLM weight sync) never
    holds the whole gathered model. Every rank must consume it in the same order."""
    for k, v in sd.items():
        if is_adapter_key(k):
            continue
        v = full(v)
        module, _, leaf = k.rpartition(".")
        if module.endswith(".base_layer"):
            owner = module.removesuffix(".base_layer")
            if leaf == "weight":
                name = next(n for n in sd if n.startswith(f"{owner}.lora_A.") and n.endswith(".weight"))
                a, b = full(sd[name]), full(sd[name.replace(".lora_A.", ".lora_B.")])
                v = (v.float() + scale[owner] * (b.float() @ a.float())).to(v.dtype)
            k = f"{owner}.{leaf}"
        yield k, v


def save_adapter(peft_model, sd: dict[str, torch.Tensor], folder: Path) -> None:
    """Write the adapter (adapter_config.json + adapter_model.safetensors) from a full state dict
    of the base model (FSDP2 gathers it; peft's own state would be the shards)."""
    adapters = {f"base_model.model.{k}": v for k, v in adapter_state(sd).items()}
    peft_model.save_pretrained(str(folder), state_dict=adapters)
