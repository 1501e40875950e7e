"""RL by online policy mirror descent (Kimi k1.5, as reused by Kimi-VL).

Iteration i, with the current policy pi_i as the reference:
  1. sample    draw a batch of problems (curriculum and/or prioritized sampler)
  2. generate  k responses each from pi_i, recording their token log-probs (these are log pi_i)
  3. score     r_j = verifier(response, answer) in {0, 1}, plus w * k1.5 length reward
  4. update    one or more optimiser steps on
                 L = 1/B sum_j ( r_j - rbar_group - tau * (log pi_theta(y_j|x) - log pi_i(y_j|x)) )^2
               (none when every group's rewards are tied: no advantage is non-zero, see `update`)
  5. pi_{i+1} := the updated policy (the next iteration's rollouts record its log-probs)
Each phase is one call, timed and logged. Nothing here knows how generation is implemented.

Loss aggregation: responses from all micro-batches and ranks of an iteration are normalised by the
iteration's total response count B (GRPO: its total response-token count), times world size since
FSDP averages gradients, so micro-batching and the number of processes do not change the update.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm import tqdm

from thinkvl.config import ConfigError
from thinkvl.data.chat import Example
from thinkvl.data.formats import read_records
from thinkvl.data.packing import bfd_pack, collate_rows
from thinkvl.eval.evaluate import greedy_metrics, load_tagger, tag_shares
from thinkvl.models.attention import uses_varlen
from thinkvl.models.forward import token_logprobs
from thinkvl.models.load import Loaded, load
from thinkvl.rewards.length import group_length_rewards, length_weight
from thinkvl.rewards.verifiers import format_ok, get_verifier, safe_score, verifier_failures
from thinkvl.rl.losses import LOSSES, get_loss, mirror_descent_stats, tied_groups
from thinkvl.rl.samplers import SAMPLER_KINDS, build_sampler
from thinkvl.rollout.engine import SamplingParams, VLLMSettings, build_engine
from thinkvl.rollout.hf_engine import media_token_ids
from thinkvl.rollout.types import Rollout
from thinkvl.train import distributed as D
from thinkvl.train import lora as lora_
from thinkvl.train import precision as P
from thinkvl.train.common import OPTIMIZERS, ModelConfig, RunDir, Timer, make_optimizer, param_groups, set_lr

log = logging.getLogger("thinkvl")


@dataclass
class RLDataConfig:
    problems: str = ""  # problem file (messages + answer [+ difficulty]): JSONL / Parquet / datasets folder
    columns: dict = field(default_factory=dict)  # column mapping for other layouts (problem/answer/images)
    on_error: Literal["raise", "skip"] = "raise"
    eval_problems: str | None = None  # held-out problems for greedy accuracy during training
    eval_limit: int = 64
    limit: int | None = None

    def check(self, prefix: str) -> None:
        if not self.problems:
            raise ConfigError(f"{prefix}.problems: a problem file is required")


@dataclass
class RolloutConfig:
    prompts_per_iter: int = 16  # problems drawn per iteration (across all processes)
    k: int = 8  # responses per problem (the group)
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 64  # sequences per generation batch (hf engine)
    engine: Literal["hf", "vllm"] = "hf"  # hf: thinkvl's sampling loop; vllm: a vLLM worker (rollout.vllm)
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    # recompute the recorded log-probs (log pi_i of the loss) with the trainer's forward before the
    # update; None = only for the vllm engine, whose kernels, ban bias and top-p renormalisation
    # differ from the trainer's (thinkvl.rollout.vllm_engine). Logged as logprob_gap/{mean,max}.
    recompute_logprobs: bool | None = None


@dataclass
class LossConfig:
    name: str = "mirror_descent"  # mirror_descent | grpo
    tau: float = 0.1  # mirror descent: KL weight toward pi_i
    clip_eps: float = 0.2  # grpo: ratio clip
    updates_per_iter: int = 1  # optimiser steps per iteration, all against the same pi_i
    responses_per_micro_batch: int = 16  # whole groups; small micro-batches keep activations in cache
    share_prompt: bool = True  # pack a group's prompt once for its k responses (needs varlen attention)
    lr: float = 1e-5
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    optimizer: str = "adamw"  # adamw (betas 0.9, 0.95) | sgd (heavy-ball momentum below)
    momentum: float = 0.9  # sgd only

    def check(self, prefix: str) -> None:
        if self.name not in LOSSES:
            raise ConfigError(f"{prefix}.name: {self.name!r} unknown; choose one of {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"{prefix}.optimizer: {self.optimizer!r} unknown; choose one of "
                              f"{', '.join(OPTIMIZERS)}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"{prefix}.momentum: must be in [0, 1), got {self.momentum}")


@dataclass
class LengthPenaltyConfig:
    weight: float = 0.0  # w in r + w * len_reward (k1.5); 0 = off
    warmup_iters: int = 0  # no length penalty before this iteration


@dataclass
class SamplerConfig:
    kind: str = "uniform"  # uniform | prioritized | curriculum | curriculum+prioritized
    curriculum_iters: int = 0  # iterations over which the pool grows from easy to all
    start_frac: float = 0.3  # the easiest fraction of problems available at the start
    ema: float | None = None  # prioritized: success-rate EMA weight (None: running mean)

    def check(self, prefix: str) -> None:
        if self.kind not in SAMPLER_KINDS:
            raise ConfigError(f"{prefix}.kind: {self.kind!r} unknown; choose one of {', '.join(SAMPLER_KINDS)}")


@dataclass
class GuardrailConfig:
    max_truncated_frac: float = 0.9  # warn when more responses than this hit max_new_tokens
    max_zero_var_frac: float = 0.95  # warn when more groups than this have identical rewards
    patience: int = 3  # consecutive iterations before a warning becomes a stop (if stop=true)
    stop: bool = False  # stop the run instead of only warning


@dataclass
class RLConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: RLDataConfig = field(default_factory=RLDataConfig)
    verifier: str = "math"  # math | exact | numeric | think_math | format | module:function
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    length_penalty: LengthPenaltyConfig = field(default_factory=LengthPenaltyConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    guardrails: GuardrailConfig = field(default_factory=GuardrailConfig)
    iterations: int = 100
    out_dir: str = "runs/rl"
    seed: int = 0
    eval_every: int = 0  # iterations between held-out evaluations (0: at the end only)
    eval_max_new_tokens: int = 256
    # module:function (problem, response) -> {tag: bool or None}; each iteration logs the share of
    # rollouts with each tag as `tags/<name>` (e.g. the demo's behaviours, to watch what RL chooses)
    rollout_tagger: str = ""
    save_every: int = 0  # iterations between checkpoints (0: at the end only)
    resume: bool = True
    logging_backend: str = "none"


# --- phases -----------------------------------------------------------------------------------


def score(rollouts: list[list[Rollout]], problems: list[dict], verifier, lp: LengthPenaltyConfig, it: int) -> None:
    """Fill each rollout's correctness, length reward and total reward (in place)."""
    w = length_weight(it, lp.weight, lp.warmup_iters)
    for g, (group, prob) in enumerate(zip(rollouts, problems)):
        for r in group:
            r.group = g
            r.correct = safe_score(verifier, r.response_text, prob["answer"])
            r.format_ok = format_ok(r.response_text)
        lens = group_length_rewards([r.length for r in group], [r.correct >= 0.5 for r in group], len(group))
        for r, lr_ in zip(group, lens):
            r.length_reward = lr_
            r.reward = r.correct + w * lr_


