"""Evaluation: the pass@k estimator by hand, exact breakdowns from a scripted engine, files, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from transformers import Kimi_K25ForConditionalGeneration

import thinkvl.eval.evaluate as ev
from thinkvl.data.chat import Example
from thinkvl.eval.evaluate import Scorer, difficulty_bucket, evaluate, format_table, pass_at_k, write_eval
from thinkvl.models.load import Loaded, wrap
from thinkvl.models.tiny import build_processor, build_tokenizer, tiny_config
from thinkvl.rollout.engine import SamplingParams
from thinkvl.rollout.types import Rollout

torch.set_num_threads(1)


# ---- the estimator ----


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2)) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0  # n - c = 1 < k: every pair holds a correct sample
    assert pass_at_k(5, 5, 5) == 1.0
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - 35 / 210)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_difficulty_buckets():
    assert [difficulty_bucket({"difficulty": d}) for d in (0.0, 0.19, 0.2, 0.6, 0.8, 1.0)] == [
        "0.0-0.2", "0.0-0.2", "0.2-0.4", "0.6-0.8", "0.8-1.0", "0.8-1.0"]
    assert difficulty_bucket({"difficulty": None, "difficulty_level": 3}) == "level 3"
    assert difficulty_bucket({}) == "unknown"


# ---- exact breakdowns from a scripted engine ----

IMG = [{"type": "image", "image": "IMAGE"}, {"type": "text", "text": "how many?"}]
PROBLEMS = [
    {"id": "A", "task": "count", "messages": [{"role": "user", "content": "a"}], "answer": "3", "difficulty": 0.1},
    {"id": "B", "task": "count", "messages": [{"role": "user", "content": IMG}], "answer": "2", "difficulty": 0.5},
    {"id": "C", "task": "add", "messages": [{"role": "user", "content": "c"}], "answer": "7", "difficulty": None,
     "difficulty_level": 3},
    {"id": "D", "task": "add", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": IMG}],
     "answer": "5", "difficulty": 1.0},
]
# greedy response, greedy truncated?, 5 sampled responses. '#' marks the required format.
SCRIPT = {
    "A": ("#3", False, ["3", "#3", "1", "2", "4"]),  # c=2: pass@1 .4, pass@2 .7
    "B": ("1", True, ["1"] * 5),  # c=0
    "C": ("7", False, ["7", "7", "7", "7", "1"]),  # c=4: pass@1 .8, pass@2 1
    "D": ("#5", False, ["5", "0", "0", "0", "0"]),  # c=1: pass@1 .2, pass@2 1 - C(4,2)/C(5,2) = .4
}
SCORER = Scorer(
    verify=lambda response, reference: float(response.lstrip("#") == reference),
    format_ok=lambda response: response.startswith("#"),
    extract_answer=lambda response: response.lstrip("#") or None,
)


class ScriptedEngine:
    """Returns SCRIPT's responses; a response's length in tokens is its length in characters."""

    def __init__(self):
        self.calls: list[tuple[int, int, SamplingParams]] = []

    def generate(self, prompts: list[Example], n: int, sampling: SamplingParams) -> list[list[Rollout]]:
        self.calls.append((len(prompts), n, sampling))
        out = []
        for p in prompts:
            greedy, truncated, samples = SCRIPT[p.extra["id"]]
            texts = [greedy] if sampling.greedy else samples[:n]
            out.append([Rollout(prompt_id=p.extra["id"], prompt_ids=p.input_ids, response_ids=[0] * len(t),
                                response_text=t, length=len(t), truncated=truncated and sampling.greedy,
                                finished=not (truncated and sampling.greedy), sample_index=j)
                        for j, t in enumerate(texts)])
        return out


class _RenderOnly:
    """The part of `Loaded` evaluate uses when an engine is given: rendering prompts."""

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> Example:
        return Example(input_ids=[1, 2, 3], loss_mask=[False] * 3)


def _scripted_eval(monkeypatch, **kw) -> tuple[ev.EvalResult, ScriptedEngine]:
    monkeypatch.setattr(ev, "PROBLEMS_PER_CALL", 3)  # 4 problems -> two calls per pass; order must hold
    engine = ScriptedEngine()
    result = evaluate(_RenderOnly(), PROBLEMS, verifier=SCORER, k=2, n_samples=5, max_new_tokens=9,
                      temperature=0.8, engine=engine, **kw)
    return result, engine


def test_evaluate_exact_breakdowns(monkeypatch):
    result, engine = _scripted_eval(monkeypatch)
    assert [(n_prompts, n, s.greedy) for n_prompts, n, s in engine.calls] == [(3, 1, True), (1, 1, True),
                                                                              (3, 5, False), (1, 5, False)]
    assert all(s.max_new_tokens == 9 and s.temperature == 0.8 for *_, s in engine.calls)
    o = result.overall
    assert o["n"] == 4
    assert o["greedy_pass@1"] == pytest.approx(3 / 4)
    assert o["sampled_pass@1"] == pytest.approx((0.4 + 0 + 0.8 + 0.2) / 4)
    assert o["pass@k"] == pytest.approx((0.7 + 0 + 1 + 0.4) / 4)
    assert o["format_ok"] == pytest.approx(0.5)
    assert o["truncated"] == pytest.approx(0.25)
    assert (o["mean_length"], o["median_length"]) == (pytest.approx(1.5), 1.5)
    assert o["sampled_mean_length"] == pytest.approx(21 / 20)  # 6 + 5 + 5 + 5 characters
    assert o["sampled_truncated"] == 0.0

    def metrics(groups: dict) -> dict:
        return {g: (s["n"], s["greedy_pass@1"], round(s["sampled_pass@1"], 6), round(s["pass@k"], 6))
                for g, s in groups.items()}

    assert metrics(result.by_task) == {"count": (2, 0.5, 0.2, 0.35), "add": (2, 1.0, 0.5, 0.7)}
    assert metrics(result.by_modality) == {"text": (2, 1.0, 0.6, 0.85), "image": (2, 0.5, 0.1, 0.2)}
    assert metrics(result.by_difficulty) == {"0.0-0.2": (1, 1.0, 0.4, 0.7), "0.4-0.6": (1, 0.0, 0.0, 0.0),
                                             "0.8-1.0": (1, 1.0, 0.2, 0.4), "level 3": (1, 1.0, 0.8, 1.0)}
    a = result.problems[0]
    assert (a.id, a.greedy_response, a.extracted_answer, a.score, a.sample_scores) == (
        "A", "#3", "3", 1.0, [1.0, 1.0, 0.0, 0.0, 0.0])
    assert "pass@2" in format_table(result)


def test_evaluate_require_format(monkeypatch):
    result, _ = _scripted_eval(monkeypatch, require_format=True)
    assert result.greedy_pass1 == pytest.approx(0.5)  # C's unformatted "7" now scores 0
    assert [p.sample_scores for p in result.problems][0] == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert result.sampled_pass1 == pytest.approx((0.2 + 0 + 0 + 0) / 4)


def test_write_eval_fields(monkeypatch, tmp_path):
    result, _ = _scripted_eval(monkeypatch)
    write_eval(result, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary) == {"settings", "overall", "by_task", "by_difficulty", "by_modality"}
    assert summary["settings"]["k"] == 2 and summary["settings"]["n_samples"] == 5
    assert summary["overall"]["pass@k"] == pytest.approx(0.525)
    lines = [json.loads(x) for x in (tmp_path / "out" / "responses.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == ["A", "B", "C", "D"]
    assert {"id", "task", "greedy_response", "extracted_answer", "score", "sample_scores", "answer"} <= set(lines[0])
    assert lines[1]["task"] == "count" and lines[1]["score"] == 0.0 and lines[1]["sample_scores"] == [0.0] * 5


# ---- the image-swap check ----

# Four counting scenes (answers 1, 2, 2, 3), one scene of another task and a text problem.
SWAP_PROBLEMS = [
    *({"id": f"s{i}", "task": "count", "answer": a,
       "messages": [{"role": "user", "content": [{"type": "image", "image": f"img{i}"},
                                                  {"type": "text", "text": "how many?"}]}]}
      for i, a in enumerate(["1", "2", "2", "3"])),
    {"id": "o", "task": "other", "answer": "9",
     "messages": [{"role": "user", "content": [{"type": "image", "image": "imgO"}, {"type": "text", "text": "?"}]}]},
    {"id": "t", "task": "count", "answer": "4", "messages": [{"role": "user", "content": "how many?"}]},
]
SEEN = {"img0": "1", "img1": "2", "img2": "2", "img3": "3", "imgO": "9"}


class _RenderImage:
    """Renders a prompt to its first image's path (what the engines below look at)."""

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> Example:
        images = ev._images_of(messages)
        return Example(input_ids=[1], loss_mask=[False], extra={"image": images[0] if images else None})


