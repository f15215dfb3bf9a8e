"""Prompt records: read a JSONL file line by line, validate each line, give each record an id.

A line is a prompt record (its prompt or dialog, its id, its own settings) or an OpenAI batch
request (custom_id, body: see `openai_batch`); each line decides for itself. A record may name
its settings as llama-gen does or as OpenAI's and vLLM's requests do (`ALIASES`).

Plain Python on plain data. A bad line never stops the reading: it comes out as a `BadLine`
with its line number and reason, for the errors file.
"""
from __future__ import annotations

import codecs
import dataclasses
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..settings import PER_RECORD, RULES
from ..text.chat import message_problem
from ..values import BadValue, is_int
from .openai_batch import BatchRequest, body_field, is_batch_request, parse_batch_request
from .openai_output import CONTEXT_LENGTH_EXCEEDED, INVALID_REQUEST, error_line, request_id


@dataclass(frozen=True)
class Record:
    """A valid line: a prompt, or a dialog (`messages`) for the model's chat format."""

    line: int  # 1-based line number in the prompt file
    id: str | int
    prompt: str | None
    fields: dict[str, Any]  # the input object, unchanged
    overrides: dict[str, Any] = field(default_factory=dict)  # its own settings, checked
    # (a record's: those of PER_RECORD it sets; a batch request's: its body's, BATCH_SETTINGS)
    messages: list[dict[str, str]] | None = None
    target: str | None = None  # scoring: the text scored (a whole text, or a completion)
    batch: BatchRequest | None = None  # a batch request line: answered in the API's format
    aliases: tuple[str, ...] = ()  # the fields that set its settings by ALIASES' names


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str
    text: str  # the line as read (invalid UTF-8 replaced), cut to a readable length
    max_seq_len: int | None = None  # a prompt too long for this context: retried with a longer
    custom_id: str | None = None  # a batch request's: its entry is in the batch error format
    samples: int = 0  # a record found bad once read: its pending samples (not in the file)

    def as_json(self) -> dict[str, Any]:
        """The errors file's entry. A batch request's is the API's error line, plus the line
        number (and max_seq_len) that resuming reads; any other is this BadLine's fields."""
        if self.custom_id is None:
            return {k: v for k, v in dataclasses.asdict(self).items()
                    if v is not None and k != "samples"}
        code = INVALID_REQUEST if self.max_seq_len is None else CONTEXT_LENGTH_EXCEEDED
        entry = error_line(self.custom_id, self.reason, code,
                           request_id=request_id(self.custom_id))
        entry["line"] = self.line
        if self.max_seq_len is not None:
            entry["max_seq_len"] = self.max_seq_len
        return entry


# OpenAI's and vLLM's names for llama-gen's per-record settings, where they mean the same: a
# record may set a setting by either name (not both), checked by the setting's rule. Its other
# settings (temperature, top_p, top_k, min_p, seed, stop, presence_penalty, frequency_penalty,
# repetition_penalty, min_tokens, ignore_eos) have the same names there.
ALIASES = {"max_tokens": "max_gen_len", "max_completion_tokens": "max_gen_len",
           "n": "num_samples"}


def aliases_of(obj: dict[str, Any], names: tuple[str, ...] = PER_RECORD) -> tuple[str, ...]:
    """The fields of `obj` that set one of `names` by its ALIASES name."""
    return tuple(alias for alias, name in ALIASES.items() if alias in obj and name in names)


def aliases_taken(aliases: Iterable[str]) -> str:
    """The log's note of the ALIASES names a run's records used, each with its setting."""
    taken = set(aliases)
    return ("per-record fields taken by their OpenAI/vLLM names: "
            + ", ".join(f"{a} as {name}" for a, name in ALIASES.items() if a in taken))


