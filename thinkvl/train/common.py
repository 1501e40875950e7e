"""Pieces every training stage shares: model settings, parameter groups, run directory, metrics,
checkpoints and the final Hugging Face export."""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from thinkvl.config import ConfigError, save_config
from thinkvl.models.load import Loaded
from thinkvl.train import checkpoint as C
from thinkvl.train import distributed as D
from thinkvl.train import lora as lora_
from thinkvl.train.lora import LoraSettings
from thinkvl.train.precision import export_state, write_config_dtype

log = logging.getLogger("thinkvl")

PART_NAMES = ("vision", "projector", "lm")


@dataclass
class ModelConfig:
    """Which model to train and how each part of it trains."""

    path: str = "tiny"  # `tiny` (built in), a local folder, or a hub id already in the HF cache
    # The checkpoint's dtype: weights are read in it and final/ is written in it (`auto`: the
    # checkpoint's own, float32 for `tiny`). What training keeps and computes in is `precision`.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # fp32 (weights, optimiser state and compute in float32) | bf16_mixed (float32 master weights and
    # optimiser state, bfloat16 compute: autocast in one process, FSDP2 MixedPrecisionPolicy under
    # torchrun) | bf16_pure (bfloat16 weights and optimiser state, no master copy: updates below
    # ~1/256 of a weight are lost; an explicit opt-in). See thinkvl/train/precision.py.
    precision: Literal["fp32", "bf16_mixed", "bf16_pure"] = "fp32"
    trust_remote_code: bool = False  # run code shipped with a checkpoint (off unless you trust it)
    # LM attention: varlen (SDPA per packed example: exact, no cross-example work) | sdpa | eager |
    # flash_attention_2 | flash_attention_3 | flex_attention
    attn_implementation: str = "varlen"
    chat_template: str | None = None  # a Jinja template overriding the tokenizer's own
    freeze_vision: bool = False  # vision encoder frozen
    freeze_projector: bool = False  # vision-to-text MLP projector frozen
    freeze_lm: bool = False  # language model frozen
    # Regular expressions (re.search on parameter names): when set, only matching parameters train,
    # e.g. ["layers\\.3\\.", "language_model\\.norm"] for the tiny model's last LM block (names as
    # model.named_parameters() gives them); applied after the freeze_* flags
    trainable: list[str] | None = None
    lr_mult_vision: float = 1.0  # learning-rate multiplier of the vision encoder
    lr_mult_projector: float = 1.0  # of the projector
    lr_mult_lm: float = 1.0  # of the language model
    gradient_checkpointing: bool = False  # recompute activations in the backward pass to save memory
    # LoRA adapters through peft ({rank, alpha, dropout, target_modules}; thinkvl/train/lora.py): only
    # the adapters train; unset: full fine-tuning
    lora: LoraSettings | None = None
    seed: int = 0  # initialisation seed of the built-in tiny model

    def check(self, prefix: str) -> None:
        from thinkvl.models.attention import CHOICES

        if self.attn_implementation not in CHOICES:
            raise ConfigError(f"{prefix}.attn_implementation: {self.attn_implementation!r} is not one of "
                             f"{', '.join(CHOICES)}")
        for part in PART_NAMES:
            if getattr(self, f"lr_mult_{part}") < 0:
                raise ConfigError(f"{prefix}.lr_mult_{part}: must be >= 0")
        if self.trainable is not None and not self.trainable:
            raise ConfigError(f"{prefix}.trainable: an empty list would train nothing; leave it unset to train "
                              "every parameter")
        for i, pattern in enumerate(self.trainable or []):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"{prefix}.trainable[{i}]: {pattern!r} is not a regular expression ({e})") from None


def part_of(param_name: str) -> str:
    """vision | projector | lm, from a parameter's name (Kimi, Qwen-VL, LLaVA-style layouts)."""
    n = param_name
    if any(k in n for k in ("mm_projector", "multi_modal_projector", "visual.merger", "connector")):
        return "projector"
    if any(k in n for k in ("vision_tower", "visual.", "vision_model", "vision_encoder")):
        return "vision"
    return "lm"