class _AnswerEngine:
    """Answers every prompt with `answer(prompt)`."""

    def __init__(self, answer):
        self.answer = answer

    def generate(self, prompts: list[Example], n: int, sampling: SamplingParams) -> list[list[Rollout]]:
        return [[Rollout(prompt_id=p.extra["id"], prompt_ids=p.input_ids, response_ids=[0], response_text=t,
                         length=1, truncated=False, finished=True, sample_index=j)
                 for j, t in enumerate([self.answer(p)] * n)] for p in prompts]


def test_swap_partners_same_task_other_answer():
    # s1 (2) skips s2 (also 2) for s3; s3 wraps round to s0; the lone 'other' scene and the text
    # problem have no partner
    assert ev.swap_partners(SWAP_PROBLEMS) == [(0, 1), (1, 3), (2, 3), (3, 0)]


def test_image_swap_separates_a_reader_from_a_blind_model():
    def run(answer):
        result = evaluate(_RenderImage(), SWAP_PROBLEMS, verifier=SCORER, k=0, engine=_AnswerEngine(answer),
                          swap_images=True, check_images=False)
        return result.overall["image_swap"]

    reader = run(lambda p: SEEN.get(p.extra["image"], "4"))  # answers what its image shows
    assert (reader["n"], reader["greedy_own"], reader["greedy_swapped"]) == (4, 1.0, 0.0)
    blind = run(lambda p: "2")  # the same answer whatever the image
    assert (blind["greedy_own"], blind["greedy_swapped"]) == (0.5, 0.5)
    assert blind["greedy_own_se"] == pytest.approx(math.sqrt(0.25 / 4))
    table = format_table(evaluate(_RenderImage(), SWAP_PROBLEMS, verifier=SCORER, k=0, check_images=False,
                                  engine=_AnswerEngine(lambda p: SEEN.get(p.extra["image"], "4")), swap_images=True))
    assert "image swap: greedy 100.0+-0.0 with their own images -> 0.0+-0.0" in table


