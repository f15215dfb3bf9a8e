"""The job's units: counting and sharing the work, the output line, results on their way to the
writer (one process), the replicas' messages, and how a run ends."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from llama_gen.distributed import Dist
from llama_gen.engine import Completion, Request, SamplingParams
from llama_gen.errors import UserError
from llama_gen.job import (OUTPUT_FIELDS, Interrupted, Plan, Results, StopRequested, Tag, Work,
                           check_no_clash, count_pending, end_of_run, output_line, pending_work,
                           prepare, requests_for)
from llama_gen.output import OutputLock
from llama_gen.records import BadLine, Record, parse_line
from llama_gen.replicas import Finished, decode, encode
from llama_gen.settings import Settings
from llama_gen.tiny_tokenizers import build_sentencepiece_model
from llama_gen.tokenizer import load_tokenizer

ONE_PROCESS = Dist(rank=0, world_size=1, device=torch.device("cpu"), backend="gloo",
                   model_parallel_size=1)
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 10


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_sentencepiece_model(tmp_path_factory.mktemp("tok") / "t.model"))


def settings(tmp_path: Path, **kwargs) -> Settings:
    prompt = tmp_path / "prompts.jsonl"
    if not prompt.exists():
        prompt.write_text('{"prompt": "hi"}\n{"prompt": "there"}\n')
    return Settings(**{"ckpt_dir": tmp_path, "prompt_path": prompt,
                       "out_path": tmp_path / "out.jsonl", **kwargs})


def write_prompts(tmp_path: Path, *objs: dict | str) -> None:
    (tmp_path / "prompts.jsonl").write_text(
        "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))


def record(text: str) -> Record:
    item = parse_line(text.encode() + b"\n", 4, "prompt", "key", True)
    assert isinstance(item, Record)
    return item


# --- the output line ---------------------------------------------------------------------------

def test_output_line_keeps_the_input_fields_and_adds_ours(tmp_path, tokenizer):
    rec = record('{"prompt": "Hello", "key": "k", "meta": {"a": 1}}')
    prompt = tokenizer.encode("Hello", bos=True)
    new = tokenizer.encode("world!", bos=False)  # SentencePiece: "▁world" carries the space
    request = Request(prompt, SamplingParams(), tag=Tag(rec, 2))
    line = output_line(Completion(request, new, None, "stop", len(prompt)), tokenizer,
                       settings(tmp_path))
    assert line == {"prompt": "Hello", "key": "k", "meta": {"a": 1}, "id": "k", "sample": 2,
                    "completion": " world!", "finish_reason": "stop",
                    "prompt_tokens": len(prompt), "completion_tokens": len(new)}
    assert list(line)[:3] == ["prompt", "key", "meta"]


def test_output_line_with_echo_and_logprobs(tmp_path, tokenizer):
    rec = record('{"prompt": "Hello", "key": 5}')
    prompt = tokenizer.encode("Hello", bos=True)
    new = tokenizer.encode("world!", bos=False)
    request = Request(prompt, SamplingParams(echo=True, logprobs=True), tag=Tag(rec, 0))
    logprobs = [None] + [-0.5] * (len(prompt) - 1 + len(new))
    line = output_line(Completion(request, prompt + new, logprobs, "length", len(prompt)),
                       tokenizer, settings(tmp_path))
    assert line["completion"] == "Hello world!"
    assert line["completion_tokens"] == len(new) and line["prompt_tokens"] == len(prompt)
    assert line["logprobs"] == logprobs and line["finish_reason"] == "length"
    assert (line["id"], line["sample"]) == (5, 0)


def test_output_line_names_the_completion_after_completion_key(tmp_path, tokenizer):
    # A dataset's own "completion" (a gold answer, say) stays as it was, beside ours.
    rec = record('{"prompt": "Hello", "key": "k", "completion": "gold"}')
    prompt = tokenizer.encode("Hello", bos=True)
    new = tokenizer.encode("world!", bos=False)
    request = Request(prompt, SamplingParams(), tag=Tag(rec, 0))
    line = output_line(Completion(request, new, None, "stop", len(prompt)), tokenizer,
                       settings(tmp_path, completion_key="generated"))
    assert line["completion"] == "gold" and line["generated"] == " world!"
    assert (line["id"], line["sample"], line["finish_reason"]) == ("k", 0, "stop")


# --- fields that clash with the output's: one error at start -------------------------------------

def test_a_completion_field_in_the_input_is_one_error_naming_the_flag(tmp_path):
    write_prompts(tmp_path, {"prompt": "a"}, {"prompt": "b", "completion": "gold"},
                  {"prompt": "c", "completion": "gold"})
    with pytest.raises(UserError) as e:
        count_pending(settings(tmp_path), set())
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'prompts.jsonl'}: line 2: field 'completion' is "
                              "also an output field")
    assert "--completion_key" in message
    # Another name for ours: the input's field is just a field.
    assert count_pending(settings(tmp_path, completion_key="generated"), set()) == 3


def test_a_field_named_as_the_completion_key_clashes_too(tmp_path):
    write_prompts(tmp_path, {"prompt": "a", "completion": "gold", "generated": "x"})
    with pytest.raises(UserError, match=r"line 1: field 'generated' .*--completion_key"):
        count_pending(settings(tmp_path, completion_key="generated"), set())


@pytest.mark.parametrize("name", [f for f in OUTPUT_FIELDS if f != "id"])
def test_other_output_fields_in_the_input_are_one_error_asking_to_rename(tmp_path, name):
    write_prompts(tmp_path, {"prompt": "a"}, {"prompt": "b", name: 1})
    with pytest.raises(UserError) as e:
        count_pending(settings(tmp_path), set())
    message = str(e.value)
    assert f"line 2: field {name!r} is also an output field" in message
    assert "rename it in the input" in message and "--completion_key" not in message


def test_an_id_field_clashes_only_when_the_ids_come_from_another_key(tmp_path):
    write_prompts(tmp_path, {"prompt": "a", "id": 7, "key": "x"})
    assert count_pending(settings(tmp_path), set()) == 1  # "id" is the record's id
    with pytest.raises(UserError, match="line 1: field 'id' is also an output field"):
        count_pending(settings(tmp_path, id_key="key"), set())


def test_bad_lines_are_not_checked_for_clashes(tmp_path):
    write_prompts(tmp_path, {"completion": "no prompt"}, {"prompt": "a"})
    assert count_pending(settings(tmp_path), set()) == 1


def test_id_key_id_names_the_field_that_is_the_id(tmp_path):
    write_prompts(tmp_path, {"prompt": "a", "id": 7})
    assert count_pending(settings(tmp_path, id_key="id"), set()) == 1


@pytest.mark.parametrize("name", ["id", "sample"])
def test_a_completion_key_that_is_an_output_field_is_refused(tmp_path, name):
    with pytest.raises(UserError, match="--completion_key"):
        count_pending(settings(tmp_path, completion_key=name), set())


# --- counting and sharing the work ---------------------------------------------------------------

def test_count_pending_counts_samples_not_done(tmp_path):
    write_prompts(tmp_path, {"prompt": "a"}, {"prompt": "b", "num_samples": 4}, "bad")
    s = settings(tmp_path, num_samples=2)
    assert count_pending(s, set()) == 2 + 4
    assert count_pending(s, {(1, 1), (2, 0), (2, 3), (3, 0)}) == 1 + 2


def shares(s: Settings, tokenizer, replicas: int, done=frozenset()) -> list[list]:
    return [list(pending_work(s, set(done), tokenizer, r, replicas)) for r in range(replicas)]


def test_two_replicas_share_the_pending_samples_disjointly_and_completely(tmp_path, tokenizer):
    write_prompts(tmp_path, *({"prompt": f"prompt {i}", "id": i, "num_samples": 1 + i % 3}
                              for i in range(9)))
    s = settings(tmp_path, num_samples=2)
    done = {(0, 0), (1, 0), (1, 1), (4, 2), (8, 0)}
    everything = {(i, k) for i in range(9) for k in range(1 + i % 3)} - done
    assert count_pending(s, done) == len(everything)
    for replicas in (1, 2, 3):
        pairs = [[(w.record.id, k) for w in share for k in w.samples]
                 for share in shares(s, tokenizer, replicas, done)]
        flat = [p for share in pairs for p in share]
        assert len(flat) == len(set(flat))  # no sample twice
        assert set(flat) == everything  # none left out
        records = [{pair[0] for pair in share} for share in pairs]
        assert all(a.isdisjoint(b) for i, a in enumerate(records) for b in records[i + 1:])
        if replicas == 2:  # records 0 and 1 are done: 7 with work left, taken in turn
            assert [sorted(r) for r in records] == [[2, 4, 6, 8], [3, 5, 7]]


def test_bad_lines_are_reported_by_replica_0_only(tmp_path, tokenizer):
    write_prompts(tmp_path, {"prompt": "a", "id": "a"}, "not json", {"prompt": "b", "id": "b"},
                  {"prompt": "c", "id": "a"}, {"prompt": ""}, {"prompt": "d", "id": "d"})
    first, second = shares(settings(tmp_path), tokenizer, 2)
    assert [x.line for x in first if isinstance(x, BadLine)] == [2, 4, 5]
    assert not [x for x in second if isinstance(x, BadLine)]
    assert [x.record.id for x in first if isinstance(x, Work)] == ["a", "d"]
    assert [x.record.id for x in second if isinstance(x, Work)] == ["b"]
    assert all(x.max_seq_len is None for x in first if isinstance(x, BadLine))


def test_a_prompt_too_long_is_reported_by_its_owner_with_the_context_it_was_tried_at(
        tmp_path, tokenizer):
    write_prompts(tmp_path, {"prompt": "short", "id": "a"}, {"prompt": LONG_PROMPT, "id": "b"})
    n = len(tokenizer.encode(LONG_PROMPT, bos=True))
    first, second = shares(settings(tmp_path, max_seq_len=32), tokenizer, 2)
    assert [type(x).__name__ for x in first] == ["Work"]
    [bad] = second
    assert isinstance(bad, BadLine) and bad.line == 2 and bad.max_seq_len == 32
    assert bad.reason.startswith(f"the prompt has {n} tokens; --max_seq_len 32")
    assert bad.as_json()["max_seq_len"] == 32
    assert json.loads(bad.text) == {"prompt": LONG_PROMPT, "id": "b"}


def test_requests_carry_a_tag_of_record_and_sample(tmp_path, tokenizer):
    write_prompts(tmp_path, {"prompt": "a", "id": "x"})
    s = settings(tmp_path, num_samples=3)
    [work] = shares(s, tokenizer, 1, {("x", 1)})[0]
    requests = list(requests_for(work, s))
    assert [r.tag for r in requests] == [Tag(work.record, 0), Tag(work.record, 2)]
    assert all(r.prompt_tokens == work.prompt_tokens for r in requests)


# --- prepare (one process) -----------------------------------------------------------------------

def test_prepare_locks_checks_and_counts(tmp_path, tokenizer, single_process):
    write_prompts(tmp_path, {"prompt": "a"}, {"prompt": "b"}, "bad")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "params.json").write_text('{"dim": 64}')
    s = settings(tmp_path, ckpt_dir=ckpt, num_samples=2)
    lock = OutputLock(s.lock_path, s.out_path)
    try:
        assert prepare(s, tokenizer, "torch.float32", ONE_PROCESS, lock) == Plan(frozenset(), 4)
        assert s.settings_path.exists()
        other = OutputLock(s.lock_path, s.out_path)
        with pytest.raises(UserError, match="another llama-gen job"):
            prepare(s, tokenizer, "torch.float32", ONE_PROCESS, other)
    finally:
        lock.release()
    s.out_path.write_bytes(b'{"id": 1, "sample": 0, "completion": "x"}\n')
    lock = OutputLock(s.lock_path, s.out_path)
    try:
        assert prepare(s, tokenizer, "torch.float32", ONE_PROCESS, lock) == \
            Plan(frozenset({(1, 0)}), 3)
    finally:
        lock.release()
    write_prompts(tmp_path, {"prompt": "a", "completion": "gold"})
    fresh = settings(tmp_path, ckpt_dir=ckpt, out_path=tmp_path / "fresh.jsonl")
    lock = OutputLock(fresh.lock_path, fresh.out_path)
    try:
        with pytest.raises(UserError, match="--completion_key"):
            prepare(fresh, tokenizer, "torch.float32", ONE_PROCESS, lock)
    finally:
        lock.release()


# --- results on one process ----------------------------------------------------------------------

@pytest.fixture
def stop():
    """A StopRequested, with the test runner's own signal handlers put back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield StopRequested()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_results_on_one_process_go_to_the_writer(tmp_path, stop):
    s = settings(tmp_path)
    results = Results(s, ONE_PROCESS, total=2)
    assert results.mailbox is None and results.writer is not None
    try:
        results.finished({"id": 1, "sample": 0, "completion": "é", "completion_tokens": 2}, 1)
        results.deliver(BadLine(2, "invalid JSON", "x"))
        results.deliver(BadLine(3, "too long", "y", max_seq_len=8))
        results.finished({"id": 4, "sample": 0, "completion": "z", "completion_tokens": 3}, 4)
        results.finish(stop)
    finally:
        results.close()
    assert results.first_bad_line == BadLine(2, "invalid JSON", "x")
    assert (results.writer.samples, results.writer.tokens, results.writer.bad_lines) == (2, 5, 2)
    assert [json.loads(x) for x in s.out_path.read_bytes().splitlines()] == [
        {"id": 1, "sample": 0, "completion": "é", "completion_tokens": 2},
        {"id": 4, "sample": 0, "completion": "z", "completion_tokens": 3}]
    assert [json.loads(x) for x in s.errors_path.read_bytes().splitlines()] == [
        {"line": 2, "reason": "invalid JSON", "text": "x"},
        {"line": 3, "reason": "too long", "text": "y", "max_seq_len": 8}]
    assert "end: 2 sample(s) written, 2 bad line(s)" in s.log_path.read_text()


