"""Prompt records: validation, ids, per-record settings (by llama-gen's names or OpenAI's and
vLLM's), and fields that clash with the output."""
from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest

from llama_gen.job.openai_output import output_id, request_id
from llama_gen.job.records import (BadLine, Record, ScoreSchema, aliases_taken, parse_line,
                                   read_records)
from llama_gen.settings import ScoreSettings


def write_lines(path: Path, *lines: str | bytes) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def read_all(tmp_path: Path, *lines: str | bytes, **kwargs) -> list[Record | BadLine]:
    return list(read_records(write_lines(tmp_path / "p.jsonl", *lines), **kwargs))


def parse(text: str | bytes, line: int = 7, prompt_key: str = "prompt", id_key: str = "id",
          required: bool = False) -> Record | BadLine | None:
    raw = text if isinstance(text, bytes) else text.encode()
    return parse_line(raw + b"\n", line, prompt_key, id_key, required)


def bad_reason(text: str | bytes, **kwargs) -> str:
    item = parse(text, **kwargs)
    assert isinstance(item, BadLine), item
    assert item.line == 7
    return item.reason


# --- one line -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, reason", [
    ('{"prompt": "hi"', "invalid JSON"),
    ("prompt: hi", "invalid JSON"),
    ('["prompt", "hi"]', "expected a JSON object, got list"),
    ('"hi"', "expected a JSON object, got str"),
    ("3", "expected a JSON object, got int"),
    ("null", "expected a JSON object, got NoneType"),
    ('{"text": "hi"}', "prompt field 'prompt' is missing (or give a dialog as 'messages')"),
    ('{"prompt": ""}', "prompt field 'prompt' is empty"),
    ('{"prompt": 5}', "prompt field 'prompt' is not a string (int)"),
    ('{"prompt": null}', "prompt field 'prompt' is not a string (NoneType)"),
    ('{"prompt": ["a"]}', "prompt field 'prompt' is not a string (list)"),
    ('{"prompt": "hi", "id": 1.5}', "id field 'id' must be a string or an integer"),
    ('{"prompt": "hi", "id": true}', "id field 'id' must be a string or an integer"),
    ('{"prompt": "hi", "id": null}', "id field 'id' must be a string or an integer"),
    ('{"prompt": "hi", "id": [1]}', "id field 'id' must be a string or an integer"),
    ('{"prompt": "hi", "max_gen_len": 0}', "max_gen_len must be an integer >= 1, got 0"),
    ('{"prompt": "hi", "max_gen_len": "5"}', 'max_gen_len must be an integer >= 1, got "5"'),
    ('{"prompt": "hi", "max_gen_len": true}', "max_gen_len must be an integer >= 1, got true"),
    ('{"prompt": "hi", "max_gen_len": 2.0}', "max_gen_len must be an integer >= 1, got 2.0"),
    ('{"prompt": "hi", "temperature": -1}', "temperature must be a number in [0, 10000], got -1"),
    ('{"prompt": "hi", "temperature": "0.5"}', "temperature must be a number in [0, 10000]"),
    ('{"prompt": "hi", "temperature": NaN}', "temperature must be a number in [0, 10000], got NaN"),
    ('{"prompt": "hi", "top_p": 0}', "top_p must be a number in (0, 1], got 0"),
    ('{"prompt": "hi", "top_p": 1.5}', "top_p must be a number in (0, 1], got 1.5"),
    ('{"prompt": "hi", "top_p": false}', "top_p must be a number in (0, 1], got false"),
    ('{"prompt": "hi", "seed": 1.5}', "seed must be an integer, got 1.5"),
    ('{"prompt": "hi", "seed": "3"}', 'seed must be an integer, got "3"'),
    ('{"prompt": "hi", "top_k": 100000000000000000000000}',
     "top_k must be an integer in [0, 2147483647], got 100000000000000000000000"),
    ('{"prompt": "hi", "repetition_penalty": 1e39}', "repetition_penalty must be a number in (0, "),
    ('{"prompt": "hi", "num_samples": 0}', "num_samples must be an integer in [1, 1024], got 0"),
    ('{"prompt": "hi", "num_samples": -2}', "num_samples must be an integer in [1, 1024], got -2"),
])
def test_bad_line_reasons(text, reason):
    assert reason in bad_reason(text)


