"""fp32 master weights with bf16 compute (`model.precision`): at the report's smallest learning
rate a bf16-compute run moves the weights like an fp32 run, in one process and under FSDP2, while
bf16 weights without a master copy leave almost all of them where they were."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _torchrun import torchrun
from conftest import sft_config
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from thinkvl.config import ConfigError, load_config
from test_rl_loop import VERIFIER, toy  # noqa: F401  (toy is a fixture)

from thinkvl.rl.loop import RLConfig
from thinkvl.rl.loop import train as train_rl
from thinkvl.train.checkpoint import read
from thinkvl.train.sft import SFTConfig, StageConfig, train

STEPS = 4
LR = 2e-6  # the end of the report's first SFT stage
# Measured (tiny model from a bf16 checkpoint, 4 AdamW steps at 2e-6, 2 rows a step):
#   fp32 moved 343,936 of 344,004 weights (the rest get no gradient), mean |update| 6.03e-6;
#   bf16_mixed: 99.99% of those moved, ||u_mixed - u_fp32|| / ||u_fp32|| = 0.041, cosine 0.9992;
#   bf16_pure: 3.7% moved, mean |update| 2.6e-7.
# Adam's first steps are about lr * sign(g), so the difference is gradients near 0 whose sign the
# bf16 forward flips (0.3% of the weights); the tolerances leave room for other CPUs' kernels.
REL_TOL, COS_MIN = 0.1, 0.995


def precision_sft(model_dir, data, out_dir, precision: str, grad_accum: int = 2) -> None:
    """STEPS steps at a constant LR, no weight decay (a weight moves only by its gradient), 2 rows
    a step (1 process x grad_accum 2 or 2 processes x 1), a checkpoint at the end."""
    cfg = sft_config(model_dir, data, out_dir, max_steps=STEPS,
                     **{"model.precision": precision, "optim.weight_decay": 0.0, "optim.grad_accum": grad_accum})
    cfg.stages = [StageConfig(name="s", max_length=128, lr_peak=LR, lr_end=LR, warmup_frac=0.0)]
    train(cfg)


@pytest.fixture(scope="module")
def bf16_dir(tiny_dir, tmp_path_factory) -> Path:
    """The tiny model saved as a bf16 checkpoint (as Kimi-VL and Qwen2.5-VL ship)."""
    out = tmp_path_factory.mktemp("bf16") / "model"
    AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=torch.bfloat16).save_pretrained(out)
    for f in tiny_dir.iterdir():  # tokenizer, processor, chat template
        if not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    return out


def updates(run_dir: Path, start: Path) -> dict[str, torch.Tensor]:
    """Trained (checkpointed master) weights minus the start's, in float32."""
    init = AutoModelForImageTextToText.from_pretrained(start, dtype="auto").state_dict()
    trained = read(run_dir / "checkpoints" / f"step-{STEPS}" / "model")
    return {k: trained[k].float() - init[k].float() for k in init}


def compare(u: dict, ref: dict) -> tuple[float, float, float]:
    """(share of the weights the fp32 run moved that u moves too, ||u - ref|| / ||ref||, cosine)."""
    moving = {k: ref[k] != 0 for k in ref}
    moved = sum(int((u[k] != 0)[moving[k]].sum()) for k in ref) / sum(int(m.sum()) for m in moving.values())
    dot = sum(float((u[k] * ref[k]).sum()) for k in ref)
    nu = sum(float(u[k].pow(2).sum()) for k in ref) ** 0.5
    nr = sum(float(ref[k].pow(2).sum()) for k in ref) ** 0.5
    diff = sum(float((u[k] - ref[k]).pow(2).sum()) for k in ref) ** 0.5
    return moved, diff / nr, dot / (nu * nr)


