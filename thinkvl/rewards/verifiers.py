"""Answer verifiers: one implementation for rejection sampling, the RL reward and evaluation.

Contract
--------
A verifier is a plain function ``(response, reference) -> float`` returning a score in [0, 1].
``response`` is the model's full output (possibly ``<think>...</think>`` then an answer);
``reference`` is the gold answer (``"1/2"``, ``"\\frac{1}{2}"``, ``"red"``, or ``"\\boxed{...}"``).
A verifier never credits an empty response, one without an extractable answer, a format-only
response (``<think></think>``), an empty ``\\boxed{}`` or a runaway response longer than
``MAX_RESPONSE_CHARS``.

Built-ins (names usable in a recipe): ``math``, ``exact``, ``numeric``, ``format``, ``think_math``.
They are safe on hostile input from any thread, in three layers:

1. size caps: a response over ``MAX_RESPONSE_CHARS`` has no answer; only its last
   ``ANSWER_SCAN_CHARS`` are searched; answers over ``MAX_ANSWER_CHARS`` are compared as strings;
2. ``_sympy_safe`` turns away, in microseconds, what would make sympy build astronomically large
   numbers (power towers, ``(10^6)!``, huge binomials, deep nesting);
3. what is left runs in a small pool of helper processes, killed when a check overruns
   ``SYMPY_TIMEOUT_S``. math-verify's own timeout uses ``signal.alarm``, which works only in the
   main thread, and a thread cannot stop one long C call holding the GIL; killing a process can.
   If helper processes cannot be started, checks fall back to an in-thread deadline.

The helpers belong to one process: a child made by ``fork`` (multiprocessing's default on Linux,
DataLoader workers) starts its own on its first check, never the parent's. A check that could not
be made (past its budget, a helper that died) scores 0, so hostile input cannot win, but is
counted in ``verifier_failures()`` and logged: a broken set-up must not pass for a wrong model.

Your own verifier
-----------------
Write a function in your own module and name it as ``"package.module:function"`` in the recipe::

    # my_project/checks.py
    from thinkvl.rewards.verifiers import extract_answer

    def chemistry(response: str, reference: str) -> float:
        answer = extract_answer(response)
        return float(answer is not None and answer.replace(" ", "") == reference.replace(" ", ""))

    # recipe.yaml:   verifier: my_project.checks:chemistry

``get_verifier`` imports it; callers score through ``safe_score``, which turns an exception or a
run past ``timeout_s`` into 0.0 (counted and logged), so a buggy user verifier cannot stall the
RL loop.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from math_verify import LatexExtractionConfig, parse, verify

Verifier = Callable[[str, str], float]
T = TypeVar("T")

# A response longer than this is a runaway generation (~250k tokens): it gets no answer at all.
MAX_RESPONSE_CHARS = 1_000_000
# Only the end of a response is searched for the final answer; keeps regex work bounded.
ANSWER_SCAN_CHARS = 20_000
# Longer answers are compared as normalised strings only, never handed to sympy.
MAX_ANSWER_CHARS = 1_000
# Deeper bracket nesting is adversarial: the LaTeX parser's time grows steeply with depth.
MAX_NESTING = 10
# Numeric exponents may hold at most this many integer digits in total (< 10^5). Larger ones
# mean pow() on huge ints, one C call that only a helper-process kill could stop.
MAX_EXPONENT_DIGITS = 5
# Numeric factorial / binomial / gamma arguments: at most this many digits each (< 1000).
MAX_COMBINATORIC_DIGITS = 3
# Wall-clock budget for one sympy equivalence check inside the built-ins (hard: the helper
# process doing it is killed when it runs over).
SYMPY_TIMEOUT_S = 1.5
# Helper processes: how long a fresh one may take to import sympy, how many checks before it is
# replaced (sympy caches grow), and its memory / CPU-time caps.
WORKER_STARTUP_TIMEOUT_S = 60.0
WORKER_MAX_CHECKS = 2_000
WORKER_MEMORY_BYTES = 4 << 30
WORKER_CPU_SECONDS = 3_600  # > WORKER_MAX_CHECKS * SYMPY_TIMEOUT_S: only an orphan reaches it

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_BOXED = "\\boxed"
# "Answer: 7", "Final answer: 7", "**Answer:** 7", "The answer is 7." (rest of the line).
_ANSWER_LINE = re.compile(r"\banswer[* \t]*(?:is\b[* \t]*:?|:)[* \t]*(\S[^\n]*)", re.IGNORECASE)


def extract_answer(response: str) -> str | None:
    """The final answer of ``response``, or None when it has none.

    The last ``\\boxed{...}`` wins (nested braces allowed); without one, the last
    "Answer: ..." / "The answer is ..." line. With a think block, only the text after the last
    ``</think>`` is searched: an answer inside the reasoning does not count.
    """
    region = _answer_region(response)
    if region is None:
        return None
    if _BOXED in region:
        answer = _last_boxed(region)
    else:
        answer = _last_answer_line(region)
    return answer if answer else None


def _answer_region(response: str) -> str | None:
    """The tail of the response where the final answer may appear."""
    if not isinstance(response, str) or len(response) > MAX_RESPONSE_CHARS:
        return None
    close = response.rfind(_THINK_CLOSE)
    if close >= 0:
        region = response[close + len(_THINK_CLOSE):]
    elif _THINK_OPEN in response:
        return None  # unfinished thought (truncated): everything is still reasoning
    else:
        region = response
    return region[-ANSWER_SCAN_CHARS:]


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``; None if that one is unclosed or empty."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    brace = start + len(_BOXED)
    while brace < len(text) and text[brace] == " ":
        brace += 1
    if brace >= len(text) or text[brace] != "{":
        return None
    end = _matching_brace(text, brace)
    if end is None:
        return None
    return text[brace + 1:end].strip() or None


def _matching_brace(text: str, open_at: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_at``; escaped ``\\{ \\}`` do not count."""
    depth, i = 0, open_at
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # skip the escaped character (\{ \} \\)
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _last_answer_line(text: str) -> str | None:
    last = None
    for last in _ANSWER_LINE.finditer(text):
        pass
    if last is None:
        return None
    return last.group(1).strip().strip("*").strip() or None