def check_overrides(obj: dict[str, Any], names: tuple[str, ...] = PER_RECORD
                    ) -> tuple[dict[str, Any], str | None]:
    """The record's own settings (those of `names` it sets, by their names or ALIASES'), or the
    first bad one's problem, worded in the field the record wrote."""
    values = {}
    for name in names:
        given = [k for k in (name, *(a for a, n in ALIASES.items() if n == name)) if k in obj]
        if len(given) > 1 and given[0] == name:
            return {}, f"has both {name!r} and {given[1]!r} (its OpenAI/vLLM name): give one"
        checked = []
        for key in given:
            try:
                checked.append(RULES[name].check(obj[key]))
            except BadValue as e:
                return {}, f"{key} {e}" + ("" if key == name else f" (it is llama-gen's {name})")
        if len(set(checked)) > 1:  # two of its other names, at different values
            a, b = given[:2]
            return {}, (f"has both {a!r} ({json.dumps(obj[a])}) and {b!r} ({json.dumps(obj[b])}), "
                        f"two names for llama-gen's {name}: give one")
        if given:
            values[name] = checked[0]
    return values, None


def parse_line(raw: bytes, line: int, prompt_key: str, id_key: str, id_key_required: bool,
               schema: RecordSchema | None = None) -> Record | BadLine | None:
    """One line of the prompt file, read by `schema` (default: a prompt under `prompt_key`);
    None for a blank line."""
    schema = schema or PromptSchema(prompt_key)
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
    if is_batch_request(obj):
        return batch_record(obj, line, shown, schema)
    if (problem := schema.problem(obj)) is not None:
        return BadLine(line, problem, shown)
    if id_key in obj:
        record_id = obj[id_key]
        if not (isinstance(record_id, str) or is_int(record_id)):
            return BadLine(line, f"id field {id_key!r} must be a string or an integer", shown)
    elif id_key_required:
        return BadLine(line, f"id field {id_key!r} is missing", shown)
    else:
        record_id = line
    overrides, problem = check_overrides(obj, schema.per_record)
    if problem:
        return BadLine(line, problem, shown)
    prompt, messages, target = schema.parts(obj)
    return Record(line, record_id, prompt, obj, overrides, messages, target,
                  aliases=aliases_of(obj, schema.per_record))


# What a batch request's answer always is, whatever the run's flags: the API echoes no prompt
# (a body's echo is refused), and a completion's prompt is its raw text, never a chat message.
BATCH_SETTINGS = {"chat": {"echo": False}, "completion": {"echo": False, "chat": False}}


def batch_record(obj: dict[str, Any], line: int, shown: str,
                 schema: RecordSchema) -> Record | BadLine:
    """A batch request line as a record: its id is its custom_id, its settings its body's,
    checked by the settings' rules and worded in the body's own field names."""
    custom_id = obj.get("custom_id")
    custom_id = custom_id if isinstance(custom_id, str) and custom_id else None
    if schema.batch_refusal is not None:
        return BadLine(line, schema.batch_refusal, shown, custom_id=custom_id)
    request = parse_batch_request(obj)
    if isinstance(request, str):
        return BadLine(line, request, shown, custom_id=custom_id)
    overrides = dict(BATCH_SETTINGS[request.endpoint])
    for name, value in request.overrides.items():
        try:
            overrides[name] = RULES[name].check(value)
        except BadValue as e:
            field_name = body_field(name, obj["body"], request.endpoint)
            return BadLine(line, f"body.{field_name} {e}", shown, custom_id=custom_id)
    return Record(line, request.custom_id, request.prompt, obj, overrides, request.messages,
                  batch=request)


@dataclass(frozen=True)
class PromptSchema:
    """What a record to generate from must hold: a prompt (its text under `prompt_key`) or a
    dialog ("messages"). A batch request line answers in the API's format."""

    prompt_key: str = "prompt"
    per_record: tuple[str, ...] = PER_RECORD  # the settings a record may set
    batch_refusal: ClassVar[str | None] = None  # why a batch request line cannot run, if not

    def problem(self, obj: dict[str, Any]) -> str | None:
        return prompt_problem(obj, self.prompt_key)

    def parts(self, obj: dict[str, Any]) -> tuple[str | None, list | None, str | None]:
        """A valid record's prompt, messages and target (see `Record`)."""
        if "messages" in obj:
            return None, obj["messages"], None
        return obj[self.prompt_key], None, None


