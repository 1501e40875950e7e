"""A minimal OpenAI-compatible chat-completions server around any generate function.

It lets a user serve a (tiny) model to the Stage 2 teacher client, and gives tests a real HTTP
server with fault injection (fail the first N requests, sleep per request, count requests).
Stdlib ``http.server`` only; images arrive as ``data:`` URLs and reach ``generate_fn`` as PIL images.

    server, thread, url = serve(my_generate)      # url = "http://127.0.0.1:<port>/v1"
    ...
    stop(server, thread)
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Literal

from PIL import Image

log = logging.getLogger(__name__)

# generate_fn(messages, n, temperature, max_tokens) -> n texts, or (text, finish_reason) pairs.
GenerateFn = Callable[[list[dict], int, float, int], list[str | tuple[str, str]]]

_MAX_BODY_BYTES = 64 * 1024 * 1024  # enough for a few large base64 images per request
_MAX_N = 128
_DEFAULT_MAX_TOKENS = 1024


class BadRequest(ValueError):
    """A malformed request; answered with HTTP 400 and the message."""


@dataclass
class ServerFaults:
    """Fault-injection knobs (set before or during a run) and request counters (read by tests).

    fail_first: the first N chat requests fail, in the way ``fail_kind`` names:
        ``"status"``: an error answer with HTTP ``fail_status`` (default 500);
        ``"drop"``: a 200 whose body is cut off half-way, then the connection closes;
        ``"garbled"``: a complete 200 whose body is not JSON.
    retry_after_ms: when set, error answers carry ``retry-after-ms`` (the wait a client should keep).
    sleep_s: every chat request sleeps this long before answering (to test timeouts/concurrency).
    requests / in_flight / max_in_flight: chat requests received, running now, most at once.
    """

    fail_first: int = 0
    fail_status: int = 500
    fail_kind: Literal["status", "drop", "garbled"] = "status"
    retry_after_ms: int | None = None
    sleep_s: float = 0.0
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def enter(self) -> int:
        """Count a request as started; returns its 1-based number."""
        with self._lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.requests

    def leave(self) -> None:
        """Count a request as finished."""
        with self._lock:
            self.in_flight -= 1


class TeacherHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer carrying what the handler needs; daemon threads so shutdown never hangs."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        generate_fn: GenerateFn,
        model_name: str,
        faults: ServerFaults,
        api_key: str | None,
        count_tokens: Callable[[str], int],
        split_reasoning: bool = False,
    ) -> None:
        super().__init__(address, _Handler)
        self.generate_fn = generate_fn
        self.model_name = model_name
        self.faults = faults
        self.api_key = api_key
        self.count_tokens = count_tokens
        self.split_reasoning = split_reasoning


# ----------------------------------------------------------------------------------------------
# Request parsing


def decode_data_url(url: str) -> Image.Image:
    """PIL image from a ``data:<mime>;base64,<data>`` URL (remote URLs are refused: no fetching)."""
    if not url.startswith("data:"):
        raise BadRequest(f"only data: image URLs are supported, got {url[:40]!r}")
    header, sep, data = url.partition(",")
    if not sep or ";base64" not in header:
        raise BadRequest("image data URL must be base64-encoded")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()  # decode now, so a corrupt image is a 400 here, not a 500 in generate_fn
    except (binascii.Error, OSError, ValueError) as err:
        raise BadRequest(f"cannot decode image: {err}") from err
    return image


def _parse_part(part: Any) -> dict[str, Any]:
    """One OpenAI content part in the record format: text as is, image_url -> PIL image."""
    if not isinstance(part, dict):
        raise BadRequest("content parts must be objects")
    kind = part.get("type")
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else image_url
        if not isinstance(url, str):
            raise BadRequest("image_url part needs image_url.url")
        return {"type": "image", "image": decode_data_url(url)}
    raise BadRequest(f"unsupported content part {kind!r}")


def parse_messages(raw: Any) -> list[dict[str, Any]]:
    """Validate OpenAI messages and convert them to the record format with PIL images."""
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' must be a non-empty list")
    out = []
    for msg in raw:
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise BadRequest("each message needs a string 'role'")
        content = msg.get("content")
        if isinstance(content, list):
            content = [_parse_part(p) for p in content]
        elif not isinstance(content, str):
            raise BadRequest("message 'content' must be a string or a list of parts")
        out.append({"role": msg["role"], "content": content})
    return out


def _number(body: dict, name: str, default: float, lo: float, integer: bool = False) -> Any:
    """A numeric field with a default and a lower bound (bool is rejected: it is an int in Python)."""
    value = body.get(name, default)
    kinds = (int,) if integer else (int, float)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kinds) or value < lo:
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"'{name}' must be {kind} >= {lo}, got {value!r}")
    return value


def parse_request(body: Any) -> tuple[list[dict], int, float, int]:
    """(messages, n, temperature, max_tokens) from a chat-completions body, or BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if body.get("stream"):
        raise BadRequest("streaming is not supported")
    messages = parse_messages(body.get("messages"))
    n = _number(body, "n", 1, 1, integer=True)
    if n > _MAX_N:
        raise BadRequest(f"'n' must be <= {_MAX_N}")
    temperature = float(_number(body, "temperature", 1.0, 0.0))
    # Newer OpenAI clients send max_completion_tokens instead of max_tokens.
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number(body, name, _DEFAULT_MAX_TOKENS, 1, integer=True)
    return messages, n, temperature, max_tokens