# --- the replicas' messages ----------------------------------------------------------------------

@pytest.mark.parametrize("message", [
    Finished({"prompt": "é🦙\n", "id": 3, "sample": 1, "completion": "a\u2028b",
              "meta": {"x": [1, None]}, "logprobs": [None, -0.25]}, 7),
    Finished({"id": "k", "sample": 0}, 1),
    BadLine(2, "invalid JSON: Expecting value at column 1", "not json é"),
    BadLine(5, "the prompt has 40 tokens", '{"prompt": "…"}', max_seq_len=32),
])
def test_a_replica_message_survives_encoding(message):
    text = encode(message)
    assert isinstance(text, str)
    back = decode(text)
    assert type(back) is type(message) and back == message


# --- the end of a run ----------------------------------------------------------------------------

def ended(s: Settings, stop: StopRequested, *items, done=frozenset()) -> None:
    """Deliver `items` (BadLines, or output lines) on one process, then end the run."""
    results = Results(s, ONE_PROCESS, total=0)
    try:
        for item in items:
            if isinstance(item, BadLine):
                results.deliver(item)
            else:
                results.finished(item, 1)
        results.finish(stop)
        end_of_run(s, stop, results, Plan(frozenset(done), 0))
    finally:
        results.close()


LINE = {"id": 1, "sample": 0, "completion": "x", "completion_tokens": 1}