@dataclass(frozen=True)
class ScoreSchema:
    """What a record to score must hold: a text scored whole (under `text_key`), a prompt and a
    completion scored given it, or a dialog whose last reply is scored."""

    prompt_key: str = "prompt"
    per_record: tuple[str, ...] = PER_RECORD  # the settings a record may set
    text_key: str = "text"
    completion_key: str = "completion"
    batch_refusal: ClassVar[str | None] = (
        "an OpenAI batch request: `llama-gen score` scores texts; answer requests with "
        "`llama-gen` itself")

    def problem(self, obj: dict[str, Any]) -> str | None:
        if "messages" in obj:
            return prompt_problem(obj, self.prompt_key)
        text_key, completion_key = self.text_key, self.completion_key
        if text_key in obj:
            clash = [k for k in (self.prompt_key, completion_key) if k in obj]
            return (f"has both {text_key!r} and {clash[0]!r}: give a whole text, or a prompt and "
                    "a completion" if clash else text_problem(obj, text_key, ""))
        if self.prompt_key not in obj:
            return (f"nothing to score: give a whole text as {text_key!r}, a prompt and a "
                    f"completion as {self.prompt_key!r} and {completion_key!r}, or a dialog as "
                    "'messages'")
        return (text_problem(obj, self.prompt_key, "", "prompt field")
                or text_problem(obj, completion_key, ""))

    def parts(self, obj: dict[str, Any]) -> tuple[str | None, list | None, str | None]:
        """A valid record's prompt, messages and target (see `Record`)."""
        if "messages" in obj:
            return None, obj["messages"], None
        if self.text_key in obj:
            return None, None, obj[self.text_key]
        return obj[self.prompt_key], None, obj[self.completion_key]


RecordSchema = PromptSchema | ScoreSchema


def prompt_problem(obj: dict[str, Any], prompt_key: str) -> str | None:
    """Why a record has no usable prompt: it needs a non-empty text under `prompt_key`, or a
    dialog under "messages", not both."""
    if "messages" in obj:
        if prompt_key in obj:
            return (f"has both {prompt_key!r} and 'messages': give a prompt or a dialog, not "
                    "both")
        return message_problem(obj["messages"])
    return text_problem(obj, prompt_key, " (or give a dialog as 'messages')", "prompt field")


def text_problem(obj: dict[str, Any], key: str, hint: str, what: str = "field") -> str | None:
    """Why obj[key] is not a non-empty text, or None."""
    value = obj.get(key)
    if isinstance(value, str) and value:
        return None
    problem = "missing" if key not in obj else (
        "empty" if value == "" else f"not a string ({type(value).__name__})")
    return f"{what} {key!r} is {problem}{hint}"


def read_records(path: Path, prompt_key: str = "prompt", id_key: str | None = None,
                 schema: RecordSchema | None = None) -> Iterator[Record | BadLine]:
    """Every non-blank line as a Record or a BadLine (a repeated id is a BadLine).

    `id_key` None: records use their "id" field when they have one, else their line number. A
    batch request's id is its custom_id, whatever `id_key` and `prompt_key` say.
    """
    seen: dict[str, str | int] = {}  # ids as text (5 and "5" would be one id downstream)
    with path.open("rb") as f:
        for line, raw in enumerate(f, start=1):
            if line == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # as some editors on Windows save
            item = parse_line(raw, line, prompt_key, id_key or "id", id_key is not None, schema)
            if item is None:
                continue
            if isinstance(item, Record):
                key = str(item.id)
                if key in seen:
                    earlier = seen[key]
                    same = "" if earlier == item.id else f" (as {json.dumps(earlier)} earlier)"
                    item = BadLine(line, f"duplicate id {json.dumps(item.id)}{same}",
                                   json.dumps(item.fields, ensure_ascii=False)[:1000],
                                   custom_id=item.batch and item.batch.custom_id)
                else:
                    seen[key] = item.id
            yield item