def test_invalid_utf8_is_a_bad_line_with_the_text_still_shown():
    item = parse(b'{"prompt": "caf\xe9"}')
    assert isinstance(item, BadLine) and item.line == 7
    assert item.reason == "invalid UTF-8 at byte 15"
    assert item.text == '{"prompt": "caf\ufffd"}'


def test_bad_line_text_is_the_line_without_its_newline_and_cut_when_long():
    assert parse("[1, 2]\r").text == "[1, 2]"
    long = parse(json.dumps({"text": "x" * 5000}))
    assert isinstance(long, BadLine) and long.text.endswith("...") and len(long.text) == 1003


@pytest.mark.parametrize("text", ["", "   ", "\t", "\r"])
def test_blank_lines_are_none(text):
    assert parse(text) is None


def test_a_valid_record_keeps_its_fields_unchanged():
    obj = {"prompt": "Hello", "id": "a-1", "meta": {"x": [1, 2.5, None]}, "temperature": 0,
           "top_p": 1, "max_gen_len": 3, "seed": -4, "num_samples": 2, "émoji": "🦙"}
    item = parse(json.dumps(obj, ensure_ascii=False))
    assert item == Record(7, "a-1", "Hello", obj, dict(max_gen_len=3, temperature=0, top_p=1,
                                                       seed=-4, num_samples=2))
    assert type(item.overrides["top_p"]) is float and type(item.overrides["temperature"]) is float
    assert list(item.fields) == list(obj)  # key order too


def test_no_overrides_means_an_empty_dict():
    item = parse('{"prompt": "Hello"}')
    assert item.overrides == {} and item.id == 7


def test_fields_a_record_may_not_set_are_kept_but_not_overrides():
    item = parse('{"prompt": "Hello", "max_seq_len": 0, "device": "x", "compile": true}')
    assert isinstance(item, Record) and item.overrides == {}
    assert item.fields["max_seq_len"] == 0


def test_bad_line_as_json_leaves_out_what_is_unset():
    assert BadLine(3, "why", "text").as_json() == {"line": 3, "reason": "why", "text": "text"}
    assert BadLine(3, "why", "text", max_seq_len=32).as_json() == {
        "line": 3, "reason": "why", "text": "text", "max_seq_len": 32}


def test_custom_prompt_key():
    item = parse('{"text": "Hello", "prompt": 5}', prompt_key="text")
    assert isinstance(item, Record) and item.prompt == "Hello"
    assert bad_reason('{"prompt": "Hello"}', prompt_key="text") == \
        "prompt field 'text' is missing (or give a dialog as 'messages')"


# --- a whole file -------------------------------------------------------------------------------

def test_read_records_keeps_going_after_bad_lines_with_1_based_line_numbers(tmp_path):
    items = read_all(tmp_path,
                     '{"prompt": "one"}',
                     "not json",
                     "",
                     '["a list"]',
                     b'{"prompt": "\xff"}',
                     "   ",
                     '{"prompt": "six", "top_p": 1.5}',
                     '{"prompt": "seven"}')
    assert [(type(x).__name__, x.line) for x in items] == [
        ("Record", 1), ("BadLine", 2), ("BadLine", 4), ("BadLine", 5), ("BadLine", 7),
        ("Record", 8)]
    assert [x.id for x in items if isinstance(x, Record)] == [1, 8]


def test_file_without_a_final_newline_reads_its_last_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "b"}')
    assert [x.prompt for x in read_records(path)] == ["a", "b"]


def test_ids_default_to_the_id_field_else_the_line_number(tmp_path):
    items = read_all(tmp_path, '{"prompt": "a", "id": "x"}', '{"prompt": "b"}',
                     '{"prompt": "c", "id": 10}')
    assert [x.id for x in items] == ["x", 2, 10]


def test_duplicate_id_reports_the_second_occurrence(tmp_path):
    items = read_all(tmp_path, '{"prompt": "a", "id": "x"}', '{"prompt": "b", "id": 1}',
                     '{"prompt": "c", "id": "x"}', '{"prompt": "d", "id": "1"}',
                     '{"prompt": "e", "id": "x"}')
    assert [type(x).__name__ for x in items] == ["Record", "Record", "BadLine", "BadLine",
                                                 "BadLine"]
    assert items[2] == BadLine(3, 'duplicate id "x"', '{"prompt": "c", "id": "x"}')
    assert items[4].line == 5 and items[4].reason == 'duplicate id "x"'
    # Ids are compared as text: a reader joining on id would take 1 and "1" for one record.
    assert items[3].reason == 'duplicate id "1" (as 1 earlier)'