def format_ok(response: str) -> bool:
    """Think-then-answer: one ``<think>`` block first, non-empty reasoning, then an answer."""
    if not isinstance(response, str) or len(response) > MAX_RESPONSE_CHARS:
        return False
    body = response.lstrip()
    if not body.startswith(_THINK_OPEN):
        return False
    if body.count(_THINK_OPEN) != 1 or body.count(_THINK_CLOSE) != 1:
        return False
    reasoning, _, after = body[len(_THINK_OPEN):].partition(_THINK_CLOSE)
    return bool(reasoning.strip()) and bool(after.strip()) and extract_answer(response) is not None


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------

_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit)\{([^{}]*)\}")
_WORD = re.compile(r"[^\W\d_]{2,}(?:\s+[^\W\d_]+)*")


def _clean(answer: str) -> str:
    """Strip whitespace, one trailing period and the math delimiters around the whole answer."""
    text = answer.strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    for left, right in _MATH_DELIMITERS:
        if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
            text = text[len(left):-len(right)].strip()
            break
    return text


def _normalize(answer: str) -> str:
    """Form used for string equality: cleaned, ``\\text{}`` unwrapped, case-folded, one space."""
    text = _TEXT_WRAPPER.sub(r"\1", _clean(answer))
    return " ".join(text.casefold().split())


def _reference_answer(reference: str) -> str:
    """A reference may itself be written as ``\\boxed{...}``; take what is inside."""
    if not isinstance(reference, str):
        return ""
    if _BOXED in reference:
        return _last_boxed(reference[-ANSWER_SCAN_CHARS:]) or ""
    return reference[:MAX_RESPONSE_CHARS]


