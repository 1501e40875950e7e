"""Measurement plumbing shared by the benchmarks: isolated runs, memory, timing, medians.

Every measured run executes in a child process forked from the bench driver (`isolated`), so its
peak resident memory (`ru_maxrss`, reset by the kernel at fork) belongs to that run alone, while
the slow imports (torch, transformers, trl: 5-20 s each on a busy 2-core machine) are paid once in
the parent. The parent must not run torch operations before forking (OpenMP thread pools do not
survive a fork), so models and data are always built inside the child.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import psutil


def rss_mb() -> float:
    """Current resident memory of this process, MiB."""
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """High-water resident memory of this process since it started (or was forked), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(conn, fn: Callable[..., dict], kwargs: dict) -> None:
    try:
        base = rss_mb()
        out = fn(**kwargs)
        out["rss_base_mb"] = round(base, 1)
        out["peak_rss_mb"] = round(peak_rss_mb(), 1)
        out["peak_rss_delta_mb"] = round(out["peak_rss_mb"] - base, 1)
        conn.send(out)
    except BaseException:  # noqa: BLE001 - the parent re-raises with the child's traceback
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


def isolated(fn: Callable[..., dict], timeout_s: float = 900, **kwargs: Any) -> dict:
    """Run fn(**kwargs) in a forked child; its result dict gains rss_base_mb, peak_rss_mb and
    peak_rss_delta_mb (peak minus the resident memory at fork: the run's own footprint)."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, kwargs))
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout_s):
            raise TimeoutError(f"{fn.__module__}.{fn.__name__} ran past {timeout_s} s")
        out = recv.recv()
    finally:
        if proc.is_alive():
            proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if "error" in out:
        raise RuntimeError(f"{fn.__module__}.{fn.__name__} failed in its child process:\n{out['error']}")
    return out


def in_process(fn: Callable[..., dict], **kwargs: Any) -> dict:
    """Run fn here (the --quick smoke path): fast, but peak memory is the whole process's.
    The caller's torch thread count is restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    base = rss_mb()
    try:
        out = fn(**kwargs)
    finally:
        torch.set_num_threads(threads)
    out["rss_base_mb"] = round(base, 1)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["peak_rss_delta_mb"] = round(max(out["peak_rss_mb"] - base, 0.0), 1)
    return out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


class StepClock:
    """Wall time between consecutive step ends; step 0 (warm-up: allocator, thread pools, lazy init)
    is recorded but left out of the steady-state figures."""

    def __init__(self) -> None:
        self.t_start = time.perf_counter()
        self.ends: list[float] = []

    def tick(self) -> None:
        self.ends.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        prev = [self.t_start] + self.ends[:-1]
        return [e - p for e, p in zip(self.ends, prev)]

    def steady_seconds(self) -> float:
        """Seconds from the end of step 0 to the end of the last step."""
        return self.ends[-1] - self.ends[0] if len(self.ends) > 1 else float("nan")


def throughput(clock: StepClock, tokens: list[int], supervised: list[int], slots: list[int]) -> dict:
    """Steady-state figures from per-step counts (step 0 excluded)."""
    secs = clock.steady_seconds()
    tok, sup, slot = sum(tokens[1:]), sum(supervised[1:]), sum(slots[1:])
    return {
        "steps": len(clock.ends),
        "step_s": [round(s, 3) for s in clock.step_seconds()],
        "steady_s": round(secs, 3),
        "tokens_per_s": round(tok / secs, 1),
        "supervised_tokens_per_s": round(sup / secs, 1),
        "non_pad_fraction": round(tok / max(slot, 1), 4),
        "tokens": sum(tokens),
        "supervised_tokens": sum(supervised),
    }


def choose_threads() -> int:
    """Intra-op threads for every run of a session, decided once (exported as BENCH_THREADS).

    On a machine whose cores are busy with other work, OpenMP threads that spin-wait for each other
    collapse: measured here with the load average at 6 on 2 cores, a thinkvl SFT step ran at 160
    tokens/s with 2 threads and 720 with 1 (and TRL alike). So: 1 thread when the 1-minute load
    average exceeds half the cores, else one per core. Set BENCH_THREADS to override."""
    if "BENCH_THREADS" not in os.environ:
        cores = os.cpu_count() or 1
        os.environ["BENCH_THREADS"] = str(1 if os.getloadavg()[0] > cores / 2 else cores)
    return int(os.environ["BENCH_THREADS"])


def set_threads() -> int:
    """Apply the session's thread count (see `choose_threads`) in this run."""
    import torch

    n = choose_threads()
    torch.set_num_threads(n)
    return n


def thinkvl_defaults(model) -> str:
    """Give a model built by hand the attention thinkvl's `load` would give it (its default
    `model.attn_implementation`), so the thinkvl side is measured as shipped. Returns the name."""
    from thinkvl.models.attention import set_attention
    from thinkvl.train.common import ModelConfig

    name = ModelConfig().attn_implementation
    set_attention(model, name)
    return name


def thinkvl_adamw(model, lr: float, betas: tuple[float, float], weight_decay: float):
    """The optimiser thinkvl's SFT and RL loops build (`thinkvl.train.common.adamw`: the fused
    kernel on CPU), over all of a model's parameters in one group."""
    from thinkvl.train.common import adamw

    return adamw([{"params": list(model.parameters()), "lr": lr, "weight_decay": weight_decay}], betas)
