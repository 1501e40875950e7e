"""The math verifier from forked, forkserver and spawned children and from many threads at once.

The sympy helper pool is process-global state (pipes, a start-up thread, locks). A child made by
``fork`` inherits a copy of it that it must not use: before the fix, a child of a process that had
just called ``get_verifier("math")`` waited 60 s for a start-up thread that fork did not copy and
scored a right answer 0, and a child checking while its parent did shared the parent's helper
pipes, so each read the other's replies (right answers scored 0). The scenarios run in a fresh
interpreter (the script below), each under a time limit, so a hang fails in seconds, named.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thinkvl.rewards import verifiers
from thinkvl.rewards.verifiers import math_verifier

# (response, reference, score): a right answer only sympy can see, a wrong one sympy must reject,
# and a right symbolic one.
CASES = [
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{3}", "4", 0.0),
    ("The answer is $x^2-1$", "(x-1)(x+1)", 1.0),
]
# Under the 60 s helper start-up wait that the old code fell into; a child's first check waits for
# its own helper to start (2 s on an idle 2-core machine, 15 s at a load of 10).
SCENARIO_LIMIT_S = 50
SCRIPT_LIMIT_S = 400

_SCENARIOS = r"""
import json, multiprocessing as mp, os, select, sys, threading, time
from thinkvl.rewards.verifiers import get_verifier

CASES, LIMIT_S = json.loads(sys.argv[1]), float(sys.argv[2])

def score_cases(_=None):
    verifier = get_verifier("math")
    return [verifier(response, reference) for response, reference, _ in CASES]

def report(name, run):
    start = time.perf_counter()
    try:
        scores = run()
    except Exception as err:  # a timeout: the scenario hung
        scores = f"{type(err).__name__}: {err}"
    print(json.dumps({"scenario": name, "scores": scores, "s": time.perf_counter() - start}),
          flush=True)

def in_pool(method):
    with mp.get_context(method).Pool(1) as pool:
        return pool.map_async(score_cases, range(1)).get(timeout=LIMIT_S)[0]

def in_threads(n=6):
    out = []
    threads = [threading.Thread(target=lambda: out.append(score_cases())) for _ in range(n)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + LIMIT_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if len(out) != n:
        raise TimeoutError(f"{n - len(out)} of {n} threads did not finish")
    assert all(scores == out[0] for scores in out), out
    return out[0]

def fork_and_parent_at_once(rounds=10):
    # Children and parent check at the same time: with inherited helpers they would share pipes
    # and read each other's replies.
    parent_scores = []
    parent = threading.Thread(
        target=lambda: parent_scores.extend(score_cases() for _ in range(rounds)))
    with mp.get_context("fork").Pool(1) as pool:
        pending = pool.map_async(score_cases, range(rounds))
        parent.start()
        child_scores = pending.get(timeout=LIMIT_S)
    parent.join(LIMIT_S)
    every = child_scores + parent_scores
    if len(every) != 2 * rounds:
        raise TimeoutError(f"the parent finished {len(parent_scores)} of {rounds} rounds")
    wrong = [scores for scores in every if scores != every[0]]
    assert not wrong, (every[0], wrong)
    return every[0]

def in_bare_fork():
    # os.fork without multiprocessing: the child exits through sys.exit, which runs atexit.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.write(write_end, json.dumps(score_cases()).encode())
        sys.exit(0)
    os.close(write_end)
    ready, _, _ = select.select([read_end], [], [], LIMIT_S)
    if not ready:
        os.kill(pid, 9)
        raise TimeoutError(f"no answer from the forked child in {LIMIT_S} s")
    scores = json.loads(os.read(read_end, 1 << 16))
    os.waitpid(pid, 0)
    return scores

if __name__ == "__main__":
    get_verifier("math")  # a recipe's setup: the helper starts importing sympy, then we fork
    report("fork_while_helper_starts", lambda: in_pool("fork"))
    report("parent", score_cases)
    report("fork_after_use", lambda: in_pool("fork"))
    report("fork_and_parent_at_once", fork_and_parent_at_once)
    report("forkserver", lambda: in_pool("forkserver"))
    report("spawn", lambda: in_pool("spawn"))
    report("bare_fork_exiting_normally", in_bare_fork)
    report("parent_after_children", score_cases)
    report("threads", in_threads)
"""
SCENARIOS = ("fork_while_helper_starts", "parent", "fork_after_use", "fork_and_parent_at_once",
             "forkserver", "spawn", "bare_fork_exiting_normally", "parent_after_children",
             "threads")


@pytest.fixture(scope="module")
def scenario_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Scenario name -> {"scores": [...] or an error string, "s": seconds}; "stderr" too."""
    script = tmp_path_factory.mktemp("verifier_processes") / "scenarios.py"
    script.write_text(_SCENARIOS)
    args = [sys.executable, str(script), json.dumps(CASES), str(SCENARIO_LIMIT_S)]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=SCRIPT_LIMIT_S,
                              cwd=Path(__file__).resolve().parents[1])
        stdout, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as expired:
        stdout, stderr = expired.stdout or "", f"killed after {SCRIPT_LIMIT_S} s"
    stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
    results = {record["scenario"]: record for record in map(json.loads, stdout.splitlines())}
    results["stderr"] = stderr[-3000:]
    return results


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_verifier_scores_right_and_wrong_answers_in_every_process(
    scenario: str, scenario_results: dict
) -> None:
    result = scenario_results.get(scenario)
    assert result is not None, f"{scenario} did not run: {scenario_results['stderr']}"
    expected = [score for _, _, score in CASES]
    assert result["scores"] == expected, (scenario, scenario_results["stderr"])
    assert result["s"] < SCENARIO_LIMIT_S


