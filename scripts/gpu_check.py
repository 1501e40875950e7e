"""The GPU check behind scripts/gpu_check.sh: thinkvl's GPU paths on small models built from configs.

Steps (each timed; the whole check is sized to finish in under 8 minutes on one GPU):
  1. sft       bf16_mixed SFT steps with packing (flash-attention 2 when installed, else thinkvl's
               varlen SDPA) on the tiny Kimi-VL model; on a GPU also on bench's 50M Qwen2, whose
               achieved TFLOP/s (6 N a token + attention) is printed
  2. rl        a few policy-mirror-descent iterations (generation, scoring, update) in bf16_mixed
  3. logprobs  token log-probs of a packed batch on the device (fp32, and bf16 autocast) against the
               same batch on the CPU in fp32: the reference every CPU test was written against
  4. roundtrip final/ loaded with plain transformers on the device gives thinkvl's logits
  5. vllm      the vLLM rollout engine (when a vLLM environment is there: $THINKVL_VLLM_PYTHON or
               scripts/vllm_venv.sh's default folder; skipped otherwise): greedy and sampled
               generation of a Qwen2 (head_dim 64) against thinkvl's HF engine and trainer forward,
               then a weight sync (sleep/wake around it on a GPU) that must reach vLLM; on a GPU
               also whether the tiny Kimi loads in vLLM (on vLLM 0.32 it does not: docs/vllm.md)
Prints throughput, peak memory and every mismatch; exits 1 when a mismatch is over its tolerance.
`--cpu` runs the same steps at small sizes on the CPU (CI's dry run).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Tolerances (max |difference| of token log-probs, nats): fp32 on the device against fp32 on the CPU
# differs by summation order only; bf16 compute by its 8-bit mantissa.
TOL_FP32, TOL_BF16, TOL_ROUNDTRIP = 1e-3, 0.25, 1e-4
# vLLM (float32) against the trainer's forward: other kernels; 5e-7 measured on the CPU backend
TOL_VLLM = 1e-2
DEFAULT_VLLM_PYTHON = "~/.cache/thinkvl/venv-vllm/bin/python"  # where scripts/vllm_venv.sh builds it


@dataclass(frozen=True)
class Sizes:
    tiny: dict  # save_tiny config kwargs
    n_sft: int  # synthetic conversations
    length: int  # packed row length
    sft_steps: int
    rl_iters: int
    rl_prompts: int
    text_model: str | None  # bench TEXT_SIZES key for the throughput run (None: skip)
    vllm_prompts: int  # sampled: prompts x 8 samples x vllm_tokens new tokens
    vllm_tokens: int


GPU = Sizes(tiny={}, n_sft=400, length=2048, sft_steps=20, rl_iters=4, rl_prompts=8, text_model="50M",
            vllm_prompts=64, vllm_tokens=256)
CPU = Sizes(tiny=dict(vision_width=32, vision_layers=1, text_width=64, text_layers=2, experts=4), n_sft=24,
            length=256, sft_steps=3, rl_iters=1, rl_prompts=2, text_model=None, vllm_prompts=4, vllm_tokens=16)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def sft(model_dir: Path, data: Path, out: Path, sizes: Sizes, attn: str) -> dict:
    from thinkvl.train.sft import SFTConfig, SourceConfig, StageConfig, train

    cfg = SFTConfig()
    cfg.model.path, cfg.model.precision, cfg.model.attn_implementation = str(model_dir), "bf16_mixed", attn
    cfg.data.sources = [SourceConfig(path=str(data))]
    cfg.stages = [StageConfig(name="s", max_length=sizes.length, lr_peak=1e-4, lr_end=1e-4, warmup_frac=0.0)]
    cfg.optim.grad_accum, cfg.max_steps, cfg.out_dir = 2, sizes.sft_steps, str(out)
    t0 = time.perf_counter()
    train(cfg)
    steps = [m for m in metrics(out) if "loss" in m]
    later = steps[1:] or steps  # the first step pays for kernel selection and allocation
    tok_s = sum(m["tokens"] for m in later) / sum(m["time/forward_backward"] + m["time/optimizer"] for m in later)
    return {"seconds": round(time.perf_counter() - t0, 1), "steps": len(steps), "tokens_per_s": round(tok_s, 1),
            "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
            "packing_efficiency": steps[-1]["packing_efficiency"]}


def text_sft_tflops(root: Path, sizes: Sizes, attn: str, device: torch.device) -> dict:
    """bench's Qwen2 text model through the same SFT loop; achieved TFLOP/s from its tokens/s."""
    from bench.data import text_conversations, write_jsonl
    from bench.models import TEXT_SIZES, build_text_model, text_tokenizer

    size = TEXT_SIZES[sizes.text_model]
    tok = text_tokenizer()
    model = build_text_model(size, tok)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(root / "text_model")
    tok.save_pretrained(root / "text_model")
    data = write_jsonl(root / "text.jsonl", [{"messages": m} for m in text_conversations(sizes.n_sft, 0)])
    out = sft(root / "text_model", data, root / "text_sft", sizes, attn)
    # 6 N a token for the matmuls (LM head included: tied), plus causal attention over ~length/2
    flops = 6 * n + 6 * size.layers * size.hidden * sizes.length / 2 * 2
    out["achieved_tflops"] = round(out["tokens_per_s"] * flops / 1e12, 2)
    out["params"] = n
    return out