def _is_word(text: str) -> bool:
    """Plain words ("red", "no solution"): sympy reads "ten" as t*e*n, equal to "net"."""
    return _WORD.fullmatch(_TEXT_WRAPPER.sub(r"\1", text).strip()) is not None


# ---------------------------------------------------------------------------------------------
# Guards: keep inputs that would make sympy compute astronomically large numbers away from it
# ---------------------------------------------------------------------------------------------

_POWER_OP = re.compile(r"\^|\*\*|\\exp\b")  # exp(x) is e^x
_COMBINATORIC_CMD = re.compile(r"\\[dt]?binom|\\choose|\\Gamma|\\operatorname\{(?:fact|gamma)\}")
_COMMAND = re.compile(r"\\[a-zA-Z]+")
_INT_PART = re.compile(r"(\d+)(?:\.\d*)?")
_OPENERS, _CLOSERS = "({[", ")}]"


def _sympy_safe(expr: str) -> bool:
    """True if ``expr`` may be given to sympy: short, shallow, and no numeric explosion."""
    if len(expr) > MAX_ANSWER_CHARS or _nesting_depth(expr) > MAX_NESTING:
        return False
    if any(not _small_exponent(op) for op in _exponent_operands(expr)):
        return False
    return all(_small_combinatoric(arg) for arg in _combinatoric_operands(expr))


def _nesting_depth(expr: str) -> int:
    depth = deepest = 0
    for char in expr:
        if char in _OPENERS:
            depth += 1
            deepest = max(deepest, depth)
        elif char in _CLOSERS:
            depth = max(0, depth - 1)
    return deepest


def _is_symbolic(operand: str) -> bool:
    """Has a free variable: sympy keeps x^(...) unevaluated. ``e`` is Euler's number, so numeric."""
    letters = _COMMAND.sub("", operand)
    return any(char.isalpha() and char not in "eE" for char in letters)


def _digits(operand: str) -> int:
    """Total integer digits: bounds the magnitude of +, -, *, / combinations of the literals."""
    return sum(len(match.group(1).lstrip("0") or "0") for match in _INT_PART.finditer(operand))


def _explodes(operand: str) -> bool:
    """A numeric power, factorial or binomial inside an operand can be astronomically large."""
    return bool(_POWER_OP.search(operand) or "!" in operand or _COMBINATORIC_CMD.search(operand))


def _small_exponent(operand: str) -> bool:
    if _is_symbolic(operand):
        return True
    return not _explodes(operand) and _digits(operand) <= MAX_EXPONENT_DIGITS


def _small_combinatoric(operand: str) -> bool:
    if _is_symbolic(operand):
        return True
    return not _explodes(operand) and _digits(operand) <= MAX_COMBINATORIC_DIGITS


def _exponent_operands(expr: str) -> Iterator[str]:
    """The exponent of every ``^`` / ``**``; a chained ``9^9^9`` keeps the rest of the chain."""
    for match in _POWER_OP.finditer(expr):
        start = match.end()
        end = _operand_end(expr, start)
        follow = expr[end:].lstrip()
        if follow.startswith(("^", "**")):
            end = len(expr)  # right-associative tower: the exponent is everything after
        yield expr[start:end]


def _operand_end(expr: str, start: int) -> int:
    """End of the operand starting at ``start``: a bracketed group, a command or a token."""
    i = start
    while i < len(expr) and expr[i] == " ":
        i += 1
    if i >= len(expr):
        return i
    if expr[i] in _OPENERS:
        return _group_end(expr, i)
    command = _COMMAND.match(expr, i)
    if command:
        return _arguments_end(expr, command.end(), 2)  # ^\frac{a}{b} takes the whole fraction
    while i < len(expr) and (expr[i].isalnum() or expr[i] == "."):
        i += 1
    return max(i, start + 1)


def _arguments_end(expr: str, start: int, count: int) -> int:
    """End of up to ``count`` bracketed arguments following position ``start``."""
    end = start
    for _ in range(count):
        i = end
        while i < len(expr) and expr[i] == " ":
            i += 1
        if i >= len(expr) or expr[i] not in _OPENERS:
            break
        end = _group_end(expr, i)
    return end