# ---- with the real engine on a tiny model ----


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Loaded, list[dict]]:
    tok = build_tokenizer(["how many red circles are there? the answer is \\boxed{3}."] * 20, vocab_size=400)
    torch.manual_seed(0)
    model = Kimi_K25ForConditionalGeneration(tiny_config(tok, text_layers=2, vision_layers=1)).eval()
    loaded = wrap(model, build_processor(tok))
    d = tmp_path_factory.mktemp("eval")
    Image.new("RGB", (56, 56), (255, 0, 0)).save(d / "red.png")
    problems = [
        {"id": "t", "task": "count", "messages": [{"role": "user", "content": "how many?"}], "answer": "3"},
        {"id": "i", "task": "count", "answer": "1", "difficulty": 0.3,
         "messages": [{"role": "user", "content": [{"type": "image", "image": str(d / "red.png")},
                                                   {"type": "text", "text": "how many red circles?"}]}]},
    ]
    return loaded, problems


def test_evaluate_with_hf_engine(tiny):
    loaded, problems = tiny
    always = Scorer(verify=lambda r, a: 1.0, format_ok=lambda r: False, extract_answer=lambda r: None)
    result = evaluate(loaded, problems, verifier=always, k=2, max_new_tokens=5, batch_size=4)
    assert result.greedy_pass1 == 1.0 and result.sampled_pass1 == 1.0 and result.pass_k == 1.0
    assert result.overall["format_ok"] == 0.0
    assert set(result.by_modality) == {"text", "image"}
    for p in result.problems:
        assert 1 <= p.length <= 5 and len(p.sample_scores) == len(p.sample_lengths) == 2
        assert not p.truncated or p.length == 5


