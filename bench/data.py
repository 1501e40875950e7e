"""Benchmark data, from thinkvl's synthetic tasks, written as files thinkvl reads and as the
`datasets` rows TRL takes. Both frameworks get the same conversations."""

from __future__ import annotations

import json
import random
from pathlib import Path

from thinkvl.demo.tasks import IMAGE_TASKS, make_problem, question_text, short_response, synth
from thinkvl.demo.teacher import trace

SYSTEM = "You are a helpful assistant. Think step by step, then give the answer in \\boxed{}."


def text_conversations(n: int, seed: int, max_problems: int = 6) -> list[list[dict]]:
    """n single-turn conversations with a realistic length spread (about 30 to 1000 tokens).

    30% are short-answer SFT turns; the rest ask 1..max_problems arithmetic / word problems at once
    and answer each with a long-CoT teacher trace (~150 tokens per problem).
    """
    rng = random.Random(seed)
    convs = []
    for i in range(n):
        short = rng.random() < 0.3
        k = 1 if short else rng.randint(1, max_problems)
        recs = [make_problem(rng.choice(("arith", "word")), i * 16 + j, rng) for j in range(k)]
        if short:
            user, answer = question_text(recs[0]), short_response(recs[0])
        else:
            user = "\n".join(f"{j + 1}. {question_text(r)}" for j, r in enumerate(recs))
            answer = "\n\n".join(trace(r, rng, mistake=rng.random() < 0.5, explore=rng.random() < 0.5)
                                 for r in recs)
        msgs = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
        convs.append(msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}])
    return convs


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def as_prompt_completion(messages: list[dict]) -> dict:
    """TRL's conversational prompt-completion row (completion-only loss = thinkvl's assistant mask
    for single-turn conversations)."""
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def mm_conversations(out_dir: Path, n: int, seed: int, trace_frac: float = 0.5) -> Path:
    """n image conversations (the synthetic image tasks, 112x112 px): short answers, and for
    trace_frac of them a long-CoT teacher trace instead; returns the JSONL path (images beside it)."""
    paths = synth(out_dir / "synth", seed, n_sft=n, n_rl=0, n_eval=0, tasks=IMAGE_TASKS)
    rng = random.Random(seed)
    recs = []
    for line in paths["sft"].read_text().splitlines():
        r = json.loads(line)
        if rng.random() < trace_frac:
            r["messages"][-1]["content"] = trace(r, rng, mistake=rng.random() < 0.5, explore=rng.random() < 0.5)
        recs.append({"messages": r["messages"]})
    return write_jsonl(paths["sft"].parent / "mm.jsonl", recs)


def mm_trl_rows(jsonl: Path) -> list[dict]:
    """The same conversations as TRL vision rows: prompt/completion with the image in `images`."""
    from PIL import Image

    rows = []
    for line in jsonl.read_text().splitlines():
        msgs = json.loads(line)["messages"]
        images = []
        prompt = []
        for m in msgs[:-1]:
            if isinstance(m["content"], str):
                prompt.append({"role": m["role"], "content": [{"type": "text", "text": m["content"]}]})
                continue
            parts = []
            for p in m["content"]:
                if p["type"] == "image":
                    with Image.open(jsonl.parent / p["image"]) as im:
                        images.append(im.convert("RGB"))
                    parts.append({"type": "image"})
                else:
                    parts.append(p)
            prompt.append({"role": m["role"], "content": parts})
        completion = [{"role": "assistant", "content": [{"type": "text", "text": msgs[-1]["content"]}]}]
        rows.append({"prompt": prompt, "completion": completion, "images": images})
    return rows


def rl_problems(n: int, seed: int) -> list[dict]:
    """n verifiable text problems (arithmetic, word problems): messages + answer."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        r = make_problem(rng.choice(("arith", "word")), i, rng)
        out.append({"id": r["id"], "messages": [{"role": "system", "content": SYSTEM}] + r["messages"],
                    "answer": r["answer"]})
    return out