def test_a_byte_order_mark_before_the_first_line_is_skipped(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + b'{"prompt": "a"}\n{"prompt": "b"}\n')
    assert [x.prompt for x in read_records(path)] == ["a", "b"]


def test_a_line_number_id_can_collide_with_an_explicit_id(tmp_path):
    # Line 2 has no id so its id is 2, which line 1 already took.
    items = read_all(tmp_path, '{"prompt": "a", "id": 2}', '{"prompt": "b"}')
    assert isinstance(items[1], BadLine) and items[1].reason == "duplicate id 2"


def test_an_explicit_id_key_is_required_on_every_line(tmp_path):
    items = read_all(tmp_path, '{"prompt": "a", "key": "k1"}', '{"prompt": "b"}',
                     '{"prompt": "c", "key": 3}', '{"prompt": "d", "key": {"a": 1}}',
                     id_key="key")
    assert isinstance(items[0], Record) and items[0].id == "k1"
    assert items[1] == BadLine(2, "id field 'key' is missing", '{"prompt": "b"}')
    assert isinstance(items[2], Record) and items[2].id == 3
    assert items[3].reason == "id field 'key' must be a string or an integer"


def test_read_records_with_a_custom_prompt_key(tmp_path):
    items = read_all(tmp_path, '{"question": "why?"}', '{"prompt": "no"}', prompt_key="question")
    assert items[0].prompt == "why?"
    assert items[1].reason == "prompt field 'question' is missing (or give a dialog as 'messages')"


# --- known bug ----------------------------------------------------------------------------------

def test_a_lone_surrogate_escape_is_a_bad_line():
    for text in ('{"prompt": "hi \\ud800"}', '{"prompt": "hi", "meta": "\\udfff"}'):
        assert isinstance(parse(text), BadLine)


# --- OpenAI batch request lines -----------------------------------------------------------------

CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"


def batch_line(custom_id="r-1", url=CHAT_URL, **body) -> str:
    if url == CHAT_URL:
        body.setdefault("messages", [{"role": "user", "content": "Hi"}])
    else:
        body.setdefault("prompt", "Once upon")
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def test_a_batch_request_is_a_record_named_by_its_custom_id_with_its_body_settings():
    item = parse(batch_line(model="m", max_completion_tokens=9, temperature=0, n=2,
                            stop="###", logprobs=True, top_logprobs=3))
    assert isinstance(item, Record) and item.batch is not None
    assert (item.id, item.prompt, item.target) == ("r-1", None, None)
    assert item.messages == [{"role": "user", "content": "Hi"}] == item.batch.messages
    assert item.overrides == {"echo": False, "max_gen_len": 9, "temperature": 0.0,
                              "num_samples": 2, "stop": ("###",), "logprobs": True,
                              "top_logprobs": 3}
    assert type(item.overrides["temperature"]) is float  # checked into the setting's type
    assert item.fields == json.loads(batch_line(model="m", max_completion_tokens=9,
                                                temperature=0, n=2, stop="###", logprobs=True,
                                                top_logprobs=3))


def test_a_completions_request_is_its_raw_prompt_never_a_chat_message():
    item = parse(batch_line(url=COMPLETIONS_URL, prompt="Say this", logprobs=2))
    assert isinstance(item, Record) and (item.prompt, item.messages) == ("Say this", None)
    assert item.overrides == {"echo": False, "chat": False, "max_gen_len": 16,
                              "logprobs": True, "top_logprobs": 2}


