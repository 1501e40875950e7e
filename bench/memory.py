"""Peak host memory of a few SFT steps, to check docs/scale.md's formulas on CPU.

    python -m bench.memory [--model tiny|50M] [--length 1024] [--steps 3] [--procs 1|2]

Builds the model from its config (the demo's tiny Kimi-VL model, or bench's 50M Qwen2), writes 64
text conversations, and runs `thinkvl sft` for a few steps (fp32, no gradient checkpointing, one
packed row of `length` tokens a micro-batch), in a fresh process or under torchrun. Each rank
reports its resident memory after imports (the base) and its peak (ru_maxrss), and the formula's
prediction of the difference (`thinkvl.report.memory_plan`, at 4 bytes an element on CPU):
    states 16 N / procs + (procs > 1: one full fp32 copy, loaded before sharding, 4 N)
    + activations of every layer (no checkpointing) + the chunked LM head.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _child(model_dir: str, data: str, out: str, length: int, steps: int, report: str) -> None:
    """One rank: measure the base, train, write base/peak to report.RANK.json."""
    import torch

    torch.set_num_threads(1)
    from thinkvl.train.sft import SFTConfig, SourceConfig, StageConfig, train

    base = _rss_mib()
    cfg = SFTConfig()
    cfg.model.path = model_dir
    cfg.data.sources = [SourceConfig(path=data)]
    cfg.stages = [StageConfig(name="s", max_length=length, lr_peak=1e-4, lr_end=1e-4, warmup_frac=0.0)]
    cfg.max_steps, cfg.out_dir, cfg.save_every = steps, out, 0
    train(cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{report}.{rank}.json").write_text(json.dumps({"rank": rank, "base_mib": base, "peak_mib": peak}))


def build(model: str, root: Path) -> tuple[Path, Path, int, object]:
    """The model folder, the data file, the parameter count and the memory-plan Arch."""
    from bench.data import text_conversations, write_jsonl
    from bench.models import TEXT_SIZES, build_text_model, text_tokenizer

    data = write_jsonl(root / "sft.jsonl", [{"messages": m} for m in text_conversations(64, 0)])
    if model == "tiny":
        from thinkvl.models.tiny import build_tiny, save_tiny

        from thinkvl.report.memory_plan import Arch

        out = save_tiny(root / "model")
        m, _ = build_tiny()
        t = m.config.text_config
        q = (t.hidden_size * t.q_lora_rank + t.q_lora_rank * 4 * 48 + t.hidden_size * (t.kv_lora_rank + 16)
             + t.kv_lora_rank * 4 * 64 + 4 * 32 * t.hidden_size)
        arch = Arch("tiny", vocab=t.vocab_size, hidden=t.hidden_size, layers=t.num_hidden_layers, heads=4,
                    qk_dim=48, v_dim=32, kv_heads=4, q_params=q, dense_layers=1, dense_ffn=t.intermediate_size,
                    moe_layers=t.num_hidden_layers - 1, experts=t.n_routed_experts, shared_experts=1, top_k=2,
                    moe_ffn=t.moe_intermediate_size, tied=True, extra_attn_elems=80 + 64 + 4 * 64)
        n = sum(p.numel() for p in m.parameters())
        return out, data, n, Arch(**{**arch.__dict__, "vision_params": n - arch.lm_params})
    from thinkvl.report.memory_plan import Arch

    size = TEXT_SIZES[model]
    tok = text_tokenizer()
    m = build_text_model(size, tok)
    m.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    arch = Arch(model, vocab=m.config.vocab_size, hidden=size.hidden, layers=size.layers, heads=size.heads,
                qk_dim=size.hidden // size.heads, v_dim=size.hidden // size.heads, kv_heads=size.kv_heads,
                q_params=4 * size.hidden * size.hidden, dense_layers=size.layers, dense_ffn=size.intermediate,
                tied=True)
    return root / "model", data, sum(p.numel() for p in m.parameters()), arch


def predicted_mib(n: int, arch, length: int, procs: int) -> float:
    states = 16 * n / procs + (4 * n if procs > 1 else 0)
    act = 2 * arch.layers * length * arch.block_act_bytes()  # fp32: twice the bf16 bytes
    head = 3 * 1024 * arch.vocab * 4
    return (states + act + head) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="50M")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--procs", type=int, default=1)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data, n, arch = build(a.model, root)
        report = root / "report"
        args = [str(model_dir), str(data), str(root / "run"), str(a.length), str(a.steps), str(report)]
        code = "import sys; from bench.memory import _child; _child(*sys.argv[1:3], sys.argv[3], *map(int, sys.argv[4:6]), sys.argv[6])"
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TMPDIR=tmp)
        if a.procs == 1:
            cmd = [sys.executable, "-c", code, *args]
        else:
            script = root / "child.py"
            script.write_text(code)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.procs),
                   str(script), *args]
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        ranks = [json.loads(p.read_text()) for p in sorted(root.glob("report.*.json"))]
        pred = predicted_mib(n, arch, a.length, a.procs)
        for r in ranks:
            got = r["peak_mib"] - r["base_mib"]
            print(json.dumps({"model": a.model, "params": n, "procs": a.procs, "length": a.length, **r,
                              "peak_minus_base_mib": round(got, 1), "predicted_mib": round(pred, 1),
                              "ratio": round(got / pred, 2)}))


if __name__ == "__main__":
    main()
