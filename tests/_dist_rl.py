"""Entry point for test_rl_loop's multi-process checks.

    python -m torch.distributed.run --nproc_per_node 2 tests/_dist_rl.py update MODEL OUT_JSON
    python -m torch.distributed.run --nproc_per_node 2 tests/_dist_rl.py train MODEL PROBLEMS OUT_DIR VERIFIER [PRECISION]

update: one RL `update` on a fixed batch (`run_update` is also called in-process for 1 process).
Every rank loads the same model and samples the same rollouts with a fixed seed *before* sharding
(so generation needs no collectives), gives them fixed rewards, keeps its own prompts
(`idx[rank::world]`, as `train` does), shards with FSDP2, builds the optimiser from the sharded
parameters and runs `update` once (SGD). Rank 0 writes the reported loss / grad norm / entropy and the
full updated state dict (OUT_JSON and OUT_JSON + ".pt").

train: a 2-iteration `train` run (the verifier module must be importable: PYTHONPATH).
"""

from __future__ import annotations

import functools
import json
import sys

import torch

torch.set_num_threads(1)

from thinkvl.models.load import load  # noqa: E402
from thinkvl.rl.loop import RLConfig, update  # noqa: E402
from thinkvl.rl.losses import get_loss  # noqa: E402
from thinkvl.rollout.engine import SamplingParams  # noqa: E402
from thinkvl.rollout.hf_engine import HFEngine  # noqa: E402
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


if __name__ == "__main__":
    if sys.argv[1] == "train":
        run_train(*sys.argv[2:7])
    else:
        model_dir, out_json = sys.argv[2:4]
        metrics, state = run_update(model_dir)
        if metrics["rank"] == 0:
            torch.save(state, out_json + ".pt")
            with open(out_json, "w") as f:
                json.dump(metrics, f)
