"""One process or many: torchrun environment, FSDP2 sharding, and the few collectives we need.

Under `torchrun` (WORLD_SIZE > 1) the process group is gloo on CPU and NCCL on CUDA, and the model is
sharded with FSDP2 (`fully_shard`) layer by layer. Gradients are averaged across ranks by FSDP, so a
loss meant to be a global sum over N tokens is scaled by world_size / N on every rank.
"""

from __future__ import annotations

import functools
import gc
import os
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> Dist:
    """Initialise from torchrun's environment (or a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local, device=dev)


def shard(model: torch.nn.Module, d: Dist, mp_policy=None) -> torch.nn.Module:
    """FSDP2: shard each transformer block, then the root (no-op in one process). `mp_policy`: a
    `MixedPrecisionPolicy` (thinkvl.train.precision.mp_policy), or None to compute in the
    parameters' dtype."""
    if not d.enabled:
        return model
    from torch.distributed.fsdp import fully_shard

    kw = {"mp_policy": mp_policy} if mp_policy is not None else {}
    for module in model.modules():
        name = type(module).__name__
        if name.endswith(("DecoderLayer", "EncoderLayer", "Block")) and module is not model:
            fully_shard(module, **kw)
    fully_shard(model, **kw)
    # thinkvl's training forward (models/forward.token_logprobs) bypasses `model.forward`; register
    # it as a forward method of the root so FSDP gathers the root's parameters around it.
    from torch.distributed.fsdp import register_fsdp_forward_method

    from thinkvl.models.forward import FSDP_FORWARD, _token_logprobs

    setattr(model, FSDP_FORWARD, types.MethodType(_token_logprobs, model))
    register_fsdp_forward_method(model, FSDP_FORWARD)
    return model


def shard_from_rank0(model: torch.nn.Module, d: Dist, mp_policy=None) -> torch.nn.Module:
    """Shard a model that rank 0 loaded and the other ranks built on the meta device
    (`models.load.load(..., meta=True)`), then give every rank its shards of rank 0's weights, one
    tensor at a time (`set_model_state_dict(..., broadcast_from_rank0=True)`). Before, every rank
    loaded the whole model and then sharded it; now rank 0 peaks at the whole model plus its shards
    and the other ranks at their shards plus one whole tensor in flight (measured: docs/scale.md).
    `mp_policy` as in `shard`. One process: moved to the device, nothing else."""
    if not d.enabled:
        return model.to(d.device)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = model.state_dict() if d.main else {}  # rank 0's whole tensors, kept alive past fully_shard
    model = shard(model, d, mp_policy)
    if not d.main:
        model.to_empty(device=d.device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    # Buffers that are not in the state dict (rotary frequencies) were never filled on the meta ranks.
    for _, buf in model.named_buffers():
        dist.broadcast(buf, src=0)
    return model


def all_reduce_sum(x: float | torch.Tensor, d: Dist) -> float:
    if not d.enabled:
        return float(x)
    t = torch.as_tensor(x, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def full_state_dict(model: torch.nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """The unsharded model state (on CPU) on every rank."""
    if not d.enabled:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Tied parameters (LM head = embeddings) come back as separate copies; share them again so
    # save_pretrained writes a tied weight once, as it does from one process.
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first and name in sd:
            sd[name] = sd[first[id(p)]]
        first.setdefault(id(p), name)
    return sd


def cleanup(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        # Every rank reaches this point before any tears its gloo pairs down: a rank that destroyed the
        # group while its peer still had traffic in flight died in C++ ("terminate called without an
        # active exception", SIGABRT), seen twice in the 2-process RL test on a loaded machine.
        dist.barrier()
        dist.destroy_process_group()


def releases_process_group(train_fn):
    """Decorate a stage's `train`: when it returns (or raises), collect garbage, so the sharded model
    and optimiser it dropped, and with them the process group their device mesh holds, are freed
    while the interpreter is alive. FSDP2 models hold reference cycles (hooks and registered forward
    methods point back at their modules), so without a collection they live until interpreter exit,
    where destroying gloo's worker threads aborted a rank ("terminate called without an active
    exception", SIGABRT) after a run had finished and saved everything."""

    @functools.wraps(train_fn)
    def wrapper(*args, **kwargs):
        try:
            return train_fn(*args, **kwargs)
        finally:
            gc.collect()

    return wrapper
