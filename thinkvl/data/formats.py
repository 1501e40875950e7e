"""Read and validate records: conversations (SFT) and problems (distill / label / RL / eval).

Sources are JSONL files, Parquet files or folders written by `datasets.Dataset.save_to_disk`.
Every record is checked as it is read; a bad one raises `DataError` naming the file, the line (row
for Parquet/datasets, 1-based) and the field, unless `on_error="skip"`, in which case it is counted
by reason in `ReadStats` and the caller reports the counts. Nothing is dropped silently.

Image paths are resolved relative to the data file's folder and stored absolute.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "image")
Kind = Literal["conversation", "problem"]


class DataError(ValueError):
    """A record that cannot be used; the message names file, line and field."""


@dataclass
class ReadStats:
    """What a read kept and what it skipped, by reason."""

    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def describe(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"read {self.read}, kept {self.kept}, skipped {sum(self.skipped.values())} ({reasons})"


def _raw_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based line or row, parsed object or a DataError) for each record of a source."""
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        for i, row in enumerate(ds, start=1):
            yield i, row
    elif path.suffix == ".parquet":
        import datasets

        ds = datasets.Dataset.from_parquet(str(path))
        for i, row in enumerate(ds, start=1):
            yield i, row
    else:
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    yield i, DataError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno})")


def _map_columns(raw: dict, columns: dict[str, str] | None) -> dict:
    """Bring `problem/answer/images` or `prompt/completion` layouts to the `messages` layout.

    `columns` maps our names (messages, problem, answer, images, prompt, completion, id) to the
    source's column names; unmapped names are looked up as themselves.
    """
    col = {k: k for k in ("messages", "problem", "answer", "images", "prompt", "completion", "id", "system")}
    col.update(columns or {})
    if col["messages"] in raw:
        out = dict(raw)
        out["messages"] = raw[col["messages"]]
    elif col["problem"] in raw:
        images = raw.get(col["images"]) or []
        if isinstance(images, str):
            images = [images]
        parts = [{"type": "image", "image": im} for im in images]
        parts.append({"type": "text", "text": raw[col["problem"]]})
        out = {k: v for k, v in raw.items() if k not in (col["problem"], col["images"])}
        out["messages"] = [{"role": "user", "content": parts if images else raw[col["problem"]]}]
    elif col["prompt"] in raw:
        prompt, completion = raw[col["prompt"]], raw.get(col["completion"])
        msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if completion is not None:
            msgs = msgs + (completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}])
        out = {k: v for k, v in raw.items() if k not in (col["prompt"], col["completion"])}
        out["messages"] = msgs
    else:
        raise KeyError(f"no `{col['messages']}`, `{col['problem']}` or `{col['prompt']}` column")
    if col["answer"] != "answer" and col["answer"] in raw:
        out["answer"] = raw[col["answer"]]
    if col["id"] != "id" and col["id"] in raw:
        out["id"] = raw[col["id"]]
    if col["system"] in raw and raw[col["system"]] and out["messages"][0].get("role") != "system":
        out["messages"] = [{"role": "system", "content": raw[col["system"]]}] + out["messages"]
    return out


def _check_image(value: Any, base: Path, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}.image: expected a file path string, got {type(value).__name__}")
    p = Path(value)
    p = p if p.is_absolute() else base / p
    if not p.is_file():
        raise DataError(f"{where}.image: missing image file {p}")
    try:
        with Image.open(p) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for broken files
        raise DataError(f"{where}.image: unreadable image {p} ({type(e).__name__}: {e})") from None
    return str(p.resolve())


def validate_messages(messages: Any, base: Path, where: str, kind: Kind) -> list[dict]:
    """Check a messages list and return it with image paths made absolute."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}.messages: expected a non-empty list, got {type(messages).__name__}")
    out = []
    for m_i, msg in enumerate(messages):
        w = f"{where}.messages[{m_i}]"
        if not isinstance(msg, dict):
            raise DataError(f"{w}: expected an object, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise DataError(f"{w}.role: unknown role {role!r}; allowed: {', '.join(ROLES)}")
        content = msg.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise DataError(f"{w}.content: expected a string or a list of parts, got {type(content).__name__}")
        parts = []
        for p_i, part in enumerate(content):
            pw = f"{w}.content[{p_i}]"
            ptype = part.get("type") if isinstance(part, dict) else None
            if ptype not in PART_TYPES:
                raise DataError(f"{pw}.type: unknown part type {ptype!r}; allowed: {', '.join(PART_TYPES)}")
            if ptype == "text":
                if not isinstance(part.get("text"), str):
                    raise DataError(f"{pw}.text: expected a string, got {type(part.get('text')).__name__}")
                parts.append({"type": "text", "text": part["text"]})
            else:
                parts.append({"type": "image", "image": _check_image(part.get("image"), base, pw)})
        out.append({"role": role, "content": parts})
    roles = [m["role"] for m in out]
    if kind == "conversation" and "assistant" not in roles:
        raise DataError(f"{where}.messages: no assistant turn (nothing to learn from)")
    if kind == "problem":
        if roles[-1] != "user":
            raise DataError(f"{where}.messages: a problem must end with a user turn, got {roles[-1]!r}")
    return out


def validate_record(raw: Any, base: Path, where: str, kind: Kind, columns: dict[str, str] | None) -> dict:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    try:
        rec = _map_columns(raw, columns)
    except KeyError as e:
        raise DataError(f"{where}: {e.args[0]}") from None
    rec["messages"] = validate_messages(rec["messages"], base, where, kind)
    if kind == "problem":
        if "answer" not in rec or rec["answer"] is None:
            raise DataError(f"{where}.answer: missing reference answer")
        if not isinstance(rec["answer"], (str, int, float)):
            raise DataError(f"{where}.answer: expected a string or number, got {type(rec['answer']).__name__}")
        rec["answer"] = str(rec["answer"])
        diff = rec.get("difficulty")
        if diff is not None and not (isinstance(diff, (int, float)) and 0.0 <= diff <= 1.0):
            raise DataError(f"{where}.difficulty: expected a number in [0, 1] or null, got {diff!r}")
    return rec


def read_records(
    path: str | Path,
    kind: Kind = "conversation",
    on_error: Literal["raise", "skip"] = "raise",
    columns: dict[str, str] | None = None,
    limit: int | None = None,
    stats: ReadStats | None = None,
) -> list[dict]:
    """Read, validate and normalise the records of one source.

    Each returned record has `messages` (image paths absolute), the source's other fields, an `id`
    (the source's, or `file:line`) and `_where` (`file:line`, for later error messages).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    base = path if path.is_dir() else path.parent
    stats = stats if stats is not None else ReadStats()
    out: list[dict] = []
    for line, raw in _raw_rows(path):
        where = f"{path}:{line}"
        stats.read += 1
        try:
            if isinstance(raw, DataError):
                raise raw
            rec = validate_record(raw, base, where, kind, columns)
        except DataError as e:
            if on_error == "raise":
                raise
            stats.skipped[_reason(str(e))] += 1
            continue
        rec.setdefault("id", f"{path.name}:{line}")
        rec["_where"] = where
        out.append(rec)
        stats.kept += 1
        if limit is not None and len(out) >= limit:
            break
    return out


def _reason(message: str) -> str:
    """A short skip reason from a DataError message, for the counts."""
    for key in ("malformed JSON", "unknown role", "missing image", "unreadable image", "no assistant turn",
                "unknown part type", "missing reference answer", "must end with a user turn", "expected"):
        if key in message:
            return key
    return "invalid"


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Write records as JSONL, dropping private `_` fields."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, ensure_ascii=False) + "\n")
