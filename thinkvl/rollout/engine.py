"""What a generation engine is: prompts in, n typed rollouts per prompt out.

An engine knows nothing about training. The RL loop, distillation, difficulty labelling and
evaluation all call `generate` and read `Rollout`s; `HFEngine` (plain PyTorch, CPU or one GPU) is the
built-in implementation; `VLLMEngine` (`rollout.engine: vllm`) runs vLLM in a worker process.
`EngineConfig` is the `rollout` section the recipes share and `build_engine` turns it into an engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from thinkvl.config import ConfigError
from thinkvl.data.chat import Example
from thinkvl.rollout.types import Rollout


@dataclass
class SamplingParams:
    """How to sample. Checked in `__post_init__`; errors name the field and the allowed values."""

    max_new_tokens: int = 128  # response tokens at most; a response that hits it is `truncated`
    temperature: float = 1.0  # logits are divided by it (also for the recorded log-probs)
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens with probability >= top_p; 1 = off
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    greedy: bool = False  # argmax instead of sampling (the filters and the seed are then irrelevant)
    stop_strings: tuple[str, ...] = ()  # also stop once the response text contains one of these
    seed: int = 0  # sample j of prompt i depends only on (seed, i, j), not on batching
    banned_token_ids: tuple[int, ...] = ()  # never sampled (e.g. image/video placeholders)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an integer >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature: expected a number > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k: expected an integer >= 0 (0 = off), got {self.top_k}")
        self.stop_strings = tuple(self.stop_strings)
        self.banned_token_ids = tuple(int(t) for t in self.banned_token_ids)


class GenerationEngine(Protocol):
    """Anything that turns prompts into rollouts."""

    def generate(self, prompts: list[Example], n: int, sampling: SamplingParams) -> list[list[Rollout]]:
        """n rollouts for each prompt, in prompt order: result[i][j] is sample j of prompt i.

        A prompt's id is taken from `prompt.extra["id"]` when present, else its index in `prompts`.
        """
        ...


@dataclass
class VLLMSettings:
    """How to start the vLLM worker (`rollout.vllm.*`); see `thinkvl.rollout.vllm_engine`."""

    python: str = ""  # the vLLM environment's python; "" = $THINKVL_VLLM_PYTHON, else this python
    dtype: str = "auto"  # vLLM's dtype; "auto" = the checkpoint's
    max_model_len: int | None = None  # prompt + response tokens at most; None = the model's own limit
    kv_cache_gib: float = 1.0  # KV cache size (kv_cache_memory_bytes); on CPU vLLM otherwise takes ~16-20 GiB
    gpu_memory_utilization: float = 0.5  # GPU: the share vLLM takes (the trainer needs the rest)
    sleep: bool = False  # GPU: free vLLM's memory while the trainer updates (`sleep`/`wake_up`)
    enforce_eager: bool = True  # no CUDA graphs / torch.compile: quicker start, slower decode on GPU
    startup_timeout_s: float = 600.0


@dataclass
class EngineConfig:
    """Which engine generates (the `rollout` section of the label and distill recipes)."""

    engine: Literal["hf", "vllm"] = "hf"  # hf: thinkvl's own loop; vllm: a vLLM worker (own environment)
    vllm: VLLMSettings = field(default_factory=VLLMSettings)


def build_engine(kind: str, loaded, model_path: str | None, batch_size: int = 64, vllm: VLLMSettings | None = None,
                 seed: int = 0, trust_remote_code: bool = False) -> GenerationEngine:
    """An `HFEngine` on `loaded`, or a `VLLMEngine` that loads `model_path` (the same model; None or
    `tiny`: `loaded` saved to a temporary folder)."""
    if kind == "hf":
        from thinkvl.rollout.hf_engine import HFEngine

        return HFEngine(loaded, batch_size=batch_size)
    if kind == "vllm":
        from thinkvl.rollout.vllm_engine import VLLMEngine

        path = None if model_path in (None, "tiny") else model_path
        return VLLMEngine(loaded, path, vllm or VLLMSettings(), seed=seed, trust_remote_code=trust_remote_code)
    raise ConfigError(f"rollout.engine: {kind!r} unknown; choose one of 'hf', 'vllm'")
