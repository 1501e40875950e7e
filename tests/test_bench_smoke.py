"""The benchmarks in bench/ run at toy size and return the figures they promise, so they cannot rot.

Each benchmark side runs in this process at its `--quick` size (seconds). The TRL halves skip when
trl (the `bench` extra) is not installed, the vLLM side when $THINKVL_VLLM_PYTHON is unset.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import run  # noqa: E402

SFT_KEYS = ("supervised_tokens_per_s", "tokens_per_s", "non_pad_fraction", "peak_rss_mb", "losses", "final_loss",
            "weights_checksum", "params", "heldout_loss")
RL_KEYS = ("step_seconds", "gen_seconds", "gen_tokens_per_s", "peak_rss_mb", "gen_tokens")
KEYS = {"text_sft": SFT_KEYS, "mm_sft_qwen2.5-vl": SFT_KEYS, "mm_sft_kimi": SFT_KEYS, "rl_step": RL_KEYS,
        "rl_step_vllm": RL_KEYS,
        "logprob_mem": ("op_peak_mb", "seconds", "logits_fp32_mb"), "ceiling": ("fp32_gflops", "bf16_gflops")}
CASES = [(name, side) for name, keys in KEYS.items() for side in run.BENCHES[name].sides]


@pytest.mark.parametrize(("name", "side"), CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_bench_side_quick(name: str, side: str) -> None:
    if side == "trl" and not run.HAVE_TRL:
        pytest.skip(run.TRL_MISSING)
    if side == "thinkvl_vllm" and not run.vllm_available():
        pytest.skip(run.VLLM_MISSING)
    res = run.run_bench(run.BENCHES[name], quick=True, sides=[side])
    (r,) = res["runs"][side]
    for key in KEYS[name]:
        assert key in r, f"{name}/{side}: result has no {key!r}"
        value = r[key]
        if isinstance(value, float):
            assert math.isfinite(value), f"{name}/{side}: {key} = {value}"
    if "losses" in r:
        assert all(math.isfinite(x) and x > 0 for x in r["losses"])
    assert res["median"][side], "medians missing"


def test_text_sft_same_start_and_ratio() -> None:
    """Both sides start from the same weights, and the driver computes thinkvl/TRL ratios."""
    if not run.HAVE_TRL:
        pytest.skip(run.TRL_MISSING)
    res = run.run_bench(run.BENCHES["text_sft"], quick=True)
    a, b = res["runs"]["thinkvl"][0], res["runs"]["trl"][0]
    assert a["weights_checksum"] == b["weights_checksum"]
    assert a["params"] == b["params"]
    assert abs(a["losses"][0] - b["losses"][0]) < 0.5  # same model, same data distribution, step 1
    assert set(res["ratio"]) >= {"supervised_tokens_per_s", "peak_rss_mb"}


def test_cli_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    run.main(["--quick", "--only", "ceiling", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["ceiling"]["median"]["machine"]["fp32_gflops"] > 0
    assert {"nproc", "cpu", "torch", "transformers"} <= set(data["environment"])
