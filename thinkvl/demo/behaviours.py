"""What a response to a demo problem does: its behaviours and how well it read the image.

:func:`tag_response` is the demo's tagger for ``thinkvl.eval.evaluate`` (``tagger=``): it returns
named yes/no tags per response, which the evaluation averages into shares (greedy responses and
samples separately). The behaviours are the program teacher's (:mod:`thinkvl.demo.teacher`), so the
shares before and after RL say which behaviours RL chose.
"""

from __future__ import annotations

from typing import Any

from thinkvl.demo.tasks import reading_scores
from thinkvl.demo.teacher import GLANCE, REREAD

BEHAVIOURS: dict[str, str] = {
    "glance": "answers at a glance, no working (`Quick answer: ...`)",
    "works": "works the problem out (reads the rows / restates the expression or start)",
    "checks": "checks its result (`Check: ...` line)",
    "repairs": "catches and repairs a slip (`Wait, ...`)",
    "explores": "re-derives the answer another way (`Another way: ...`)",
    "rereads": "reads its input a second time (`Let me read it again: ...`)",
}


def _thought(response: str) -> str | None:
    if "<think>" not in response or "</think>" not in response:
        return None
    return response.split("<think>", 1)[1].split("</think>", 1)[0].strip()


def tag_response(problem: dict[str, Any], response: str) -> dict[str, bool | None]:
    """Behaviour tags of one response (None when it has no ``<think>...</think>``) and, for scene
    problems whose response reads the rows out, ``reads_colours`` / ``reads_exact`` (every row's
    colours / objects read out right)."""
    thought = _thought(response)
    tags: dict[str, bool | None] = {name: None for name in BEHAVIOURS}
    if thought is not None:
        lines = thought.splitlines()
        glance = bool(lines) and lines[0].startswith(GLANCE)
        tags.update(glance=glance, works=bool(lines) and not glance,
                    checks=any(line.startswith("Check:") for line in lines),
                    repairs=any(line.startswith("Wait,") or " Wait, " in line for line in lines),
                    explores=any(line.startswith("Another way:") for line in lines),
                    rereads=any(line.startswith(REREAD) for line in lines))
    reading = reading_scores(problem, response) if "Row 1:" in response else None
    if reading is not None:  # only responses that read the image out
        tags["reads_exact"], tags["reads_colours"] = reading
    return tags