@pytest.fixture(scope="module")
def fp32_update(bf16_dir, sft_data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fp32") / "run"
    precision_sft(bf16_dir, sft_data, out, "fp32")
    u = updates(out, bf16_dir)
    n_moved = sum(int((v != 0).sum()) for v in u.values())
    assert n_moved >= 0.99 * sum(v.numel() for v in u.values())  # nearly every weight has a gradient
    return u


def test_bf16_mixed_moves_the_weights_like_fp32(bf16_dir, sft_data, fp32_update, tmp_path):
    precision_sft(bf16_dir, sft_data, tmp_path / "mixed", "bf16_mixed")
    precision_sft(bf16_dir, sft_data, tmp_path / "pure", "bf16_pure")
    mixed = compare(updates(tmp_path / "mixed", bf16_dir), fp32_update)
    pure = compare(updates(tmp_path / "pure", bf16_dir), fp32_update)
    print(f"bf16_mixed: moved {mixed[0]:.4f}, rel err {mixed[1]:.3f}, cos {mixed[2]:.4f}; "
          f"bf16_pure: moved {pure[0]:.4f}, rel err {pure[1]:.3f}")
    assert mixed[0] >= 0.99 and mixed[1] <= REL_TOL and mixed[2] >= COS_MIN
    assert pure[0] < 0.2  # what the masters are for: bf16 weights mostly do not move at this LR

    # final/ is in the checkpoint's own dtype and loads as such with plain transformers
    final = tmp_path / "mixed" / "final"
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    assert {v.dtype for v in load_file(final / "model.safetensors").values()} == {torch.bfloat16}
    assert AutoModelForImageTextToText.from_pretrained(final, dtype="auto").dtype == torch.bfloat16
    # the run's config records the resolved checkpoint dtype
    assert "dtype: bfloat16" in (tmp_path / "mixed" / "config.yaml").read_text()


def test_bf16_mixed_under_fsdp2_moves_the_weights_like_fp32(bf16_dir, sft_data, fp32_update, tmp_path):
    out = tmp_path / "two"
    torchrun("_dist_precision.py", str(bf16_dir), str(sft_data), str(out), "bf16_mixed", tmp_dir=tmp_path / "tmp")
    moved, rel, cos = compare(updates(out, bf16_dir), fp32_update)
    print(f"2 processes, bf16_mixed: moved {moved:.4f}, rel err {rel:.3f}, cos {cos:.4f}")
    assert moved >= 0.99 and rel <= REL_TOL and cos >= COS_MIN
    final = out / "final"
    assert {v.dtype for v in load_file(final / "model.safetensors").values()} == {torch.bfloat16}


def test_fp32_checkpoint_exports_fp32(tiny_dir, sft_data, tmp_path):
    precision_sft(tiny_dir, sft_data, tmp_path / "run", "bf16_mixed")
    assert {v.dtype for v in load_file(tmp_path / "run" / "final" / "model.safetensors").values()} == {torch.float32}


@pytest.mark.parametrize("cls,overrides,message", [
    (SFTConfig, ["optim.autocast=bf16"], r"^optim\.autocast: removed; set model\.precision instead: bf16_mixed"),
    (SFTConfig, ["model.precision=bf16"], r"^model\.precision: 'bf16' is not allowed; choose one of 'fp32', "
                                          r"'bf16_mixed', 'bf16_pure'"),
    (RLConfig, ["data.problems=p.jsonl", "model.precision=fp16"], r"^model\.precision: 'fp16' is not allowed"),
])
def test_bf16_weights_without_masters_are_refused(cls, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(cls, overrides=overrides)


def test_kimi_vl_recipes_train_with_fp32_masters():
    root = Path(__file__).parent.parent / "recipes" / "kimi_vl"
    for name, cls in [("sft", SFTConfig), ("longcot_sft", SFTConfig), ("rl", RLConfig)]:
        cfg = load_config(cls, root / f"{name}.yaml")
        assert cfg.model.precision == "bf16_mixed" and cfg.model.dtype == "bfloat16", name
        assert cfg.save_every > 0, name  # checkpoints, which are always sharded (thinkvl.train.checkpoint)


# --- RL ---------------------------------------------------------------------------------------


def test_rl_bf16_mixed_learns_and_its_reference_matches(toy, tmp_path):
    """One process: rollouts (their recorded log-probs are the tau term's reference) and the update
    both compute in bf16 from the fp32 masters, so at the first update, before any step, the
    recomputed log-probs equal the recorded ones up to bf16 rounding; and the run learns."""
    from test_rl_loop import metrics, rl_config

    run = train_rl(rl_config(toy, tmp_path / "run", **{"model.precision": "bf16_mixed"}))
    lines = metrics(run.path)
    rewards = [m["reward"] for m in lines]
    print("bf16_mixed RL reward per iteration:", [round(r, 2) for r in rewards], "kl at 1:", lines[0]["kl"])
    assert abs(lines[0]["kl"]) < 0.05  # nats per response; fp32 gives ~1e-7
    assert sum(rewards[-3:]) / 3 > 0.8 and sum(rewards[:3]) / 3 < 0.3


def test_rl_bf16_mixed_two_processes(toy, tmp_path):
    """`train` under torchrun with FSDP2's mixed-precision policy and a bf16 rollout replica; half
    the vocabulary stops a response, so lengths, hence length rewards, differ within groups."""
    model = tmp_path / "model"
    shutil.copytree(toy["model"], model)
    gen_cfg = json.loads((model / "generation_config.json").read_text())
    vocab = json.loads((model / "config.json").read_text())["text_config"]["vocab_size"]
    gen_cfg["eos_token_id"] = [gen_cfg["eos_token_id"], *range(20, vocab, 2)]
    (model / "generation_config.json").write_text(json.dumps(gen_cfg))
    out = tmp_path / "run"
    torchrun("_dist_rl.py", "train", str(model), str(toy["problems"]), str(out), VERIFIER, "bf16_mixed",
             tmp_dir=tmp_path / "tmp", timeout=180, pythonpath=toy["root"])
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert [m["step"] for m in lines] == [1, 2] and all(m["loss"] > 1e-3 for m in lines)
    w0 = load_file(toy["model"] / "model.safetensors")
    w1 = load_file(out / "final" / "model.safetensors")
    assert {v.dtype for v in w1.values()} == {torch.float32}  # the toy checkpoint is fp32
    assert max(float((w0[k] - w1[k]).abs().max()) for k in w0) > 1e-3
