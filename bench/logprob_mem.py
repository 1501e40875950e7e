"""Benchmark 4: peak memory of sequence log-probs over a large vocabulary, forward + backward.

chunked: `thinkvl.rl.logprobs.token_logprobs_from_hidden` (LM head applied 1024 tokens at a time,
logits recomputed in the backward). naive: `log_softmax(h @ W^T)` in float32 over the whole
sequence, then gather, as a plain training loop or a trainer without a fused head computes it.
Each run is its own forked process; the figure is its peak resident memory minus the resident
memory once the inputs (hidden states, LM-head weight, targets) exist.
"""

from __future__ import annotations

import time

import torch

from bench.common import peak_rss_mb, rss_mb, set_threads


def predicted_naive_mb(seq: int, vocab: int) -> float:
    """Rough upper bound of the naive peak: four float32 [T, V] buffers (logits/log-probs, the
    incoming gradient, the softmax backward's temporaries)."""
    return 4 * seq * vocab * 4 / 2**20


def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run(impl: str, seq: int, vocab: int, hidden: int, chunk: int = 1024, seed: int = 0) -> dict:
    from thinkvl.rl.logprobs import token_logprobs_from_hidden

    threads = set_threads()
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(1, seq, hidden, generator=g).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).requires_grad_(True)
    targets = torch.randint(vocab, (1, seq), generator=g)
    inputs_rss = rss_mb()
    t0 = time.perf_counter()
    if impl == "chunked":
        logp = token_logprobs_from_hidden(h, w, targets, chunk_size=chunk)
    elif impl == "naive":
        logp = torch.log_softmax((h @ w.t()).float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    else:
        raise ValueError(f"impl: {impl!r} unknown; choose chunked or naive")
    logp.sum().backward()
    secs = time.perf_counter() - t0
    return {"impl": impl, "seq": seq, "vocab": vocab, "hidden": hidden, "threads": threads,
            "seconds": round(secs, 2), "inputs_rss_mb": round(inputs_rss, 1),
            "op_peak_mb": round(peak_rss_mb() - inputs_rss, 1),
            "logits_fp32_mb": round(seq * vocab * 4 / 2**20, 1)}
