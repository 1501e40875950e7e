"""Checkpoints survive a SIGKILL at any moment of a save, and a crafted pickle in one is refused."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import sft_config
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from thinkvl.config import save_config
from thinkvl.train.checkpoint import CRASH_ENV, CheckpointError
from thinkvl.train.sft import train

STEPS = 6  # checkpoints at 2, 4 and 6 (save_every=2); the crashes hit the step-4 save


def metrics(run_dir: Path) -> list[dict]:
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [m for m in lines if "loss" in m]


RUN_TIMEOUT = 240  # seconds for one `thinkvl sft` run (about 8 s on an idle machine)


def thinkvl_sft(recipe: Path, crash_at: str | None = None) -> tuple[int, str]:
    """Run `thinkvl sft RECIPE` in a process group of its own; (exit code, its output).

    The output goes to a file, not a pipe: a pipe is read until every process holding it has
    closed it, so a straggler the run left behind would block the test. Whatever happens, the whole
    group is killed afterwards, and a run past RUN_TIMEOUT fails the test instead of hanging it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    log = recipe.with_name(f"{recipe.stem}.{crash_at or 'run'}.out".replace(":", "-"))
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "thinkvl.cli", "sft", str(recipe)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    if code is None:
        pytest.fail(f"`thinkvl sft` (crash at {crash_at}) still running after {RUN_TIMEOUT} s, killed:\n{text[-3000:]}")
    return code, text


def recipe(tiny_dir: Path, sft_data: Path, out: Path) -> Path:
    path = out.parent / f"{out.name}.yaml"
    save_config(sft_config(tiny_dir, sft_data, out, save_every=2, max_steps=STEPS), path)
    return path


# The points in the step-4 save where the process is killed, in the order the chain below uses them
# (a few of CRASH_POINTS; each is one more run of `thinkvl sft`). "model.metadata": during the
# model's write (its shards are on disk, DCP's index of them is not); "optim.metadata": the same for
# the optimiser; "trainer": before the trainer state; "rename": all written and fsynced, not yet
# renamed into place. Until then the rerun resumes from step 2; at "cleanup" step-4 is complete.
POINTS = ["model.metadata", "optim.metadata", "trainer", "rename", "cleanup"]


def test_sigkill_while_saving_then_rerun_equals_uninterrupted(tiny_dir, sft_data, tmp_path):
    full = tmp_path / "full"
    code, text = thinkvl_sft(recipe(tiny_dir, sft_data, full))
    assert code == 0, text[-3000:]

    # One run killed at each point in turn: each rerun of the same command resumes, trains on,
    # and is killed at the next point while it writes the step-4 checkpoint again.
    out = tmp_path / "run"
    cmd = recipe(tiny_dir, sft_data, out)
    resumed_at = None
    for point in POINTS:
        code, text = thinkvl_sft(cmd, crash_at=f"4:{point}")
        assert code == -signal.SIGKILL, (point, code, text[-3000:])
        log = (out / "train.log").read_text()
        if resumed_at is not None:
            assert f"resumed from {out / 'checkpoints' / f'step-{resumed_at}'} at step {resumed_at}" in log, point
        assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4], point  # it died in the save after step 4
        ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
        if point == "cleanup":
            assert "step-4" in ckpts, ckpts
            resumed_at = 4
        else:  # the half-written save is a temporary folder the rerun ignores (and then replaces)
            assert ckpts == [".tmp-step-4", "step-2"], (point, ckpts)
            resumed_at = 2

    code, text = thinkvl_sft(cmd)
    assert code == 0, text[-3000:]
    assert "resumed from" in (out / "train.log").read_text() and resumed_at == 4
    got, want = metrics(out), metrics(full)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "lr"):
        assert [m[key] for m in got] == [m[key] for m in want], key
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


def craft_index(folder: Path, payload: Payload) -> None:
    """Replace DCP's index (a pickle) by the payload."""
    with (folder / ".metadata").open("wb") as f:
        pickle.dump(payload, f)


def craft_value(folder: Path, payload: Payload) -> None:
    """Rewrite the DCP folder with the payload as a stored value (the learning rate of a param
    group): a well-formed checkpoint whose index is fine and whose data file carries the attack."""
    plain = folder.parent / "plain.pt"
    dcp_to_torch_save(folder, plain)  # reads with weights_only=False: fine for this trusted folder
    state = torch.load(plain, weights_only=False)
    state["param_groups"][0]["lr"] = payload
    shutil.rmtree(folder)
    plain.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=folder, no_dist=True)


@pytest.mark.parametrize("victim,craft", [("model/.metadata", craft_index), ("optim/.metadata", craft_index),
                                          ("optim/__0_0.distcp", craft_value)])
def test_crafted_pickle_in_checkpoint_is_refused(victim, craft, tiny_dir, sft_data, tmp_path):
    out = tmp_path / "run"
    train(sft_config(tiny_dir, sft_data, out, save_every=2, max_steps=2))
    ckpt = out / "checkpoints" / "step-2"
    marker = tmp_path / "pwned"
    craft(ckpt / victim.split("/")[0], Payload(marker))
    assert not marker.exists()
    shutil.rmtree(out / "final")
    with pytest.raises(CheckpointError) as err:
        train(sft_config(tiny_dir, sft_data, out, save_every=2, max_steps=4))
    msg = str(err.value)
    print(msg)
    assert msg.startswith(f"{ckpt / victim}: refused to load") and "GLOBAL posix.system" in msg
    assert not marker.exists()  # the payload did not run
    # ... where DCP's own reader would have run it
    with contextlib.suppress(Exception, CheckpointException):
        dcp_to_torch_save(ckpt / victim.split("/")[0], tmp_path / "converted.pt")
    assert marker.exists()