def test_cli_main_writes_files(tiny, tmp_path, capsys):
    pytest.importorskip("thinkvl.rewards.verifiers")
    loaded, problems = tiny
    loaded.model.save_pretrained(tmp_path / "model")
    loaded.processor.save_pretrained(tmp_path / "model")
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in problems))
    rc = ev.main(["--model", str(tmp_path / "model"), "--data", str(data), "--out", str(tmp_path / "out"),
                  "--k", "2", "--max-new-tokens", "4", "--verifier", "math", "--limit", "1"])
    assert rc == 0
    assert "greedy@1" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["overall"]["n"] == 1 and summary["settings"]["verifier"] == "math"
    assert len((tmp_path / "out" / "responses.jsonl").read_text().splitlines()) == 1


def test_evaluate_plain_function_verifier_greedy_only(tiny):
    """A user's `(response, reference) -> float` goes through the shared safe scorer; k=0 skips sampling."""
    loaded, problems = tiny

    def only_image_problem(response: str, reference: str) -> float:
        return float(reference == "1")

    result = evaluate(loaded, problems, verifier=only_image_problem, k=0, max_new_tokens=3)
    assert result.greedy_pass1 == 0.5 and result.sampled_pass1 is None and result.pass_k is None
    assert result.by_modality["image"]["greedy_pass@1"] == 1.0 and result.by_modality["text"]["greedy_pass@1"] == 0.0
    assert result.settings["verifier"] == "only_image_problem"


def test_image_reliance_is_zero_for_a_model_that_cannot_see(tiny, tmp_path):
    """Log-prob of each image problem's response with its own image minus with another problem's: a
    model whose projector outputs zeros sees every image alike and must score exactly 0."""
    loaded, _ = tiny
    problems, responses = [], []
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (56, 56), color).save(tmp_path / f"{i}.png")
        problems.append({"id": str(i), "answer": "1", "messages": [{"role": "user", "content": [
            {"type": "image", "image": str(tmp_path / f"{i}.png")}, {"type": "text", "text": "how many?"}]}]})
        responses.append(f"the answer is \\boxed{{{i + 1}}}.")
    problems.append({"id": "t", "answer": "3", "messages": [{"role": "user", "content": "how many?"}]})
    responses.append("3")  # text problems are left out
    seeing = ev.image_reliance(loaded, problems, responses)
    assert seeing is not None and abs(seeing) > 1e-4
    out = loaded.model.model.mm_projector.out_proj
    saved = {k: v.clone() for k, v in out.state_dict().items()}
    try:
        with torch.no_grad():
            for v in out.parameters():
                v.zero_()
        assert ev.image_reliance(loaded, problems, responses) == 0.0
    finally:
        out.load_state_dict(saved)
    assert ev.image_reliance(loaded, problems[:1] + problems[3:], responses[:1] + responses[3:]) is None


def test_greedy_metrics_per_task(monkeypatch):
    # The in-training eval logs each task's greedy accuracy too: RL can trade one task for another
    # while the overall figure stays where it was.
    real = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **kw: real(*a, engine=ScriptedEngine(), **kw))

    class Loaded_(_RenderOnly):
        model = torch.nn.Linear(1, 1)

    m = ev.greedy_metrics(Loaded_(), PROBLEMS, SCORER, max_new_tokens=9)
    assert m == {"eval/accuracy": 0.75, "eval/format": 0.5, "eval/response_length": 1.5,
                 "eval/accuracy/add": 1.0, "eval/accuracy/count": 0.5}
    one_task = [p for p in PROBLEMS if p["task"] == "add"]
    assert set(ev.greedy_metrics(Loaded_(), one_task, SCORER, max_new_tokens=9)) == {
        "eval/accuracy", "eval/format", "eval/response_length"}


