"""scripts/gpu_check.sh: its CPU dry run passes (CI), and on a GPU the real check passes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run_check(tmp_path: Path, *args: str, timeout: int) -> dict:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", *args, "--out", str(tmp_path / "out")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "gpu_check: all checks passed" in proc.stdout
    return json.loads((tmp_path / "out" / "gpu_check.json").read_text())


def test_cpu_dry_run_passes(tmp_path):
    # ~40 s of CPU time at 1 thread; the timeout allows for a loaded machine
    report = run_check(tmp_path, "--cpu", timeout=900)
    print(json.dumps(report, indent=1))
    assert report["device"] == "cpu" and report["attention"] == "varlen"
    assert report["sft"]["steps"] == 3 and report["sft"]["tokens_per_s"] > 0
    assert report["rl"]["iterations"] == 1 and report["rl"]["gen_tokens_per_s"] > 0
    assert report["logprobs"]["tokens"] > 0
    # on the CPU the "device" is the reference: fp32 agrees exactly, bf16 autocast really ran
    assert report["logprobs"]["fp32_max_diff"] <= 1e-6 < report["logprobs"]["bf16_max_diff"]
    assert report["roundtrip"]["logits_max_diff"] <= 1e-5
    assert report["peak_memory_mib"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_check_passes_on_a_gpu(tmp_path):
    report = run_check(tmp_path, timeout=600)
    print(json.dumps(report, indent=1))
    assert report["sft_50m"]["achieved_tflops"] > 0