def test_a_clean_run_ends_quietly(tmp_path, stop):
    ended(settings(tmp_path), stop)  # nothing to do
    ended(settings(tmp_path), stop, LINE)
    ended(settings(tmp_path), stop, BadLine(2, "bad", "x"), LINE)  # some lines bad


def test_strict_ends_with_a_user_error_naming_the_first_bad_line(tmp_path, stop):
    s = settings(tmp_path, strict=True)
    with pytest.raises(UserError) as e:
        ended(s, stop, LINE, BadLine(3, "invalid JSON: oops", "x"), BadLine(5, "other", "y"))
    message = str(e.value)
    assert message.startswith(f"{s.prompt_path}: line 3: invalid JSON: oops (--strict")
    assert str(s.errors_path) in message


def test_a_run_in_which_every_line_was_bad_is_a_user_error(tmp_path, stop):
    s = settings(tmp_path)
    with pytest.raises(UserError) as e:
        ended(s, stop, BadLine(1, "bad", "x"), BadLine(2, "bad", "y"))
    assert str(e.value) == f"every line of {s.prompt_path} is bad: the reasons are in " \
                           f"{s.errors_path}"
    # Bad lines after an earlier run's good ones: a resume with nothing new that fits.
    ended(s, stop, BadLine(1, "bad", "x"), done={(3, 0)})