def rl(model_dir: Path, problems: Path, out: Path, sizes: Sizes, attn: str) -> dict:
    from thinkvl.rl.loop import RLConfig, train

    cfg = RLConfig()
    cfg.model.path, cfg.model.precision, cfg.model.attn_implementation = str(model_dir), "bf16_mixed", attn
    cfg.data.problems, cfg.verifier = str(problems), "math"
    cfg.rollout.prompts_per_iter, cfg.rollout.k, cfg.rollout.max_new_tokens = sizes.rl_prompts, 4, 32
    cfg.loss.lr, cfg.length_penalty.weight = 1e-5, 0.5
    cfg.iterations, cfg.out_dir = sizes.rl_iters, str(out)
    t0 = time.perf_counter()
    train(cfg)
    lines = metrics(out)
    return {"seconds": round(time.perf_counter() - t0, 1), "iterations": len(lines),
            "gen_tokens_per_s": lines[-1]["gen_tokens_per_s"], "train_tokens_per_s": lines[-1]["train_tokens_per_s"],
            "kl_first": lines[0]["kl"]}


def packed_batch(loaded, conversations: list[list[dict]]) -> dict:
    from thinkvl.data.packing import bfd_pack, collate_rows

    examples = [loaded.render(m) for m in conversations]
    rows = bfd_pack([len(e) for e in examples], sum(len(e) for e in examples))
    return collate_rows(examples, rows, loaded.pad_id, loaded.positions)


def logprobs(model_dir: Path, data: Path, device: torch.device) -> dict:
    """thinkvl's training/scoring forward (packed rows, chunked LM head) on the device vs the CPU."""
    from thinkvl.models.forward import token_logprobs
    from thinkvl.models.load import load

    from thinkvl.data.formats import read_records

    conversations = [r["messages"] for r in read_records(str(data), "conversation", limit=6)]  # images resolved
    ref_loaded = load(str(model_dir))
    batch = packed_batch(ref_loaded, conversations)
    with torch.no_grad():
        ref = token_logprobs(ref_loaded.model.eval(), batch)
        dev_model = load(str(model_dir)).model.to(device).eval()
        fp32 = token_logprobs(dev_model, batch).cpu()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16 = token_logprobs(dev_model, batch).float().cpu()
    mask = batch["target_mask"].bool()
    return {"tokens": int(mask.sum()), "fp32_max_diff": float((fp32 - ref)[mask].abs().max()),
            "bf16_max_diff": float((bf16 - ref)[mask].abs().max())}


def roundtrip(final: Path, device: torch.device) -> dict:
    """final/ through plain transformers on the device: its logits against thinkvl's loader's."""
    from transformers import AutoModelForImageTextToText

    from thinkvl.models.load import load

    loaded = load(str(final), attn_implementation=None)
    plain = AutoModelForImageTextToText.from_pretrained(final, dtype=torch.float32).to(device).eval()
    ours = loaded.model.to(device).eval()
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], tokenize=False,
                                                add_generation_prompt=True)
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        a = plain(input_ids=ids, use_cache=False).logits.float()
        b = ours(input_ids=ids, use_cache=False).logits.float()
    return {"dtype": str(next(plain.parameters()).dtype), "logits_max_diff": float((a - b).abs().max())}


