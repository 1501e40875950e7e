"""Run the thinkvl-vs-TRL benchmarks, print a table and write bench/results.json.

    python bench/run.py                 # the real measurement (about 10 minutes on 2 cores)
    python bench/run.py --quick         # toy sizes, seconds: the smoke test's path
    python bench/run.py --only rl_step  # one benchmark (repeatable: --only a --only b)

Each benchmark runs thinkvl and its reference (TRL, or the naive log-prob) alternately, `reps` times
each, every run in its own forked process (peak memory per run); the table shows medians and the
thinkvl / reference ratio. --quick runs everything in this process instead (fast, but its memory
figures are the whole process's and mean nothing).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import ceiling, logprob_mem, mm_sft, rl_step, text_sft  # noqa: E402
from bench.common import choose_threads, in_process, isolated, median  # noqa: E402

HAVE_TRL = importlib.util.find_spec("trl") is not None
TRL_MISSING = "trl is not installed (pip install -e '.[bench]'): the TRL half is not run"
VLLM_MISSING = ("no vLLM environment (bash scripts/vllm_venv.sh, then THINKVL_VLLM_PYTHON=its python): "
                "the vLLM side is not run")


def vllm_available() -> bool:
    """$THINKVL_VLLM_PYTHON is set (VLLMEngine's lookup finds it; a wrong path then fails the run)."""
    return bool(os.environ.get("THINKVL_VLLM_PYTHON"))
RESULTS = Path(__file__).resolve().parent / "results.json"


@dataclass
class Bench:
    """One benchmark: how to run each side, with which arguments at each scale, what to compare."""

    name: str
    sides: dict[str, Callable[..., dict]]  # side name -> function run in a child process
    quick: dict[str, dict]  # side -> kwargs at toy size
    full: dict[str, dict]  # side -> kwargs at the measured size
    reps: int = 2  # runs per side (alternating), full mode
    figures: tuple[str, ...] = ()  # result keys shown in the table (median over reps)
    higher_is_better: dict[str, bool] = field(default_factory=dict)


def _text(size: str, n_conv: int, capacity: int, rows: int, steps: int) -> dict[str, dict]:
    kw = dict(size=size, n_conv=n_conv, capacity=capacity, rows_per_step=rows, steps=steps)
    return {"thinkvl": kw, "trl": kw}


def _mm(model: str, n_conv: int, capacity: int, rows: int, steps: int, toy: bool) -> dict[str, dict]:
    kw = dict(model_name=model, n_conv=n_conv, capacity=capacity, steps=steps, toy=toy)
    return {"thinkvl": {**kw, "rows_per_step": rows}, "trl": {**kw, "batch": None}}  # batch: from thinkvl's run


def _rl(size: str, prompts: int, k: int, max_new: int, steps: int) -> dict[str, dict]:
    kw = dict(size=size, prompts=prompts, k=k, max_new=max_new, steps=steps)
    return {"thinkvl": kw, "trl": kw}


def _rl_sides(sides: tuple[str, ...], size: str, prompts: int, k: int, max_new: int, steps: int) -> dict[str, dict]:
    return {side: dict(size=size, prompts=prompts, k=k, max_new=max_new, steps=steps) for side in sides}


SFT_FIGURES = ("supervised_tokens_per_s", "tokens_per_s", "non_pad_fraction", "peak_rss_mb", "peak_rss_delta_mb",
               "final_loss", "heldout_loss", "setup_s")
RL_FIGURES = ("step_seconds", "gen_seconds", "gen_tokens_per_s", "peak_rss_mb", "peak_rss_delta_mb")
LP_FIGURES = ("op_peak_mb", "seconds")
HIGHER = {"supervised_tokens_per_s": True, "tokens_per_s": True, "gen_tokens_per_s": True, "non_pad_fraction": True}

BENCHES: dict[str, Bench] = {b.name: b for b in [
    Bench("text_sft", {"thinkvl": text_sft.run_thinkvl, "trl": text_sft.run_trl},
          quick=_text("toy", 24, 256, 1, 3), full=_text("4L-256", 80, 1024, 2, 6), reps=3,
          figures=SFT_FIGURES),
    Bench("text_sft_50m", {"thinkvl": text_sft.run_thinkvl, "trl": text_sft.run_trl},
          quick=_text("toy", 16, 256, 1, 2), full=_text("50M", 40, 1024, 1, 5), reps=2,
          figures=SFT_FIGURES),
    Bench("mm_sft_qwen2.5-vl", {"thinkvl": mm_sft.run_thinkvl, "trl": mm_sft.run_trl},
          quick=_mm("qwen2.5-vl", 8, 512, 1, 2, True), full=_mm("qwen2.5-vl", 64, 1024, 1, 6, False),
          figures=SFT_FIGURES),
    Bench("mm_sft_kimi", {"thinkvl": mm_sft.run_thinkvl, "trl": mm_sft.run_trl},
          quick=_mm("kimi", 8, 512, 1, 2, True), full=_mm("kimi", 64, 1024, 1, 6, False),
          figures=SFT_FIGURES),
    Bench("rl_step", {"thinkvl": rl_step.run_thinkvl, "trl": rl_step.run_trl},
          quick=_rl("toy", 2, 2, 8, 1), full=_rl("rl", 16, 8, 256, 2), reps=2, figures=RL_FIGURES),
    # vLLM generating (its own environment, $THINKVL_VLLM_PYTHON) against thinkvl's HF engine. TRL 1.16
    # with use_vllm=True cannot run here: it imports vllm in the trainer's own process (thinkvl's env
    # cannot hold vLLM's transformers pin), supports vLLM 0.22-0.31 (this is 0.32), and its server
    # mode syncs weights through vLLM's NCCL engine, which needs a CUDA device.
    Bench("rl_step_vllm", {"thinkvl_vllm": rl_step.run_thinkvl_vllm, "thinkvl_hf": rl_step.run_thinkvl},
          quick=_rl_sides(("thinkvl_vllm", "thinkvl_hf"), "toy", 2, 2, 8, 1),
          full=_rl_sides(("thinkvl_vllm", "thinkvl_hf"), "rl", 16, 8, 256, 2), reps=2,
          figures=RL_FIGURES + ("vllm_startup_s",)),
    Bench("logprob_mem", {"chunked": logprob_mem.run, "naive": logprob_mem.run},
          quick={"chunked": dict(impl="chunked", seq=1024, vocab=4096, hidden=32, chunk=256),
                 "naive": dict(impl="naive", seq=1024, vocab=4096, hidden=32)},
          full={"chunked": dict(impl="chunked", seq=8192, vocab=152064, hidden=64),
                "naive": dict(impl="naive", seq=8192, vocab=152064, hidden=64)},
          reps=1, figures=LP_FIGURES),
    Bench("ceiling", {"machine": ceiling.run}, quick={"machine": dict(n=256, reps=2)},
          full={"machine": dict(n=2048, reps=5)}, reps=1, figures=("fp32_gflops", "bf16_gflops")),
]}


def _final_loss(res: dict) -> None:
    if "losses" in res:
        res["final_loss"] = res["losses"][-1]


def _prepare(bench: Bench, side: str, kwargs: dict, done: dict[str, list[dict]], quick: bool) -> dict | None:
    """Per-run argument fix-ups; None = skip this run (with the reason recorded by the caller)."""
    kw = dict(kwargs)
    if bench.name.startswith("mm_sft") and side == "trl":
        ref = done.get("thinkvl") or []
        epr = ref[0]["examples_per_row"] if ref else 4.0
        kw["batch"] = max(1, round(epr * bench.full["thinkvl"]["rows_per_step"] if not quick else epr))
    if bench.name == "logprob_mem" and side == "naive" and not quick:
        need, have = logprob_mem.predicted_naive_mb(kw["seq"], kw["vocab"]), logprob_mem.mem_available_mb()
        if need > 0.6 * have:
            return None
    return kw


def run_bench(bench: Bench, quick: bool, reps: int | None = None, sides: list[str] | None = None) -> dict:
    """Alternate the sides `reps` times; return every run plus medians and ratios."""
    runner = in_process if quick else isolated
    reps = reps or (1 if quick else bench.reps)
    sides = sides or list(bench.sides)
    notes: list[str] = []
    if not HAVE_TRL and "trl" in sides:
        sides = [s for s in sides if s != "trl"]
        notes.append(TRL_MISSING)
    if "thinkvl_vllm" in sides and not vllm_available():
        sides = [s for s in sides if s != "thinkvl_vllm"]
        notes.append(VLLM_MISSING)
    params = bench.quick if quick else bench.full
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    t0 = time.perf_counter()
    for rep in range(reps):
        order = sides if rep % 2 == 0 else sides[::-1]
        for side in order:
            kw = _prepare(bench, side, params[side], runs, quick)
            if kw is None:
                notes.append(f"{side}: skipped, predicted peak above 60% of the memory available now")
                continue
            res = runner(bench.sides[side], **kw)
            res["args"] = kw
            _final_loss(res)
            runs[side].append(res)
    if bench.name == "logprob_mem" and not quick:
        _logprob_extra(bench, runs, runner, notes)
    out = {"name": bench.name, "quick": quick, "reps": reps, "wall_s": round(time.perf_counter() - t0, 1),
           "notes": notes, "runs": runs, "median": {}, "ratio": {}}
    for side, rs in runs.items():
        out["median"][side] = {f: median([r[f] for r in rs if f in r]) for f in bench.figures if any(f in r for r in rs)}
    ref = [s for s in sides if s != sides[0]]
    if ref and runs[sides[0]] and runs[ref[0]]:
        a, b = out["median"][sides[0]], out["median"][ref[0]]
        out["ratio"] = {f: round(a[f] / b[f], 3) for f in a if f in b and b[f]}
    return out


def _logprob_extra(bench: Bench, runs: dict, runner, notes: list[str]) -> None:
    """Both implementations at shorter sequences too: a measured ratio, and the naive line
    extrapolated to the full length when memory forbids running it there."""
    full = bench.full["chunked"]
    for seq in (1024, 2048, 4096):
        for impl in ("chunked", "naive"):
            if impl == "chunked" and seq == 1024:
                continue
            kw = {**full, "impl": impl, "seq": seq}
            if impl == "naive" and logprob_mem.predicted_naive_mb(seq, kw["vocab"]) > 0.6 * logprob_mem.mem_available_mb():
                notes.append(f"naive at {seq}: skipped (memory)")
                continue
            res = runner(bench.sides[impl], **kw)
            res["args"] = kw
            runs.setdefault(f"{impl}@{seq}", []).append(res)
    if not runs.get("naive"):
        pts = [(r["seq"], r["op_peak_mb"]) for k, rs in runs.items() if k.startswith("naive@") for r in rs]
        if len(pts) >= 2:
            (x0, y0), (x1, y1) = sorted(pts)[-2:]
            slope = (y1 - y0) / (x1 - x0)
            est = y1 + slope * (full["seq"] - x1)
            runs["naive"] = [{"impl": "naive", "seq": full["seq"], "op_peak_mb": round(est, 1), "seconds": float("nan"),
                              "extrapolated_from": pts}]
            notes.append(f"naive at {full['seq']}: extrapolated linearly from {pts} (op_peak_mb)")


def environment() -> dict:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    env = {"date": dt.datetime.now().isoformat(timespec="seconds"), "nproc": os.cpu_count(), "cpu": cpu,
           "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "loadavg_start": os.getloadavg(), "threads": choose_threads()}
    if HAVE_TRL:
        import trl

        env["trl"] = trl.__version__
    return env


def derived(results: dict) -> dict:
    """Figures across benchmarks: the SFT step's model FLOP utilisation against the matmul ceiling."""
    out = {}
    ceil = results.get("ceiling", {}).get("median", {}).get("machine", {})
    for name in ("text_sft", "text_sft_50m"):
        r = results.get(name)
        if not r or not ceil.get("fp32_gflops"):
            continue
        for side, rs in r["runs"].items():
            if not rs:
                continue
            params = rs[0]["params"]
            tps = r["median"][side]["tokens_per_s"]
            gflops = 6 * params * tps / 1e9  # attention's T^2 term left out: a lower bound
            out[f"{name}/{side}/model_gflops"] = round(gflops, 2)
            out[f"{name}/{side}/mfu_vs_fp32_matmul"] = round(gflops / ceil["fp32_gflops"], 3)
    return out


def table(results: dict) -> str:
    lines = ["| benchmark | figure | thinkvl | reference | ratio |", "|---|---|---|---|---|"]
    for name, r in results.items():
        if name in ("environment", "derived"):
            continue
        sides = list(r["median"])
        for f in BENCHES[name].figures:
            vals = [r["median"][s].get(f) for s in sides]
            if all(v is None for v in vals):
                continue
            a = vals[0]
            b = vals[1] if len(vals) > 1 else None
            ref = f"{b} ({sides[1]})" if b is not None else ""
            lines.append(f"| {name} | {f} | {a} | {ref} | {r['ratio'].get(f, '')} |")
    for k, v in results.get("derived", {}).items():
        lines.append(f"| derived | {k} | {v} | | |")
    return "\n".join(lines)


def run_all(quick: bool, only: list[str] | None = None, reps: int | None = None) -> dict:
    names = only or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise SystemExit(f"--only: unknown benchmark(s) {unknown}; choose from {', '.join(BENCHES)}")
    results: dict = {"environment": environment()}
    order = (["ceiling"] if "ceiling" in names else []) + [n for n in names if n != "ceiling"]
    for name in order:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results[name] = run_bench(BENCHES[name], quick, reps)
        print(f"[bench] {name}: {results[name]['wall_s']} s", file=sys.stderr, flush=True)
    if "ceiling" in names and not quick:  # again at the end: the load may have changed meanwhile
        r = results["ceiling"]
        r["runs"]["machine"].append(isolated(ceiling.run, **BENCHES["ceiling"].full["machine"]))
        r["median"]["machine"] = {f: median([x[f] for x in r["runs"]["machine"]]) for f in BENCHES["ceiling"].figures}
    results["environment"]["loadavg_end"] = os.getloadavg()
    results["derived"] = derived(results)
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy sizes, in-process, seconds (smoke test)")
    p.add_argument("--only", action="append", help=f"run only this benchmark: {', '.join(BENCHES)}")
    p.add_argument("--reps", type=int, help="runs per side (default: each benchmark's own)")
    p.add_argument("--out", type=Path, default=None, help=f"results file (default {RESULTS}; --quick: none)")
    args = p.parse_args(argv)
    results = run_all(args.quick, args.only, args.reps)
    print(table(results))
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        out.write_text(json.dumps(results, indent=1, default=str) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