def _prompt_text(messages: list[dict[str, Any]]) -> str:
    """All text of the prompt, for the approximate prompt token count."""
    parts = []
    for msg in messages:
        content = msg["content"]
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(p["text"] for p in content if p["type"] == "text")
    return "\n".join(parts)


def split_think(text: str) -> dict[str, str]:
    """``reasoning_content`` and ``content`` of ``<think>r</think>c``, as servers with a reasoning
    parser (vLLM, SGLang) answer; text without a closing ``</think>`` is all content."""
    head, sep, tail = text.partition("</think>")
    if not sep:
        return {"content": text}
    return {"reasoning_content": head.removeprefix("<think>").strip("\n"), "content": tail.lstrip("\n")}


def build_response(
    outputs: list[str | tuple[str, str]],
    model: str,
    prompt_tokens: int,
    count: Callable[[str], int],
    split_reasoning: bool = False,
) -> dict[str, Any]:
    """The chat.completion object for the generated outputs."""
    choices, completion_tokens = [], 0
    for i, out in enumerate(outputs):
        text, finish = (out, "stop") if isinstance(out, str) else out
        completion_tokens += count(text)
        message = {"role": "assistant", **(split_think(text) if split_reasoning else {"content": text})}
        choices.append({"index": i, "message": message, "finish_reason": finish})
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


# ----------------------------------------------------------------------------------------------
# Handler


