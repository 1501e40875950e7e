"""Evaluation: greedy pass@1, sampled pass@1, unbiased pass@k, response length, format compliance.

For each problem the model answers once greedily and n times by sampling (n = `n_samples`, default
k). A response is correct when the verifier's score is >= 0.5 (verifiers return 0 or 1; partial
scores are thresholded). Per problem with c correct samples out of n:

    sampled pass@1 = c / n
    pass@k         = 1 - C(n - c, k) / C(n, k)      (Chen et al. 2021, unbiased for n >= k)

and every metric is the mean over problems, overall and broken down by task, by difficulty bucket
and by modality (text vs image). `thinkvl eval --model DIR --data FILE` prints a table and writes
`summary.json` + `responses.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from thinkvl.models.load import Loaded
from thinkvl.rollout.engine import GenerationEngine, SamplingParams, VLLMSettings, build_engine
from thinkvl.rollout.types import Rollout

CORRECT_THRESHOLD = 0.5
# Problems per generate call: fixed (not batch_size) so seeds, hence samples, do not depend on it.
PROBLEMS_PER_CALL = 64
DIFFICULTY_EDGES = (0.2, 0.4, 0.6, 0.8)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    The probability that at least one of k samples drawn without replacement from the n is correct.
    It is 1 when n - c < k (every k-subset holds a correct sample) and 0 when c = 0.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def difficulty_bucket(problem: dict) -> str:
    """'0.0-0.2' ... '0.8-1.0' from `difficulty` (1.0 in the last bucket), else 'level N', else 'unknown'."""
    d = problem.get("difficulty")
    if d is not None:
        i = sum(d >= e for e in DIFFICULTY_EDGES)
        lo = 0.0 if i == 0 else DIFFICULTY_EDGES[i - 1]
        hi = 1.0 if i == len(DIFFICULTY_EDGES) else DIFFICULTY_EDGES[i]
        return f"{lo:.1f}-{hi:.1f}"
    if problem.get("difficulty_level") is not None:
        return f"level {problem['difficulty_level']}"
    return "unknown"


def _images_of(messages: list[dict]) -> list[str]:
    """The image parts' paths of a conversation, in order."""
    return [part["image"] for m in messages if not isinstance(m["content"], str)
            for part in m["content"] if part.get("type") == "image"]


def has_image(problem: dict) -> bool:
    return bool(_images_of(problem["messages"]))


@dataclass
class Scorer:
    """The three verifier functions evaluation needs; each must never raise."""

    verify: Callable[[str, str], float]  # (response, reference) -> score in [0, 1]
    format_ok: Callable[[str], bool]  # the response follows the expected answer format
    extract_answer: Callable[[str], str | None]  # the final answer the verifier would read

    @classmethod
    def build(cls, verifier: str | Callable[[str, str], float], timeout_s: float = 2.0) -> Scorer:
        """From a registered verifier name or a plain `(response, reference) -> float` function."""
        from thinkvl.rewards import verifiers

        fn = verifiers.get_verifier(verifier) if isinstance(verifier, str) else verifier
        return cls(
            verify=partial(verifiers.safe_score, fn, timeout_s=timeout_s),
            format_ok=verifiers.format_ok,
            extract_answer=verifiers.extract_answer,
        )


@dataclass
class ProblemResult:
    """One problem's responses and scores."""

    id: str
    task: str
    has_image: bool
    difficulty: str  # the bucket label
    answer: str
    question: str = ""  # the last user turn's text
    image: str | None = None  # the first image's path, if any
    greedy_response: str | None = None
    extracted_answer: str | None = None
    score: float | None = None  # greedy response's score (0 when require_format and the format fails)
    format_ok: bool | None = None
    length: int | None = None  # greedy response tokens
    truncated: bool | None = None
    sample_scores: list[float] = field(default_factory=list)  # [n]
    sample_lengths: list[int] = field(default_factory=list)  # [n]
    sample_truncated: list[bool] = field(default_factory=list)  # [n]
    # the tagger's named yes/no tags (None: does not apply) of the greedy response and of each sample
    tags: dict[str, bool | None] = field(default_factory=dict)
    sample_tags: list[dict[str, bool | None]] = field(default_factory=list)  # [n]

    @property
    def n_correct(self) -> int:
        return sum(s >= CORRECT_THRESHOLD for s in self.sample_scores)


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _top_share_by_task(values: Sequence[tuple[str, str]]) -> float | None:
    """Share of (task, value) pairs whose value is the most common one of its task."""
    by_task: dict[str, Counter] = {}
    for task, value in values:
        by_task.setdefault(task, Counter())[value] += 1
    return sum(c.most_common(1)[0][1] for c in by_task.values()) / len(values) if values else None


