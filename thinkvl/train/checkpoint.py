"""Checkpoints that survive a crash and load nothing executable.

A checkpoint is a folder `checkpoints/step-N/`:
    model.pt     the model's state (tensors by parameter name)
    optim.pt     the optimiser's state (tensors, numbers, strings, lists, dicts)
    trainer.json the trainer's state: step, data position, sampler, random generators
    COMPLETE     written last; a folder without it is not a checkpoint

It is written into `.tmp-step-N/`, every file and the folder are fsynced, the folder is renamed into
place (atomic on POSIX) and the parent folder is fsynced, so after a crash or a power loss a
`step-N/` either is whole or does not exist. Loading uses `torch.load(weights_only=True)` (and JSON):
a checkpoint from someone else can hold only data, never code to run.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

MARKER = "COMPLETE"
# Test hook: THINKVL_CRASH_AT=STEP:POINT makes the process SIGKILL itself while it saves the step-STEP
# checkpoint, just before POINT (one of CRASH_POINTS); the crash-safety tests use it.
CRASH_ENV = "THINKVL_CRASH_AT"
CRASH_POINTS = ("model", "optim", "trainer", "fsync", "complete", "rename", "cleanup")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and why."""


def crash_point(step: int, point: str) -> None:
    """SIGKILL this process here when THINKVL_CRASH_AT names this step and point (tests only)."""
    if os.environ.get(CRASH_ENV) == f"{step}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


def fsync(path: Path) -> None:
    """Flush a file's or a folder's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, the folder itself last."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync(Path(root) / name)
        fsync(Path(root))


def begin(ckpt_dir: Path, step: int) -> Path:
    """A fresh temporary folder for the step-`step` checkpoint (a crashed save's leftover removed)."""
    tmp = ckpt_dir / f".tmp-step-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, step: int, keep: int) -> Path:
    """fsync `tmp`, mark it complete, rename it to step-`step` and fsync the parent; then delete all but
    the `keep` newest complete checkpoints (and leftovers of crashed saves)."""
    crash_point(step, "fsync")
    fsync_tree(tmp)
    crash_point(step, "complete")
    (tmp / MARKER).write_text(json.dumps({"step": step}))
    fsync(tmp / MARKER)
    fsync(tmp)
    crash_point(step, "rename")
    final = tmp.parent / f"step-{step}"
    if final.exists():  # the same step saved again (a resumed run): move the old one aside first
        old = tmp.parent / f".old-step-{step}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync(tmp.parent)
    crash_point(step, "cleanup")
    for p in complete(tmp.parent)[:-keep]:
        shutil.rmtree(p)
    for p in tmp.parent.glob(".*-step-*"):
        shutil.rmtree(p)
    return final


def complete(ckpt_dir: Path) -> list[Path]:
    """The complete checkpoints under `ckpt_dir`, oldest first."""
    if not ckpt_dir.exists():
        return []
    found = []
    for p in ckpt_dir.glob("step-*"):
        if (p / MARKER).exists() and p.name.split("-")[1].isdigit():
            found.append((int(p.name.split("-")[1]), p))
    return [p for _, p in sorted(found)]


def save_tensors(obj: Any, path: Path) -> None:
    torch.save(obj, path)


def load_tensors(path: Path) -> Any:
    """`torch.load(weights_only=True)`: tensors, numbers, strings, lists, tuples and dicts only.

    Raises CheckpointError naming the file when it holds anything else (a pickle that would import
    a module or call a function when loaded)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message wraps the reason (e.g. "unsupported GLOBAL posix.system") in advice to retry with
        # weights_only=False, which is the one thing not to do here: keep only the reason.
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[-1] if lines else "")
        raise CheckpointError(f"{path}: refused to load: it holds Python objects that would run code when "
                              f"unpickled ({why}); thinkvl checkpoints hold only tensors, numbers, strings, "
                              "lists and dicts, so this file was not written by thinkvl") from None


def save_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj))


def load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def rng_state() -> dict:
    """Python's and torch's random generators as JSON values."""
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss], "torch": torch.get_rng_state().tolist()}


def set_rng_state(s: dict) -> None:
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
