"""Benchmark: peak host memory (RSS) per rank of loading a model under torchrun and sharding it.

    python -m bench.load_mem build DIR [LAYERS HIDDEN INTERMEDIATE VOCAB]
                                                      # the 50M benchmark model (or that size), in HF format
    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/load_mem.py DIR eager|meta OUT

eager: every rank loads the whole model, then shards it (thinkvl's SFT before issue 19.3; its RL
still loads this way, as each rank keeps a whole replica for generation anyway).
meta: rank 0 loads it, the other ranks build it on the meta device and receive their shards tensor by
tensor (`train.distributed.shard_from_rank0`, what SFT does now).
Each rank writes OUT/rank-R.json: resident memory after imports, its peak (ru_maxrss) after loading
and sharding, and the model's size.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

if __name__ == "__main__" and sys.argv[1:2] != ["build"]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import peak_rss_mb, rss_mb  # noqa: E402


def build(out: Path, dims: list[int]) -> None:
    from bench.models import TEXT_SIZES, TextSize, build_text_model, text_tokenizer

    size = TEXT_SIZES["50M"]
    if dims:  # a model whose weights are mostly in its blocks rather than its 32K-token embedding
        layers, hidden, inter, vocab = dims
        size = TextSize(layers=layers, hidden=hidden, intermediate=inter, heads=8, kv_heads=8, vocab=vocab)
    tok = text_tokenizer()
    model = build_text_model(size, tok, seed=0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters in {out}")


def measure(model_dir: str, mode: str, out: Path) -> None:
    from thinkvl.models.load import load
    from thinkvl.train import distributed as D

    torch.set_num_threads(1)
    d = D.setup("cpu")
    # Import what loading and sharding import lazily, so the baseline holds the code and only the
    # weights and their copies show in the difference.
    from torch.distributed.checkpoint import state_dict  # noqa: F401
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    base = rss_mb()
    D.barrier(d)
    if mode == "eager":
        model = D.shard(load(model_dir).model, d)
    elif mode == "meta":
        model = D.shard_from_rank0(load(model_dir, meta=not d.main).model, d)
    else:
        raise SystemExit(f"mode {mode!r}: choose eager or meta")
    D.barrier(d)
    params = sum(p.numel() for p in model.parameters())  # global sizes (DTensor)
    mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{d.rank}.json").write_text(json.dumps({
        "mode": mode, "rank": d.rank, "world": d.world, "params": params, "model_mb": round(mb, 1),
        "rss_after_imports_mb": round(base, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_after_load_mb": round(rss_mb(), 1), "peak_minus_imports_mb": round(peak_rss_mb() - base, 1)}))
    D.cleanup(d)


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(Path(sys.argv[2]), [int(x) for x in sys.argv[3:7]])
    else:
        measure(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