@pytest.mark.parametrize("url, body, reason", [
    (CHAT_URL, {"n": 0}, "body.n must be an integer in [1, 1024], got 0"),
    (CHAT_URL, {"max_tokens": 0}, "body.max_tokens must be an integer >= 1, got 0"),
    (CHAT_URL, {"max_tokens": 4, "max_completion_tokens": "5"},
     'body.max_completion_tokens must be an integer >= 1, got "5"'),
    (COMPLETIONS_URL, {"max_tokens": 2.5}, "body.max_tokens must be an integer >= 1, got 2.5"),
    (CHAT_URL, {"temperature": -1}, "body.temperature must be a number in [0, 10000], got -1"),
    (CHAT_URL, {"top_p": 0}, "body.top_p must be a number in (0, 1], got 0"),
    (CHAT_URL, {"seed": 1.5}, "body.seed must be an integer, got 1.5"),
    (CHAT_URL, {"stop": 5}, "body.stop must be a non-empty text or a list of them, got 5"),
    (CHAT_URL, {"stop": ["a", ""]},
     'body.stop must be a non-empty text or a list of them, got ["a", ""]'),
    (CHAT_URL, {"logprobs": "yes"}, 'body.logprobs must be true or false, got "yes"'),
    (CHAT_URL, {"logprobs": True, "top_logprobs": 21},
     "body.top_logprobs must be an integer in [0, 20], got 21"),
    (COMPLETIONS_URL, {"logprobs": 30}, "body.logprobs must be an integer in [0, 20], got 30"),
    (CHAT_URL, {"presence_penalty": 3},
     "body.presence_penalty must be a number in [-2, 2], got 3"),
    (CHAT_URL, {"ignore_eos": 1}, "body.ignore_eos must be true or false, got 1"),
])
def test_a_bad_body_setting_is_worded_in_the_bodys_own_field_name(url, body, reason):
    item = parse(batch_line(url=url, **body))
    assert isinstance(item, BadLine) and item.custom_id == "r-1"
    assert item.reason == reason


def test_a_request_llama_gen_cannot_answer_is_a_bad_line_that_keeps_its_custom_id():
    item = parse(json.dumps({"custom_id": "e-1", "method": "POST", "url": "/v1/embeddings",
                             "body": {"input": "x"}}))
    assert isinstance(item, BadLine) and item.custom_id == "e-1"
    assert item.reason.startswith('url "/v1/embeddings" is not supported')
    for custom_id in (7, "", None):  # no custom_id to answer under: the plain shape
        item = parse(batch_line(custom_id=custom_id))
        assert isinstance(item, BadLine) and item.custom_id is None
        assert "custom_id must be a non-empty string" in item.reason
        assert set(item.as_json()) == {"line", "reason", "text"}


def test_a_batch_bad_lines_entry_is_the_apis_error_line_with_the_line_number():
    entry = BadLine(4, "body.n must be an integer in [1, 1024], got 0", "{...}", custom_id="r-1").as_json()
    assert entry["custom_id"] == "r-1" and entry["line"] == 4 and "max_seq_len" not in entry
    assert entry["error"] == {"code": "invalid_request",
                              "message": "body.n must be an integer in [1, 1024], got 0"}
    assert entry["response"]["status_code"] == 400
    too_long = BadLine(5, "the prompt has 90 tokens", "{...}", max_seq_len=64,
                       custom_id="r-2").as_json()
    assert too_long["error"]["code"] == "context_length_exceeded"
    assert (too_long["line"], too_long["max_seq_len"]) == (5, 64)  # what a resume reads
    assert too_long["response"]["request_id"] == request_id("r-2")  # the same in every run
    assert too_long["id"] == output_id("r-2")


def test_id_key_and_prompt_key_do_not_apply_to_batch_lines(tmp_path):
    items = read_all(tmp_path, '{"text": "plain", "key": "k"}', batch_line("r-1"),
                     batch_line("r-2", url=COMPLETIONS_URL), id_key="key", prompt_key="text")
    assert [(type(x).__name__, x.id) for x in items] == [("Record", "k"), ("Record", "r-1"),
                                                         ("Record", "r-2")]
    assert items[2].prompt == "Once upon"


def test_a_repeated_custom_id_is_a_bad_line_in_the_batch_error_shape(tmp_path):
    items = read_all(tmp_path, batch_line("r-1"), batch_line("r-1", temperature=0),
                     '{"prompt": "plain", "id": "r-2"}', batch_line("r-2"))
    assert [type(x).__name__ for x in items] == ["Record", "BadLine", "Record", "BadLine"]
    assert (items[1].reason, items[1].custom_id) == ('duplicate id "r-1"', "r-1")
    assert items[3].reason == 'duplicate id "r-2"' and items[3].as_json()["line"] == 4


def test_a_line_with_a_custom_id_but_no_body_is_a_prompt_record():
    item = parse('{"custom_id": "x", "prompt": "hi"}')
    assert isinstance(item, Record) and item.batch is None and item.id == 7