def _group_end(expr: str, open_at: int) -> int:
    """Index after the bracket closing the one at ``open_at`` (any kind); the end if unclosed."""
    depth = 0
    for i in range(open_at, len(expr)):
        if expr[i] in _OPENERS:
            depth += 1
        elif expr[i] in _CLOSERS:
            depth -= 1
            if depth == 0:
                return i + 1
    return len(expr)


def _combinatoric_operands(expr: str) -> Iterator[str]:
    """Operands of ``n!`` and the arguments of ``\\binom`` / ``\\Gamma`` and friends."""
    for match in re.finditer(r"!+(?!=)", expr):
        yield _operand_before(expr, match.start())
    for match in _COMBINATORIC_CMD.finditer(expr):
        if match.group() == "\\choose":  # infix: {n \\choose k}
            yield _operand_before(expr, match.start())
            yield expr[match.end():_operand_end(expr, match.end())]
        else:
            yield expr[match.end():_arguments_end(expr, match.end(), 2)]


def _operand_before(expr: str, end: int) -> str:
    """The operand ending just before ``end``: a bracketed group or a run of digits/letters."""
    i = end - 1
    while i >= 0 and expr[i] == " ":
        i -= 1
    if i < 0:
        return ""
    if expr[i] in _CLOSERS:
        depth = 0
        for j in range(i, -1, -1):
            if expr[j] in _CLOSERS:
                depth += 1
            elif expr[j] in _OPENERS:
                depth -= 1
                if depth == 0:
                    return expr[j:i + 1]
        return expr[:i + 1]
    j = i
    while j >= 0 and (expr[j].isalnum() or expr[j] == "."):
        j -= 1
    return expr[j + 1:i + 1]


# ---------------------------------------------------------------------------------------------
# Failures: a check that could not be made scores 0 (hostile input must not win), but is counted
# and logged, so a broken set-up cannot pass for a model that answers wrong
# ---------------------------------------------------------------------------------------------

FAILURE_KINDS = (
    "sympy_timeout",  # a sympy check ran past SYMPY_TIMEOUT_S: its helper was killed, scored 0
    "helper_exited",  # a helper process died during a check: scored 0
    "helper_start",  # no helper could start: checks run in this process from then on
    "in_thread_timeout",  # such an in-process check ran past SYMPY_TIMEOUT_S: scored 0
    "verifier_timeout",  # safe_score: the verifier ran past timeout_s, scored 0
    "verifier_error",  # safe_score: the verifier raised, scored 0
)
_failures = dict.fromkeys(FAILURE_KINDS, 0)
_failures_lock = threading.Lock()


def verifier_failures() -> dict[str, int]:
    """Checks in this process (since it started or was forked) that were not made as asked,
    by kind (see ``FAILURE_KINDS``). All zero in a healthy run."""
    with _failures_lock:
        return dict(_failures)


def _count_failure(kind: str, message: str, *args: object) -> None:
    """Count one failure; log the 1st, 2nd, 4th, 8th, ... of each kind (seen, without a flood)."""
    with _failures_lock:
        _failures[kind] += 1
        count = _failures[kind]
    if count & (count - 1) == 0:
        logger.warning(f"{message} [{kind} #{count} in this process; verifier_failures()]", *args)


def _preview(text: object, chars: int = 60) -> str:
    """A short, quoted excerpt of an input for a log line (an input may be megabytes long)."""
    text = text if isinstance(text, str) else repr(text)
    return repr(text if len(text) <= chars else text[:chars] + "...")


# ---------------------------------------------------------------------------------------------
# Deadline that works from any thread
# ---------------------------------------------------------------------------------------------


class _DeadlineExceeded(BaseException):
    """Raised inside an abandoned worker; a BaseException so ``except Exception`` cannot eat it."""


class _Overran(TimeoutError):
    """What ``_run_with_deadline`` reports for a call still running at its deadline."""


