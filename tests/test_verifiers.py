"""Verifiers: answer extraction, equivalence both ways, think format, hostile inputs, plug-ins."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from thinkvl.rewards import verifiers
from thinkvl.rewards.verifiers import (
    BUILTIN_VERIFIERS,
    exact_verifier,
    extract_answer,
    format_ok,
    format_verifier,
    get_verifier,
    math_verifier,
    numeric_verifier,
    safe_score,
    think_math_verifier,
)

TIME_LIMIT_S = 3.0
GUARD_LIMIT_S = 1.0  # below the sympy budget: a case this fast never needed a helper kill
FIVE_MB = "x" * 5_000_000 + " \\boxed{1}"  # correct answer at the end, but a runaway response


def _timed(fn: Callable[..., float], *args: object) -> tuple[float, float]:
    """(result, wall seconds) of ``fn(*args)`` in the calling thread."""
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def _in_thread(fn: Callable[..., float], *args: object) -> tuple[float, float]:
    """Like ``_timed`` but from a worker thread, where signal.alarm timeouts cannot work."""
    out: list[tuple[float, float]] = []
    worker = threading.Thread(target=lambda: out.append(_timed(fn, *args)))
    worker.start()
    worker.join()
    assert out, "the verifier raised inside the worker thread"
    return out[0]


# --- extract_answer ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("so \\boxed{3}", "3"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}} done", "\\frac{\\sqrt{3}}{2}"),  # nested braces
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{\\left\\{ x \\right.}", "\\left\\{ x \\right."),  # an escaped \{ is not a brace
        ("first \\boxed{1}, then \\boxed{2}", "2"),  # last boxed wins
        ("\\boxed{5}\nAnswer: 6", "5"),  # boxed beats an answer line
        ("Answer: 7", "7"),
        ("We get 40 + 2.\nThe answer is 42.", "42."),
        ("**Answer:** 7", "7"),
        ("Answer: 1\nhmm, no.\nFinal answer: 2", "2"),  # last answer line wins
        ("<think>maybe \\boxed{9}</think>The answer is 3", "3"),  # think part is ignored
        ("  <think>x</think>\n\\boxed{ 4 }", "4"),
    ],
)
def test_extract_answer(response: str, expected: str) -> None:
    assert extract_answer(response) == expected


@pytest.mark.parametrize(
    "response",
    [
        "",
        "I think it is three",
        "<think></think>",
        "<think>Answer: 9</think>",  # answer only inside the think block
        "<think>\\boxed{9}</think>  ",
        "<think>still thinking \\boxed{9}",  # truncated: never left the think block
        "\\boxed{}",
        "\\boxed{   }",
        "\\boxed{3",  # unclosed box
        "\\boxed{3} and then \\boxed{",  # the last box is unfinished
        FIVE_MB,
    ],
)
def test_extract_answer_none(response: str) -> None:
    assert extract_answer(response) is None


# --- format_ok ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "ok"),
    [
        ("<think>2+2=4</think>\\boxed{4}", True),
        ("\n  <think>reason</think>\nThe answer is 4.", True),
        ("\\boxed{4}", False),  # no think block
        ("Sure! <think>r</think>\\boxed{4}", False),  # text before the think block
        ("<think> </think>\\boxed{4}", False),  # empty reasoning
        ("<think>r</think>   ", False),  # nothing after the think block
        ("<think>r</think>I give up.", False),  # no extractable answer
        ("<think>a</think><think>b</think>\\boxed{4}", False),  # two think blocks
        ("<think>a</think>\\boxed{4}</think>", False),
    ],
)
def test_format_ok(response: str, ok: bool) -> None:
    assert format_ok(response) is ok


# --- equivalence: must accept / must reject ------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "reference"),
    [
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{1/2}", "0.5"),
        ("\\boxed{3}", "3"),
        ("Answer: 7", "7"),
        ("The answer is $\\frac{3}{4}$.", "0.75"),
        ("\\boxed{\\{1, 2\\}}", "\\{2,1\\}"),  # sets ignore order
        ("\\boxed{(1,2]}", "(1, 2]"),  # intervals
        ("\\boxed{red}", "Red"),  # non-math answers: normalised string match
        ("Answer: \\text{Red}", "red"),
        ("\\boxed{1,000}", "1000"),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
        ("\\boxed{x^2+2x+1}", "(x+1)^2"),
        ("<think>hmm</think>\\boxed{5}", "\\boxed{5}"),  # a boxed reference is unwrapped
    ],
)
def test_math_verifier_accepts(response: str, reference: str) -> None:
    assert math_verifier(response, reference) == 1.0


@pytest.mark.parametrize(
    ("response", "reference"),
    [
        ("\\boxed{3}", "4"),
        ("\\boxed{-3}", "3"),
        ("\\boxed{1/2}", "0.55"),
        ("\\boxed{[1,2)}", "(1,2]"),  # open/closed ends matter
        ("\\boxed{\\{1, 2\\}}", "\\{1, 3\\}"),
        ("<think>\\boxed{3}</think>I am not sure.", "3"),  # answer only inside think
        ("\\boxed{ten}", "net"),  # sympy alone would read both as t*e*n
        ("\\boxed{3}", ""),  # an empty reference never matches
        ("\\boxed{}", ""),
        ("\\boxed{.}", ""),  # answers that normalise to nothing never match
        ("Answer: $ $", ""),
    ],
)
def test_math_verifier_rejects(response: str, reference: str) -> None:
    assert math_verifier(response, reference) == 0.0


def test_math_verifier_works_off_the_main_thread() -> None:
    # math-verify's default signal timeout fails silently in a thread; ours must still say 1.0.
    score, _ = _in_thread(math_verifier, "\\boxed{\\frac{1}{2}}", "0.5")
    assert score == 1.0


@pytest.mark.parametrize(
    ("response", "reference", "expected"),
    [
        ("\\boxed{Red}", "red", 1.0),
        ("Answer: $x + 1$.", "x+1", 0.0),  # exact is not math: spacing inside differs
        ("Answer: $x+1$.", "x+1", 1.0),
        ("\\boxed{0.5}", "1/2", 0.0),
        ("\\boxed{red}", "blue", 0.0),
        ("<think>\\boxed{red}</think>", "red", 0.0),
        ("\\boxed{.}", "", 0.0),
    ],
)
def test_exact_verifier(response: str, reference: str, expected: float) -> None:
    assert exact_verifier(response, reference) == expected


@pytest.mark.parametrize(
    ("response", "reference", "expected"),
    [
        ("\\boxed{1,000}", "1000", 1.0),
        ("\\boxed{0.5}", "1/2", 1.0),
        ("\\boxed{\\frac{3}{4}}", "0.75", 1.0),
        ("Answer: 3.0000001", "3", 1.0),  # within rel tol 1e-6
        ("\\boxed{1e-3}", "0.001", 1.0),
        ("\\boxed{-2.5}", "-5/2", 1.0),
        ("\\boxed{3.01}", "3", 0.0),
        ("\\boxed{1,2}", "12", 0.0),  # a list, not a thousands separator
        ("\\boxed{x}", "1", 0.0),
        ("\\boxed{1/0}", "1", 0.0),
        ("\\boxed{1e999}", "1e999", 0.0),  # infinities are not numbers
    ],
)
def test_numeric_verifier(response: str, reference: str, expected: float) -> None:
    assert numeric_verifier(response, reference) == expected


@pytest.mark.parametrize(
    ("response", "math", "think_math", "fmt"),
    [
        ("<think>half of one</think>\\boxed{\\frac{1}{2}}", 1.0, 1.0, 1.0),
        ("\\boxed{\\frac{1}{2}}", 1.0, 0.0, 0.0),  # right answer, no think block
        ("<think>a</think><think>b</think>\\boxed{0.5}", 1.0, 0.0, 0.0),  # two think blocks
        ("<think>guess</think>\\boxed{0.6}", 0.0, 0.0, 0.0),  # good format, wrong answer
    ],
)
def test_think_format_verifiers(response: str, math: float, think_math: float, fmt: float) -> None:
    assert math_verifier(response, "0.5") == math
    assert think_math_verifier(response, "0.5") == think_math
    assert format_verifier(response, "0.5") == fmt


# --- hostile inputs: score 0, quickly, from any thread ------------------------------------------
# They run in a child process so that a regression (a guard that stops working, so sympy sits in
# one uninterruptible C call) fails the test with the hung case named instead of hanging pytest.

HOSTILE = {
    "empty": ("", ""),
    "no_answer": ("I refuse to answer.", "1"),
    "only_tags": ("<think></think>", ""),
    "tags_and_empty_box": ("<think></think>\\boxed{}", ""),
    "empty_boxed": ("\\boxed{}", "1"),
    "five_mb": (FIVE_MB, "1"),
    "power_tower": ("\\boxed{9^{9^{9^{9^{9}}}}}", "1"),
    "python_power_tower": ("Answer: 9**9**9**9", "1"),
    "nested_frac_500": ("\\boxed{" + "\\frac{1}{" * 500 + "2" + "}" * 500 + "}", "1"),
    "huge_factorial": ("\\boxed{(10^{6})!}", "1"),
    "huge_factorial_literal": ("\\boxed{1000000!}", "1"),
    "huge_binomial": ("\\boxed{\\binom{10^{9}}{5\\cdot 10^{8}}}", "1"),
    "exp_tower": ("\\boxed{\\exp(\\exp(\\exp(10)))}", "1"),
    "hostile_reference": ("\\boxed{1}", "9^{9^{9^{9}}}"),
}
# Inputs whose sympy check overruns its budget, so the helper process doing it must be killed
# (each kill costs a helper restart, so these run for math_verifier only, without safe_score).
OVERRUNS = {
    # Passes the cheap guards, but sympy needs far longer than its budget to expand it.
    "slow_sympy": ("\\boxed{(x+y+z)^{60}}", "1"),
    # With the guards switched off: one C call holding the GIL, which no thread could interrupt.
    "unguarded_power_tower": ("\\boxed{9^{9^{9^{9}}}}", "1"),
}
MODES = ("main_thread", "worker_thread", "safe_score_in_worker")
CHILD_TIMEOUT_S = 120

_CHILD = r"""
import json, sys, threading, time
from thinkvl.rewards import verifiers
from thinkvl.rewards.verifiers import BUILTIN_VERIFIERS, get_verifier, math_verifier, safe_score

