"""Prompt records: read a JSONL file line by line, validate each line, give each record an id.

Plain Python on plain data. A bad line never stops the reading: it comes out as a `BadLine`
with its line number and reason, for the errors file.
"""
from __future__ import annotations

import codecs
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chat import message_problem
from .settings import PER_RECORD, RULES
from .values import BadValue, is_int


@dataclass(frozen=True)
class Record:
    """A valid line: a prompt, or a dialog (`messages`) for the model's chat format."""

    line: int  # 1-based line number in the prompt file
    id: str | int
    prompt: str | None
    fields: dict[str, Any]  # the input object, unchanged
    overrides: dict[str, Any] = field(default_factory=dict)  # its own settings (PER_RECORD)
    messages: list[dict[str, str]] | None = None


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str
    text: str  # the line as read (invalid UTF-8 replaced), cut to a readable length
    max_seq_len: int | None = None  # a prompt too long for this context: retried with a longer

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def check_overrides(obj: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The record's own settings (those a record may set), or the first bad one's problem."""
    values = {}
    for name in PER_RECORD:
        if name in obj:
            try:
                values[name] = RULES[name].check(obj[name])
            except BadValue as e:
                return {}, f"{name} {e}"
    return values, None


def parse_line(raw: bytes, line: int, prompt_key: str, id_key: str,
               id_key_required: bool) -> Record | BadLine | None:
    """One line of the prompt file; None for a blank line."""
    text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    shown = text if len(text) <= 1000 else text[:1000] + "..."
    if not text.strip():
        return None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadLine(line, f"invalid UTF-8 at byte {e.start}", shown)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return BadLine(line, f"invalid JSON: {e.msg} at column {e.colno}", shown)
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return BadLine(line, "a \\u escape encodes half of a surrogate pair (not a character)",
                       shown)
    if not isinstance(obj, dict):
        return BadLine(line, f"expected a JSON object, got {type(obj).__name__}", shown)
    prompt, messages = obj.get(prompt_key), obj.get("messages")
    if (problem := prompt_problem(obj, prompt_key)) is not None:
        return BadLine(line, problem, shown)
    if id_key in obj:
        record_id = obj[id_key]
        if not (isinstance(record_id, str) or is_int(record_id)):
            return BadLine(line, f"id field {id_key!r} must be a string or an integer", shown)
    elif id_key_required:
        return BadLine(line, f"id field {id_key!r} is missing", shown)
    else:
        record_id = line
    overrides, problem = check_overrides(obj)
    if problem:
        return BadLine(line, problem, shown)
    return Record(line, record_id, prompt, obj, overrides, messages)


def prompt_problem(obj: dict[str, Any], prompt_key: str) -> str | None:
    """Why a record has no usable prompt: it needs a non-empty text under `prompt_key`, or a
    dialog under "messages", not both."""
    if "messages" in obj:
        if prompt_key in obj:
            return (f"has both {prompt_key!r} and 'messages': give a prompt or a dialog, not "
                    "both")
        return message_problem(obj["messages"])
    prompt = obj.get(prompt_key)
    if isinstance(prompt, str) and prompt:
        return None
    problem = "missing" if prompt_key not in obj else (
        "empty" if prompt == "" else f"not a string ({type(prompt).__name__})")
    return f"prompt field {prompt_key!r} is {problem} (or give a dialog as 'messages')"


def read_records(path: Path, prompt_key: str = "prompt", id_key: str | None = None
                 ) -> Iterator[Record | BadLine]:
    """Every non-blank line as a Record or a BadLine (a repeated id is a BadLine).

    `id_key` None: records use their "id" field when they have one, else their line number.
    """
    seen: dict[str, str | int] = {}  # ids as text (5 and "5" would be one id downstream)
    with path.open("rb") as f:
        for line, raw in enumerate(f, start=1):
            if line == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # as some editors on Windows save
            item = parse_line(raw, line, prompt_key, id_key or "id", id_key is not None)
            if item is None:
                continue
            if isinstance(item, Record):
                key = str(item.id)
                if key in seen:
                    earlier = seen[key]
                    same = "" if earlier == item.id else f" (as {json.dumps(earlier)} earlier)"
                    item = BadLine(line, f"duplicate id {json.dumps(item.id)}{same}",
                                   json.dumps(item.fields, ensure_ascii=False)[:1000])
                else:
                    seen[key] = item.id
            yield item