def find_vllm_python() -> str | None:
    """$THINKVL_VLLM_PYTHON as it is (a broken one then fails the step, as it fails the tests), else
    scripts/vllm_venv.sh's default folder when it exists, else None (the step is skipped)."""
    import os

    if os.environ.get("THINKVL_VLLM_PYTHON"):
        return os.path.expanduser(os.environ["THINKVL_VLLM_PYTHON"])
    path = Path(DEFAULT_VLLM_PYTHON).expanduser()
    return str(path) if path.exists() else None


def vllm_check(root: Path, tiny_dir: Path, sizes: Sizes, device: torch.device, python: str) -> dict:
    """VLLMEngine on bench's `rl` Qwen2 (2 x 128, head_dim 64: the CPU backend refuses head_dim 16)
    in float32: greedy ids against thinkvl's HF engine, sampled log-probs against the trainer's
    forward (no bans, so both are log softmax over the full vocabulary), then a perturbed model
    synced in: its log-probs must match the new weights, and greedy answers must change."""
    import copy
    import dataclasses

    from bench.models import TEXT_SIZES, build_text_model, text_tokenizer
    from thinkvl.models.load import load
    from thinkvl.rl.loop import response_logprobs
    from thinkvl.rollout.engine import SamplingParams, VLLMSettings
    from thinkvl.rollout.hf_engine import HFEngine
    from thinkvl.rollout.vllm_engine import VLLMEngine

    folder = root / "vllm_qwen2"
    tok = text_tokenizer()
    build_text_model(TEXT_SIZES["rl"], tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    loaded = load(str(folder))
    loaded.model.to(device).eval()
    questions = [f"What is {a} + {b} * {a + b}?" for a in range(1, 5) for b in range(1, 5)]
    prompts = [loaded.render([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in questions[: max(sizes.vllm_prompts, 4)]]
    prompts = (prompts * (sizes.vllm_prompts // len(prompts) + 1))[: sizes.vllm_prompts]
    on_gpu = device.type == "cuda"
    settings = VLLMSettings(python=python, dtype="float32", max_model_len=1024, kv_cache_gib=0.25 if not on_gpu else 4,
                            sleep=on_gpu, gpu_memory_utilization=0.3)

    def gap(model, rollouts) -> tuple[float, float]:
        flat = [r for g in rollouts for r in g if r.length]
        with torch.no_grad():
            ours = response_logprobs(model, flat, loaded, 1.0).float().cpu()
        diffs = torch.cat([(ours[i, : r.length] - torch.tensor(r.logprobs)).abs() for i, r in enumerate(flat)])
        return float(diffs.max()), float(diffs.mean())

    out: dict = {"python": python}
    greedy = SamplingParams(max_new_tokens=32, greedy=True)
    sampled = SamplingParams(max_new_tokens=sizes.vllm_tokens, temperature=1.0)
    with VLLMEngine(loaded, str(folder), settings, ban_media_tokens=False) as engine:
        out["vllm"], out["startup_s"] = engine.version, round(engine.startup_s, 1)
        out["sync_s"] = round(engine.sync_weights(loaded.model), 3)
        v = [[r.response_ids for r in g] for g in engine.generate(prompts[:4], 1, greedy)]
        h = [[r.response_ids for r in g] for g in HFEngine(loaded).generate(prompts[:4], 1, greedy)]
        out["greedy_equal_hf"] = f"{sum(a == b for a, b in zip(v, h))}/{len(v)}"
        t0 = time.perf_counter()
        rollouts = engine.generate(prompts, 8, sampled)
        seconds = time.perf_counter() - t0
        n_tok = sum(r.length for g in rollouts for r in g)
        out["sampled"] = {"prompts": len(prompts), "n": 8, "max_new_tokens": sizes.vllm_tokens,
                          "seconds": round(seconds, 2), "tokens_per_s": round(n_tok / seconds, 1)}
        out["logprob_max_diff"], out["logprob_mean_diff"] = gap(loaded.model, rollouts)
        other = copy.deepcopy(loaded.model)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device))
        engine.sleep()  # GPU: the trainer's update would run here (no-op on the CPU)
        engine.wake_up()
        out["sync_s_after_sleep"] = round(engine.sync_weights(other), 3)
        after = engine.generate(prompts[:4], 2, sampled)
        out["after_sync_max_diff"], _ = gap(other, after)
        out["stale_max_diff"], _ = gap(loaded.model, after)  # what a missed sync would look like
        v2 = [[r.response_ids for r in g] for g in engine.generate(prompts[:4], 1, greedy)]
        h2 = [[r.response_ids for r in g] for g in HFEngine(dataclasses.replace(loaded, model=other))
              .generate(prompts[:4], 1, greedy)]
        out["greedy_equal_hf_after_sync"] = f"{sum(a == b for a, b in zip(v2, h2))}/{len(v2)}"
        out["sync_changed_greedy"] = v2 != v
    if on_gpu:  # the tiny Kimi (MLA, MoonViT): vLLM 0.32 cannot load it; record what this vLLM says
        try:
            with VLLMEngine(load(str(tiny_dir)), str(tiny_dir), settings, trust_remote_code=True):
                out["kimi"] = "loads"
        except Exception as e:  # noqa: BLE001 - reported, not a check
            out["kimi"] = f"does not load: {str(e).strip().splitlines()[-1][:300]}"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="thinkvl's GPU check (scripts/gpu_check.sh)")
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU at small sizes")
    ap.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    a = ap.parse_args(argv)
    if not a.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --cpu for the CPU dry run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if a.cpu else "cuda")
    sizes = CPU if a.cpu else GPU
    import importlib.util

    attn = "flash_attention_2" if not a.cpu and importlib.util.find_spec("flash_attn") else "varlen"
    from thinkvl.demo.tasks import synth
    from thinkvl.models.tiny import save_tiny

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out) if a.out else Path(tmp)
        t0 = time.perf_counter()
        paths = synth(root / "data", seed=0, n_sft=sizes.n_sft, n_rl=16, n_eval=0)
        model_dir = save_tiny(root / "tiny", seed=0, **sizes.tiny)
        report: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                        "torch": torch.__version__, "attention": attn}
        report["sft"] = sft(model_dir, paths["sft"], root / "sft", sizes, attn)
        if sizes.text_model:
            report["sft_50m"] = text_sft_tflops(root, sizes, attn, device)
        report["rl"] = rl(model_dir, paths["rl"], root / "rl", sizes, attn)
        report["logprobs"] = logprobs(model_dir, paths["sft"], device)
        report["roundtrip"] = roundtrip(root / "sft" / "final", device)
        python = find_vllm_python()
        report["vllm"] = (vllm_check(root, model_dir, sizes, device, python) if python else
                          {"skipped": "no vLLM environment: THINKVL_VLLM_PYTHON is unset and "
                                      f"{DEFAULT_VLLM_PYTHON} does not exist (bash scripts/vllm_venv.sh)"})
        report["peak_memory_mib"] = round(peak_memory_mib(device), 1)
        report["seconds"] = round(time.perf_counter() - t0, 1)
    checks = {"logprobs fp32 vs CPU": (report["logprobs"]["fp32_max_diff"], TOL_FP32),
              "logprobs bf16 vs CPU fp32": (report["logprobs"]["bf16_max_diff"], TOL_BF16),
              "HF round trip logits": (report["roundtrip"]["logits_max_diff"], TOL_ROUNDTRIP)}
    if "skipped" not in report["vllm"]:
        checks["vLLM log-probs vs trainer"] = (report["vllm"]["logprob_max_diff"], TOL_VLLM)
        checks["vLLM log-probs vs trainer after a weight sync"] = (report["vllm"]["after_sync_max_diff"], TOL_VLLM)
    else:
        print(f"skip vLLM: {report['vllm']['skipped']}")
    report["checks"] = {name: {"max_diff": got, "tolerance": tol} for name, (got, tol) in checks.items()}
    print(json.dumps(report, indent=1))
    if a.out:
        (Path(a.out) / "gpu_check.json").write_text(json.dumps(report, indent=1))
    bad = 0
    for name, (got, tol) in checks.items():
        ok = got <= tol
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: max |diff| {got:.2e} (tolerance {tol:.0e})")
    print(f"gpu_check: {'all checks passed' if not bad else f'{bad} mismatch(es)'} in {report['seconds']} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