def _run_with_deadline(fn: Callable[[], T], timeout_s: float) -> tuple[T | None, Exception | None]:
    """``(fn(), None)``; ``(None, error)`` if ``fn`` raised, or ``(None, _Overran)`` if it was still
    running after ``timeout_s``.

    Unlike ``signal.alarm`` this works from any thread. A late worker is sent an asynchronous
    exception so pure-Python work stops instead of burning a core; a single long C call holding
    the GIL cannot be interrupted (and delays the caller too), which is why the built-ins run
    sympy in helper processes instead.
    """
    result: list[T] = []
    errors: list[Exception] = []

    def target() -> None:
        try:
            result.append(fn())
        except _DeadlineExceeded:  # sent after the caller gave up: nobody is listening
            pass
        except BaseException as err:  # noqa: BLE001 - a verifier's SystemExit too
            # Without its traceback: that would hold this frame, and the frame this list (a cycle).
            errors.append(err.with_traceback(None) if isinstance(err, Exception)
                          else RuntimeError(repr(err)))

    worker = threading.Thread(target=target, name="thinkvl-verifier", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        _interrupt(worker)
        return None, _Overran(f"still running after {timeout_s:g} s")
    if errors:
        return None, errors[0]
    return result[0], None


def _interrupt(worker: threading.Thread) -> None:
    if worker.ident is None:
        return
    try:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(worker.ident), ctypes.py_object(_DeadlineExceeded)
        )
    except (AttributeError, OSError):  # not CPython: the worker finishes in the background
        pass


# ---------------------------------------------------------------------------------------------
# Math equivalence
# ---------------------------------------------------------------------------------------------

# LaTeX extraction only: plain-text extraction runs sympy's parse_expr on Python-like input.
_EXTRACTION = (LatexExtractionConfig(),)


class _SilenceDisabledTimeoutWarning(logging.Filter):
    """We switch math-verify's signal timeout off on purpose (our deadline replaces it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


def _install_log_filter() -> None:
    for logger_name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(logger_name).addFilter(_SilenceDisabledTimeoutWarning())


_install_log_filter()


@functools.lru_cache(maxsize=4096)
def _parse(expr: str) -> tuple:
    """math-verify parse of one answer; cached because a reference is scored k times per prompt."""
    return tuple(parse(f"${expr}$", list(_EXTRACTION), parsing_timeout=None))


def _sympy_equivalent(answer: str, reference: str) -> bool:
    gold, pred = _parse(reference), _parse(answer)
    if not gold or not pred:
        return False
    return bool(verify(list(gold), list(pred), timeout_seconds=None))


def _math_equal(answer: str, reference: str) -> bool:
    """Normalised string match, else math-verify equivalence under guards and a deadline."""
    pred, gold = _clean(answer), _clean(reference)
    if not pred or not gold:
        return False
    if _normalize(pred) == _normalize(gold):
        return True
    if _is_word(pred) or _is_word(gold):
        return False
    if not (_sympy_safe(pred) and _sympy_safe(gold)):
        return False
    return _SYMPY_POOL.equivalent(pred, gold)


# ---------------------------------------------------------------------------------------------
# Sympy in helper processes: killing the process is the only way to stop a single C call that
# holds the GIL (a bigint pow or shift deep in sympy/mpmath), which the guards may not foresee.
# ---------------------------------------------------------------------------------------------

# The helper loads this file by path, so it does not import the thinkvl package (or torch).
_WORKER_BOOT = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_thinkvl_sympy_worker', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "module._serve()\n"
)


_WARM_UP = ("\\frac{x^2-1}{2}", "(x-1)(x+1)/2")


def _serve() -> None:
    """Helper-process loop: one JSON ``[answer, reference]`` per stdin line -> "1" or "0"."""
    _limit_worker_resources()
    replies, sys.stdout = sys.stdout, sys.stderr  # a library print must not corrupt replies
    try:  # sympy's first symbolic check sets up caches and lazy imports (~1 s, more under load):
        _sympy_equivalent(*_WARM_UP)  # paid here, in the start-up wait, not in a check's budget
    except Exception:  # noqa: BLE001 - a failed warm-up only makes the first check slower
        pass
    print("ready", file=replies, flush=True)
    for line in sys.stdin:
        answer, reference = json.loads(line)
        try:
            verdict = _sympy_equivalent(answer, reference)
        except Exception:  # noqa: BLE001 - MemoryError included: a failed check is a "no"
            verdict = False
        print("1" if verdict else "0", file=replies, flush=True)


def _limit_worker_resources() -> None:
    """A memory blow-up becomes a MemoryError; an orphaned, spinning helper dies eventually."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
        resource.setrlimit(resource.RLIMIT_CPU, (WORKER_CPU_SECONDS, WORKER_CPU_SECONDS + 60))
    except (ImportError, ValueError, OSError):  # not POSIX, or limits already lower
        pass


