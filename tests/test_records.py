"""Prompt records and the job's pure record-to-work path: validation, ids, sharding, seeds."""
from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest

from llama_gen.errors import UserError
from llama_gen.job import (OUTPUT_FIELDS, Tag, Work, check_no_clash, count_pending,
                           pending_work, requests_for)
from llama_gen.records import BadLine, Record, parse_line, read_records
from llama_gen.settings import Settings
from llama_gen.sampling import derive_seed
from llama_gen.tiny_tokenizers import build_sentencepiece_model
from llama_gen.tokenizer import load_tokenizer


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
    ('{"text": "hi"}', "prompt field 'prompt' is missing"),
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
    ('{"prompt": "hi", "temperature": -1}', "temperature must be a number >= 0, got -1"),
    ('{"prompt": "hi", "temperature": "0.5"}', "temperature must be a number >= 0"),
    ('{"prompt": "hi", "temperature": NaN}', "temperature must be a number >= 0, got NaN"),
    ('{"prompt": "hi", "top_p": 0}', "top_p must be a number in (0, 1], got 0"),
    ('{"prompt": "hi", "top_p": 1.5}', "top_p must be a number in (0, 1], got 1.5"),
    ('{"prompt": "hi", "top_p": false}', "top_p must be a number in (0, 1], got false"),
    ('{"prompt": "hi", "seed": 1.5}', "seed must be an integer, got 1.5"),
    ('{"prompt": "hi", "seed": "3"}', 'seed must be an integer, got "3"'),
    ('{"prompt": "hi", "num_samples": 0}', "num_samples must be an integer >= 1, got 0"),
    ('{"prompt": "hi", "num_samples": -2}', "num_samples must be an integer >= 1, got -2"),
])
def test_bad_line_reasons(text, reason):
    assert reason in bad_reason(text)


@pytest.mark.parametrize("name", ["sample", "completion", "finish_reason", "prompt_tokens",
                                  "completion_tokens", "logprobs"])
def test_output_field_names_in_the_input_are_rejected_by_the_job_at_start(tmp_path, name):
    # A record reads fine (datasets with gold answers have such fields); the job refuses the
    # clash once, at start, naming the line, the field and the fix.
    item = parse(json.dumps({"prompt": "hi", name: 1}))
    assert isinstance(item, Record) and item.fields[name] == 1
    with pytest.raises(UserError) as e:
        check_no_clash(item, settings(tmp_path))
    message = str(e.value)
    assert f"line 7: field {name!r} is also an output field" in message
    assert ("--completion_key" if name == "completion" else "rename it in the input") in message
    write_prompts(tmp_path, {"prompt": "ok"}, {"prompt": "hi", name: 1})
    with pytest.raises(UserError, match=f"line 2: field {name!r} is also an output field"):
        count_pending(settings(tmp_path), set())


def test_a_completion_field_is_fine_under_another_completion_key(tmp_path):
    item = parse('{"prompt": "hi", "completion": "gold"}')
    check_no_clash(item, settings(tmp_path, completion_key="generated"))
    with pytest.raises(UserError, match="field 'generated' is also an output field: pass "
                                        "--completion_key with another name"):
        check_no_clash(parse('{"prompt": "hi", "generated": "x"}'),
                       settings(tmp_path, completion_key="generated"))


def test_an_id_field_is_reserved_when_the_ids_come_from_another_key(tmp_path):
    item = parse('{"prompt": "hi", "key": "a", "id": 3}', id_key="key", required=True)
    assert isinstance(item, Record) and item.id == "a"
    with pytest.raises(UserError, match="field 'id' is also an output field"):
        check_no_clash(item, settings(tmp_path, id_key="key"))
    default = parse('{"prompt": "hi", "id": 3}')
    assert isinstance(default, Record)  # the default id key is fine
    check_no_clash(default, settings(tmp_path))


def test_an_id_field_is_fine_when_it_is_the_id_key(tmp_path):
    item = parse('{"prompt": "hi", "id": 3}', id_key="id", required=True)
    assert isinstance(item, Record) and item.id == 3
    check_no_clash(item, settings(tmp_path, id_key="id"))


@pytest.mark.parametrize("key", OUTPUT_FIELDS)
def test_a_completion_key_that_is_another_output_field_is_refused(tmp_path, key):
    write_prompts(tmp_path, {"prompt": "hi"})
    with pytest.raises(UserError, match="--completion_key"):
        count_pending(settings(tmp_path, completion_key=key), set())


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
        "prompt field 'text' is missing"


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
    assert items[1].reason == "prompt field 'question' is missing"