def test_a_signal_ends_the_run_as_interrupted(tmp_path, stop):
    signal.raise_signal(signal.SIGTERM)  # caught: only noted
    assert stop and stop.signal == signal.SIGTERM
    with pytest.raises(Interrupted) as e:
        ended(settings(tmp_path), stop, LINE)
    assert e.value.signum == signal.SIGTERM and str(e.value) == "stopped by SIGTERM"
    assert settings(tmp_path).out_path.read_bytes().count(b"\n") == 1  # what was done is kept


def test_strict_is_reported_before_the_signal(tmp_path, stop):
    signal.raise_signal(signal.SIGINT)  # caught: only noted
    with pytest.raises(UserError, match="line 2: bad"):
        ended(settings(tmp_path, strict=True), stop, BadLine(2, "bad", "x"))


def test_a_clash_found_on_resume_names_the_ways_out_that_work(tmp_path):
    """On resume, --completion_key may not change (it defines the output): the message must not
    send the user to a flag the resume check then refuses."""
    s = settings(tmp_path)
    record = Record(4, 4, "p", {"prompt": "p", "completion": "gold"})
    with pytest.raises(UserError, match=r"line 4: .*--completion_key generated --overwrite"):
        check_no_clash(record, s, resuming=True)
    with pytest.raises(UserError, match=r"pass --completion_key with another name"):
        check_no_clash(record, s)