def _same_prompt(a: Rollout, b: Rollout) -> bool:
    if a.prompt_ids != b.prompt_ids or (a.pixel_values is None) != (b.pixel_values is None):
        return False
    return a.pixel_values is None or a.pixel_values is b.pixel_values or torch.equal(a.pixel_values, b.pixel_values)


def packed_responses(flat: list[Rollout], loaded: Loaded,
                     share_prompt: bool) -> tuple[list[Example], list[list[tuple[int, int]]]]:
    """Training examples for the responses, and per example the (rollout index, offset) of each
    response it holds, the offset being the position that predicts the response's first token.

    Without `share_prompt`: one example per rollout (prompt + response). With it: consecutive
    rollouts of the same prompt become one example, the prompt minus its last token once, then for
    each response its prompt's last token and the response, positions continuing the prompt's
    (`loaded.positions` of the full prompt + response, so mRoPE rows continue too). Only varlen
    attention reads such a row correctly (a segment starting at position s > 0 sees the root's
    first s tokens; `thinkvl.models.attention`). The images of a shared prompt appear once.
    """
    examples: list[Example] = []
    where: list[list[tuple[int, int]]] = []
    i = 0
    while i < len(flat):
        j = i + 1
        if share_prompt:
            while j < len(flat) and _same_prompt(flat[i], flat[j]):
                j += 1
        n_p = len(flat[i].prompt_ids)
        if j - i == 1 or n_p < 2:
            for r in range(i, j):
                ex = flat[r].to_example()
                ex.extra["positions"] = loaded.positions(ex)
                examples.append(ex)
                where.append([(r, n_p - 1)])
            i = j
            continue
        group = [flat[r].to_example() for r in range(i, j)]
        positions = [loaded.positions(ex) for ex in group]
        first = group[0]
        cut = n_p - 1  # the prefix every response shares; each branch starts with the prompt's last token
        ids, mask, pos = list(first.input_ids[:cut]), list(first.loss_mask[:cut]), [positions[0][..., :cut]]
        tt = list(first.extra["mm_token_type_ids"][:cut]) if "mm_token_type_ids" in first.extra else None
        spots = []
        for r, ex, ex_pos in zip(range(i, j), group, positions):
            spots.append((r, len(ids)))
            ids += ex.input_ids[cut:]
            mask += ex.loss_mask[cut:]
            pos.append(ex_pos[..., cut:])
            if tt is not None:
                tt += ex.extra["mm_token_type_ids"][cut:]
        extra = {"positions": torch.cat(pos, dim=-1)}
        if tt is not None:
            extra["mm_token_type_ids"] = tt
        examples.append(Example(input_ids=ids, loss_mask=mask, pixel_values=first.pixel_values,
                                image_grid_thw=first.image_grid_thw, extra=extra))
        where.append(spots)
        i = j
    return examples, where