# --- the job's side: settings, pending work, requests --------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_sentencepiece_model(tmp_path_factory.mktemp("tok") / "t.model"))


def settings(tmp_path: Path, **kwargs) -> Settings:
    prompt = tmp_path / "prompts.jsonl"
    if not prompt.exists():
        prompt.write_text('{"prompt": "hi"}\n')
    return Settings(ckpt_dir=tmp_path, prompt_path=prompt, out_path=tmp_path / "out.jsonl",
                    **kwargs)


# (The settings' own checks are in test_settings.py.)


def write_prompts(tmp_path: Path, *objs: dict | str) -> None:
    (tmp_path / "prompts.jsonl").write_text(
        "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))


def collect(s: Settings, tokenizer, replicas: int, done=frozenset()):
    return [list(pending_work(s, set(done), tokenizer, r, replicas)) for r in range(replicas)]


def test_pending_work_shards_records_disjointly_and_completely(tmp_path, tokenizer):
    write_prompts(tmp_path, *({"prompt": f"prompt number {i}", "id": f"r{i}"} for i in range(7)))
    s = settings(tmp_path)
    one = collect(s, tokenizer, 1)[0]
    assert [w.record.id for w in one] == [f"r{i}" for i in range(7)]
    shares = collect(s, tokenizer, 2)
    ids = [{w.record.id for w in share} for share in shares]
    assert ids[0].isdisjoint(ids[1])
    assert ids[0] | ids[1] == {f"r{i}" for i in range(7)}
    assert len(ids[0]) == 4 and len(ids[1]) == 3  # balanced
    for share in shares:
        for w in share:
            assert isinstance(w, Work) and w.samples == [0]
            assert w.prompt_tokens == tokenizer.encode(w.record.prompt, bos=True)
            assert w.prompt_tokens[0] == tokenizer.bos_id


def test_pending_work_skips_done_pairs_and_rebalances_what_is_left(tmp_path, tokenizer):
    write_prompts(tmp_path, *({"prompt": f"p{i}", "id": i} for i in range(6)),
                  {"prompt": "many", "id": "m", "num_samples": 3})
    s = settings(tmp_path, num_samples=2)
    done = {(0, 0), (0, 1), (1, 0), (2, 1), (4, 0), (4, 1), ("m", 1)}
    shares = collect(s, tokenizer, 2, done)
    pending = {w.record.id: w.samples for share in shares for w in share}
    assert pending == {1: [1], 2: [0], 3: [0, 1], 5: [0, 1], "m": [0, 2]}
    ids = [[w.record.id for w in share] for share in shares]
    assert ids == [[1, 3, "m"], [2, 5]]  # fully done records take no turn in the rotation
    for share in shares:
        for w in share:
            assert all((w.record.id, i) not in done for i in w.samples)


def test_pending_work_with_everything_done_is_empty(tmp_path, tokenizer):
    write_prompts(tmp_path, {"prompt": "a"}, {"prompt": "b"})
    s = settings(tmp_path)
    assert collect(s, tokenizer, 2, {(1, 0), (2, 0)}) == [[], []]


def test_bad_lines_come_from_replica_0_and_too_long_prompts_from_their_owner(tmp_path, tokenizer):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 10
    write_prompts(tmp_path,
                  {"prompt": "short a", "id": "a"},      # owned by replica 0
                  "not json",                            # line 2: invalid, replica 0 reports
                  {"prompt": long_prompt, "id": "b"},    # owned by replica 1: too long
                  {"prompt": "short c", "id": "a"},      # line 4: duplicate id, replica 0
                  {"prompt": "short c", "id": "c"},      # owned by replica 0
                  {"prompt": long_prompt, "id": "d"})    # owned by replica 1: too long
    s = settings(tmp_path, max_seq_len=32)
    assert len(tokenizer.encode(long_prompt, bos=True)) > 31
    shares = collect(s, tokenizer, 2)
    kinds = [[(type(x).__name__, x.line if isinstance(x, BadLine) else x.record.id)
              for x in share] for share in shares]
    assert kinds == [[("Work", "a"), ("BadLine", 2), ("BadLine", 4), ("Work", "c")],
                     [("BadLine", 3), ("BadLine", 6)]]
    too_long = shares[1][0]
    n = len(tokenizer.encode(long_prompt, bos=True))
    assert too_long.reason.startswith(f"the prompt has {n} tokens; --max_seq_len 32 allows at "
                                      "most 31")
    assert json.loads(too_long.text) == {"prompt": long_prompt, "id": "b"}
    assert too_long.max_seq_len == 32  # retried on a resume with a longer context
    assert all(x.max_seq_len is None for x in shares[0] if isinstance(x, BadLine))
    # One replica reports everything.
    alone = collect(s, tokenizer, 1)[0]
    assert sorted(x.line for x in alone if isinstance(x, BadLine)) == [2, 3, 4, 6]


def test_a_prompt_of_exactly_max_seq_len_minus_1_tokens_is_accepted(tmp_path, tokenizer):
    write_prompts(tmp_path, {"prompt": "Hello world! This is a tiny corpus."})
    n = len(tokenizer.encode("Hello world! This is a tiny corpus.", bos=True))
    assert isinstance(collect(settings(tmp_path, max_seq_len=n + 1), tokenizer, 1)[0][0], Work)
    assert isinstance(collect(settings(tmp_path, max_seq_len=n), tokenizer, 1)[0][0], BadLine)


def test_count_pending_uses_num_samples_and_per_record_overrides(tmp_path):
    write_prompts(tmp_path, {"prompt": "a"}, {"prompt": "b", "num_samples": 4}, "bad",
                  {"prompt": "c", "num_samples": 1}, {"prompt": "d", "id": 1})  # d: duplicate
    s = settings(tmp_path, num_samples=3)
    assert count_pending(s, set()) == 3 + 4 + 1
    assert count_pending(s, {(1, 0), (1, 2), (2, 3), (2, 9), (4, 0), ("x", 0)}) == 1 + 3 + 0
    assert count_pending(settings(tmp_path), set()) == 1 + 4 + 1


def requests(tmp_path: Path, tokenizer, s: Settings, done=frozenset()):
    return [r for w in collect(s, tokenizer, 1, done)[0] for r in requests_for(w, s)]


def test_requests_for_derives_a_seed_per_id_and_sample(tmp_path, tokenizer):
    write_prompts(tmp_path, {"prompt": "same", "id": "a"}, {"prompt": "same", "id": "b"},
                  {"prompt": "same", "id": 1})
    s = settings(tmp_path, num_samples=2, seed=11)
    reqs = requests(tmp_path, tokenizer, s)
    assert all(isinstance(r.tag, Tag) for r in reqs)
    assert [(r.tag.record.id, r.tag.sample) for r in reqs] == [
        ("a", 0), ("a", 1), ("b", 0), ("b", 1), (1, 0), (1, 1)]
    seeds = [r.params.seed for r in reqs]
    assert len(set(seeds)) == 6
    assert seeds[0] == derive_seed(11, "a", 0) and seeds[5] == derive_seed(11, 1, 1)
    assert all(0 <= x < 2**63 for x in seeds)
    # Resuming with some samples done gives the remaining ones the same seeds as before.
    resumed = requests(tmp_path, tokenizer, s, {("a", 0), ("b", 1)})
    assert [r.params.seed for r in resumed] == [seeds[1], seeds[2], seeds[4], seeds[5]]
    # Another run seed changes them all.
    other = requests(tmp_path, tokenizer, settings(tmp_path, num_samples=2, seed=12))
    assert not set(seeds) & {r.params.seed for r in other}


def test_requests_for_applies_per_record_overrides(tmp_path, tokenizer):
    write_prompts(tmp_path, {"prompt": "a"},
                  {"prompt": "b", "temperature": 0, "top_p": 0.5, "max_gen_len": 3, "seed": 99,
                   "num_samples": 2})
    s = settings(tmp_path, temperature=0.7, top_p=0.9, max_gen_len=20, seed=5, logprobs=True,
                 echo=True)
    plain, *special = requests(tmp_path, tokenizer, s)
    assert (plain.params.temperature, plain.params.top_p, plain.params.max_gen_len,
            plain.params.seed) == (0.7, 0.9, 20, derive_seed(5, 1, 0))
    assert plain.params.logprobs and plain.params.echo
    assert len(special) == 2
    for sample, r in enumerate(special):
        assert r.params.temperature == 0  # an override of 0 is not "unset"
        assert (r.params.top_p, r.params.max_gen_len) == (0.5, 3)
        assert r.params.seed == derive_seed(99, 2, sample)
        assert r.params.logprobs and r.params.echo
        assert r.tag == Tag(special[0].tag.record, sample)
        assert r.prompt_tokens == tokenizer.encode("b", bos=True)


# --- known bug ----------------------------------------------------------------------------------

def test_a_lone_surrogate_escape_is_a_bad_line():
    for text in ('{"prompt": "hi \\ud800"}', '{"prompt": "hi", "meta": "\\udfff"}'):
        assert isinstance(parse(text), BadLine)
