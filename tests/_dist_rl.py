"""Entry point for test_rl_loop's multi-process checks.

    python -m torch.distributed.run --nproc_per_node 2 tests/_dist_rl.py update MODEL OUT_JSON
    python -m torch.distributed.run --nproc_per_node 2 tests/_dist_rl.py train MODEL PROBLEMS OUT_DIR VERIFIER [PRECISION]
    python -m torch.distributed.run --nproc_per_node 2 tests/_dist_rl.py skip MODEL OUT_JSON

update: one RL `update` on a fixed batch (`run_update` is also called in-process for 1 process).
Every rank loads the same model and samples the same rollouts with a fixed seed *before* sharding
(so generation needs no collectives), gives them fixed rewards, keeps its own prompts
(`idx[rank::world]`, as `train` does), shards with FSDP2, builds the optimiser from the sharded
parameters and runs `update` once (SGD). Rank 0 writes the reported loss / grad norm / entropy and the
full updated state dict (OUT_JSON and OUT_JSON + ".pt").

train: a 2-iteration `train` run (the verifier module must be importable: PYTHONPATH).

skip: `update` on a batch where every group is tied on every rank (must skip on both ranks, weights
and AdamW state untouched; a checkpoint of the still-empty state must not initialise it, and loading
it leaves the optimiser empty), then on
one where only rank 1's groups carry signal (both ranks must step: a rank skipping alone would hang
the other in FSDP's collectives). Rank 0 writes every rank's findings to OUT_JSON.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from thinkvl.models.load import load  # noqa: E402
from thinkvl.rl.loop import RLConfig, update  # noqa: E402
from thinkvl.rl.losses import get_loss  # noqa: E402
from thinkvl.rollout.engine import SamplingParams  # noqa: E402
from thinkvl.rollout.hf_engine import HFEngine  # noqa: E402
from thinkvl.train import checkpoint as C  # noqa: E402
from thinkvl.train import distributed as D  # noqa: E402
from thinkvl.train.common import make_optimizer, param_groups  # noqa: E402

PROMPTS = ["Say 7.", "Say the number 7.", "Please say 7.", "What is 7?"]
K = 4


def fixed_rollouts(loaded) -> list:
    """K responses to each prompt (same on every rank: fixed seed, unsharded model), with fixed
    rewards that differ within each group (so every group carries a learning signal)."""
    prompts = [loaded.render([{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS]
    sampling = SamplingParams(max_new_tokens=6, temperature=1.0, seed=1234)
    with torch.no_grad():
        groups = HFEngine(loaded, batch_size=64).generate(prompts, K, sampling)
    for g, group in enumerate(groups):
        for j, r in enumerate(group):
            r.group = g
            r.reward = float((j + g) % 2) + 0.1 * j  # [K] distinct within a group
    return groups


def run_update(model_dir: str, tau: float = 0.5, lr: float = 1.0) -> tuple[dict, dict]:
    """One `update` on this process's share of the fixed batch; returns (metrics, full state dict).

    metrics["rank"] says which process returned them."""
    d = D.setup()
    torch.manual_seed(0)
    cfg = RLConfig()
    cfg.model.path = model_dir
    cfg.rollout.k = K
    cfg.loss.tau = tau
    cfg.loss.lr = lr
    cfg.loss.responses_per_micro_batch = 64
    loaded = load(model_dir)
    groups = fixed_rollouts(loaded)
    loaded.model.train()
    idx = list(range(len(groups)))
    mine = idx[d.rank :: d.world]
    flat = [r for i in mine for r in groups[i]]
    n_global = int(D.all_reduce_sum(len(flat), d))
    model = D.shard(loaded.model, d)
    # Optimiser over the sharded parameters (fully_shard replaces them). Plain SGD: the weight change
    # is then the (clipped) gradient itself, whereas Adam's first step, about lr * sign(g), would turn
    # float noise in near-zero gradient entries into full-size differences.
    # make_optimizer: its SGD must step on FSDP2's DTensor parameters (no fused kernel there)
    optim = make_optimizer(param_groups(model, cfg.model, lr, 0.0), "sgd", momentum=0.0)
    loss_fn = functools.partial(get_loss("mirror_descent"), tau=tau)
    out = update(model, optim, flat, K, loaded, cfg, d, loss_fn, n_global)
    out["n_global"] = n_global
    out["world"] = d.world
    out["rank"] = d.rank
    sd = D.full_state_dict(model, d)
    D.cleanup(d)
    return out, sd


def run_skip(model_dir: str, ckpt_dir: str) -> list[dict]:
    """The two `update` calls described in the module docstring; every rank's findings, in rank order."""
    import torch.distributed as dist

    d = D.setup()
    cfg = RLConfig()
    cfg.model.path = model_dir
    cfg.rollout.k = K
    cfg.loss.responses_per_micro_batch = 64
    loaded = load(model_dir)
    groups = fixed_rollouts(loaded)
    loaded.model.train()
    flat = [r for i in range(len(groups))[d.rank :: d.world] for r in groups[i]]
    signal = [r.reward for r in flat]
    model = D.shard(loaded.model, d)
    start = D.full_state_dict(model, d)
    optim = make_optimizer(param_groups(model, cfg.model, 1e-2, 0.0), "adamw", (0.9, 0.95))
    loss_fn = functools.partial(get_loss("mirror_descent"), tau=0.5)
    n_global = int(D.all_reduce_sum(len(flat), d))

    def same_as_start() -> bool | None:
        now = D.full_state_dict(model, d)  # collective; the full weights (cpu_offload) reach rank 0 only
        if d.rank != 0:
            return None
        return len(start) > 0 and now.keys() == start.keys() and all(torch.equal(now[k], start[k]) for k in start)

    mine: dict = {"rank": d.rank}
    for r in flat:  # every group tied: all right or all wrong, on both ranks
        r.reward = float(r.group % 2)
    mine["tied"] = update(model, optim, flat, K, loaded, cfg, d, loss_fn, n_global)
    mine["tied_same_weights"] = same_as_start()
    C.save(Path(ckpt_dir), 1, model, optim, {}, keep=1, d=d)  # must not initialise the empty state
    mine["tied_optim_state_len"] = len(optim.state)
    mine["tied_saved_optim"] = (Path(ckpt_dir) / "step-1" / "optim").exists()
    C.load(Path(ckpt_dir) / "step-1", model, optim, d)  # the model's weights back; the optimiser stays fresh
    mine["loaded_optim_state_len"] = len(optim.state)
    mine["loaded_same_weights"] = same_as_start()
    for r, reward in zip(flat, signal):  # rank 1 keeps its groups' differing rewards, rank 0's stay tied
        r.reward = reward if d.rank == 1 else r.reward
    mine["rank1_signal"] = update(model, optim, flat, K, loaded, cfg, d, loss_fn, n_global)
    mine["rank1_signal_same_weights"] = same_as_start()
    mine["rank1_signal_optim_state_len"] = len(optim.state)
    out: list = [None] * d.world
    dist.all_gather_object(out, mine)
    D.cleanup(d)
    return out


