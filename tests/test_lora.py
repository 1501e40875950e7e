"""LoRA through peft (`model.lora`): only the adapters train and are checkpointed; final/ is the
merged model (plain transformers) with the adapter beside it; FSDP2, resume and RL work with it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _torchrun import torchrun
from conftest import sft_config
from test_rl_loop import metrics as rl_metrics
from test_rl_loop import rl_config, toy  # noqa: F401  (toy is a fixture)
from transformers import AutoModelForImageTextToText

from thinkvl.config import ConfigError, load_config
from thinkvl.train.checkpoint import read
from thinkvl.train.lora import LoraSettings
from thinkvl.train.sft import SFTConfig, train

pytest.importorskip("peft")

STEPS = 4


def lora_sft(model_dir, data, out_dir, grad_accum: int = 2, steps: int = STEPS, **overrides) -> None:
    """`steps` steps of rank-4 LoRA at lr 1e-3 (2 rows a step), checkpoints every 2 steps."""
    train(sft_config(model_dir, data, out_dir, max_steps=steps, save_every=2,
                     **{"model.lora": LoraSettings(rank=4, alpha=8.0), "optim.grad_accum": grad_accum, **overrides}))


def losses(run_dir: Path) -> list[tuple]:
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [(m["step"], m["loss"], m["grad_norm"]) for m in lines if "loss" in m]


@pytest.fixture(scope="module")
def lora_run(tiny_dir, sft_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "run"
    lora_sft(tiny_dir, sft_data, out)
    return out


def test_only_adapters_train_and_are_checkpointed(lora_run):
    ckpt = lora_run / "checkpoints" / f"step-{STEPS}"
    model_sd, optim_sd = read(ckpt / "model"), read(ckpt / "optim")
    assert model_sd and all(".lora_A." in k or ".lora_B." in k for k in model_sd)
    # default targets: the LM's attention and dense-MLP projections, 2 layers x 8 (layer 0) / 5 + shared 3
    targets = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in model_sd}
    assert targets == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj"}
    assert not any("vision_tower" in k or "experts.gate_up" in k for k in model_sd)
    # AdamW holds moments for the adapter tensors only, one entry per checkpointed adapter tensor
    n_params = sum(len(g["params"]) for g in optim_sd["param_groups"])
    assert n_params == len(model_sd) == len(optim_sd["state"])
    assert all(st["exp_avg"].shape in {v.shape for v in model_sd.values()} for st in optim_sd["state"].values())
    # B starts at 0; training moved it
    assert all(float(v.abs().max()) > 0 for k, v in model_sd.items() if ".lora_B." in k)


def test_final_is_the_merged_model_in_plain_transformers(lora_run, tiny_dir, images):
    from peft import PeftModel
    from PIL import Image

    final = lora_run / "final"
    assert (final / "adapter" / "adapter_config.json").is_file()
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    assert not (final / "adapter_config.json").exists()
    merged, info = AutoModelForImageTextToText.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    base = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    peft_model = PeftModel.from_pretrained(base, final / "adapter")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(final)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red circles?"}]}]
    text = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(images["blue"]).convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        got = merged.eval()(**inputs, use_cache=False).logits
        want = peft_model.eval()(**inputs, use_cache=False).logits
        plain = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()(**inputs, use_cache=False).logits
    diff, moved = float((got - want).abs().max()), float((want - plain).abs().max())
    print(f"merged vs peft logits max diff {diff:.1e}; adapters changed the logits by {moved:.1e}")
    assert diff <= 1e-5 and moved > 1e-3


def test_lora_two_processes_equal_one(lora_run, tiny_dir, sft_data, tmp_path):
    two = tmp_path / "two"
    torchrun("_dist_lora.py", str(tiny_dir), str(sft_data), str(two), tmp_dir=tmp_path / "tmp")
    l1, l2 = losses(lora_run), losses(two)
    print("1 process:", l1, "\n2 processes:", l2)
    assert [m[0] for m in l2] == list(range(1, STEPS + 1))
    for a, b in zip(l1, l2):
        assert b[1] == pytest.approx(a[1], rel=1e-5) and b[2] == pytest.approx(a[2], rel=1e-4)
    a1 = read(lora_run / "checkpoints" / f"step-{STEPS}" / "model")
    a2 = read(two / "checkpoints" / f"step-{STEPS}" / "model")  # written in shards by 2 processes
    assert a1.keys() == a2.keys() and all(torch.allclose(a1[k], a2[k], rtol=1e-4, atol=1e-6) for k in a1)
    assert (two / "final" / "adapter" / "adapter_model.safetensors").is_file()


def test_lora_resume_equals_uninterrupted(lora_run, tiny_dir, sft_data, tmp_path):
    cut = tmp_path / "cut"
    lora_sft(tiny_dir, sft_data, cut, steps=2)
    shutil.rmtree(cut / "final")
    lora_sft(tiny_dir, sft_data, cut)
    assert "resumed from" in (cut / "train.log").read_text()
    assert losses(cut) == losses(lora_run)


def test_lora_config_errors():
    with pytest.raises(ConfigError, match=r"^model\.lora\.rank: must be >= 1, got 0"):
        load_config(SFTConfig, overrides=["model.lora={rank: 0}"])
    with pytest.raises(ConfigError, match=r"^model\.lora\.target_modules: an empty list"):
        load_config(SFTConfig, overrides=["model.lora={target_modules: []}"])


def test_lora_target_that_matches_nothing_names_the_key(tiny_dir, sft_data, tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.lora\.target_modules: .*not found"):
        lora_sft(tiny_dir, sft_data, tmp_path / "run", **{"model.lora": LoraSettings(target_modules=["nope_proj"])})


def test_rl_with_lora_references_the_adapted_policy(toy, tmp_path):
    """The tau term's reference log-probs are recorded at generation from the policy with its
    adapters on: once the adapters have moved (iterations 2, 3), recomputing the responses'
    log-probs before the update gives back the recorded ones (KL estimate ~0), although the
    adapted policy is far from the base model."""
    from safetensors.torch import load_file

    from thinkvl.rl.loop import train as train_rl

    run = train_rl(rl_config(toy, tmp_path / "run", iterations=3,
                             **{"model.lora": LoraSettings(rank=4, alpha=8.0), "loss.lr": 5e-2}))
    kls = [m["kl"] for m in rl_metrics(run.path)]
    base = load_file(toy["model"] / "model.safetensors")
    merged = load_file(run.final_dir / "model.safetensors")
    moved = max(float((merged[k] - base[k]).abs().max()) for k in base)
    print(f"kl per iteration {kls}; merged weights moved by up to {moved:.2e}")
    assert moved > 1e-2 and all(abs(k) < 1e-4 for k in kls)
    assert (run.final_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_lora_over_a_bf16_base_trains_fp32_adapters(tiny_dir, sft_data, tmp_path):
    """bf16_pure with LoRA in one process: the frozen base stays bf16, the adapters (all that trains,
    and all the optimiser holds) are float32; under torchrun FSDP2 needs one dtype per block."""
    from thinkvl.models.load import load
    from thinkvl.train.lora import attach

    lora_sft(tiny_dir, sft_data, tmp_path / "run", steps=2, **{"model.precision": "bf16_pure"})
    adapters = read(tmp_path / "run" / "checkpoints" / "step-2" / "model")
    optim_sd = read(tmp_path / "run" / "checkpoints" / "step-2" / "optim")
    assert {v.dtype for v in adapters.values()} == {torch.float32}
    assert {st["exp_avg"].dtype for st in optim_sd["state"].values()} == {torch.float32}
    with pytest.raises(ConfigError, match=r"^model\.precision: bf16_pure with model\.lora under torchrun"):
        attach(load(str(tiny_dir)).model, LoraSettings(), "bf16_pure", world=2)


def test_resume_with_another_lora_setting_is_refused(lora_run, tiny_dir, sft_data, tmp_path):
    # A LoRA checkpoint holds adapters only: resuming it as full fine-tuning (or a full checkpoint
    # with LoRA) would load a model that lacks weights; refused, naming the key.
    cut = tmp_path / "cut"
    shutil.copytree(lora_run, cut)
    shutil.rmtree(cut / "final")
    with pytest.raises(ConfigError, match=r"^model\.lora: the checkpoint lacks weights this run loads .* written with LoRA adapters"):
        train(sft_config(tiny_dir, sft_data, cut, max_steps=STEPS + 2, save_every=2))