class _WorkerDied(Exception):
    """The helper process exited, or did not start."""


class _SympyWorker:
    """One helper process running ``_serve``; used by one thread at a time.

    A caller may be interrupted anywhere by ``safe_score``'s asynchronous exception, so the state
    is kept such that an interrupted caller leaves either a usable worker or one that gets closed.
    """

    def __init__(self) -> None:
        self.checks = 0
        self.in_flight = False  # a request was sent and its reply not read: state unknown
        self._started = threading.Event()
        self._start_ok = False
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, os.path.abspath(__file__)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, encoding="utf-8",
        )
        # The hand-shake is read by a thread nobody interrupts, so it is never left half-read.
        threading.Thread(target=self._await_start, name="thinkvl-sympy-start", daemon=True).start()

    def _await_start(self) -> None:
        self._start_ok = self._proc.stdout.readline().strip() == "ready"
        self._started.set()

    def equivalent(self, answer: str, reference: str, timeout_s: float) -> bool | None:
        """The verdict, or None when the check ran past ``timeout_s`` (the worker is then unusable).

        The first use waits for the helper's imports, outside the check's own budget.
        """
        if not self._started.wait(WORKER_STARTUP_TIMEOUT_S) or not self._start_ok:
            raise _WorkerDied("the sympy helper process did not start")
        self.checks += 1
        self.in_flight = True
        self._proc.stdin.write(json.dumps([answer, reference]) + "\n")
        self._proc.stdin.flush()
        readable, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
        if not readable:
            return None
        reply = self._proc.stdout.readline()
        if not reply:
            raise _WorkerDied("the sympy helper process exited")
        self.in_flight = False
        return reply.strip() == "1"

    @property
    def started(self) -> bool:
        return self._start_ok

    def usable(self) -> bool:
        return not self.in_flight and self.checks < WORKER_MAX_CHECKS and self._proc.poll() is None

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait()