def run_train(model_dir: str, problems: str, out_dir: str, verifier: str, precision: str = "fp32") -> None:
    """A short `train` run: 2 prompts x 2 responses per rank, 2 generation chunks, 2 micro-batches."""
    from thinkvl.rl.loop import train

    cfg = RLConfig()
    cfg.model.path = model_dir
    cfg.model.precision = precision
    cfg.data.problems = problems
    cfg.verifier = verifier
    cfg.rollout.prompts_per_iter, cfg.rollout.k, cfg.rollout.max_new_tokens = 4, 2, 8
    cfg.rollout.batch_size = 2
    cfg.loss.responses_per_micro_batch = 2
    cfg.loss.lr = 1e-2
    cfg.length_penalty.weight = 0.5  # a learning signal even when no response is correct
    cfg.iterations, cfg.save_every = 2, 1
    cfg.out_dir = out_dir
    train(cfg)
    from conftest import assert_models_released

    assert_models_released()


if __name__ == "__main__":
    if sys.argv[1] == "train":
        run_train(*sys.argv[2:7])
    elif sys.argv[1] == "skip":
        found = run_skip(sys.argv[2], sys.argv[3] + ".ckpt")
        if found[0]["rank"] == 0 and int(__import__("os").environ["RANK"]) == 0:
            with open(sys.argv[3], "w") as f:
                json.dump(found, f)
    else:
        model_dir, out_json = sys.argv[2:4]
        metrics, state = run_update(model_dir)
        if metrics["rank"] == 0:
            torch.save(state, out_json + ".pt")
            with open(out_json, "w") as f:
                json.dump(metrics, f)