def timed(fn, response, reference):
    start = time.perf_counter()
    score = fn(response, reference)
    return score, time.perf_counter() - start

def in_worker(fn, response, reference):
    out = []
    worker = threading.Thread(target=lambda: out.append(timed(fn, response, reference)))
    worker.start()
    worker.join()
    return out[0] if out else ("raised", 0.0)

def settle():
    # A sympy check that waits for a ready helper (one may be restarting after a kill), so the
    # timings below measure the hostile call, not a helper's import.
    assert math_verifier("\\boxed{1}", "2") == 0.0

def run(section, cases, verifiers_to_run, modes):
    for case, (response, reference) in cases.items():
        verifiers._sympy_safe = no_guard if case.startswith("unguarded") else guard
        for name, verifier in verifiers_to_run.items():
            runs = {
                "main_thread": lambda: timed(verifier, response, reference),
                "worker_thread": lambda: in_worker(verifier, response, reference),
                "safe_score_in_worker": lambda: in_worker(
                    lambda r, g: safe_score(verifier, r, g), response, reference),
            }
            for mode in modes:
                settle()
                print(json.dumps({"start": [section, case, name, mode]}), flush=True)
                score, seconds = runs[mode]()
                done = {"done": [section, case, name, mode], "score": score, "s": seconds}
                print(json.dumps(done), flush=True)