class _SympyPool:
    """Up to ``size`` helper processes, started on first use. A check that overruns kills its
    helper, and a replacement starts importing at once. If helpers cannot run at all (no
    subprocesses, no ``select`` on pipes), checks fall back to an in-thread deadline.

    Fork-safe: a child made by ``fork`` starts over with no helpers and fresh locks
    (``_after_fork_in_child``), and builds its own helpers on its first check."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._workers: set[_SympyWorker] = set()  # every live helper of this process, idle or busy
        self._idle: list[_SympyWorker] = []
        self._inherited: list[_SympyWorker] = []  # the parent's, after a fork: never touched
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)
        self._broken = sys.platform == "win32"

    def warm(self) -> None:
        """Start a helper in the background so the first check does not wait for sympy's import."""
        with self._lock:
            if not self._idle and not self._broken:
                self._spawn_idle()

    def equivalent(self, answer: str, reference: str) -> bool:
        with self._slots:
            worker = None if self._broken else self._take()
            if worker is None:  # helpers cannot run here
                return self._in_thread(answer, reference)
            verdict, failure = None, None
            try:
                verdict = worker.equivalent(answer, reference, SYMPY_TIMEOUT_S)
            except (_WorkerDied, OSError, ValueError) as err:
                failure = f"{type(err).__name__}: {err}"  # text: the error would pin this frame
                if not worker.started:
                    self._give_up(failure)  # before the release below: it starts no replacement
            finally:
                self._release(worker, discard=failure is not None and not worker.started)
        if failure is not None and not worker.started:
            return self._in_thread(answer, reference)  # this check is still made, here
        if failure is not None:
            _count_failure("helper_exited", "a sympy helper died while checking %s against %s "
                           "(%s): scored 0", _preview(answer), _preview(reference), failure)
            return False
        if verdict is None:
            _count_failure("sympy_timeout", "sympy check of %s against %s ran past %g s: "
                           "scored 0", _preview(answer), _preview(reference), SYMPY_TIMEOUT_S)
            return False
        return verdict

    @staticmethod
    def _in_thread(answer: str, reference: str) -> bool:
        verdict, error = _run_with_deadline(lambda: _sympy_equivalent(answer, reference),
                                            SYMPY_TIMEOUT_S)
        if isinstance(error, _Overran):
            _count_failure("in_thread_timeout", "in-process sympy check of %s against %s ran past "
                           "%g s: scored 0", _preview(answer), _preview(reference), SYMPY_TIMEOUT_S)
        return bool(verdict)  # sympy raising on an input is a "no", as in a helper

    def _take(self) -> _SympyWorker | None:
        with self._lock:
            if not self._idle:
                self._spawn_idle()
            return self._idle.pop() if self._idle else None

    def _release(self, worker: _SympyWorker, discard: bool) -> None:
        keep = not discard and worker.usable()
        if not keep:
            worker.close()
        with self._lock:
            if keep:
                self._idle.append(worker)
                return
            self._workers.discard(worker)
            if not self._broken and not self._idle:
                self._spawn_idle()  # the replacement imports sympy while the caller moves on

    def _spawn_idle(self) -> None:
        """Call with ``_lock`` held."""
        try:
            worker = _SympyWorker()
        except OSError as err:
            self._give_up(err)
            return
        self._workers.add(worker)
        self._idle.append(worker)

    def _give_up(self, err: BaseException | str) -> None:
        if not self._broken:
            _count_failure("helper_start", "no sympy helper processes (%s): checks run in this "
                           "process under an in-thread deadline from now on", err)
        self._broken = True

    def _after_fork_in_child(self) -> None:
        """In a child made by ``fork``: drop the parent's helpers and locks; start over lazily.

        The helpers are the parent's: their pipes are shared with it (two processes on one pipe
        read each other's replies) and their start-up threads were not copied. A lock held by a
        thread of the parent at the fork stays held here forever. The parent's worker objects
        are kept, never used, so that no finaliser of ours closes or waits on what it owns.
        """
        self._inherited.extend(self._workers)
        self._workers, self._idle = set(), []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self._size)

    def close(self) -> None:
        with self._lock:
            workers, self._workers, self._idle = self._workers, set(), []
        for worker in workers:
            worker.close()


def _after_fork_in_child() -> None:
    global _failures_lock
    _failures_lock = threading.Lock()
    _failures.update(dict.fromkeys(FAILURE_KINDS, 0))
    _SYMPY_POOL._after_fork_in_child()


_SYMPY_POOL = _SympyPool(size=min(4, os.cpu_count() or 1))
atexit.register(_SYMPY_POOL.close)
if hasattr(os, "register_at_fork"):  # POSIX; spawned children import this module afresh
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+|(?=\.\d))(?:\.\d+)?(?:[eE][+-]?\d+)?")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")


def _parse_number(text: str) -> float | None:
    """A finite number from "1,000", "-2.5", "3e-4", "3/4" or "\\frac{3}{4}"; None otherwise."""
    cleaned = _clean(text)
    if len(cleaned) > MAX_ANSWER_CHARS:
        return None
    cleaned = _LATEX_FRAC.sub(r"\1/\2", cleaned).replace(" ", "")
    numerator, slash, denominator = cleaned.partition("/")
    value = _parse_decimal(numerator)
    if slash:
        divisor = _parse_decimal(denominator)
        if value is None or divisor is None or divisor == 0:
            return None
        value /= divisor
    return value if value is not None and math.isfinite(value) else None


