"""Run a test script under torchrun in 2 CPU processes (gloo), the way the distributed tests need it.

`--standalone` lets torchrun's own rendezvous take a free port when it binds, so there is no window
between picking a port and binding it for another test job to take it. TMPDIR points into the
test's temporary folder: torchrun's agent writes a `torchelastic_*` log folder under it and never
removes it, which otherwise piles up in /tmp with every test run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def torchrun(script: str, *args: str, tmp_dir: Path, timeout: int = 300, pythonpath: Path | None = None) -> None:
    """`python -m torch.distributed.run --standalone --nproc_per_node 2 tests/SCRIPT ARGS`; fails the
    test with the processes' output if they exit non-zero, or after `timeout` seconds (a collective
    that one rank never joins hangs the others)."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TMPDIR=str(tmp_dir))
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).with_name(script)), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"2-process run still going after {timeout} s (a collective mismatch hangs): "
                    f"{str(e.stderr)[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited with {proc.returncode}:\n{(proc.stdout + proc.stderr)[-5000:]}")
