"""The rollout record: one sampled response to one prompt, with what RL needs to score and train on it.

A generation engine fills the sampling fields; the reward step fills the reward fields later. The
record knows nothing about the loss; `to_example` turns it back into a training `Example` whose loss
mask covers exactly the response tokens.

Log-probs (`logprobs`) are recorded as ``log softmax(logits / temperature)[token]`` over the full
vocabulary: the logits are the model's raw output at the sampling temperature, BEFORE top-k/top-p
filtering and before banned tokens are masked. That is the quantity the trainer recomputes
(`thinkvl.models.forward.token_logprobs` at the same temperature), so at the first optimiser step of
an RL iteration ``log pi_theta - log pi_ref`` is zero up to float noise. It is not the probability
under the truncated sampling distribution when top-k/top-p/bans are active. `VLLMEngine` records
vLLM's own log-probs, which are renormalised over the tokens those filters leave (see its module
doc); the RL loop recomputes them with the trainer for that engine (`rollout.recompute_logprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from thinkvl.data.chat import Example


@dataclass
class Rollout:
    """One response sampled for one prompt."""

    prompt_id: str  # the problem's id (or the prompt's index in the call, as a string)
    prompt_ids: list[int]  # [P] the rendered prompt, generation prompt included, no padding
    response_ids: list[int]  # [R] sampled tokens; the EOS / stop token that ended it is included
    response_text: str  # decode(response_ids) with special tokens skipped
    pixel_values: torch.Tensor | None = None  # [n_patches, ...] the prompt's images (shared, not copied)
    image_grid_thw: torch.Tensor | None = None  # [n_images, 3]
    logprobs: list[float] = field(default_factory=list)  # [R] sampler's log p(token), see module doc
    finished: bool = False  # ended by EOS or a stop string
    truncated: bool = False  # hit max_new_tokens without EOS / stop string
    length: int = 0  # R, the number of response tokens
    sample_index: int = 0  # which of the n samples of this prompt (0..n-1)
    extra: dict = field(default_factory=dict)  # the prompt Example's extra (e.g. mm_token_type_ids [P])
    # Filled by the reward step:
    reward: float = 0.0  # total reward used by the loss (correctness + weighted length reward)
    correct: float = 0.0  # verifier score in [0, 1]
    length_reward: float = 0.0  # k1.5 length reward, before its weight
    format_ok: bool = False  # the response follows the expected answer format
    group: int = 0  # index of the prompt's group of n samples within an RL batch

    def to_example(self) -> Example:
        """prompt + response as a training `Example`; the loss mask covers the response tokens only."""
        extra = dict(self.extra)
        if "mm_token_type_ids" in extra:
            # response tokens are text; the image placeholders are banned during sampling
            extra["mm_token_type_ids"] = list(extra["mm_token_type_ids"]) + [0] * len(self.response_ids)
        return Example(
            input_ids=list(self.prompt_ids) + list(self.response_ids),
            loss_mask=[False] * len(self.prompt_ids) + [True] * len(self.response_ids),
            pixel_values=self.pixel_values,
            image_grid_thw=self.image_grid_thw,
            extra=extra,
        )

    @property
    def has_image(self) -> bool:
        return self.pixel_values is not None
