"""RemoteTeacher against a real local OpenAI-compatible server (thinkvl.distill.openai_server).

No mocks: every test starts a ThreadingHTTPServer on 127.0.0.1 and talks HTTP to it through the
openai client; faults (500s, 400s, slow replies, bodies cut off or garbled, a port nobody listens
on) are injected server-side through ServerFaults and counted there.
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import openai
import pytest
from PIL import Image

from thinkvl.distill.openai_server import ServerFaults, serve, stop
from thinkvl.distill.remote import RemoteTeacher, TeacherError, to_openai_messages

IMAGE_SIZE = (13, 7)  # odd, non-square: a swapped or resized image would show


def _user_text(messages: list[dict[str, Any]]) -> str:
    """Text of the last user turn, whatever its content form."""
    content = messages[-1]["content"]
    if isinstance(content, str):
        return content
    return " ".join(p["text"] for p in content if p["type"] == "text")


def echo_generate(messages: list[dict], n: int, temperature: float, max_tokens: int) -> list[str]:
    """Deterministic echo of the request; fails the request (-> 500) if an image is not a PIL image."""
    sizes = []
    for msg in messages:
        if isinstance(msg["content"], list):
            for part in msg["content"]:
                if part["type"] == "image":
                    assert isinstance(part["image"], Image.Image)
                    sizes.append("x".join(map(str, part["image"].size)))
    text = f"echo[{_user_text(messages)}] images={sizes} t={temperature} mt={max_tokens}"
    return [text] * n


def counting_generate(server: str) -> Callable[..., list[str]]:
    """A generate_fn whose every output is unique (server name + counter), so equal outputs can
    only come from a cache."""
    counter = itertools.count()

    def generate(messages: list[dict], n: int, temperature: float, max_tokens: int) -> list[str]:
        return [f"{_user_text(messages)}@{server}#{next(counter)}" for _ in range(n)]

    return generate


@pytest.fixture
def start_server():
    """Start servers on free loopback ports; stop them all at teardown."""
    started = []

    def _start(generate_fn=echo_generate, **kwargs: Any) -> tuple[ServerFaults, str]:
        server, thread, url = serve(generate_fn, **kwargs)
        started.append((server, thread))
        return server.faults, url

    yield _start
    for server, thread in started:
        stop(server, thread)


# Error answers ask for a 10 ms wait (openai honours retry-after-ms), so status retries are fast;
# timeouts and dropped connections carry no header and wait openai's own 0.5 s, 1 s, ...
FAST_RETRY_MS = 10


def _teacher(url: str, **kwargs: Any) -> RemoteTeacher:
    kwargs.setdefault("timeout_s", 5.0)
    return RemoteTeacher(url, "thinkvl-tiny", **kwargs)


def _text_records(k: int) -> list[dict]:
    return [
        {"id": f"q{i}", "messages": [{"role": "user", "content": f"what is {i}+{i}?"}], "answer": str(2 * i)}
        for i in range(k)
    ]


def _image_record(path: str) -> dict:
    content = [{"type": "image", "image": path}, {"type": "text", "text": "count the dots"}]
    return {
        "id": "img",
        "messages": [
            {"role": "system", "content": "think step by step"},
            {"role": "user", "content": content},
        ],
        "answer": "3",
    }


# ----------------------------------------------------------------------------------------------


def test_round_trip_text_and_image(start_server, tmp_path: Path) -> None:
    Image.new("RGB", IMAGE_SIZE, "red").save(tmp_path / "dots.png")
    faults, url = start_server()
    teacher = _teacher(url, base_dir=tmp_path, temperature=0.7, max_tokens=64)
    records = [_text_records(1)[0], _image_record("dots.png")]  # relative path -> base_dir
    out = teacher.sample_batch(records, n=2)
    assert out[0] == ["echo[what is 0+0?] images=[] t=0.7 mt=64"] * 2
    assert out[1] == ["echo[count the dots] images=['13x7'] t=0.7 mt=64"] * 2
    assert faults.requests == 4  # one HTTP call per sample
    assert teacher.stats.requests == 4 and teacher.stats.cache_hits == 0
    assert teacher.stats.completion_tokens > 0  # usage is read back
    assert teacher.sample(_image_record(str(tmp_path / "dots.png")), n=1) == out[1][:1]


def test_messages_conversion_sniffs_mime(tmp_path: Path) -> None:
    Image.new("RGB", IMAGE_SIZE).save(tmp_path / "photo.png", format="JPEG")  # lying extension
    msgs = to_openai_messages(_image_record("photo.png")["messages"], base_dir=tmp_path)
    assert msgs[0] == {"role": "system", "content": "think step by step"}  # string passes through
    image_part, text_part = msgs[1]["content"]
    url = image_part["image_url"]["url"]
    assert image_part["type"] == "image_url" and url.startswith("data:image/jpeg;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == (tmp_path / "photo.png").read_bytes()
    assert text_part == {"type": "text", "text": "count the dots"}
    with pytest.raises(FileNotFoundError, match="missing.png"):
        to_openai_messages(_image_record("missing.png")["messages"], base_dir=tmp_path)


def test_concurrency_limit_is_used_and_respected(start_server) -> None:
    faults, url = start_server(faults=ServerFaults(sleep_s=0.2))
    teacher = _teacher(url, concurrency=4)
    done: list[int] = []
    out = teacher.sample_batch(_text_records(2), n=4, progress=done.append)
    assert [len(row) for row in out] == [4, 4]
    assert sum(done) == 8
    assert 2 <= faults.max_in_flight <= 4


@pytest.mark.parametrize("status", [500, 503, 429])
def test_transient_status_is_retried(start_server, status: int) -> None:
    faults, url = start_server(faults=ServerFaults(fail_first=2, fail_status=status,
                                                   retry_after_ms=FAST_RETRY_MS))
    teacher = _teacher(url)
    assert teacher.sample(_text_records(1)[0], n=1) == ["echo[what is 0+0?] images=[] t=1.0 mt=1024"]
    assert faults.requests == 3
    assert teacher.stats.retries == 2 and teacher.stats.requests == 3 and teacher.stats.failures == 0


def test_client_error_is_not_retried(start_server) -> None:
    faults, url = start_server(faults=ServerFaults(fail_first=1, fail_status=400))
    teacher = _teacher(url)
    with pytest.raises(TeacherError) as info:
        teacher.sample(_text_records(1)[0], n=1)
    message = str(info.value)
    assert "HTTP 400" in message and f"{url}/chat/completions" in message and "'thinkvl-tiny'" in message
    assert "injected failure" in message  # the server's own message is relayed
    assert isinstance(info.value.__cause__, openai.BadRequestError)  # openai's typed error is kept
    assert faults.requests == 1 and teacher.stats.retries == 0 and teacher.stats.failures == 1


def test_timeout_retried_then_raises(start_server) -> None:
    faults, url = start_server(faults=ServerFaults(sleep_s=0.6))
    teacher = _teacher(url, timeout_s=0.3, max_retries=1)
    with pytest.raises(TeacherError, match="gave up after 2 attempts.*timed out") as info:
        teacher.sample(_text_records(1)[0], n=1)
    assert isinstance(info.value.__cause__, openai.APITimeoutError)
    assert faults.requests == 2 and teacher.stats.retries == 1 and teacher.stats.failures == 1


def test_timeout_skip_counts_and_rerun_fills_in(start_server, tmp_path: Path) -> None:
    faults, url = start_server(faults=ServerFaults(sleep_s=0.6))
    cache = tmp_path / "cache.jsonl"
    teacher = _teacher(url, timeout_s=0.3, max_retries=1, on_failure="skip", cache_path=cache)
    assert teacher.sample_batch(_text_records(1), n=2) == [[]]
    assert teacher.stats.failures == 2 and len(teacher.failures) == 2
    assert {f.sample_index for f in teacher.failures} == {0, 1} and teacher.failures[0].record_id == "q0"
    faults.sleep_s = 0.0  # the server recovers: failed samples were not cached, so they are retried
    assert len(teacher.sample_batch(_text_records(1), n=2)[0]) == 2


def test_connection_refused_is_retried(start_server) -> None:
    server, thread, url = serve(echo_generate)
    stop(server, thread)  # nothing listens on that port any more
    teacher = _teacher(url, max_retries=2)
    with pytest.raises(TeacherError, match="gave up after 3 attempts; last error: connection failed") as info:
        teacher.sample(_text_records(1)[0], n=1)
    assert isinstance(info.value.__cause__, openai.APIConnectionError)
    assert teacher.stats.retries == 2 and teacher.stats.requests == 3


def test_api_key_from_env_sent_as_bearer(start_server, monkeypatch: pytest.MonkeyPatch) -> None:
    faults, url = start_server(api_key="s3cret")
    monkeypatch.setenv("THINKVL_TEACHER_API_KEY", "s3cret")
    assert len(_teacher(url).sample(_text_records(1)[0], n=1)) == 1
    with pytest.raises(TeacherError, match="HTTP 401"):
        _teacher(url, api_key="wrong").sample(_text_records(1)[0], n=1)
    assert faults.requests == 2  # the 401 was not retried
    # openai's own $OPENAI_API_KEY is never sent: a key for one provider must not reach another.
    monkeypatch.delenv("THINKVL_TEACHER_API_KEY")
    monkeypatch.setenv("OPENAI_API_KEY", "s3cret")
    with pytest.raises(TeacherError, match="HTTP 401"):
        _teacher(url).sample(_text_records(1)[0], n=1)
    assert faults.requests == 3


def test_cache_means_no_second_payment(start_server, tmp_path: Path) -> None:
    cache = tmp_path / "teacher.jsonl"
    faults1, url1 = start_server(counting_generate("first"))
    first = _teacher(url1, cache_path=cache).sample_batch(_text_records(3), n=2)
    assert faults1.requests == 6
    faults2, url2 = start_server(counting_generate("second"))  # a fresh server would answer differently
    again = _teacher(url2, cache_path=cache)
    assert again.sample_batch(_text_records(3), n=2) == first
    assert faults2.requests == 0 and again.stats.cache_hits == 6 and again.stats.requests == 0
    # A changed sampling parameter is a different request: it is not served from the cache.
    assert _teacher(url2, cache_path=cache, temperature=0.5).sample_batch(_text_records(3), n=2) != first
    assert faults2.requests == 6


def test_interrupted_build_resumes_only_missing(start_server, tmp_path: Path) -> None:
    cache = tmp_path / "teacher.jsonl"
    faults1, url1 = start_server(counting_generate("first"))
    first = _teacher(url1, cache_path=cache, concurrency=1).sample_batch(_text_records(3), n=2)
    lines = cache.read_text().splitlines(keepends=True)
    assert len(lines) == 6
    # Simulate a kill mid-write: three complete lines, then half of the fourth without its newline.
    cache.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    kept = {json.loads(line)["content"] for line in lines[:3]}

    faults2, url2 = start_server(counting_generate("second"))
    resumed_teacher = _teacher(url2, cache_path=cache)
    resumed = resumed_teacher.sample_batch(_text_records(3), n=2)
    assert faults2.requests == 3  # only the three missing samples were requested
    assert resumed_teacher.stats.cache_bad_lines == 1 and resumed_teacher.stats.cache_hits == 3
    flat_first = [s for row in first for s in row]
    flat_resumed = [s for row in resumed for s in row]
    assert [a == b for a, b in zip(flat_first, flat_resumed)].count(True) == 3
    assert kept <= set(flat_resumed)
    # The file is whole again: six parseable lines, and a third client pays for nothing.
    assert len([json.loads(line)["key"] for line in cache.read_text().splitlines()]) == 6
    third = _teacher(url2, cache_path=cache)
    assert third.sample_batch(_text_records(3), n=2) == resumed and faults2.requests == 3


def test_server_rejects_malformed_requests(start_server) -> None:
    faults, url = start_server(model_name="tiny-test")
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")

    def call(method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        status, data = resp.status, json.loads(resp.read())
        conn.close()
        return status, data

    assert call("GET", "/v1/models")[1]["data"][0]["id"] == "tiny-test"
    bad_bodies = [
        b"not json",
        b"[]",
        json.dumps({"messages": []}).encode(),
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 0}).encode(),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url",
                    "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}).encode(),
    ]
    for body in bad_bodies:
        status, data = call("POST", "/v1/chat/completions", body)
        assert status == 400 and data["error"]["message"], body
    ok = json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 3}).encode()
    status, data = call("POST", "/v1/chat/completions", ok)
    assert status == 200 and len(data["choices"]) == 3
    assert data["choices"][0]["finish_reason"] == "stop" and data["usage"]["total_tokens"] > 0


@pytest.mark.parametrize("concurrency", [1, 4])
def test_batch_stops_early_in_raise_mode(start_server, concurrency: int) -> None:
    faults, url = start_server(faults=ServerFaults(fail_first=100, fail_status=400))
    teacher = _teacher(url, concurrency=concurrency)
    with pytest.raises(TeacherError, match="HTTP 400"):  # the real cause, not "aborted"
        teacher.sample_batch(_text_records(5), n=2)
    # Queued samples are dropped once one fails; only requests already running may still go out.
    assert 1 <= faults.requests <= concurrency
    assert teacher.stats.failures == faults.requests


def test_cache_keeps_complete_last_line_without_newline(tmp_path: Path) -> None:
    cache = tmp_path / "teacher.jsonl"
    good = [json.dumps({"key": k, "content": f"text {k}"}) for k in "abc"]
    cache.write_text(good[0] + "\n" + "{broken\n" + good[1] + "\n" + good[2])  # no final newline
    teacher = RemoteTeacher("http://127.0.0.1:9/v1", "m", cache_path=cache)
    assert set(teacher.cache.entries) == {"a", "b", "c"} and teacher.stats.cache_bad_lines == 1
    assert cache.read_text().endswith(good[2] + "\n")  # newline restored, so appends stay line-wise


# ----------------------------------------------------------------------------------------------
# openai's retries, counted server-side; nothing received is lost or paid twice


@pytest.mark.parametrize("max_retries", [0, 3])
def test_retry_count_is_honoured(start_server, max_retries: int) -> None:
    faults, url = start_server(faults=ServerFaults(fail_first=100, fail_status=503,
                                                   retry_after_ms=FAST_RETRY_MS))
    teacher = _teacher(url, max_retries=max_retries)
    with pytest.raises(TeacherError) as info:
        teacher.sample(_text_records(1)[0], n=1)
    assert faults.requests == max_retries + 1  # the server saw exactly the allowed attempts
    assert isinstance(info.value.__cause__, openai.InternalServerError)
    gave_up = f"gave up after {max_retries + 1} attempts; last error: " if max_retries else ""
    assert f"{url}/chat/completions (model 'thinkvl-tiny'): {gave_up}HTTP 503: injected failure" in str(info.value)
    assert teacher.stats.requests == max_retries + 1 and teacher.stats.retries == max_retries


def test_server_requested_wait_is_kept(start_server) -> None:
    # 900 ms: well above openai's own first wait (0.375-0.5 s), so only the header explains it.
    faults, url = start_server(faults=ServerFaults(fail_first=1, fail_status=429, retry_after_ms=900))
    start = time.monotonic()
    assert len(_teacher(url).sample(_text_records(1)[0], n=1)) == 1
    assert time.monotonic() - start >= 0.9  # the rate limit's retry-after-ms was waited out
    assert faults.requests == 2


def test_body_cut_off_mid_transfer_is_retried(start_server, tmp_path: Path) -> None:
    faults, url = start_server(faults=ServerFaults(fail_first=1, fail_kind="drop"))
    teacher = _teacher(url, cache_path=tmp_path / "cache.jsonl")
    assert teacher.sample(_text_records(1)[0], n=1) == ["echo[what is 0+0?] images=[] t=1.0 mt=1024"]
    assert faults.requests == 2 and teacher.stats.retries == 1 and teacher.stats.failures == 0
    assert len((tmp_path / "cache.jsonl").read_text().splitlines()) == 1


def test_garbled_body_is_not_retried_nor_cached(start_server, tmp_path: Path) -> None:
    # A complete 200 was received (and paid for): asking again would pay twice for the same call.
    faults, url = start_server(faults=ServerFaults(fail_first=1, fail_kind="garbled"))
    cache = tmp_path / "cache.jsonl"
    teacher = _teacher(url, cache_path=cache, on_failure="skip")
    assert teacher.sample_batch(_text_records(1), n=1) == [[]]
    assert faults.requests == 1 and teacher.stats.retries == 0 and teacher.stats.failures == 1
    assert "(model 'thinkvl-tiny'): malformed response: '{\"choices\"" in teacher.failures[0].error
    assert not cache.exists()  # nothing unusable was written
    assert len(teacher.sample_batch(_text_records(1), n=1)[0]) == 1  # a rerun asks again
    assert faults.requests == 2 and len(cache.read_text().splitlines()) == 1
    faults.fail_first = 3  # raise mode names the cause too
    with pytest.raises(TeacherError, match="malformed response"):
        _teacher(url).sample(_text_records(2)[1], n=1)


def test_response_is_cached_before_a_callback_can_fail(start_server, tmp_path: Path) -> None:
    cache = tmp_path / "cache.jsonl"
    # 0.2 s per answer: the batch is still running when the first callback fails.
    faults1, url1 = start_server(counting_generate("first"), faults=ServerFaults(sleep_s=0.2))

    def progress(k: int) -> None:
        raise RuntimeError("progress bar crashed")

    with pytest.raises(RuntimeError, match="progress bar crashed"):
        _teacher(url1, cache_path=cache, concurrency=2).sample_batch(_text_records(3), n=2, progress=progress)
    answered = faults1.requests
    assert 1 <= answered < 6  # the batch stopped early...
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(lines) == answered  # ...and every answer the server sent is in the cache
    faults2, url2 = start_server(counting_generate("second"))
    resumed = _teacher(url2, cache_path=cache).sample_batch(_text_records(3), n=2)
    assert faults2.requests == 6 - answered  # the rest is asked for, nothing twice
    assert {line["content"] for line in lines} <= {s for row in resumed for s in row}


def test_identical_prompts_in_a_batch_are_paid_once(start_server) -> None:
    faults, url = start_server(counting_generate("only"))
    record = _text_records(1)[0]
    out = _teacher(url).sample_batch([record, dict(record, id="copy")], n=2)
    assert out[0] == out[1] and len(set(out[0])) == 2 and faults.requests == 2


def test_reasoning_field_is_folded_back_and_cached(start_server, tmp_path: Path) -> None:
    def think(messages: list[dict], n: int, temperature: float, max_tokens: int) -> list[str]:
        return ["<think>\nplan, then check\n</think>\n\\boxed{4}"] * n

    faults, url = start_server(think, split_reasoning=True)  # as vLLM's --reasoning-parser does
    cache = tmp_path / "cache.jsonl"
    (sample,) = _teacher(url, cache_path=cache).sample_batch_full(_text_records(1), n=1)[0]
    assert (sample.reasoning, sample.content) == ("plan, then check", "\\boxed{4}")
    assert sample.usage is not None and sample.usage["completion_tokens"] > 0
    again = _teacher(url, cache_path=cache)
    assert again.sample(_text_records(1)[0], n=1) == ["<think>\nplan, then check\n</think>\n\\boxed{4}"]
    assert faults.requests == 1  # the second answer came from the cache, reasoning included


def test_missing_openai_names_the_extra(tmp_path: Path) -> None:
    # A real missing package: openai is made unimportable before thinkvl imports it.
    code = ("import sys; sys.modules['openai'] = None\n"
            "from thinkvl.distill.remote import RemoteTeacher\n"
            "RemoteTeacher('http://127.0.0.1:9/v1', 'm')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "ImportError: the remote teacher needs the openai package: pip install 'thinkvl[teacher]'" in proc.stderr
