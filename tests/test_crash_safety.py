"""Checkpoints survive a SIGKILL at any moment of a save, and a crafted pickle in one is refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import sft_config

from thinkvl.config import save_config
from thinkvl.train.checkpoint import CRASH_ENV, CheckpointError
from thinkvl.train.sft import train

STEPS = 6  # checkpoints at 2, 4 and 6 (save_every=2); the crashes hit the step-4 save


def metrics(run_dir: Path) -> list[dict]:
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [m for m in lines if "loss" in m]


def thinkvl_sft(recipe: Path, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run([sys.executable, "-m", "thinkvl.cli", "sft", str(recipe)], env=env,
                          capture_output=True, text=True, timeout=600)


def recipe(tiny_dir: Path, sft_data: Path, out: Path) -> Path:
    path = out.parent / f"{out.name}.yaml"
    save_config(sft_config(tiny_dir, sft_data, out, save_every=2, max_steps=STEPS), path)
    return path


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, sft_data, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("crash") / "full"
    proc = thinkvl_sft(recipe(tiny_dir, sft_data, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return metrics(out)


# (point in the step-4 save where the process is killed, checkpoint the rerun resumes from)
CASES = [("model", 2), ("optim", 2), ("trainer", 2), ("fsync", 2), ("rename", 2), ("cleanup", 4)]


@pytest.mark.parametrize("point,resumes_at", CASES)
def test_sigkill_while_saving_then_rerun_equals_uninterrupted(point, resumes_at, uninterrupted, tiny_dir,
                                                               sft_data, tmp_path):
    out = tmp_path / "run"
    cmd = recipe(tiny_dir, sft_data, out)
    killed = thinkvl_sft(cmd, crash_at=f"4:{point}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]  # it died in the save after step 4
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    if resumes_at == 2:  # the half-written save is a temporary folder the rerun ignores
        assert ckpts == [".tmp-step-4", "step-2"], ckpts
    else:
        assert "step-4" in ckpts, ckpts

    rerun = thinkvl_sft(cmd)  # the same command again
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert f"resumed from {out / 'checkpoints' / f'step-{resumes_at}'} at step {resumes_at}" in log
    got = metrics(out)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "lr"):
        assert [m[key] for m in got] == [m[key] for m in uninterrupted], key
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-6"]


class Payload:
    """Unpickling this runs a shell command (the attack a checkpoint from a stranger could carry)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_payload_runs_when_unpickled_unsafely(tmp_path):
    # The payload is real: loaded the way the old code loaded optimiser state, it runs.
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("victim", ["model.pt", "optim.pt"])
def test_crafted_pickle_in_checkpoint_is_refused(victim, tiny_dir, sft_data, tmp_path):
    out = tmp_path / "run"
    train(sft_config(tiny_dir, sft_data, out, save_every=2, max_steps=2))
    ckpt = out / "checkpoints" / "step-2"
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker)}, ckpt / victim)
    shutil.rmtree(out / "final")
    with pytest.raises(CheckpointError) as err:
        train(sft_config(tiny_dir, sft_data, out, save_every=2, max_steps=4))
    msg = str(err.value)
    print(msg)
    assert str(ckpt / victim) in msg and "refused to load" in msg and "system" in msg
    assert not marker.exists()  # the payload did not run