def test_majority_answer_and_top_answer_share_hand_computed():
    from thinkvl.eval.evaluate import ProblemResult, summarize

    def res(task, answer, got):
        return ProblemResult(id=f"{task}{answer}{got}", task=task, has_image=False, difficulty="all", answer=answer,
                             extracted_answer=got, score=float(got == answer), format_ok=True, length=3,
                             truncated=False)

    # count: truths 1,1,1,2 -> answering "1" always scores 3/4; the model answers "1" to all four
    # arith: truths 4,5 (a tie: 1 of 2); the model answers 4 and 9 (top share 1 of 2)
    rs = [res("count", "1", "1"), res("count", "1", "1"), res("count", "1", "1"), res("count", "2", "1"),
          res("arith", "4", "4"), res("arith", "5", "9")]
    s = summarize(rs, k=0)
    assert s["majority_answer"] == pytest.approx((3 + 1) / 6)
    assert s["top_answer_share"] == pytest.approx((4 + 1) / 6)
    assert s["greedy_pass@1"] == pytest.approx(4 / 6)  # all of count's 3/4 is the prior
    assert summarize([], k=0)["majority_answer"] is None


def test_tag_shares_are_over_responses_where_the_tag_applies():
    from thinkvl.eval.evaluate import ProblemResult, summarize

    def res(i, reading, samples=()):
        r = ProblemResult(id=str(i), task="t", has_image=reading is not None, difficulty="all", answer="1",
                          extracted_answer="1", score=1.0, format_ok=True, length=3, truncated=False)
        r.tags = {} if reading is None else {"reads_exact": reading[0], "reads_colours": reading[1]}
        r.sample_tags = [{"glance": g} for g in samples]
        r.sample_scores = [1.0] * len(samples)
        return r

    s = summarize([res(0, (True, True), (True, False)), res(1, (False, True), (None, False)),
                   res(2, (False, False)), res(3, None)], k=0)
    assert s["tags"] == pytest.approx({"reads_exact": 1 / 3, "reads_colours": 2 / 3})
    assert s["reading"] == pytest.approx(1 / 3) and s["reading_colors"] == pytest.approx(2 / 3)
    assert s["sample_tags"] == pytest.approx({"glance": 1 / 3})  # the None sample does not count
    assert summarize([res(3, None)], k=0)["reading"] is None


def test_standard_errors_by_hand():
    from thinkvl.eval.evaluate import ProblemResult, summarize

    def res(i, greedy, samples):
        r = ProblemResult(id=str(i), task="t", has_image=False, difficulty="all", answer="1",
                          score=float(greedy), format_ok=True, length=3, truncated=False)
        r.sample_scores = [float(x) for x in samples]
        return r

    # greedy 3 of 4 right: se = sqrt(0.75 * 0.25 / 4); avg@4 per problem 1, 0.5, 0.25, 0.25:
    # mean 0.5, sample std sqrt(((0.5)^2 + 0 + 0.25^2 + 0.25^2) / 3) = sqrt(0.125), se = that / 2
    s = summarize([res(0, 1, [1, 1, 1, 1]), res(1, 1, [1, 1, 0, 0]), res(2, 1, [1, 0, 0, 0]),
                   res(3, 0, [0, 0, 0, 1])], k=2)
    assert s["greedy_pass@1"] == 0.75 and s["greedy_pass@1_se"] == pytest.approx((0.75 * 0.25 / 4) ** 0.5)
    assert s["avg@n"] == s["sampled_pass@1"] == 0.5
    assert s["avg@n_se"] == pytest.approx(0.125 ** 0.5 / 2)