def test_score_refuses_batch_lines_by_name(tmp_path):
    items = read_all(tmp_path, batch_line("r-1"), '{"text": "scored"}',
                     schema=ScoreSchema())
    assert isinstance(items[0], BadLine) and "`llama-gen score` scores texts" in items[0].reason
    assert isinstance(items[1], Record)


# --- OpenAI's and vLLM's names for per-record settings -----------------------------------------

ALIASED = [("max_tokens", "max_gen_len"), ("max_completion_tokens", "max_gen_len"),
           ("n", "num_samples")]


@pytest.mark.parametrize("alias, name", ALIASED)
def test_a_setting_may_be_set_by_its_openai_and_vllm_name(alias, name):
    by_alias = parse(json.dumps({"prompt": "x", alias: 3}))
    by_name = parse(json.dumps({"prompt": "x", name: 3}))
    assert isinstance(by_alias, Record) and by_alias.overrides == {name: 3} == by_name.overrides
    assert by_alias.fields == {"prompt": "x", alias: 3}  # echoed as written, as max_gen_len is
    assert (by_alias.aliases, by_name.aliases) == ((alias,), ())


def test_openai_style_record_sets_both_length_and_samples():
    item = parse('{"prompt": "x", "max_tokens": 3, "n": 2, "temperature": 0}')
    assert isinstance(item, Record)
    assert item.overrides == {"max_gen_len": 3, "temperature": 0.0, "num_samples": 2}
    assert item.aliases == ("max_tokens", "n")


@pytest.mark.parametrize("alias, name", ALIASED)
@pytest.mark.parametrize("value", [0, -1, "5", True, 2.0, None, 1025])
def test_an_alias_is_checked_by_its_settings_rule_and_named_as_written(alias, name, value):
    own = parse(json.dumps({"prompt": "x", name: value}))
    if isinstance(own, Record):  # 1025 is a fine max_gen_len
        assert parse(json.dumps({"prompt": "x", alias: value})).overrides == own.overrides
        return
    assert own.reason.startswith(f"{name} must be ")
    assert bad_reason(json.dumps({"prompt": "x", alias: value})) == \
        f"{alias}{own.reason.removeprefix(name)} (it is llama-gen's {name})"


def test_alias_reasons_read_as_the_user_wrote_them():
    assert bad_reason('{"prompt": "x", "max_tokens": 0}') == \
        "max_tokens must be an integer >= 1, got 0 (it is llama-gen's max_gen_len)"
    assert bad_reason('{"prompt": "x", "n": 2000}') == \
        "n must be an integer in [1, 1024], got 2000 (it is llama-gen's num_samples)"


@pytest.mark.parametrize("alias, name", ALIASED)
def test_a_setting_and_its_alias_together_are_a_bad_line_naming_both(alias, name):
    for a, b in ((3, 3), (3, 4)):  # even at one value: which one was meant is unsaid
        assert bad_reason(json.dumps({"prompt": "x", name: a, alias: b})) == \
            f"has both {name!r} and {alias!r} (its OpenAI/vLLM name): give one"


def test_two_aliases_must_agree():
    assert bad_reason('{"prompt": "x", "max_tokens": 3, "max_completion_tokens": 4}') == (
        "has both 'max_tokens' (3) and 'max_completion_tokens' (4), two names for llama-gen's "
        "max_gen_len: give one")
    item = parse('{"prompt": "x", "max_tokens": 3, "max_completion_tokens": 3}')
    assert isinstance(item, Record) and item.overrides == {"max_gen_len": 3}
    assert bad_reason('{"prompt": "x", "max_tokens": 3, "max_completion_tokens": 0}') == (
        "max_completion_tokens must be an integer >= 1, got 0 (it is llama-gen's max_gen_len)")


def test_aliases_of_settings_a_form_does_not_take_are_plain_fields(tmp_path):
    items = read_all(tmp_path, '{"text": "scored", "n": 0, "max_tokens": "x"}',
                     schema=ScoreSchema(per_record=ScoreSettings.per_record()))
    assert isinstance(items[0], Record)
    assert (items[0].overrides, items[0].aliases) == ({}, ())


def test_the_log_names_each_alias_taken_with_its_setting():
    assert aliases_taken(["n", "max_tokens", "n"]) == (
        "per-record fields taken by their OpenAI/vLLM names: max_tokens as max_gen_len, "
        "n as num_samples")
