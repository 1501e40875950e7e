"""Training precision: which dtype the trained weights and optimiser state live in, and which the
forward/backward computes in (`model.precision`).

- `fp32`: weights, gradients, optimiser state and compute in float32.
- `bf16_mixed`: float32 master weights and optimiser state, bfloat16 compute. In one process the
  forward runs under bf16 autocast; under FSDP2 `fully_shard` gets
  `MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`: each rank keeps its fp32 shard,
  all-gathers bf16 copies for the forward/backward, and reduce-scatters gradients in fp32.
- `bf16_pure`: the weights and AdamW's moments themselves in bfloat16, no master copy. An update
  smaller than about 2^-8 of a weight rounds away (at lr 2e-6 most weights never change), so this
  is an explicit opt-in for memory experiments, never a default. With `model.lora` in one process
  it is the lean choice: the frozen base in bf16, peft's adapters (all that trains) in float32.

The checkpoint's own dtype (`model.dtype`) is only how weights are read and how `final/` is
written; the trained copy is cast to `param_dtype(precision)` after loading.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from thinkvl.train import distributed as D

log = logging.getLogger("thinkvl")

PRECISIONS = ("fp32", "bf16_mixed", "bf16_pure")


def param_dtype(precision: str) -> torch.dtype:
    """The dtype of the trained parameters (and so of AdamW's moments)."""
    return torch.bfloat16 if precision == "bf16_pure" else torch.float32


def mp_policy(precision: str):
    """FSDP2's mixed-precision policy for `fully_shard`, or None (compute in the parameters' dtype)."""
    if precision != "bf16_mixed":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def compute(precision: str, d: D.Dist):
    """Context for forward passes: bf16 autocast for `bf16_mixed` in one process; a no-op otherwise
    (under FSDP2 the policy casts the gathered parameters; fp32 and bf16_pure compute in the
    parameters' own dtype). Backward passes run outside it, as PyTorch recommends."""
    if precision == "bf16_mixed" and not d.enabled:
        return torch.autocast(d.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare(model: torch.nn.Module, precision: str) -> torch.dtype:
    """Cast the model's floating-point weights to the trained dtype; returns the dtype they were
    loaded in (the checkpoint's, which `final/` keeps)."""
    loaded = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if precision == "bf16_pure":
        log.warning("model.precision=bf16_pure: bfloat16 weights and optimiser state without an fp32 master "
                    "copy; updates below ~1/256 of a weight are lost (use bf16_mixed to train for real)")
    model.to(param_dtype(precision))
    return loaded


def export_state(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict with floating-point tensors cast to the checkpoint's dtype (tied tensors stay
    shared, so `save_pretrained` still writes them once)."""
    cast: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in sd.items():
        if v.is_floating_point() and v.dtype != dtype:
            if id(v) not in cast:
                cast[id(v)] = v.to(dtype)
            v = cast[id(v)]
        out[k] = v
    return out


def write_config_dtype(config, dtype: torch.dtype, folder) -> None:
    """Rewrite folder/config.json with `dtype` as the model's (and its sub-configs') dtype, so
    `from_pretrained(dtype="auto")` loads final/ in the dtype its weights are stored in."""
    name = str(dtype).removeprefix("torch.")
    configs = [config] + [getattr(config, k) for k in getattr(config, "sub_configs", {}) if getattr(config, k, None)]
    before = [c.dtype for c in configs]
    for c in configs:
        c.dtype = name
    try:
        config.save_pretrained(folder)
    finally:
        for c, old in zip(configs, before):
            c.dtype = old


def replica_dtype(precision: str) -> torch.dtype:
    """The dtype of an unsharded inference replica (RL rollouts under FSDP2): the compute dtype."""
    return torch.float32 if precision == "fp32" else torch.bfloat16