def _se_binomial(p: float | None, n: int) -> float | None:
    """Standard error of a share ``p`` of ``n`` independent trials: sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1 - p) / n) if p is not None and n else None


def _se_mean(xs: Sequence[float]) -> float | None:
    """Standard error of the mean of per-problem values: sample std / sqrt(n) (n >= 2)."""
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) >= 2 else None


def tag_shares(tag_dicts: Sequence[dict[str, bool | None]]) -> dict[str, float]:
    """For each tag name, the share of responses (where it applies) that have it."""
    names = sorted({name for d in tag_dicts for name in d})
    out = {}
    for name in names:
        vals = [d[name] for d in tag_dicts if d.get(name) is not None]
        if vals:
            out[name] = sum(map(bool, vals)) / len(vals)
    return out


def summarize(results: Sequence[ProblemResult], k: int) -> dict:
    """Metrics of a group of problems (means over problems; None when a pass was not run).

    ``avg@n`` (also ``sampled_pass@1``) is the mean correctness of the n samples per problem at the
    sampling temperature, DeepSeek-R1's pass@1; ``*_se`` are standard errors over problems
    (binomial for greedy accuracy, the per-problem means' std / sqrt(n) for avg@n). ``tags`` /
    ``sample_tags``: the share of greedy responses / samples with each tagger tag.

    Two guards against reading an answer prior as skill: ``majority_answer`` is the accuracy of
    answering every problem of a task with that task's most common reference answer (a model that
    ignores the question scores up to this), and ``top_answer_share`` is the share of greedy answers
    equal to the most common greedy answer of their task (near 1: the model answers a constant)."""
    greedy = [r for r in results if r.score is not None]
    sampled = [r for r in results if r.sample_scores]
    lengths = [r.length for r in greedy] or [n for r in sampled for n in r.sample_lengths]
    greedy_acc = _mean([float(r.score >= CORRECT_THRESHOLD) for r in greedy])
    per_problem = [r.n_correct / len(r.sample_scores) for r in sampled]
    tags = tag_shares([r.tags for r in greedy])
    return {
        "n": len(results),
        "greedy_pass@1": greedy_acc,
        "greedy_pass@1_se": _se_binomial(greedy_acc, len(greedy)),
        "sampled_pass@1": _mean(per_problem),
        "avg@n": _mean(per_problem),
        "avg@n_se": _se_mean(per_problem),
        "pass@k": _mean([pass_at_k(len(r.sample_scores), r.n_correct, k) for r in sampled]) if k else None,
        "mean_length": _mean(lengths),
        "median_length": statistics.median(lengths) if lengths else None,
        "format_ok": _mean([float(r.format_ok) for r in greedy]),
        "truncated": _mean([float(r.truncated) for r in greedy]),
        "sampled_mean_length": _mean([n for r in sampled for n in r.sample_lengths]),
        "sampled_truncated": _mean([float(t) for r in sampled for t in r.sample_truncated]),
        "majority_answer": _top_share_by_task([(r.task, r.answer) for r in results]),
        "top_answer_share": _top_share_by_task([(r.task, str(r.extracted_answer)) for r in greedy]),
        "tags": tags,
        "sample_tags": tag_shares([t for r in sampled for t in r.sample_tags]),
        # kept under their old names for the report: scene responses that read every row right
        "reading": tags.get("reads_exact"),
        "reading_colors": tags.get("reads_colours"),
    }


def _breakdown(results: Sequence[ProblemResult], key: Callable[[ProblemResult], str], k: int) -> dict[str, dict]:
    groups: dict[str, list[ProblemResult]] = {}
    for r in results:
        groups.setdefault(key(r), []).append(r)
    return {name: summarize(groups[name], k) for name in sorted(groups)}


@dataclass
class EvalResult:
    """Overall metrics, breakdowns and per-problem records of one evaluation."""

    overall: dict  # `summarize` of all problems
    by_task: dict[str, dict]
    by_difficulty: dict[str, dict]
    by_modality: dict[str, dict]  # 'text' / 'image'
    problems: list[ProblemResult]
    settings: dict  # k, n_samples, max_new_tokens, temperature, verifier, ...

    @property
    def greedy_pass1(self) -> float | None:
        return self.overall["greedy_pass@1"]

    @property
    def sampled_pass1(self) -> float | None:
        return self.overall["sampled_pass@1"]

    @property
    def pass_k(self) -> float | None:
        return self.overall["pass@k"]

    def summary(self) -> dict:
        return {
            "settings": self.settings,
            "overall": self.overall,
            "by_task": self.by_task,
            "by_difficulty": self.by_difficulty,
            "by_modality": self.by_modality,
        }


def _generate_all(
    engine: GenerationEngine, prompts: list, n: int, sampling: SamplingParams, desc: str
) -> list[list[Rollout]]:
    """Generate in calls of PROBLEMS_PER_CALL prompts (a progress bar; seeds offset per call)."""
    out: list[list[Rollout]] = []
    for start in tqdm(range(0, len(prompts), PROBLEMS_PER_CALL), desc=desc, unit="call", leave=False):
        call = replace(sampling, seed=sampling.seed * 1_000_003 + start)
        out.extend(engine.generate(prompts[start : start + PROBLEMS_PER_CALL], n, call))
    return out


def _score(scorer: Scorer, rollout: Rollout, answer: str, require_format: bool) -> tuple[float, bool]:
    """(score, format ok) of one response; a format failure scores 0 when the format is required."""
    ok = bool(scorer.format_ok(rollout.response_text))
    if require_format and not ok:
        return 0.0, ok
    return float(scorer.verify(rollout.response_text, answer)), ok


def evaluate(
    loaded: Loaded,
    problems: list[dict],
    verifier: str | Callable[[str, str], float] | Scorer = "math",
    k: int = 4,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    greedy: bool = True,
    batch_size: int = 32,
    seed: int = 0,
    require_format: bool = False,
    n_samples: int | None = None,
    engine: GenerationEngine | None = None,
    check_images: bool = True,
    tagger: Callable[[dict, str], dict[str, bool | None]] | None = None,
    swap_images: bool = False,
) -> EvalResult:
    """Evaluate `loaded` on problem records (`messages`, `answer`, optional `id`/`task`/`difficulty`).

    greedy: also run one greedy response per problem (greedy pass@1, lengths, format compliance).
    k: pass@k's k; n_samples (default k) responses are sampled per problem at `temperature`
    (k = 0 skips sampling). engine: defaults to an `HFEngine(loaded, batch_size)`, which bans image
    placeholder tokens. check_images: with greedy, also measure `image_reliance` (overall).
    tagger: `(problem, response) -> {name: bool or None}` (e.g. the demo's behaviours); every
    response is tagged and the shares are in the summaries' `tags` / `sample_tags`.
    swap_images: with greedy, also answer every image problem greedily with the image of another
    problem of its task whose answer differs (:func:`swap_partners`), scored against the problem's
    own answer: `image_swap` in the overall summary. A model that reads its images falls toward 0
    there; one that answers from the question alone keeps its accuracy.
    """
    n = k if n_samples is None else n_samples
    if k < 0 or n < k:
        raise ValueError(f"need 0 <= k <= n_samples, got k={k}, n_samples={n}")
    if engine is None:
        from thinkvl.rollout.hf_engine import HFEngine

        engine = HFEngine(loaded, batch_size=batch_size)
    scorer = verifier if isinstance(verifier, Scorer) else Scorer.build(verifier)
    prompts = []
    for p in problems:
        ex = loaded.render(p["messages"], add_generation_prompt=True)
        ex.extra["id"] = str(p["id"])
        prompts.append(ex)
    results = [
        ProblemResult(id=str(p["id"]), task=str(p.get("task", "default")), has_image=has_image(p),
                      difficulty=difficulty_bucket(p), answer=str(p["answer"]),
                      question=_question(p), image=_first_image(p))
        for p in problems
    ]
    if greedy:
        sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, greedy=True, seed=seed)
        for p, res, (r,) in zip(problems, results, _generate_all(engine, prompts, 1, sampling, "greedy")):
            res.score, res.format_ok = _score(scorer, r, res.answer, require_format)
            res.tags = tagger(p, r.response_text) if tagger else {}
            res.greedy_response, res.extracted_answer = r.response_text, scorer.extract_answer(r.response_text)
            res.length, res.truncated = r.length, r.truncated
    if n > 0:
        sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        for p, res, group in zip(problems, results, _generate_all(engine, prompts, n, sampling, "samples")):
            res.sample_tags = [tagger(p, r.response_text) for r in group] if tagger else []
            res.sample_scores = [_score(scorer, r, res.answer, require_format)[0] for r in group]
            res.sample_lengths = [r.length for r in group]
            res.sample_truncated = [r.truncated for r in group]
    overall = summarize(results, k)
    if greedy and swap_images:
        overall["image_swap"] = _image_swap(engine, loaded, problems, results, scorer, max_new_tokens,
                                            temperature, seed, require_format)
    if greedy and check_images:
        overall["image_reliance"] = image_reliance(loaded, problems, [r.greedy_response or "" for r in results])
    settings = {
        "k": k, "n_samples": n, "max_new_tokens": max_new_tokens, "temperature": temperature, "greedy": greedy,
        "seed": seed, "require_format": require_format, "n_problems": len(problems),
        "verifier": verifier if isinstance(verifier, str) else getattr(verifier, "__name__", type(verifier).__name__),
    }
    return EvalResult(
        overall=overall,
        by_task=_breakdown(results, lambda r: r.task, k),
        by_difficulty=_breakdown(results, lambda r: r.difficulty, k),
        by_modality=_breakdown(results, lambda r: "image" if r.has_image else "text", k),
        problems=results,
        settings=settings,
    )


def _with_images(messages: list[dict], images: list[str]) -> list[dict]:
    """A copy of `messages` whose image parts, in order, show `images` instead."""
    it = iter(images)
    out = []
    for m in messages:
        if isinstance(m["content"], str):
            out.append(dict(m))
        else:
            out.append({**m, "content": [{**part, "image": next(it)} if part.get("type") == "image" else dict(part)
                                         for part in m["content"]]})
    return out


def _image_partners(problems: list[dict], idx: list[int],
                    accept: Callable[[dict, dict], bool] = lambda p, q: True) -> list[tuple[int, int]]:
    """(i, j) for each i in ``idx``: j is the next problem of ``idx`` after i (cyclic) with as many
    images as i, other images, and ``accept(problems[i], problems[j])``; an i with none is left out."""
    pairs = []
    for n, i in enumerate(idx):
        mine = _images_of(problems[i]["messages"])
        for j in idx[n + 1:] + idx[:n]:
            theirs = _images_of(problems[j]["messages"])
            if len(theirs) == len(mine) and theirs != mine and accept(problems[i], problems[j]):
                pairs.append((i, j))
                break
    return pairs


def swap_partners(problems: list[dict]) -> list[tuple[int, int]]:
    """(i, j) pairs: image problem i shown the images of problem j, the next problem after i
    (cyclic) of the same task with as many images, other images and another answer. Problems with
    no such partner are left out."""
    return _image_partners(problems, [i for i, p in enumerate(problems) if _images_of(p["messages"])],
                           lambda p, q: p.get("task") == q.get("task") and str(p["answer"]) != str(q["answer"]))


def _image_swap(engine: GenerationEngine, loaded: Loaded, problems: list[dict], results: list[ProblemResult],
                scorer: Scorer, max_new_tokens: int, temperature: float, seed: int,
                require_format: bool) -> dict | None:
    """Greedy accuracy of the image problems with their own images and with a partner's
    (:func:`swap_partners`), both against their own answers, with binomial standard errors."""
    pairs = swap_partners(problems)
    if not pairs:
        return None
    prompts = []
    for i, j in pairs:
        swapped = _with_images(problems[i]["messages"], _images_of(problems[j]["messages"]))
        ex = loaded.render(swapped, add_generation_prompt=True)
        ex.extra["id"] = f"{problems[i]['id']}@swap"
        prompts.append(ex)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, greedy=True, seed=seed)
    swapped_scores = [_score(scorer, r, results[i].answer, require_format)[0]
                      for (i, _), (r,) in zip(pairs, _generate_all(engine, prompts, 1, sampling, "swapped images"))]
    own = [results[i].score for i, _ in pairs]
    n = len(pairs)

    def acc(scores: list) -> tuple[float, float]:
        p = sum(s >= CORRECT_THRESHOLD for s in scores) / n
        return p, _se_binomial(p, n)

    (p_own, se_own), (p_swap, se_swap) = acc(own), acc(swapped_scores)
    return {"n": n, "greedy_own": p_own, "greedy_own_se": se_own, "greedy_swapped": p_swap,
            "greedy_swapped_se": se_swap}


@torch.no_grad()
def image_reliance(loaded: Loaded, problems: list[dict], responses: list[str], batch: int = 16) -> float | None:
    """How much the model's own greedy responses depend on the image it was shown.

    For every problem with images, the response's mean token log-prob with the problem's own images
    minus the same with the images of the next image problem (same image count, cyclic). Returns the
    mean over those problems in nats per token: about 0 means the model ignores its images (a VLM
    that answers from the text prior alone); None when fewer than two problems have images.
    """
    from thinkvl.data.packing import collate_rows
    from thinkvl.models.forward import token_logprobs

    idx = [i for i, p in enumerate(problems) if _images_of(p["messages"]) and responses[i]]
    if len(idx) < 2:
        return None
    pairs = [(i, _images_of(problems[j]["messages"])) for i, j in _image_partners(problems, idx)]
    if not pairs:
        return None
    was_training = loaded.model.training
    loaded.model.eval()
    diffs = []
    for start in range(0, len(pairs), batch):
        examples = []
        for i, imgs in pairs[start : start + batch]:
            answer = {"role": "assistant", "content": responses[i]}
            examples.append(loaded.render(problems[i]["messages"] + [answer]))
            examples.append(loaded.render(_with_images(problems[i]["messages"], imgs) + [answer]))
        rows = [[e] for e in range(len(examples))]
        b = collate_rows(examples, rows, loaded.pad_id, loaded.positions)
        mask = b["target_mask"]
        mean_lp = (token_logprobs(loaded.model, b) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        diffs.extend((mean_lp[0::2] - mean_lp[1::2]).tolist())
    loaded.model.train(was_training)
    return sum(diffs) / len(diffs)


def _question(problem: dict) -> str:
    content = problem["messages"][-1]["content"]
    return content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")


def _first_image(problem: dict) -> str | None:
    images = _images_of(problem["messages"])
    return str(images[0]) if images else None


def greedy_metrics(loaded: Loaded, problems: list[dict], verifier: str, max_new_tokens: int) -> dict[str, float]:
    """Greedy accuracy, format compliance and response length, for logging inside training runs; with
    more than one task, also each task's greedy accuracy (`eval/accuracy/<task>`): RL can trade one
    task for another while the overall figure stays put; with synthetic scenes, `eval/reads_colours`."""
    was_training = loaded.model.training
    loaded.model.eval()
    res = evaluate(loaded, problems, verifier=verifier, k=0, max_new_tokens=max_new_tokens, check_images=False)
    loaded.model.train(was_training)
    o = res.overall
    out = {"eval/accuracy": o["greedy_pass@1"], "eval/format": o["format_ok"], "eval/response_length": o["mean_length"]}
    if len(res.by_task) > 1:
        out.update({f"eval/accuracy/{task}": s["greedy_pass@1"] for task, s in sorted(res.by_task.items())})
    if o["reading_colors"] is not None:  # synthetic scenes: is the model still reading the image out right?
        out["eval/reads_colours"] = o["reading_colors"]
    return out


def write_eval(result: EvalResult, out_dir: str | Path) -> Path:
    """Write `summary.json` (settings, overall, breakdowns) and `responses.jsonl` (one line a problem)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result.summary(), indent=2) + "\n", encoding="utf-8")
    with (out / "responses.jsonl").open("w", encoding="utf-8") as f:
        for r in result.problems:
            f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
    return out


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.1f}"