def response_logprobs(model, flat: list[Rollout], loaded: Loaded, temperature: float,
                      with_entropy: bool = False, share_prompt: bool = False):
    """Current-policy log-probs of each response's tokens, from one forward pass.

    Responses (or, with `share_prompt`, whole groups that share a prompt: `packed_responses`) are
    packed best-fit into rows as long as the longest example. Returns logp [B, Tr] (and entropy
    [B, Tr]), 0 beyond each response.
    """
    examples, where = packed_responses(flat, loaded, share_prompt)
    t_max = max(r.length for r in flat)
    rows = bfd_pack([len(e) for e in examples], max(len(e) for e in examples))
    batch = collate_rows(examples, rows, loaded.pad_id, lambda ex: ex.extra["positions"])
    out = token_logprobs(model, batch, temperature=temperature, with_entropy=with_entropy)
    lp, ent = out if with_entropy else (out, None)
    # One gather from the packed rows into [B, Tr] (its backward is a single index_put); slicing
    # each response out would give every slice a zero-filled copy of the whole batch to write into.
    # Target position t predicts token t+1: a response's tokens are predicted from offset .. offset+R-1.
    width = lp.shape[1]
    index = torch.zeros(len(flat), t_max, dtype=torch.long)
    for r_i, row in enumerate(rows):
        off = 0
        for e in row:
            for i, at in where[e]:
                start = r_i * width + off + at
                index[i, : flat[i].length] = torch.arange(start, start + flat[i].length)
            off += len(examples[e])
    valid = torch.arange(t_max) < torch.tensor([r.length for r in flat]).unsqueeze(1)
    index, valid = index.to(lp.device), valid.to(lp.device)
    logp = lp.reshape(-1)[index].masked_fill(~valid, 0.0)
    if with_entropy:
        return logp, ent.detach().reshape(-1)[index].masked_fill(~valid, 0.0)
    return logp


