"""Teacher client for any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, hosted APIs).

Stage 2 of the recipe samples a teacher several times per problem and keeps the verified answers.
Teacher calls are the slow, paid part, so this client is built around three properties:

* one completion per HTTP call (``n=1``), so every finished sample is cached on its own;
* a resumable append-only JSONL cache: a sample whose key is cached is never requested again, and a
  build killed mid-way (even mid-line) loses only the samples that were in flight;
* bounded parallelism; a sample is written to the cache as soon as its response is parsed, before
  any counting or callback that could fail.

HTTP, retries with back-off, timeouts and typed errors are the ``openai`` package's (install
``thinkvl[teacher]``). Its retries cover connection errors, timeouts, a body cut off mid-transfer,
408/409/429 and 5xx; a complete 200 response is never retried, so nothing received is paid twice.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import hashlib
import io
import json
import mimetypes
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

try:
    import openai
except ImportError:  # the optional `teacher` extra; RemoteTeacher says how to install it
    openai = None  # type: ignore[assignment]

API_KEY_ENV = "THINKVL_TEACHER_API_KEY"
# The openai client insists on a key; servers without auth (vLLM, SGLang by default) ignore this one.
_NO_KEY = "EMPTY"
_ERROR_BODY_CHARS = 500
# Magic bytes beat file extensions: datasets often store JPEGs under ``.png`` names.
_MAGIC_MIME = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


class TeacherError(RuntimeError):
    """A teacher request failed for good (non-retryable status, retries exhausted, garbled body).

    The openai error behind it (APIStatusError, APITimeoutError, APIConnectionError...) is its
    ``__cause__``.
    """


@dataclass
class TeacherStats:
    """Counters of one client, cumulative over its calls.

    requests: HTTP requests sent (retries included). cache_hits: samples served from the cache.
    retries: requests repeated after a transient failure. failures: samples given up on.
    seconds: wall time spent inside ``sample``/``sample_batch``. cache_bad_lines: undecodable cache
    lines skipped at load (a truncated last line after a kill is the usual one).
    prompt_tokens / completion_tokens: summed from the server's ``usage`` when it reports one.
    """

    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0
    seconds: float = 0.0
    cache_bad_lines: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, float]:
        """The counters as a plain dict (for logging to metrics.jsonl)."""
        return asdict(self)


@dataclass(frozen=True)
class Completion:
    """One teacher sample: the answer text, its separate reasoning (if the server split it off)."""

    content: str
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    reasoning: str | None = None
    cached: bool = False


@dataclass(frozen=True)
class SampleFailure:
    """A sample given up on under ``on_failure="skip"``; it is not cached, so a rerun retries it."""

    record_id: str | None
    sample_index: int
    error: str


@dataclass(frozen=True)
class _Request:
    """One (record, sample index) to fetch; ``messages`` are exactly what is sent."""

    key: str
    record_id: str | None
    sample_index: int
    messages: list[dict[str, Any]]


class _Aborted(TeacherError):
    """A sample dropped because another sample of its batch failed (``on_failure="raise"``)."""


# ----------------------------------------------------------------------------------------------
# Message conversion (record format -> OpenAI format)


def image_mime(data: bytes, path: str | Path | None = None) -> str:
    """MIME type of image bytes: sniffed from magic bytes, else guessed from the file name."""
    for magic, mime in _MAGIC_MIME:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    guessed = mimetypes.guess_type(str(path))[0] if path is not None else None
    return guessed or "application/octet-stream"


def _image_data_url(image: Any, base_dir: Path | None) -> str:
    """A ``data:`` URL for a record's image: a path (absolute or relative to base_dir) or PIL image."""
    if isinstance(image, str) and image.startswith(("data:", "http://", "https://")):
        return image  # already a URL: the server fetches/decodes it
    if hasattr(image, "save"):  # a PIL image already in memory
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data, mime = buf.getvalue(), "image/png"
    else:
        path = Path(image)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path} (base_dir={base_dir})")
        data = path.read_bytes()
        mime = image_mime(data, path)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _convert_part(part: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    """One content part in OpenAI form: ``image`` -> ``image_url`` data URL, text unchanged."""
    kind = part.get("type")
    if kind == "image":
        url = _image_data_url(part["image"], base_dir)
        return {"type": "image_url", "image_url": {"url": url}}
    if kind == "text":
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        return part
    raise ValueError(f"unsupported content part type {kind!r} (expected 'text' or 'image')")


def to_openai_messages(messages: list[dict[str, Any]], base_dir: Path | None = None) -> list[dict]:
    """Convert record messages to OpenAI chat format; string content passes through unchanged."""
    out = []
    for msg in messages:
        content = msg["content"]
        if not isinstance(content, str):
            content = [_convert_part(p, base_dir) for p in content]
        out.append({"role": msg["role"], "content": content})
    return out


def _server_message(err: openai.APIStatusError) -> str:
    """The server's own words from an openai APIStatusError: ``error.message``, else the body."""
    body = err.body
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    if isinstance(body, str) and body:
        return body[:_ERROR_BODY_CHARS]
    return str(err.message)[:_ERROR_BODY_CHARS]


def _retries_taken(err: openai.APIError) -> int:
    """Retries openai made before it raised ``err``: it numbers each attempt in a request header."""
    return int(err.request.headers.get("x-stainless-retry-count", 0))


def _token_count(value: Any) -> int:
    """A token count from ``usage``; anything but a non-negative int counts 0 (the sample stays)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


# ----------------------------------------------------------------------------------------------
# Cache


class SampleCache:
    """Append-only JSONL cache of finished samples, keyed by request hash; thread-safe.

    Each line is written and flushed in one call, so a killed process leaves at most one truncated
    last line; it is counted, cut off at load, and the rest of the file is kept.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, dict[str, Any]] = {}
        self.bad_lines = 0
        self._lock = threading.Lock()
        self._fh: io.TextIOWrapper | None = None
        if self.path is not None and self.path.exists():
            self._load(self.path)

    def _load(self, path: Path) -> None:
        """Read all complete lines; drop (and truncate away) a partial last line."""
        raw = path.read_bytes()
        lines = raw.split(b"\n")
        tail = lines.pop()  # after the last "\n": b"" when the file ends cleanly
        for line in lines:
            if line.strip() and not self._add_line(line):
                self.bad_lines += 1
        if tail.strip():
            if self._add_line(tail):
                with path.open("ab") as fh:  # complete record missing only its newline
                    fh.write(b"\n")
            else:
                self.bad_lines += 1
                # Cut the fragment so the next append starts on a clean line.
                with path.open("r+b") as fh:
                    fh.truncate(len(raw) - len(tail))

    def _add_line(self, line: bytes) -> bool:
        """Parse one line into ``entries``; False when it is not a valid cache entry."""
        try:
            entry = json.loads(line)
        except ValueError:
            return False
        if not isinstance(entry, dict) or "key" not in entry or "content" not in entry:
            return False
        self.entries.setdefault(entry["key"], entry)
        return True

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached entry for ``key``, or None."""
        with self._lock:
            return self.entries.get(key)

    def put(self, entry: dict[str, Any]) -> None:
        """Store an entry in memory and, if backed by a file, append + flush it as one line."""
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            self.entries[entry["key"]] = entry
            if self.path is None:
                return
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = self.path.open("a", encoding="utf-8")
            self._fh.write(line)
            self._fh.flush()

    def close(self) -> None:
        """Close the file handle (reopened on the next ``put``)."""
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


# ----------------------------------------------------------------------------------------------
# Client


class RemoteTeacher:
    """Samples an OpenAI-compatible chat-completions endpoint, with retries and a resumable cache.

    Args:
        base_url: API root such as ``http://127.0.0.1:8000/v1``; requests go to
            ``{base_url}/chat/completions``.
        model: model name sent in every request (and part of the cache key).
        api_key: Bearer token; defaults to ``$THINKVL_TEACHER_API_KEY`` (never ``$OPENAI_API_KEY``:
            a key for one provider is not sent to another endpoint); a placeholder if neither.
        concurrency: maximum simultaneous HTTP requests.
        max_retries: openai's ``max_retries``: extra attempts after a connection error, timeout,
            cut-off body, 408, 409, 429 or 5xx, waiting 0.5 s doubling to 8 s (less up to 25 %
            jitter) or the server's ``Retry-After``/``retry-after-ms``; other 4xx fail at once.
        timeout_s: openai's ``timeout``: the limit on connecting and on each wait for data.
        cache_path: JSONL cache file; None keeps the cache in memory only.
        temperature, top_p, max_tokens: sampling parameters sent with each request.
        base_dir: directory that relative image paths in records are resolved against.
        extra_body: extra top-level request fields (e.g. ``{"top_k": 20}``); part of the cache key.
        on_failure: ``"raise"`` stops the batch with TeacherError; ``"skip"`` records the failure
            in ``self.failures``, counts it and leaves that sample out of the result.
        reasoning_template: how a separate ``reasoning_content``/``reasoning`` field (vLLM/SGLang
            reasoning parsers) is joined with the answer; unused when the server sends none.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        concurrency: int = 8,
        max_retries: int = 4,
        timeout_s: float = 60.0,
        cache_path: Path | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 1024,
        base_dir: Path | None = None,
        extra_body: dict | None = None,
        on_failure: Literal["raise", "skip"] = "raise",
        reasoning_template: str = "<think>\n{reasoning}\n</think>\n{content}",
    ) -> None:
        if openai is None:
            raise ImportError("the remote teacher needs the openai package: pip install 'thinkvl[teacher]'")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        for name, value, lowest in (
            ("concurrency", concurrency, 1),
            ("max_retries", max_retries, 0),
            ("max_tokens", max_tokens, 1),
        ):
            if value < lowest:
                raise ValueError(f"{name} must be >= {lowest}, got {value}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if on_failure not in ("raise", "skip"):
            raise ValueError(f"on_failure must be 'raise' or 'skip', got {on_failure!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.temperature = temperature
        self.top_p = top_p
        self.max_tokens = max_tokens
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.extra_body = dict(extra_body or {})
        self.on_failure = on_failure
        self.reasoning_template = reasoning_template
        self.cache = SampleCache(cache_path)
        self.stats = TeacherStats(cache_bad_lines=self.cache.bad_lines)
        self.failures: list[SampleFailure] = []
        self._stats_lock = threading.Lock()
        # One client for all worker threads: it is thread-safe and keeps connections alive.
        self._client = openai.OpenAI(
            base_url=base_url, api_key=api_key or _NO_KEY, max_retries=max_retries, timeout=timeout_s
        )

    # -- public API -----------------------------------------------------------------------------

    def sample(self, record: dict, n: int) -> list[str]:
        """``n`` teacher samples for one record (fewer if some were skipped on failure)."""
        return self.sample_batch([record], n)[0]

    def sample_batch(
        self, records: list[dict], n: int, progress: Callable[[int], None] | None = None
    ) -> list[list[str]]:
        """``n`` samples per record, requested in parallel, in sample-index order per record.

        ``progress(k)`` is called with the number of samples just finished (cached, fetched or
        given up on), so it can feed ``tqdm.update``; the total is ``len(records) * n``.
        """
        return [[self.render(c) for c in row] for row in self.sample_batch_full(records, n, progress)]

    def sample_batch_full(
        self, records: list[dict], n: int, progress: Callable[[int], None] | None = None
    ) -> list[list[Completion]]:
        """Like ``sample_batch`` but returns Completion objects (finish_reason, usage, reasoning)."""
        start = time.monotonic()
        try:
            return self._run_batch(records, n, progress)
        finally:
            with self._stats_lock:
                self.stats.seconds += time.monotonic() - start

    def render(self, completion: Completion) -> str:
        """The training text of a sample: the answer, with reasoning folded in when it came apart."""
        if not completion.reasoning:
            return completion.content
        return self.reasoning_template.format(reasoning=completion.reasoning, content=completion.content)

    def close(self) -> None:
        """Close the cache file and the HTTP connections."""
        self.cache.close()
        self._client.close()

    def __enter__(self) -> RemoteTeacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- batching -------------------------------------------------------------------------------

    def cache_key(self, messages: list[dict[str, Any]], sample_index: int) -> str:
        """sha256 over everything that determines a sample: change any of it and it is re-sampled."""
        payload = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "extra_body": self.extra_body,
            "sample_index": sample_index,
        }
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _plan(
        self, records: list[dict], n: int
    ) -> tuple[list[list[Completion | None]], dict[str, tuple[_Request, list[tuple[int, int]]]]]:
        """Fill cached samples; return the result grid and {key: (request, [(row, col), ...])}."""
        grid: list[list[Completion | None]] = [[None] * n for _ in records]
        todo: dict[str, tuple[_Request, list[tuple[int, int]]]] = {}
        for row, record in enumerate(records):
            # Convert every record before the first request: a missing image fails fast.
            messages = to_openai_messages(record["messages"], self.base_dir)
            for col in range(n):
                key = self.cache_key(messages, col)
                entry = self.cache.get(key)
                if entry is not None:
                    grid[row][col] = _completion_from_entry(entry, cached=True)
                elif key in todo:  # identical prompt twice in the batch: pay once
                    todo[key][1].append((row, col))
                else:
                    todo[key] = (_Request(key, record.get("id"), col, messages), [(row, col)])
        return grid, todo

    def _run_batch(
        self, records: list[dict], n: int, progress: Callable[[int], None] | None
    ) -> list[list[Completion]]:
        """Serve cached samples, fetch the rest with at most ``concurrency`` requests in flight."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        grid, todo = self._plan(records, n)
        hits = sum(c is not None for row in grid for c in row)
        with self._stats_lock:
            self.stats.cache_hits += hits
        if progress is not None and hits:
            progress(hits)
        if todo:
            self._fetch_all(grid, todo, progress)
        return [[c for c in row if c is not None] for row in grid]

    def _fetch_all(
        self,
        grid: list[list[Completion | None]],
        todo: dict[str, tuple[_Request, list[tuple[int, int]]]],
        progress: Callable[[int], None] | None,
    ) -> None:
        """Run all requests in a thread pool; fill ``grid``; stop early on failure in raise mode."""
        abort = threading.Event()  # per batch, so concurrent batches on one client stay independent
        pool = cf.ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="teacher")
        futures = {pool.submit(self._fetch_one, req, abort): slots for req, slots in todo.values()}
        try:
            for fut in cf.as_completed(futures):
                try:
                    completion = fut.result()  # TeacherError propagates in raise mode
                except _Aborted:
                    continue  # the failure that caused it is raised from its own future
                slots = futures[fut]
                for row, col in slots:
                    grid[row][col] = completion
                if progress is not None:  # given-up samples count too: they are done
                    progress(len(slots))
        finally:
            # On error: queued requests are dropped; running ones finish (retries included, as
            # openai cannot be stopped mid-call) and are cached by their worker: nothing paid is lost.
            abort.set()
            pool.shutdown(wait=True, cancel_futures=True)

    # -- one sample -----------------------------------------------------------------------------

    def _fetch_one(self, req: _Request, abort: threading.Event) -> Completion | None:
        """Fetch, cache and return one sample; None when it failed and on_failure is "skip"."""
        if abort.is_set():
            raise _Aborted(f"{self.url}: batch aborted after another sample failed")
        try:
            return self._request(req)
        except TeacherError as err:
            with self._stats_lock:
                self.stats.failures += 1
                if self.on_failure == "skip":
                    self.failures.append(SampleFailure(req.record_id, req.sample_index, str(err)))
            if self.on_failure == "raise":
                abort.set()  # set here, not in the caller, so no other request starts after this
                raise
            return None

    def _request(self, req: _Request) -> Completion:
        """One sample through openai (its retries included); cached the moment it is parsed."""
        try:
            raw = self._client.chat.completions.with_raw_response.create(
                model=self.model,
                messages=req.messages,  # type: ignore[arg-type]  (plain dicts in OpenAI form)
                temperature=self.temperature,
                top_p=self.top_p,
                max_tokens=self.max_tokens,
                n=1,
                extra_body=self.extra_body or None,  # merged last, so it may override the above
            )
        except openai.APIError as err:
            retries = _retries_taken(err)
            self._count_requests(retries)
            raise TeacherError(self._describe(err, retries + 1)) from err
        self._count_requests(raw.retries_taken)
        completion = self._parse(raw)
        self.cache.put(_entry_from_completion(req, completion, self.model))
        usage = completion.usage or {}
        with self._stats_lock:
            self.stats.prompt_tokens += _token_count(usage.get("prompt_tokens"))
            self.stats.completion_tokens += _token_count(usage.get("completion_tokens"))
        return completion

    def _count_requests(self, retries: int) -> None:
        """Count one sample's HTTP requests: its first attempt plus openai's retries."""
        with self._stats_lock:
            self.stats.requests += retries + 1
            self.stats.retries += retries

    def _describe(self, err: openai.APIError, attempts: int) -> str:
        """A TeacherError message: endpoint, model, attempts, and what went wrong in words."""
        if isinstance(err, openai.APIStatusError):
            what = f"HTTP {err.status_code}: {_server_message(err)}"
        elif isinstance(err, openai.APITimeoutError):
            what = f"request timed out (timeout_s={self.timeout_s})"
        elif isinstance(err, openai.APIConnectionError):
            cause = err.__cause__
            what = f"connection failed: {type(cause).__name__}: {cause}" if cause else "connection failed"
        else:
            what = f"{type(err).__name__}: {err}"
        where = f"{self.url} (model {self.model!r})"
        if attempts > 1:
            return f"{where}: gave up after {attempts} attempts; last error: {what}"
        return f"{where}: {what}"

    def _parse(self, raw: Any) -> Completion:  # raw: openai's with_raw_response result
        """Completion from a 200; a garbled one is a TeacherError (a complete 200 is not retried)."""
        try:
            data = raw.parse()
            choice = data.choices[0]
            message = choice.message
            content, finish_reason = message.content or "", choice.finish_reason
            usage = data.usage.to_dict() if data.usage is not None else None
        except (ValueError, AttributeError, IndexError, TypeError) as err:
            body = raw.http_response.text[:200]
            raise TeacherError(f"{self.url} (model {self.model!r}): malformed response: {body!r}") from err
        reasoning = getattr(message, "reasoning_content", None) or getattr(message, "reasoning", None)
        return Completion(
            content=content,
            finish_reason=finish_reason,
            usage=usage,
            reasoning=reasoning if isinstance(reasoning, str) else None,
        )


def _entry_from_completion(req: _Request, completion: Completion, model: str) -> dict[str, Any]:
    """The cache line of a finished sample (id/index/model only help a human reading the file)."""
    entry: dict[str, Any] = {
        "key": req.key,
        "id": req.record_id,
        "sample_index": req.sample_index,
        "model": model,
        "content": completion.content,
        "finish_reason": completion.finish_reason,
    }
    if completion.usage is not None:
        entry["usage"] = completion.usage
    if completion.reasoning is not None:
        entry["reasoning"] = completion.reasoning
    return entry


def _completion_from_entry(entry: dict[str, Any], cached: bool) -> Completion:
    """Rebuild a Completion from a cache line."""
    return Completion(
        content=entry["content"],
        finish_reason=entry.get("finish_reason"),
        usage=entry.get("usage"),
        reasoning=entry.get("reasoning"),
        cached=cached,
    )