def _parse_decimal(text: str) -> float | None:
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text.replace(",", ""))
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------
# Built-in verifiers
# ---------------------------------------------------------------------------------------------


def math_verifier(response: str, reference: str) -> float:
    """1.0 if the extracted answer equals the reference mathematically or as normalised strings."""
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    return float(_math_equal(answer, _reference_answer(reference)))


def exact_verifier(response: str, reference: str) -> float:
    """1.0 if the extracted answer equals the reference after normalisation (case, spaces, $, .)."""
    answer = extract_answer(response)
    gold = _normalize(_reference_answer(reference))
    return float(answer is not None and bool(gold) and _normalize(answer) == gold)


def numeric_verifier(response: str, reference: str) -> float:
    """1.0 if both parse as numbers equal within rel tol 1e-6 / abs tol 1e-9."""
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    pred, gold = _parse_number(answer), _parse_number(_reference_answer(reference))
    if pred is None or gold is None:
        return 0.0
    return float(math.isclose(pred, gold, rel_tol=1e-6, abs_tol=1e-9))


def format_verifier(response: str, reference: str) -> float:
    """1.0 only if the think format holds and the answer is correct per ``math_verifier``."""
    return float(format_ok(response) and math_verifier(response, reference) == 1.0)


def think_math_verifier(response: str, reference: str) -> float:
    """``math_verifier``'s score, but 0 when the response breaks the think-then-answer format."""
    return math_verifier(response, reference) if format_ok(response) else 0.0


BUILTIN_VERIFIERS: dict[str, Verifier] = {
    "math": math_verifier,
    "exact": exact_verifier,
    "numeric": numeric_verifier,
    "format": format_verifier,
    "think_math": think_math_verifier,
}


_SYMPY_VERIFIERS = frozenset({"math", "format", "think_math"})


def get_verifier(name: str) -> Verifier:
    """A built-in verifier by name, or a user's function given as ``"package.module:function"``."""
    if name in BUILTIN_VERIFIERS:
        if name in _SYMPY_VERIFIERS:
            _SYMPY_POOL.warm()  # a recipe names its verifier at setup: import sympy meanwhile
        return BUILTIN_VERIFIERS[name]
    from thinkvl.config import import_object

    return import_object(name, "verifier", f"one of {sorted(BUILTIN_VERIFIERS)} or 'package.module:function'")


def safe_score(
    verifier: Verifier, response: str, reference: str, timeout_s: float = 2.0
) -> float:
    """``verifier(response, reference)`` clamped to [0, 1]; 0.0 on any exception or after timeout_s.

    Safe from any thread. A 0 for an exception or a timeout is counted in ``verifier_failures()``
    and logged. Limits: a user verifier stuck in one long C call that holds the GIL
    (e.g. ``9**9**9**9``) delays the return until that call ends (the built-ins avoid this by
    running sympy in helper processes). The first sympy check of a process waits for a helper to
    import sympy (about a second; ``get_verifier`` starts one early): if that takes longer than
    ``timeout_s``, that first score is 0 (a counted ``verifier_timeout``).
    """
    score, error = _run_with_deadline(lambda: verifier(response, reference), timeout_s)
    try:
        value = math.nan if error is not None else float(score)
    except (TypeError, ValueError, OverflowError) as err:
        value, error = math.nan, err.with_traceback(None)
    if math.isnan(value):
        kind = "verifier_timeout" if isinstance(error, _Overran) else "verifier_error"
        why = f"{type(error).__name__}: {error}" if error is not None else "returned NaN"
        _count_failure(kind, "verifier %s on response %s, reference %s: %s; scored 0",
                       getattr(verifier, "__qualname__", repr(verifier)), _preview(response),
                       _preview(reference), why)
        return 0.0
    return min(1.0, max(0.0, value))