@torch.no_grad()
def recompute_logprobs(model, flat: list[Rollout], k: int, loaded: Loaded, cfg: RLConfig) -> dict[str, float]:
    """Replace each rollout's recorded log-probs by the trainer's (same micro-batches as `update`, so
    FSDP ranks run the same number of forwards); returns the engine-vs-trainer gap per token."""
    per_mb = max(k, (cfg.loss.responses_per_micro_batch // k) * k)
    share_prompt = cfg.loss.share_prompt and uses_varlen(model)
    gap_sum, gap_max, n = 0.0, 0.0, 0
    for start in range(0, len(flat), per_mb):
        mb = flat[start : start + per_mb]
        logp = response_logprobs(model, mb, loaded, cfg.rollout.temperature, share_prompt=share_prompt).float().cpu()
        for i, r in enumerate(mb):
            new = logp[i, : r.length]
            if r.length and r.logprobs:
                diff = (new - torch.tensor(r.logprobs[: r.length])).abs()
                gap_sum, gap_max, n = gap_sum + float(diff.sum()), max(gap_max, float(diff.max())), n + r.length
            r.logprobs = new.tolist()
    return {"logprob_gap/mean": gap_sum / max(n, 1), "logprob_gap/max": gap_max}


def update(model, optim, flat: list[Rollout], k: int, loaded: Loaded, cfg: RLConfig, d: D.Dist,
           loss_fn, n_global: int) -> dict[str, float | None]:
    """One optimiser step over this rank's responses (whole groups per micro-batch), or none at all
    when the iteration's batch carries no signal.

    No signal: every group on every rank scored its k responses alike (tied total rewards), so
    every advantage is exactly 0 under both losses (`losses.group_advantages`). The gradient is
    then rounding noise: the mirror-descent tau term is 0 too while pi_theta = pi_i, which it stays
    when nothing steps, so every update of the iteration is skipped alike. A skipped update runs no
    forward or backward and leaves the weights and the optimiser state (AdamW's moments and step
    count, SGD's momentum) untouched; it returns `update_skipped` 1 and None for what it did not
    measure. The ranks sum their counts of groups with signal, so they skip together (a rank that
    skipped alone would leave the others waiting in FSDP's collectives). The iteration still counts
    (checkpoint step, sampler statistics); RL's learning rate is constant, so no schedule shifts.
    """
    signal = D.all_reduce_sum(int((~tied_groups(torch.tensor([r.reward for r in flat]), k)).sum()), d)
    if signal == 0:
        return {"loss": None, "grad_norm": None, "entropy": None, "kl": None, "update_skipped": 1}
    per_mb = max(k, (cfg.loss.responses_per_micro_batch // k) * k)
    share_prompt = cfg.loss.share_prompt and uses_varlen(model)
    # Global count each loss divides by (losses.py): responses for mirror descent, response tokens for
    # GRPO. FSDP averages gradients over ranks, hence / world.
    n_norm = n_global if cfg.loss.name == "mirror_descent" else D.all_reduce_sum(sum(r.length for r in flat), d)
    total_loss, ent_sum, ent_n = 0.0, 0.0, 0
    stats_acc: dict[str, float] = {}
    for start in range(0, len(flat), per_mb):
        mb = flat[start : start + per_mb]
        with P.compute(cfg.model.precision, d):
            logp, ent = response_logprobs(model, mb, loaded, cfg.rollout.temperature, with_entropy=True,
                                          share_prompt=share_prompt)
        mask = torch.zeros_like(logp)
        ref = torch.zeros_like(logp)
        for i, r in enumerate(mb):
            mask[i, : r.length] = 1.0
            ref[i, : r.length] = torch.tensor(r.logprobs[: r.length])
        rewards = torch.tensor([r.reward for r in mb])
        correct = torch.tensor([r.correct for r in mb])  # GRPO scales by its spread, not the reward's
        loss = loss_fn(logp, ref, mask, rewards, k, normalizer=n_norm / d.world, correct=correct)
        loss.backward()
        total_loss += float(loss.detach())
        ent_sum += float((ent * mask).sum())
        ent_n += int(mask.sum())
        st = mirror_descent_stats(logp.detach(), ref, mask, rewards, k, cfg.loss.tau)
        for key, v in st.items():
            stats_acc[key] = stats_acc.get(key, 0.0) + v * len(mb)
    gnorm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                           cfg.loss.clip_grad if cfg.loss.clip_grad > 0 else float("inf"))
    gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
    if not (math.isfinite(gnorm) and math.isfinite(total_loss)):
        raise FloatingPointError(f"non-finite RL loss {total_loss} or grad norm {gnorm}")
    optim.step()
    optim.zero_grad(set_to_none=True)
    out = {"loss": D.all_reduce_sum(total_loss, d) / d.world, "grad_norm": gnorm,
           "entropy": D.all_reduce_sum(ent_sum, d) / max(D.all_reduce_sum(ent_n, d), 1)}
    # responses were sampled from pi_i, so minus the mean sequence log-ratio estimates KL(pi_i || pi_theta)
    out["kl"] = -stats_acc.get("log_ratio_mean", 0.0) / max(len(flat), 1)
    out["update_skipped"] = 0
    return out


def rollout_metrics(flat: list[Rollout], k: int) -> dict[str, float]:
    lengths = [r.length for r in flat]
    correct_lengths = [r.length for r in flat if r.correct >= 0.5]
    groups = [flat[i : i + k] for i in range(0, len(flat), k)]
    return {
        "reward": statistics.fmean(r.reward for r in flat),
        "reward/correct": statistics.fmean(r.correct for r in flat),
        "reward/length": statistics.fmean(r.length_reward for r in flat),
        "accuracy": statistics.fmean(float(r.correct >= 0.5) for r in flat),
        "format_rate": statistics.fmean(float(r.format_ok) for r in flat),
        "response_length/mean": statistics.fmean(lengths),
        "response_length/max": max(lengths),
        "response_length/correct_mean": statistics.fmean(correct_lengths) if correct_lengths else None,
        "truncated_frac": statistics.fmean(float(r.truncated) for r in flat),
        "zero_var_groups": statistics.fmean(float(len({r.reward for r in g}) == 1) for g in groups),
    }


class Guardrails:
    """Warn loudly (or stop) when training has stopped making sense, with the reason."""

    def __init__(self, cfg: GuardrailConfig):
        self.cfg = cfg
        self.streak: dict[str, int] = {}

    def check(self, m: dict[str, float], it: int) -> None:
        problems = {
            "truncated": (m["truncated_frac"] > self.cfg.max_truncated_frac,
                          f"{m['truncated_frac']:.0%} of responses hit max_new_tokens: the reward is stuck near 0; "
                          "raise rollout.max_new_tokens or shorten the expected answers"),
            "zero_var": (m["zero_var_groups"] > self.cfg.max_zero_var_frac,
                         f"{m['zero_var_groups']:.0%} of groups have identical rewards: no learning signal; "
                         "use harder/easier problems, a larger k, or prioritized sampling"),
        }
        for key, (bad, why) in problems.items():
            self.streak[key] = self.streak.get(key, 0) + 1 if bad else 0
            if bad:
                log.warning("iteration %d: %s", it, why)
                if self.cfg.stop and self.streak[key] >= self.cfg.patience:
                    raise RuntimeError(f"stopped by guardrail at iteration {it}: {why}")


def banned_tokens(loaded: Loaded) -> tuple[int, ...]:
    """Token ids a policy must never emit: the image/video placeholders (a sampled one crashes the
    next forward pass), the media markers around them, and a pad token distinct from EOS."""
    tok = loaded.tokenizer
    ids = set(media_token_ids(loaded))
    for name in ("<|media_begin|>", "<|media_content|>", "<|media_end|>", "<|vision_start|>", "<|vision_end|>"):
        t = tok.convert_tokens_to_ids(name)
        if isinstance(t, int) and t != tok.unk_token_id:
            ids.add(t)
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        ids.add(tok.pad_token_id)
    return tuple(sorted(ids))


def check_no_banned(flat: list[Rollout], banned: tuple[int, ...]) -> None:
    """Stop with the reason if a response holds a banned (image placeholder) token.

    The engine never samples them, but a custom engine might; the next forward pass would then fail
    deep inside transformers with "Image features and image tokens do not match".
    """
    bad = set(banned)
    for r in flat:
        hit = bad.intersection(r.response_ids)
        if hit:
            raise RuntimeError(
                f"response to problem {r.prompt_id} (sample {r.sample_index}) contains banned token ids "
                f"{sorted(hit)} (image/video placeholders or pad): its image-feature count would not match; "
                "the generation engine must honour SamplingParams.banned_token_ids")


@D.releases_process_group
def train(cfg: RLConfig) -> RunDir:
    """Run policy-mirror-descent RL as configured; returns the run directory."""
    d = D.setup()
    if cfg.rollout.prompts_per_iter % d.world:
        # equal shares keep the number of micro-batches, hence of FSDP collectives, equal on every rank
        raise ConfigError(f"rollout.prompts_per_iter: {cfg.rollout.prompts_per_iter} must be a multiple of "
                          f"the number of processes ({d.world})")
    run = RunDir(cfg.out_dir, d)
    run.add_backend(cfg.logging_backend)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    loaded = load(cfg.model.path, cfg.model.dtype, cfg.model.trust_remote_code,
                  cfg.model.attn_implementation, cfg.model.chat_template, seed=cfg.model.seed)
    ckpt_dtype = P.prepare(loaded.model, cfg.model.precision)
    cfg.model.dtype = str(ckpt_dtype).removeprefix("torch.")  # `auto` resolved, as final/ is written
    if cfg.model.lora is not None:
        run.lora = lora_.attach(loaded.model, cfg.model.lora, cfg.model.precision, d.world)  # in place: loaded.model gets the adapters
    run.save_config(cfg)
    model = loaded.model.to(d.device)
    model.train()
    verifier = get_verifier(cfg.verifier)
    tagger = load_tagger(cfg.rollout_tagger)
    problems = read_records(cfg.data.problems, "problem", cfg.data.on_error, cfg.data.columns, cfg.data.limit)
    eval_problems = (read_records(cfg.data.eval_problems, "problem", limit=cfg.data.eval_limit)
                     if cfg.data.eval_problems else [])
    prompts = [loaded.render(p["messages"], add_generation_prompt=True) for p in problems]
    for p, ex in zip(problems, prompts):
        ex.extra["id"] = p["id"]
    sampler = build_sampler(cfg.sampler.kind, len(problems), cfg.seed,
                            difficulties=[p.get("difficulty") for p in problems],
                            curriculum_steps=cfg.sampler.curriculum_iters, start_frac=cfg.sampler.start_frac,
                            ema=cfg.sampler.ema)
    # Under FSDP2 every forward is a collective, but generation runs a different number of forwards on
    # each rank (rows finish at different steps, chunk counts differ): rollouts and evals therefore come
    # from an unsharded replica, refreshed from the trained weights before use.
    # With bf16 compute the replica is kept in bf16: what FSDP2's policy gives the training forward.
    gen = (dataclasses.replace(loaded, model=copy.deepcopy(loaded.model).to(P.replica_dtype(cfg.model.precision)))
           if d.enabled else loaded)
    compute = functools.partial(P.compute, cfg.model.precision, d)
    # The vllm engine's worker holds its own copy of the weights, synced before every generation
    # (merged W + s B A under LoRA: vLLM loads the base model's names).
    use_vllm = cfg.rollout.engine == "vllm"
    engine = build_engine(cfg.rollout.engine, gen, cfg.model.path, cfg.rollout.batch_size, cfg.rollout.vllm,
                          seed=cfg.seed * 1_000_003 + d.rank, trust_remote_code=cfg.model.trust_remote_code)
    recompute = use_vllm if cfg.rollout.recompute_logprobs is None else cfg.rollout.recompute_logprobs

    @torch.no_grad()
    def rollout_policy() -> Loaded:
        if d.enabled:  # every rank all-gathers every tensor, in the same order
            gen.model.load_state_dict({k: v.full_tensor() if hasattr(v, "full_tensor") else v
                                       for k, v in model.state_dict().items()})
        return gen

    loss_fn = functools.partial(get_loss(cfg.loss.name),
                                **({"tau": cfg.loss.tau} if cfg.loss.name == "mirror_descent"
                                   else {"clip_eps": cfg.loss.clip_eps}))
    if cfg.loss.share_prompt and not uses_varlen(model):
        log.info("loss.share_prompt: the model does not attend with thinkvl's varlen attention "
                 "(model.attn_implementation=%s), so each response carries its own copy of the prompt",
                 cfg.model.attn_implementation)
    model = D.shard(model, d, P.mp_policy(cfg.model.precision))  # before the optimiser: fully_shard replaces the parameters
    groups = param_groups(model, cfg.model, cfg.loss.lr, cfg.loss.weight_decay)
    optim = make_optimizer(groups, cfg.loss.optimizer, (0.9, 0.95), cfg.loss.momentum)
    set_lr(optim, cfg.loss.lr)

    start = 0
    ckpt = run.latest_checkpoint() if cfg.resume else None
    if ckpt is not None:
        state = run.load_checkpoint(ckpt, model, optim)
        sampler.load_state_dict(state["sampler"])
        start = state["step"]
        run.truncate_metrics(start)
        log.info("resumed from %s at iteration %d", ckpt, start)
    if start == 0 and eval_problems:
        with compute():
            run.log_metrics({"step": 0, **greedy_metrics(rollout_policy(), eval_problems, cfg.verifier,
                                                         cfg.eval_max_new_tokens)})

    guard = Guardrails(cfg.guardrails)
    timer = Timer()
    k = cfg.rollout.k
    banned = banned_tokens(loaded)
    bar = tqdm(total=cfg.iterations, initial=start, disable=not d.main, desc="rl", dynamic_ncols=True)
    for it in range(start, cfg.iterations):
        with timer("sample"):
            idx = sampler.sample(cfg.rollout.prompts_per_iter, it)
            mine = idx[d.rank :: d.world]
        sampling = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                  top_p=cfg.rollout.top_p, seed=cfg.seed * 1_000_003 + it * 101 + d.rank,
                                  banned_token_ids=banned)
        model.eval()
        t0 = time.perf_counter()
        # vLLM computes in its own dtype (rollout.vllm.dtype); bf16 autocast here would only round the LoRA merge
        with timer("generate"), torch.no_grad(), (contextlib.nullcontext() if use_vllm else compute()):
            if use_vllm:
                engine.wake_up()
                engine.sync_weights(policy_weights(model, run.lora is not None))  # FSDP2: one tensor gathered at a time
            else:
                rollout_policy()
            rollouts = engine.generate([prompts[i] for i in mine], k, sampling)
            if use_vllm:
                engine.sleep()  # GPU: give the memory back to the trainer (no-op on CPU)
        gen_s = time.perf_counter() - t0
        model.train()
        failed = sum(verifier_failures().values())
        with timer("score"):
            score(rollouts, [problems[i] for i in mine], verifier, cfg.length_penalty, it)
        failed = sum(verifier_failures().values()) - failed  # on this rank: scored 0 unjudged (logged)
        flat = [r for g in rollouts for r in g]
        check_no_banned(flat, banned)
        n_global = int(D.all_reduce_sum(len(flat), d))
        gap = {}
        if recompute:
            with timer("ref_logprobs"):
                gap = recompute_logprobs(model, flat, k, loaded, cfg)
        t1 = time.perf_counter()
        with timer("update"):
            for _ in range(cfg.loss.updates_per_iter):
                upd = update(model, optim, flat, k, loaded, cfg, d, loss_fn, n_global)
                if upd["update_skipped"]:  # no signal: the policy is still pi_i, so every update would skip
                    log.info("iteration %d: every group's rewards are tied (all advantages 0): no optimiser step",
                             it + 1)
                    break
        train_s = time.perf_counter() - t1
        with timer("sampler_update"):
            rates = [statistics.fmean(r.correct for r in g) for g in rollouts]
            all_idx, all_rates = _gather_lists(mine, rates, d)
            sampler.update(all_idx, all_rates)
        m = rollout_metrics(flat, k)
        if tagger is not None:
            tag_dicts = [tagger(problems[i], r.response_text) for i, g in zip(mine, rollouts) for r in g]
            m.update({f"tags/{name}": share for name, share in tag_shares(tag_dicts).items()})
        n_tok = sum(r.length for r in flat)
        metrics = {"step": it + 1, **m, **upd, **gap, "lr": cfg.loss.lr, "verifier_failures": failed,
                   "length_weight": length_weight(it, cfg.length_penalty.weight, cfg.length_penalty.warmup_iters),
                   "gen_tokens_per_s": round(n_tok / max(gen_s, 1e-9), 1),
                   "train_tokens_per_s": None if upd["update_skipped"] else
                   round(sum(len(r.prompt_ids) + r.length for r in flat) * cfg.loss.updates_per_iter
                         / max(train_s, 1e-9), 1),
                   **{f"sampler/{kk}": v for kk, v in sampler.summary(it).items() if isinstance(v, (int, float))},
                   **timer.pop()}
        guard.check(m, it + 1)
        done = it + 1
        last = done == cfg.iterations
        if eval_problems and ((cfg.eval_every and done % cfg.eval_every == 0) or last):
            with compute():
                metrics.update(greedy_metrics(rollout_policy(), eval_problems, cfg.verifier, cfg.eval_max_new_tokens))
        run.log_metrics(metrics)
        bar.set_postfix(reward=f"{m['reward']:.2f}", acc=f"{m['accuracy']:.2f}", len=f"{m['response_length/mean']:.0f}")
        bar.update(1)
        if (cfg.save_every and done % cfg.save_every == 0) or last:
            run.save_checkpoint(done, model, optim, {"sampler": sampler.state_dict()})
    bar.close()
    if use_vllm:
        engine.close()
    run.export(loaded, model, ckpt_dtype)
    D.cleanup(d)
    return run


def policy_weights(model: torch.nn.Module, lora: bool):
    """(name, full tensor) of the policy under the names of the checkpoint vLLM loaded, one at a
    time (FSDP2: gathered one by one, every rank in the same order); with LoRA adapters attached
    the merged W + s B A, since vLLM runs the base model without adapters."""
    sd = model.state_dict()
    if lora:
        return lora_.merged_items(sd, lora_.scalings(model), _full)
    return ((name, _full(v)) for name, v in sd.items())


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor (FSDP2 shard) all-gathered, a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _gather_lists(idx: list[int], rates: list[float], d: D.Dist) -> tuple[list[int], list[float]]:
    """Every rank's (problem index, success rate) pairs, so all samplers stay identical."""
    if not d.enabled:
        return idx, rates
    import torch.distributed as dist

    out: list = [None] * d.world
    dist.all_gather_object(out, list(zip(idx, rates)))
    pairs = [p for part in out for p in part]
    return [i for i, _ in pairs], [r for _, r in pairs]
