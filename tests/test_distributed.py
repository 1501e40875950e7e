"""Two processes (torchrun, gloo, FSDP2) train like one process on the same data, and resume exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _torchrun import torchrun
from conftest import sft_config
from safetensors.torch import load_file

from thinkvl.train.sft import train

STEPS = 4  # checkpoints at 2 and 4 (save_every=2); the resume tests restart from step 2


def two_process_sft(model_dir: Path, data: Path, out_dir: Path) -> None:
    """The SFT run of _dist_sft.py in 2 CPU processes (gloo), 1 micro-batch each per step."""
    torchrun("_dist_sft.py", str(model_dir), str(data), str(out_dir), "1", str(STEPS),
             tmp_dir=out_dir.parent / f"{out_dir.name}_tmp")


def losses(run_dir: Path) -> list[tuple]:
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [(m["step"], m["loss"], m["supervised_tokens"], m["lr"]) for m in lines if "loss" in m]


def one_process_sft(model_dir: Path, data: Path, out_dir: Path) -> None:
    """The same run in one process with 2 micro-batches per step: the same 2 rows per step."""
    train(sft_config(model_dir, data, out_dir, save_every=2, max_steps=STEPS, **{"optim.grad_accum": 2}))


@pytest.fixture(scope="module")
def two_processes(tiny_dir, sft_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "two"
    two_process_sft(tiny_dir, sft_data, out)
    return out


@pytest.fixture(scope="module")
def one_process(tiny_dir, sft_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "one"
    one_process_sft(tiny_dir, sft_data, out)
    return out


def test_two_processes_equal_one(two_processes, one_process, tiny_dir):
    # 2 rows per optimiser step either way: 1 process x 2 micro-batches, or 2 processes x 1.
    two, one = two_processes, one_process

    l1, l2 = losses(one), losses(two)
    print("1 process:", l1, "\n2 processes:", l2)
    assert [m[0] for m in l1] == [m[0] for m in l2] == list(range(1, STEPS + 1))
    for a, b in zip(l1, l2):
        assert a[2:] == b[2:]  # same supervised token count and learning rate
        assert abs(a[1] - b[1]) <= 1e-5 * a[1]
    # the sharded run wrote its checkpoints: step-2 (save_every) and the last step, each rank its shards
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-2", f"step-{STEPS}"]
    for part in ("model", "optim"):
        assert sorted(p.name for p in (two / "checkpoints" / "step-2" / part).iterdir()) == [
            ".metadata", "__0_0.distcp", "__1_0.distcp"]

    config = [json.loads((d / "final" / "config.json").read_text()) for d in (one, two)]
    assert config[0] == config[1] and config[1]["architectures"] == ["Kimi_K25ForConditionalGeneration"]
    w1 = load_file(one / "final" / "model.safetensors")
    w2 = load_file(two / "final" / "model.safetensors")
    assert w1.keys() == w2.keys()  # the tied LM head is written once from FSDP too
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    print(f"final weights max abs diff {worst:.1e}")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-5, atol=1e-6), k
    init = load_file(tiny_dir / "model.safetensors")
    moved = max(float((w1[k] - init[k]).abs().max()) for k in init)
    assert moved > 1e-4 > worst * 100  # the runs trained, and agree far more closely than they moved


def test_two_process_resume_is_exact(two_processes, tiny_dir, sft_data, tmp_path):
    # The step-3 checkpoint and the export are lost; a new 2-process run restores the sharded model
    # and optimiser from step 2 and ends exactly where the uninterrupted run did.
    resumed = tmp_path / "resumed"
    shutil.copytree(two_processes, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS}")
    shutil.rmtree(resumed / "final")
    two_process_sft(tiny_dir, sft_data, resumed)
    assert losses(resumed) == losses(two_processes)
    w2 = load_file(two_processes / "final" / "model.safetensors")
    w3 = load_file(resumed / "final" / "model.safetensors")
    assert w2.keys() == w3.keys() and all(torch.equal(w2[k], w3[k]) for k in w2)
    assert "resumed from" in (resumed / "train.log").read_text()


def interrupted_copy(run: Path, dest: Path) -> Path:
    """`run` as if it had died after step 2: its last checkpoint and its export lost."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "checkpoints" / f"step-{STEPS}")
    shutil.rmtree(dest / "final")
    return dest


def assert_same_run(got: Path, want: Path) -> None:
    """Same steps, token counts and learning rates; losses and final weights equal up to the float
    rounding that 1 vs 2 processes already differ by (test_two_processes_equal_one)."""
    a, b = losses(got), losses(want)
    assert [m[0] for m in a] == [m[0] for m in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert x[2:] == y[2:] and abs(x[1] - y[1]) <= 1e-5 * y[1], (x, y)
    w1, w2 = load_file(got / "final" / "model.safetensors"), load_file(want / "final" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-5, atol=1e-6), k
    assert "resumed from" in (got / "train.log").read_text()


def test_two_process_checkpoint_resumes_in_one_process(two_processes, one_process, tiny_dir, sft_data, tmp_path):
    resumed = interrupted_copy(two_processes, tmp_path / "resumed")
    one_process_sft(tiny_dir, sft_data, resumed)
    print("2 -> 1:", losses(resumed), "\nuninterrupted 2:", losses(two_processes))
    assert_same_run(resumed, two_processes)
    assert_same_run(resumed, one_process)


def test_one_process_checkpoint_resumes_in_two_processes(one_process, two_processes, tiny_dir, sft_data, tmp_path):
    resumed = interrupted_copy(one_process, tmp_path / "resumed")
    two_process_sft(tiny_dir, sft_data, resumed)
    print("1 -> 2:", losses(resumed), "\nuninterrupted 1:", losses(one_process))
    assert_same_run(resumed, one_process)
    assert_same_run(resumed, two_processes)


def test_meta_device_loading_equals_loading_everywhere(tiny_dir, tmp_path):
    # Rank 1 builds the model on the meta device (no weights read) and gets its shards from rank 0.
    torchrun("_dist_meta_load.py", str(tiny_dir), str(tmp_path), tmp_dir=tmp_path / "tmp")
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    print(ranks)
    assert [r["built_on_meta"] for r in ranks] == [False, True]
    assert ranks[0]["tensors"] > 10 and ranks[0]["weights_equal"]  # gathered on rank 0
    assert all(r["buffers"] > 0 and r["buffers_equal"] for r in ranks)  # e.g. rotary frequencies
    assert all(r["logits_equal"] for r in ranks), [r["logits_max_diff"] for r in ranks]