def format_table(result: EvalResult) -> str:
    """A plain-text table: overall, then each breakdown's groups (accuracies in %, +- one standard
    error), then the tag shares."""
    k, n = result.settings["k"], result.settings["n_samples"]
    head = (f"{'group':<24}{'n':>6}{'greedy@1':>14}{f'avg@{n}':>14}{f'pass@{k}':>9}{'len':>8}{'format':>8}"
            f"{'trunc':>7}")
    lines = [head, "-" * len(head)]

    def pm(x: float | None, se: float | None) -> str:
        return _fmt(x) + (f"+-{100 * se:.1f}" if se is not None else "")

    def row(name: str, s: dict) -> str:
        return (f"{name[:23]:<24}{s['n']:>6}{pm(s['greedy_pass@1'], s['greedy_pass@1_se']):>14}"
                f"{pm(s['avg@n'], s['avg@n_se']):>14}{_fmt(s['pass@k']):>9}{_fmt(s['mean_length'], pct=False):>8}"
                f"{_fmt(s['format_ok']):>8}{_fmt(s['truncated']):>7}")

    lines.append(row("all", result.overall))
    swap = result.overall.get("image_swap")
    if swap:
        lines.append(f"image swap: greedy {_fmt(swap['greedy_own'])}+-{100 * swap['greedy_own_se']:.1f} with their "
                     f"own images -> {_fmt(swap['greedy_swapped'])}+-{100 * swap['greedy_swapped_se']:.1f} with "
                     f"another problem's (same task, other answer), {swap['n']} image problems")
    if result.overall.get("image_reliance") is not None:
        lines.append(f"image reliance: {result.overall['image_reliance']:.3f} nats/token (log-prob of the greedy "
                     "responses with their own image minus with another problem's; ~0 = the image is ignored)")
    for title, groups in (("task", result.by_task), ("difficulty", result.by_difficulty),
                          ("modality", result.by_modality)):
        if len(groups) > 1:
            lines.extend(row(f"{title}: {name}", s) for name, s in groups.items())
    o = result.overall
    if o.get("tags") or o.get("sample_tags"):
        names = sorted(set(o.get("tags", {})) | set(o.get("sample_tags", {})))
        lines.append("tags (share of greedy responses | of samples): " + ", ".join(
            f"{name} {_fmt(o['tags'].get(name))} | {_fmt(o['sample_tags'].get(name))}" for name in names))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="thinkvl eval", description="pass@1, pass@k and response length of a model")
    p.add_argument("--model", required=True, help="model folder, cached hub id, or 'tiny'")
    p.add_argument("--data", required=True, help="problem records (JSONL / Parquet / datasets folder)")
    p.add_argument("--out", default=None, help="write summary.json and responses.jsonl here")
    p.add_argument("--k", type=int, default=4, help="pass@k's k (0: no sampling)")
    p.add_argument("--n-samples", type=int, default=None, help="samples per problem (default k)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--verifier", default="math", help="a registered verifier name")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N problems only")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--require-format", action="store_true", help="a response with a bad format scores 0")
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy pass")
    p.add_argument("--tagger", default=None,
                   help="module:function (problem, response) -> {tag: bool}; shares of each tag are reported "
                        "(the demo's: thinkvl.demo.behaviours:tag_response)")
    p.add_argument("--swap-images", action="store_true",
                   help="also answer each image problem greedily with another problem's image (same task, other "
                        "answer), scored against its own answer: does the model use the image?")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="generation engine (vllm: its own env)")
    p.add_argument("--vllm-python", default="", help="the vLLM environment's python (default $THINKVL_VLLM_PYTHON)")
    p.add_argument("--vllm-max-model-len", type=int, default=None, help="vLLM's prompt + response tokens at most "
                   "(default: the model's limit)")
    return p