def _fresh_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts from zero: only the 1st, 2nd, 4th, ... failure of a kind is logged."""
    monkeypatch.setattr(verifiers, "_failures", dict.fromkeys(verifiers.FAILURE_KINDS, 0))


def test_fork_gives_the_child_its_own_pool() -> None:
    # The at-fork hook as the child runs it: nothing of the parent's is reused, and the locks are
    # fresh (one held by another thread at fork time would stay held forever in the child).
    pool = verifiers._SympyPool(size=1)
    pool.warm()
    inherited = list(pool._workers)
    try:
        pool._lock.acquire()  # as if other threads held the lock and the one slot at the fork
        pool._slots.acquire()
        pool._after_fork_in_child()
        assert pool._workers == set() and pool._idle == []
        assert pool.equivalent("\\frac{1}{2}", "0.5")  # would wait forever on the old locks
        assert not pool.equivalent("3", "4")
        assert len(pool._workers) == 1 and not pool._workers & set(inherited)
        assert [worker.checks for worker in inherited] == [0]
    finally:
        pool.close()
        for worker in inherited:
            worker.close()


def test_helper_that_never_starts_falls_back_instead_of_scoring_zero(monkeypatch, caplog) -> None:
    # The helper process exits at once (as a broken install would): the check itself must still be
    # made, in this process, and the fallback said out loud.
    monkeypatch.setattr(verifiers, "_WORKER_BOOT", "import sys; sys.exit(3)")
    monkeypatch.setattr(verifiers, "_SYMPY_POOL", verifiers._SympyPool(size=1))
    _fresh_counts(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=verifiers.__name__):
        assert math_verifier("\\boxed{\\frac{1}{2}}", "0.5") == 1.0
        assert math_verifier("\\boxed{3}", "4") == 0.0
    assert "did not start" in caplog.text
    assert verifiers.verifier_failures()["helper_start"] == 1


def test_overrun_is_counted_and_logged(monkeypatch, caplog) -> None:
    # A check past its sympy budget still scores 0 (the hostile-input protection), but not quietly.
    monkeypatch.setattr(verifiers, "_SYMPY_POOL", verifiers._SympyPool(size=1))
    monkeypatch.setattr(verifiers, "SYMPY_TIMEOUT_S", 0.0)
    try:
        verifiers._SYMPY_POOL.warm()
        assert verifiers._SYMPY_POOL._idle[0]._started.wait(60)
        _fresh_counts(monkeypatch)
        with caplog.at_level(logging.WARNING, logger=verifiers.__name__):
            assert math_verifier("\\boxed{\\frac{1}{2}}", "0.5") == 0.0
        assert verifiers.verifier_failures()["sympy_timeout"] == 1
        assert "ran past" in caplog.text and "scored 0" in caplog.text
    finally:
        verifiers._SYMPY_POOL.close()


def test_safe_score_counts_errors_and_timeouts(monkeypatch, caplog) -> None:
    def broken(response: str, reference: str) -> float:
        raise KeyError("no such field")

    def slow(response: str, reference: str) -> float:
        time.sleep(0.5)
        return 1.0

    _fresh_counts(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=verifiers.__name__):
        assert verifiers.safe_score(broken, "x", "y") == 0.0
        assert verifiers.safe_score(slow, "x", "y", timeout_s=0.05) == 0.0
        assert verifiers.safe_score(lambda r, g: "high", "x", "y") == 0.0
    assert verifiers.verifier_failures() == {**dict.fromkeys(verifiers.FAILURE_KINDS, 0),
                                             "verifier_error": 2, "verifier_timeout": 1}
    assert "KeyError" in caplog.text and "no such field" in caplog.text
    assert "still running after 0.05 s" in caplog.text