class _Handler(BaseHTTPRequestHandler):
    """Routes ``POST /v1/chat/completions`` and ``GET /v1/models``."""

    server: TeacherHTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive for clients that reuse connections

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        # The stdlib writes every request to stderr; route it to logging instead.
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        if self.path.rstrip("/") != "/v1/models":
            return self._error(404, f"no route GET {self.path}")
        model = {"id": self.server.model_name, "object": "model", "owned_by": "thinkvl"}
        self._json(200, {"object": "list", "data": [model]})

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._discard_body()
            return self._error(404, f"no route POST {self.path}")
        faults = self.server.faults
        number = faults.enter()
        self._counted = True
        try:
            self._chat(number)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. its timeout fired during an injected sleep)
        finally:
            self._uncount()

    def _uncount(self) -> None:
        """End this request's in-flight count (once): before its response goes out, because a client
        may send its next request as soon as it has read this one, before this handler returns."""
        if getattr(self, "_counted", False):
            self._counted = False
            self.server.faults.leave()

    def _chat(self, number: int) -> None:
        """Handle one chat request: read body, apply faults, auth, parse, generate, answer."""
        faults, srv = self.server.faults, self.server
        try:
            body = self._read_json()
        except BadRequest as err:
            return self._error(400, str(err))
        if faults.sleep_s > 0:
            time.sleep(faults.sleep_s)
        if number <= faults.fail_first:
            return self._fail(f"injected failure {number}/{faults.fail_first}")
        if srv.api_key is not None and self.headers.get("Authorization") != f"Bearer {srv.api_key}":
            return self._error(401, "invalid or missing API key")
        try:
            messages, n, temperature, max_tokens = parse_request(body)
            outputs = srv.generate_fn(messages, n, temperature, max_tokens)
        except ValueError as err:  # BadRequest, or generate_fn rejecting its input
            return self._error(400, str(err))
        except Exception as err:  # a bug in generate_fn: report it, keep serving
            log.exception("generate_fn failed")
            return self._error(500, f"generate_fn failed: {type(err).__name__}: {err}")
        if len(outputs) != n:
            return self._error(500, f"generate_fn returned {len(outputs)} outputs for n={n}")
        prompt_tokens = srv.count_tokens(_prompt_text(messages))
        count, split = srv.count_tokens, srv.split_reasoning
        self._json(200, build_response(outputs, srv.model_name, prompt_tokens, count, split))

    def _read_json(self) -> Any:
        """The request body parsed as JSON; BadRequest on a missing length, oversize or bad JSON."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True  # cannot find the end of the body: drop the connection
            raise BadRequest("missing or invalid Content-Length") from None
        if length < 0 or length > _MAX_BODY_BYTES:
            self.close_connection = True
            raise BadRequest(f"body of {length} bytes exceeds the {_MAX_BODY_BYTES}-byte limit")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except ValueError as err:
            raise BadRequest(f"body is not valid JSON: {err}") from err

    def _discard_body(self) -> None:
        """Read and drop a body we will not use, so a keep-alive connection stays in sync."""
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.close_connection = True
            return
        self.rfile.read(min(length, _MAX_BODY_BYTES))

    def _fail(self, message: str) -> None:
        """An injected failure of the kind ``faults.fail_kind`` names."""
        kind = self.server.faults.fail_kind
        if kind == "status":
            return self._error(self.server.faults.fail_status, message)
        body = json.dumps({"choices": [{"message": {"content": message}}]}).encode("utf-8")
        body = body[: len(body) // 2]  # valid JSON up to here, then nothing that closes it
        self._uncount()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        # drop: announce the whole length but close after half of it, as a cut connection would.
        self.send_header("Content-Length", str(2 * len(body) if kind == "drop" else len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = kind == "drop"

    def _error(self, status: int, message: str) -> None:
        """An OpenAI-style error object."""
        kind = "invalid_request_error" if status < 500 else "server_error"
        payload = {"error": {"message": message, "type": kind, "code": status}}
        headers = {"Retry-After": "0"} if status == 429 else {}
        if self.server.faults.retry_after_ms is not None:
            headers["retry-after-ms"] = str(self.server.faults.retry_after_ms)
        self._json(status, payload, headers)

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        """Send a JSON response with an explicit length (required for HTTP/1.1 keep-alive)."""
        data = json.dumps(payload).encode("utf-8")
        self._uncount()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


# ----------------------------------------------------------------------------------------------
# Entry points


def _whitespace_tokens(text: str) -> int:
    """Approximate token count (whitespace words) for servers without a tokenizer."""
    return len(text.split())


def serve(
    generate_fn: GenerateFn,
    host: str = "127.0.0.1",
    port: int = 0,
    model_name: str = "thinkvl-tiny",
    faults: ServerFaults | None = None,
    api_key: str | None = None,
    count_tokens: Callable[[str], int] = _whitespace_tokens,
    split_reasoning: bool = False,
) -> tuple[TeacherHTTPServer, threading.Thread, str]:
    """Start the server in a background thread; returns (server, thread, base_url ending in /v1).

    ``port=0`` picks a free port. ``server.faults`` is the live fault/counter object. With
    ``api_key`` set, requests without ``Authorization: Bearer <api_key>`` get 401.
    ``count_tokens`` fills ``usage`` (whitespace words by default: approximate). With
    ``split_reasoning``, a ``<think>...</think>`` block goes to ``message.reasoning_content``.
    """
    server = TeacherHTTPServer(
        (host, port), generate_fn, model_name, faults or ServerFaults(), api_key, count_tokens,
        split_reasoning,
    )
    # A short poll interval makes shutdown() return in ~50 ms instead of the default 0.5 s.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="openai-server", daemon=True
    )
    thread.start()
    bound_host, bound_port = server.server_address[:2]
    url_host = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    return server, thread, f"http://{url_host}:{bound_port}/v1"


def stop(server: TeacherHTTPServer, thread: threading.Thread) -> None:
    """Stop serving, close the socket and wait for the serving thread."""
    server.shutdown()
    server.server_close()
    thread.join()