def load_tagger(spec: str | None) -> Callable[[dict, str], dict] | None:
    """The function named by ``module:function`` (None for None / empty)."""
    from thinkvl.config import import_object

    return import_object(spec, "tagger") if spec else None


def main(argv: list[str] | None = None) -> int:
    """`thinkvl eval`: evaluate, print a table, optionally write the files."""
    from thinkvl.data.formats import read_records
    from thinkvl.models.load import load

    a = build_parser().parse_args(argv)
    problems = read_records(a.data, kind="problem", limit=a.limit)
    loaded = load(a.model)
    tagger = load_tagger(a.tagger)  # before the engine: a bad name fails without starting vLLM
    vllm = VLLMSettings(python=a.vllm_python, max_model_len=a.vllm_max_model_len)
    engine = build_engine(a.engine, loaded, a.model, a.batch_size, vllm, seed=a.seed)
    try:
        result = evaluate(
            loaded, problems, verifier=a.verifier, k=a.k, max_new_tokens=a.max_new_tokens,
            temperature=a.temperature, greedy=not a.no_greedy, batch_size=a.batch_size, seed=a.seed,
            require_format=a.require_format, n_samples=a.n_samples, tagger=tagger, engine=engine,
            swap_images=a.swap_images,
        )
    finally:
        getattr(engine, "close", lambda: None)()
    print(format_table(result))
    if a.out:
        print(f"wrote {write_eval(result, a.out)}")
    return 0