def param_groups(model: torch.nn.Module, cfg: ModelConfig, lr: float, weight_decay: float) -> list[dict]:
    """Optimiser groups by model part; frozen parameters (a frozen part, or outside
    `cfg.trainable` when that is set) get requires_grad=False and no group."""
    groups: dict[str, list] = {p: [] for p in PART_NAMES}
    patterns = [re.compile(x) for x in cfg.trainable or []]
    hits = [0] * len(patterns)
    n_all = n_train = 0
    for name, p in model.named_parameters():
        part = part_of(name)
        n_all += p.numel()
        matched = [i for i, rx in enumerate(patterns) if rx.search(name)]
        for i in matched:
            hits[i] += 1
        if getattr(cfg, f"freeze_{part}") or (patterns and not matched):
            p.requires_grad_(False)
        elif p.requires_grad:
            groups[part].append(p)
            n_train += p.numel()
    for pattern, n in zip(cfg.trainable or [], hits):
        if n == 0:
            raise ConfigError(f"model.trainable: {pattern!r} matches no parameter name (names look like "
                              f"{next(model.named_parameters())[0]!r}; tied weights such as an "
                              "lm_head shared with the embeddings go by their first name)")
    if patterns:
        log.info("model.trainable: training %d of %d parameters (after the freeze_* flags)", n_train, n_all)
    out = []
    for part, params in groups.items():
        if params:
            mult = getattr(cfg, f"lr_mult_{part}")
            out.append({"params": params, "lr": lr * mult, "lr_mult": mult, "name": part,
                        "weight_decay": weight_decay})
    if not out:
        raise ConfigError("model: every part is frozen; nothing to train")
    return out


_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def adamw(groups: list[dict], betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW with PyTorch's fused kernel where every parameter allows it (floating point, on CPU or
    CUDA; FSDP2's sharded parameters included), else the per-tensor loop.

    The fused kernel updates all tensors in one call; the loop runs about ten small ops per tensor.
    Measured on this 2-core CPU at 1 thread, one step of a 50M-parameter model: fused 0.03-0.06 s,
    loop 0.10-0.75 s, foreach 0.10-0.39 s (foreach also allocates temporaries for every tensor,
    which is why the loop was chosen before). Same update up to float rounding."""
    return torch.optim.AdamW(groups, betas=betas, **_impl(groups))


def _impl(groups: list[dict], fused_on_dtensor: bool = True) -> dict:
    """PyTorch's fused kernel when every parameter allows it, else the per-tensor loop.
    `fused_on_dtensor=False`: the kernel has no sharding rule for FSDP2's DTensor parameters."""
    params = [p for g in groups for p in g["params"]]
    fused = all(p.dtype in _FUSED_DTYPES and p.device.type in ("cpu", "cuda")
                and (fused_on_dtensor or type(p).__name__ != "DTensor") for p in params)
    return {"fused": True} if fused else {"foreach": False}


OPTIMIZERS = ("adamw", "sgd")


def make_optimizer(groups: list[dict], name: str, betas: tuple[float, float] = (0.9, 0.95),
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """`adamw` (see `adamw`) or `sgd`: SGD with heavy-ball momentum (a group's `weight_decay` is
    added to its gradient, as PyTorch's SGD does). AdamW moves every weight by about the
    learning rate per step whatever its gradient's size; SGD's step is proportional to the
    gradient, so it goes where the loss is most sensitive. On the demo's RL, SGD at a per-step KL
    like AdamW's lost more held-out accuracy (README, session 9); AdamW stays the default."""
    if name == "adamw":
        return adamw(groups, betas)
    if name == "sgd":
        # torch 2.14's fused SGD kernel, unlike fused AdamW, has no sharding rule for DTensor
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum,
                               **_impl(groups, fused_on_dtensor=False))
    raise ConfigError(f"optimizer {name!r} unknown; choose one of {', '.join(OPTIMIZERS)}")


def set_lr(optim: torch.optim.Optimizer, lr: float) -> None:
    for g in optim.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)


