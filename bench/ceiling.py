"""Benchmark 5: the machine's matmul ceiling (GFLOP/s), against which SFT's MFU is reported."""

from __future__ import annotations

import time

import torch

from bench.common import median, set_threads


def run(n: int = 2048, reps: int = 5) -> dict:
    threads = set_threads()
    out = {"n": n, "reps": reps, "threads": threads}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        rates = []
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            rates.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
        out[f"{name}_gflops"] = round(median(rates), 1)
        out[f"{name}_gflops_max"] = round(max(rates), 1)
    return out