guard, no_guard = verifiers._sympy_safe, lambda expr: True
spec = json.load(sys.stdin)
get_verifier("math")  # starts the helper, as a recipe's setup would
run("hostile", spec["hostile"], BUILTIN_VERIFIERS, spec["modes"])
run("overrun", spec["overrun"], {"math": math_verifier}, spec["modes"][:2])
print(json.dumps({"recovered": math_verifier("\\boxed{\\frac{1}{2}}", "0.5")}), flush=True)
"""


@pytest.fixture(scope="module")
def hostile_results() -> dict:
    """(section, case, verifier, mode) -> (score, seconds); plus "hung" and "recovered"."""
    spec = {"hostile": HOSTILE, "overrun": OVERRUNS, "modes": MODES}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD], input=json.dumps(spec), capture_output=True,
            text=True, timeout=CHILD_TIMEOUT_S, cwd=Path(__file__).resolve().parents[1],
        )
        stdout, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as expired:
        stdout, stderr = _text(expired.stdout), f"killed after {CHILD_TIMEOUT_S} s"
    results: dict = {"recovered": None}
    pending = ""
    for line in stdout.splitlines():
        record = json.loads(line)
        if "start" in record:
            pending = " / ".join(record["start"])
        elif "done" in record:
            results[tuple(record["done"])] = (record["score"], record["s"])
            pending = ""
        else:
            results["recovered"] = record["recovered"]
    results["hung"] = f"stuck in {pending or 'start-up'}: {stderr[-2000:]}"
    return results


def _text(output: bytes | str | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def _check_hostile(
    results: dict, section: str, case: str, names: list[str], mode: str, limit_s: float
) -> None:
    failures = []
    for name in names:
        key = (section, case, name, mode)
        if key not in results:
            failures.append(f"{name}: never finished ({results['hung']})")
            continue
        score, seconds = results[key]
        if score != 0.0 or seconds >= limit_s:
            failures.append(f"{name}: score {score} in {seconds:.2f} s")
    assert not failures, f"{case} [{mode}]: " + "; ".join(failures)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_inputs_score_zero_fast(hostile_results: dict, case: str, mode: str) -> None:
    # The guards and size caps answer these: no sympy work, no helper kill.
    _check_hostile(hostile_results, "hostile", case, sorted(BUILTIN_VERIFIERS), mode, GUARD_LIMIT_S)


@pytest.mark.parametrize("mode", MODES[:2])
@pytest.mark.parametrize("case", sorted(OVERRUNS))
def test_overrunning_sympy_is_killed(hostile_results: dict, case: str, mode: str) -> None:
    _check_hostile(hostile_results, "overrun", case, ["math"], mode, TIME_LIMIT_S)


@pytest.mark.parametrize(
    "expr",
    [
        "9^{9^{9^{9^{9}}}}",
        "9**9**9**9",
        "{9}^{9}^{9}",
        "x^{9^{9^{9}}}",  # a symbolic base does not help: the exponent is evaluated
        "2^\\frac{10^{9}}{1}",
        "9^{9999 \\cdot 9999}",
        "10^{1000000}",
        "e^{e^{e^{e^{e}}}}",
        "\\exp(\\exp(\\exp(10)))",
        "(10^{6})!",
        "1000000!",
        "(5!)!!",
        "\\binom{10^{9}}{5\\cdot 10^{8}}",
        "\\Gamma(10^{7})",
        "\\prod_{k=1}^{10^{7}} k",
        "\\frac{1}{" * 20 + "2" + "}" * 20,
        "1" * 1001,
    ],
)
def test_guard_rejects(expr: str) -> None:
    assert not verifiers._sympy_safe(expr)


@pytest.mark.parametrize(
    "expr",
    [
        "2^{10}", "2^{2023}", "e^{-x^2}", "x^{n+1}", "(x+1)^2", "6.02\\times10^{23}", "10!",
        "\\binom{10}{3}", "\\frac{\\sqrt{3}}{2}", "\\{1, 2\\}", "(1, 2]", "2^{10} \\cdot 5!",
    ],
)
def test_guard_accepts(expr: str) -> None:
    assert verifiers._sympy_safe(expr)


def test_helper_pool_recovers_after_kills(hostile_results: dict) -> None:
    assert hostile_results["recovered"] == 1.0, hostile_results["hung"]


def test_in_thread_fallback_when_helpers_cannot_start(monkeypatch, caplog) -> None:
    def no_subprocesses(*args: object, **kwargs: object) -> None:
        raise OSError("no subprocesses here")

    monkeypatch.setattr(verifiers.subprocess, "Popen", no_subprocesses)
    monkeypatch.setattr(verifiers, "_SYMPY_POOL", verifiers._SympyPool(size=1))
    assert math_verifier("\\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert "no sympy helper processes" in caplog.text
    score, seconds = _in_thread(math_verifier, OVERRUNS["slow_sympy"][0], "1")  # pure Python: cut
    assert score == 0.0
    assert seconds < TIME_LIMIT_S


def test_interrupted_warm_up_keeps_the_helper(monkeypatch) -> None:
    # safe_score gives up while the first helper is still importing sympy; that helper must
    # survive (not be killed and restarted, which under load could repeat forever).
    started: list[object] = []

    class CountingWorker(verifiers._SympyWorker):
        def __init__(self) -> None:
            super().__init__()
            started.append(self)

    monkeypatch.setattr(verifiers, "_SympyWorker", CountingWorker)
    monkeypatch.setattr(verifiers, "_SYMPY_POOL", verifiers._SympyPool(size=1))
    try:
        assert safe_score(math_verifier, "\\boxed{1/2}", "0.5", timeout_s=0.01) == 0.0
        assert math_verifier("\\boxed{1/2}", "0.5") == 1.0
        assert len(started) == 1
    finally:
        verifiers._SYMPY_POOL.close()


# --- safe_score ---------------------------------------------------------------------------------


def _sleepy(response: str, reference: str) -> float:
    time.sleep(5)
    return 1.0


def _busy(response: str, reference: str) -> float:
    while True:
        pass


def _raises(response: str, reference: str) -> float:
    raise RuntimeError("boom")


@pytest.mark.parametrize("verifier", [_sleepy, _busy, _raises])
@pytest.mark.parametrize("run", [_timed, _in_thread])
def test_safe_score_never_raises_or_hangs(verifier: Callable, run: Callable) -> None:
    score, seconds = run(lambda r, g: safe_score(verifier, r, g, timeout_s=0.5), "\\boxed{1}", "1")
    assert score == 0.0
    assert seconds < 0.5 + 1.0


def test_safe_score_stops_a_runaway_verifier() -> None:
    ran_in: list[threading.Thread] = []

    def busy(response: str, reference: str) -> float:
        ran_in.append(threading.current_thread())
        while True:
            pass

    assert safe_score(busy, "x", "y", timeout_s=0.2) == 0.0
    ran_in[0].join(2.0)
    assert not ran_in[0].is_alive()  # the busy loop was interrupted, not left burning a core


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1.0, 1.0), (True, 1.0), (5, 1.0), (-1, 0.0), (math.nan, 0.0), ("x", 0.0)],
)
def test_safe_score_clamps(value: object, expected: float) -> None:
    assert safe_score(lambda r, g: value, "a", "b") == expected


def test_parallel_scoring_matches_sequential() -> None:
    cases = [("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{3}", "4"), ("Answer: red", "Red")] * 4
    expected = [math_verifier(r, g) for r, g in cases]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda c: safe_score(math_verifier, *c), cases))
    assert got == expected == [1.0, 0.0, 1.0] * 4


# --- get_verifier --------------------------------------------------------------------------------


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    name = "thinkvl_test_user_checks"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            NOT_A_FUNCTION = 3

            def starts_with(response: str, reference: str) -> float:
                return float(response.startswith(reference))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def test_get_verifier_builtins() -> None:
    assert get_verifier("math") is math_verifier
    assert get_verifier("think_math") is think_math_verifier
    assert set(BUILTIN_VERIFIERS) == {"math", "exact", "numeric", "format", "think_math"}


def test_get_verifier_user_function(user_module: str) -> None:
    verifier = get_verifier(f"{user_module}:starts_with")
    assert verifier("abc", "ab") == 1.0
    assert safe_score(verifier, "abc", "b") == 0.0


@pytest.mark.parametrize(
    ("name", "mentions"),
    [
        ("nope", "nope"),
        ("maths", "maths"),
        ("no_such_module_for_thinkvl:f", "no_such_module_for_thinkvl"),
        ("{mod}:missing", "missing"),
        ("{mod}:NOT_A_FUNCTION", "NOT_A_FUNCTION"),
        ("{mod}:", "{mod}:"),
    ],
)
def test_get_verifier_errors(user_module: str, name: str, mentions: str) -> None:
    name, mentions = name.format(mod=user_module), mentions.format(mod=user_module)
    with pytest.raises(ValueError) as error:
        get_verifier(name)
    message = str(error.value)
    assert mentions in message
    assert "'math'" in message and "module:function" in message  # names the allowed choices