class RunDir:
    """A run directory: config.yaml, metrics.jsonl, train.log, checkpoints/, final/."""

    def __init__(self, out_dir: str | Path, d: D.Dist):
        self.path = Path(out_dir)
        self.d = d
        self.metrics_path = self.path / "metrics.jsonl"
        self.ckpt_dir = self.path / "checkpoints"
        self.final_dir = self.path / "final"
        self._backends: list = []
        self.lora = None  # the PeftModel when model.lora is set: checkpoints keep only the adapters
        if d.main:
            self.path.mkdir(parents=True, exist_ok=True)
            # One run's log file at a time: a later run in the same process (pipeline stages, tests)
            # must not keep writing into earlier runs' train.log.
            for h in [h for h in log.handlers if getattr(h, "thinkvl_run_log", False)]:
                log.removeHandler(h)
                h.close()
            handler = logging.FileHandler(self.path / "train.log")
            handler.thinkvl_run_log = True
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(handler)
        log.setLevel(logging.INFO)

    def save_config(self, cfg) -> None:
        if self.d.main:
            save_config(cfg, self.path / "config.yaml")

    def add_backend(self, kind: str) -> None:
        """Extra metric sinks: tensorboard (needs the package), wandb / trackio (need package + login)."""
        if not self.d.main or kind == "none":
            return
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            w = SummaryWriter(str(self.path / "tb"))
            self._backends.append(lambda m, step: [w.add_scalar(k, v, step) for k, v in m.items()
                                                   if isinstance(v, (int, float))])
        elif kind in ("wandb", "trackio"):
            mod = __import__(kind)
            mod.init(project="thinkvl", name=self.path.name, dir=str(self.path))
            self._backends.append(lambda m, step: mod.log(m, step=step))
        else:
            raise ConfigError(f"logging.backend: {kind!r} unknown; choose none, tensorboard, wandb or trackio")

    def log_metrics(self, metrics: dict) -> None:
        if not self.d.main:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        for b in self._backends:
            b(metrics, metrics.get("step", 0))

    def truncate_metrics(self, after_step: int) -> None:
        """On resume, drop metric lines logged after the checkpoint so the curve has no duplicates."""
        if not self.d.main or not self.metrics_path.exists():
            return
        keep = [ln for ln in self.metrics_path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= after_step]
        self.metrics_path.write_text("".join(ln + "\n" for ln in keep))

    # --- checkpoints (thinkvl.train.checkpoint: crash-safe, data only) -----------------------
    def latest_checkpoint(self) -> Path | None:
        found = C.complete(self.ckpt_dir)
        return found[-1] if found else None

    def save_checkpoint(self, step: int, model, optim, state: dict, keep: int = 2) -> None:
        """Model, optimiser (sharded, each rank its own part), trainer state (data position, sampler,
        RNG); crash-safe, see thinkvl.train.checkpoint. With LoRA only the trainable weights (the
        adapters) are kept: the base weights never change."""
        C.save(self.ckpt_dir, step, model, optim, state, keep, self.d, trainable_only=self.lora is not None)

    def load_checkpoint(self, path: Path, model, optim) -> dict:
        return C.load(path, model, optim, self.d, trainable_only=self.lora is not None)

    def export(self, loaded: Loaded, model, dtype: torch.dtype | None = None, max_shard_size: str = "5GB") -> Path:
        """Write final/ in Hugging Face format (model + processor/tokenizer), loadable without thinkvl;
        floating-point weights in `dtype` (the checkpoint's own) when given. With LoRA: the merged
        model, and the adapter in final/adapter/.

        Only the model's weights are gathered, tensor by tensor onto rank 0's CPU (no optimiser
        state); transformers' save_pretrained writes them as safetensors shards of at most
        `max_shard_size` with an index (one `model.safetensors` when they fit in one), in the
        checkpoint layout transformers loads. Written into .tmp-final/ and renamed, like a checkpoint."""
        sd = D.full_state_dict(model, self.d)
        if self.d.main:
            tmp = self.path / ".tmp-final"
            if tmp.exists():
                shutil.rmtree(tmp)
            if self.lora is not None:
                lora_.save_adapter(self.lora, sd, tmp / "adapter")
                sd = lora_.merged_state(sd, lora_.scalings(model))
            if dtype is not None:
                sd = export_state(sd, dtype)
            loaded.model.save_pretrained(tmp, state_dict=sd, max_shard_size=max_shard_size)
            if dtype is not None:  # save_pretrained recorded the trained copy's dtype
                write_config_dtype(loaded.model.config, dtype, tmp)
            loaded.processor.save_pretrained(tmp)
            C.fsync_tree(tmp)
            C.publish(tmp, self.final_dir)
        D.barrier(self.d)
        return self.final_dir


class Timer:
    """Times named phases of a step: `with timer("generate"): ...`; `timer.pop()` -> {name: s}."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.times[name] = timer.times.get(name, 0.0) + time.perf_counter() - self.t

        return _Ctx()

    def pop(self) -> dict[str, float]:
        out, self.times = {f"time/{k}": round(v, 4) for k, v in self.times.items()}, {}
        return out
