"""The job's units: counting and sharing the work, the output line, results on their way to the
writer (one process), the replicas' messages, and how a run ends."""
from __future__ import annotations

import itertools
import json
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from llama_gen.engine.requests import Completion, Request, SamplingParams
from llama_gen.engine.sampling import derive_seed
from llama_gen.errors import UserError
from llama_gen.job import replicas as replicas_module
from llama_gen.job.feed import pending_records
from llama_gen.job.output import OutputLock, recover_output
from llama_gen.job.parts import parts_dir
from llama_gen.job.prepare import (Prepared, check_no_clash, check_shared_folder, count_pending,
                                   prepare, start_parts)
from llama_gen.job.records import BadLine, Record, parse_line
from llama_gen.job.replicas import Counts, End, Replicas, Verdict
from llama_gen.job.results import Results
from llama_gen.job.run_end import Incomplete, Interrupted, StopRequested
from llama_gen.job.tasks import Generation, Prompting, RecordSample, Scoring, TokenizedRecord
from llama_gen.runtime.distributed import Dist
from llama_gen.settings import OUTPUT_FIELDS, ScoreSettings, Settings
from llama_gen.testing.tiny_tokenizers import build_sentencepiece_model, build_tiktoken_model
from llama_gen.text.tokenizer import load_tokenizer

ONE_PROCESS = Dist(rank=0, world_size=1, device=torch.device("cpu"), backend="gloo",
                   model_parallel_size=1)
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 10


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_sentencepiece_model(tmp_path_factory.mktemp("tok") / "t.model"))


@pytest.fixture(scope="module")
def tokenizer3(tmp_path_factory):
    return load_tokenizer(build_tiktoken_model(tmp_path_factory.mktemp("tok3") / "t.model"))


def settings(tmp_path: Path, **kwargs) -> Settings:
    prompt = tmp_path / "prompts.jsonl"
    if not prompt.exists():
        prompt.write_text('{"prompt": "hi"}\n{"prompt": "there"}\n')
    return Settings(**{"ckpt_dir": tmp_path, "prompt_path": prompt,
                       "out_path": tmp_path / "out.jsonl", **kwargs})


def generation(s: Settings, tokenizer=None) -> Generation:
    """The generation task over `s`, tokenizing with `tokenizer` (plain prompts)."""
    return Generation(s, Prompting(tokenizer, None))


def output_line(completion: Completion, tokenizer, s: Settings) -> dict:
    return generation(s, tokenizer).line(completion)


def write_prompts(tmp_path: Path, *objs: dict | str) -> None:
    (tmp_path / "prompts.jsonl").write_text(
        "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))


def parse(text: str, id_key: str = "id", required: bool = False) -> Record | BadLine | None:
    """Line 7 of a prompt file."""
    return parse_line(text.encode() + b"\n", 7, "prompt", id_key, required)


def record(text: str) -> Record:
    item = parse_line(text.encode() + b"\n", 4, "prompt", "key", True)
    assert isinstance(item, Record)
    return item


# --- the output line ---------------------------------------------------------------------------

def test_output_line_keeps_the_input_fields_and_adds_ours(tmp_path, tokenizer):
    rec = record('{"prompt": "Hello", "key": "k", "meta": {"a": 1}}')
    prompt = tokenizer.encode("Hello", bos=True)
    new = tokenizer.encode("world!", bos=False)  # SentencePiece: "▁world" carries the space
    request = Request(prompt, SamplingParams(), tag=RecordSample(rec, 2))
    line = output_line(Completion(request, new, None, "stop", len(prompt)), tokenizer,
                       settings(tmp_path))
    assert line == {"prompt": "Hello", "key": "k", "meta": {"a": 1}, "id": "k", "sample": 2,
                    "completion": " world!", "finish_reason": "stop", "stop_reason": None,
                    "prompt_tokens": len(prompt), "completion_tokens": len(new)}
    assert list(line)[:3] == ["prompt", "key", "meta"]


def test_output_line_with_echo_and_logprobs(tmp_path, tokenizer):
    rec = record('{"prompt": "Hello", "key": 5}')
    prompt = tokenizer.encode("Hello", bos=True)
    new = tokenizer.encode("world!", bos=False)
    request = Request(prompt, SamplingParams(echo=True, logprobs=True), tag=RecordSample(rec, 0))
    logprobs = [None] + [-0.5] * (len(prompt) - 1 + len(new))
    line = output_line(Completion(request, prompt + new, logprobs, "length", len(prompt)),
                       tokenizer, settings(tmp_path))
    assert line["completion"] == "Hello world!"
    assert line["completion_tokens"] == len(new) and line["prompt_tokens"] == len(prompt)
    assert line["logprobs"] == logprobs and line["finish_reason"] == "length"
    assert line["token_ids"] == prompt + new
    assert (line["id"], line["sample"]) == (5, 0)


def test_a_completion_cut_by_the_context_says_so_beside_its_finish_reason(tmp_path, tokenizer):
    rec = record('{"prompt": "Hello", "key": "k"}')
    prompt = tokenizer.encode("Hello", bos=True)
    new = tokenizer.encode("world!", bos=False)
    request = Request(prompt, SamplingParams(max_gen_len=100), tag=RecordSample(rec, 0))
    cut = output_line(Completion(request, new, None, "length", len(prompt), context_limit=True),
                      tokenizer, settings(tmp_path))
    assert (cut["finish_reason"], cut["context_limit"]) == ("length", True)
    assert list(cut).index("context_limit") == list(cut).index("finish_reason") + 1
    whole = output_line(Completion(request, new, None, "length", len(prompt)), tokenizer,
                        settings(tmp_path))
    assert "context_limit" not in whole and whole == {k: v for k, v in cut.items()
                                                      if k != "context_limit"}


def test_a_record_field_named_context_limit_clashes_with_ours(tmp_path):
    write_prompts(tmp_path, {"prompt": "a", "context_limit": 3})
    with pytest.raises(UserError, match="field 'context_limit' is also an output field"):
        count_pending(generation(settings(tmp_path)), set())
    assert "context_limit" in OUTPUT_FIELDS


def completed(tokenizer, prompt: str, new: list[int], stop_reason=None, top=None, **params):
    rec = record(json.dumps({"prompt": prompt, "key": "k"}))
    ids = tokenizer.encode(prompt, bos=True)
    request = Request(ids, SamplingParams(**params), tag=RecordSample(rec, 0))
    return Completion(request, new, None, "stop" if stop_reason else "length", len(ids),
                      stop_reason, top)


def test_output_line_cuts_the_text_before_the_stop_string_that_ended_it(tmp_path, tokenizer):
    new = tokenizer.encode("one. two. three.", bos=False)
    for stops, reason, want in ((("two", "."), ".", " one"), (("two", "."), "two", " one"),
                                ((" t",), " t", " one.")):
        completion = completed(tokenizer, "Count:", new, reason, stop=stops)
        line = output_line(completion, tokenizer, settings(tmp_path, stop=stops))
        assert (line["completion"], line["stop_reason"]) == (want, reason)
        assert line["completion_tokens"] == len(new)  # the tokens generated, all of them
    # min_tokens: stop strings count only after the first min_tokens tokens.
    head = len(tokenizer.encode("one.", bos=False))
    completion = completed(tokenizer, "Count:", new, ".", stop=(".",), min_tokens=head)
    assert output_line(completion, tokenizer, settings(tmp_path))["completion"] == " one. two"


def test_output_line_top_logprobs_name_each_alternative(tmp_path, tokenizer):
    new = tokenizer.encode("hello world", bos=False)
    top = [[(t, -0.1), (tokenizer.eos_id, -2.5)] for t in new]
    line = output_line(completed(tokenizer, "Say:", new, top=top, top_logprobs=2), tokenizer,
                       settings(tmp_path))
    assert [[a["token_id"] for a in alt] for alt in line["top_logprobs"]] == \
        [[t, tokenizer.eos_id] for t in new]
    assert "".join(alt[0]["token"] for alt in line["top_logprobs"]) == " hello world"
    assert line["top_logprobs"][0][1]["logprob"] == -2.5


def test_special_tokens_are_dropped_from_the_text_unless_kept(tmp_path, tokenizer3):
    eot = tokenizer3.special_tokens["<|eot_id|>"]
    new = tokenizer3.encode("a", bos=False) + [eot] + tokenizer3.encode("b", bos=False)
    dropped = output_line(completed(tokenizer3, "x", new), tokenizer3, settings(tmp_path))
    kept = output_line(completed(tokenizer3, "x", new, skip_special_tokens=False), tokenizer3,
                       settings(tmp_path))
    assert (dropped["completion"], kept["completion"]) == ("ab", "a<|eot_id|>b")


def test_output_line_names_the_completion_after_completion_key(tmp_path, tokenizer):
    # A dataset's own "completion" (a gold answer, say) stays as it was, beside ours.
    rec = record('{"prompt": "Hello", "key": "k", "completion": "gold"}')
    prompt = tokenizer.encode("Hello", bos=True)
    new = tokenizer.encode("world!", bos=False)
    request = Request(prompt, SamplingParams(), tag=RecordSample(rec, 0))
    line = output_line(Completion(request, new, None, "stop", len(prompt)), tokenizer,
                       settings(tmp_path, completion_key="generated"))
    assert line["completion"] == "gold" and line["generated"] == " world!"
    assert (line["id"], line["sample"], line["finish_reason"]) == ("k", 0, "stop")


# --- fields that clash with the output's: one error at start -------------------------------------

def test_a_completion_field_in_the_input_is_one_error_naming_the_flag(tmp_path):
    write_prompts(tmp_path, {"prompt": "a"}, {"prompt": "b", "completion": "gold"},
                  {"prompt": "c", "completion": "gold"})
    with pytest.raises(UserError) as e:
        count_pending(generation(settings(tmp_path)), set())
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'prompts.jsonl'}: line 2: field 'completion' is "
                              "also an output field")
    assert "--completion_key" in message
    # Another name for ours: the input's field is just a field.
    assert count_pending(generation(settings(tmp_path, completion_key="generated")), set()) == 3


def test_a_field_named_as_the_completion_key_clashes_too(tmp_path):
    write_prompts(tmp_path, {"prompt": "a", "completion": "gold", "generated": "x"})
    with pytest.raises(UserError, match=r"line 1: field 'generated' .*--completion_key"):
        count_pending(generation(settings(tmp_path, completion_key="generated")), set())


@pytest.mark.parametrize("name", [f for f in OUTPUT_FIELDS if f != "id"])
def test_other_output_fields_in_the_input_are_one_error_asking_to_rename(tmp_path, name):
    write_prompts(tmp_path, {"prompt": "a"}, {"prompt": "b", name: 1})
    with pytest.raises(UserError) as e:
        count_pending(generation(settings(tmp_path)), set())
    message = str(e.value)
    assert f"line 2: field {name!r} is also an output field" in message
    assert "rename it in the input" in message and "--completion_key" not in message


def test_an_id_field_clashes_only_when_the_ids_come_from_another_key(tmp_path):
    write_prompts(tmp_path, {"prompt": "a", "id": 7, "key": "x"})
    assert count_pending(generation(settings(tmp_path)), set()) == 1  # "id" is the record's id
    with pytest.raises(UserError, match="line 1: field 'id' is also an output field"):
        count_pending(generation(settings(tmp_path, id_key="key")), set())


def test_bad_lines_are_not_checked_for_clashes(tmp_path):
    write_prompts(tmp_path, {"completion": "no prompt"}, {"prompt": "a"})
    assert count_pending(generation(settings(tmp_path)), set()) == 1


def test_id_key_id_names_the_field_that_is_the_id(tmp_path):
    write_prompts(tmp_path, {"prompt": "a", "id": 7})
    assert count_pending(generation(settings(tmp_path, id_key="id")), set()) == 1


@pytest.mark.parametrize("name", ["id", "sample"])
def test_a_completion_key_that_is_an_output_field_is_refused(tmp_path, name):
    with pytest.raises(UserError, match="--completion_key"):
        count_pending(generation(settings(tmp_path, completion_key=name)), set())


# --- counting and sharing the work ---------------------------------------------------------------

def test_count_pending_counts_samples_not_done(tmp_path):
    write_prompts(tmp_path, {"prompt": "a"}, {"prompt": "b", "num_samples": 4}, "bad")
    s = settings(tmp_path, num_samples=2)
    assert count_pending(generation(s), set()) == 2 + 4
    assert count_pending(generation(s), {(1, 1), (2, 0), (2, 3), (3, 0)}) == 1 + 2


def shares(s: Settings, tokenizer, replicas: int, done=frozenset(), chunk_records: int = 1,
           seed: int | None = None) -> list[list]:
    """Each replica's items of `pending_work`, the replicas claiming chunks from one counter (as
    from torchrun's store) and taking items in turn, or in a random order given a seed."""
    counter = itertools.count()
    claim = (lambda: next(counter)) if replicas > 1 else None
    feeds = [pending_records(generation(s, tokenizer), set(done), claim, chunk_records,
                          reports_invalid=r == 0) for r in range(replicas)]
    out: list[list] = [[] for _ in feeds]
    live, turn, rng = list(range(replicas)), 0, random.Random(seed)
    while live:
        r = live[turn % len(live)] if seed is None else rng.choice(live)
        turn += 1
        try:
            out[r].append(next(feeds[r]))
        except StopIteration:
            live.remove(r)
    return out


def test_two_replicas_share_the_pending_samples_disjointly_and_completely(tmp_path, tokenizer):
    write_prompts(tmp_path, *({"prompt": f"prompt {i}", "id": i, "num_samples": 1 + i % 3}
                              for i in range(9)))
    s = settings(tmp_path, num_samples=2)
    done = {(0, 0), (1, 0), (1, 1), (4, 2), (8, 0)}
    everything = {(i, k) for i in range(9) for k in range(1 + i % 3)} - done
    assert count_pending(generation(s), done) == len(everything)
    for replicas, chunk, seed in itertools.product((1, 2, 3), (1, 2, 5), (None, 1, 2)):
        pairs = [[(w.record.id, k) for w in share for k in w.samples]
                 for share in shares(s, tokenizer, replicas, done, chunk, seed)]
        flat = [p for share in pairs for p in share]
        assert len(flat) == len(set(flat))  # no sample twice
        assert set(flat) == everything  # none left out
        records = [{pair[0] for pair in share} for share in pairs]
        assert all(a.isdisjoint(b) for i, a in enumerate(records) for b in records[i + 1:])
        if (replicas, chunk, seed) == (2, 2, None):  # 7 records left, claimed 2 at a time
            assert [sorted(r) for r in records] == [[2, 3, 6, 7], [4, 5, 8]]


def test_bad_lines_are_reported_by_replica_0_only(tmp_path, tokenizer):
    write_prompts(tmp_path, {"prompt": "a", "id": "a"}, "not json", {"prompt": "b", "id": "b"},
                  {"prompt": "c", "id": "a"}, {"prompt": ""}, {"prompt": "d", "id": "d"})
    first, second = shares(settings(tmp_path), tokenizer, 2)
    assert [x.line for x in first if isinstance(x, BadLine)] == [2, 4, 5]
    assert not [x for x in second if isinstance(x, BadLine)]
    assert sorted(x.record.id for x in first + second
                  if isinstance(x, TokenizedRecord)) == ["a", "b", "d"]
    assert all(x.max_seq_len is None for x in first if isinstance(x, BadLine))


def test_a_prompt_too_long_is_reported_by_its_owner_with_the_context_it_was_tried_at(
        tmp_path, tokenizer):
    write_prompts(tmp_path, {"prompt": "short", "id": "a"}, {"prompt": LONG_PROMPT, "id": "b"})
    n = len(tokenizer.encode(LONG_PROMPT, bos=True))
    first, second = shares(settings(tmp_path, max_seq_len=32), tokenizer, 2)
    # chunk 0, "a"; chunk 1 is the other's
    assert [type(x).__name__ for x in first] == ["TokenizedRecord"]
    [bad] = second
    assert isinstance(bad, BadLine) and bad.line == 2 and bad.max_seq_len == 32
    assert bad.reason.startswith(f"the prompt has {n} tokens; --max_seq_len 32")
    assert bad.as_json()["max_seq_len"] == 32
    assert json.loads(bad.text) == {"prompt": LONG_PROMPT, "id": "b"}


def test_requests_carry_a_tag_of_record_and_sample(tmp_path, tokenizer):
    write_prompts(tmp_path, {"prompt": "a", "id": "x"})
    s = settings(tmp_path, num_samples=3)
    [work] = shares(s, tokenizer, 1, {("x", 1)})[0]
    requests = list(generation(s).requests(work))
    assert [r.tag for r in requests] == [RecordSample(work.record, 0), RecordSample(work.record, 2)]
    assert all(r.prompt_tokens == work.tokens for r in requests)


# --- prepare (one process) -----------------------------------------------------------------------

def test_prepare_locks_checks_and_counts(tmp_path, tokenizer, single_process):
    write_prompts(tmp_path, {"prompt": "a"}, {"prompt": "b"}, "bad")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "params.json").write_text('{"dim": 64}')
    s = settings(tmp_path, ckpt_dir=ckpt, num_samples=2)
    lock = OutputLock(s.lock_path, s.out_path)
    try:
        assert prepare(generation(s, tokenizer), "torch.float32", ONE_PROCESS, lock) == \
            Prepared(frozenset(), 4)
        assert s.settings_path.exists()
        other = OutputLock(s.lock_path, s.out_path)
        with pytest.raises(UserError, match="another llama-gen job"):
            prepare(generation(s, tokenizer), "torch.float32", ONE_PROCESS, other)
    finally:
        lock.release()
    s.out_path.write_bytes(b'{"id": 1, "sample": 0, "completion": "x"}\n')
    lock = OutputLock(s.lock_path, s.out_path)
    try:
        assert prepare(generation(s, tokenizer), "torch.float32", ONE_PROCESS, lock) == \
            Prepared(frozenset({(1, 0)}), 3)
    finally:
        lock.release()
    write_prompts(tmp_path, {"prompt": "a", "completion": "gold"})
    fresh = settings(tmp_path, ckpt_dir=ckpt, out_path=tmp_path / "fresh.jsonl")
    lock = OutputLock(fresh.lock_path, fresh.out_path)
    try:
        with pytest.raises(UserError, match="--completion_key"):
            prepare(generation(fresh, tokenizer), "torch.float32", ONE_PROCESS, lock)
    finally:
        lock.release()


# --- results on one process ----------------------------------------------------------------------

def test_results_on_one_process_go_to_the_writer(tmp_path, stop):
    write_prompts(tmp_path, {"prompt": "a"}, "x", {"prompt": "y"}, {"prompt": "z"})
    s = settings(tmp_path)
    results = Results(generation(s), ONE_PROCESS, total=3)  # no line is made here
    assert results.replicas is None and results.writer is not None
    try:
        results.writer.output({"id": 1, "sample": 0, "completion": "é",
                               "completion_tokens": 2}, 1)
        results.writer.bad_line(BadLine(2, "invalid JSON", "x"))
        results.writer.bad_line(BadLine(3, "too long", "y", max_seq_len=8, samples=1))
        results.writer.output({"id": 4, "sample": 0, "completion": "z",
                               "completion_tokens": 3}, 4)
        results.end(stop)  # 2 written + 1 in a bad line: what the start announced
    finally:
        results.close()
    assert results.first_bad_line == BadLine(2, "invalid JSON", "x")
    assert (results.counts.samples, results.counts.tokens, results.counts.bad_lines,
            results.counts.bad_samples) == (2, 5, 2, 1)
    assert [json.loads(x) for x in s.out_path.read_bytes().splitlines()] == [
        {"id": 1, "sample": 0, "completion": "é", "completion_tokens": 2},
        {"id": 4, "sample": 0, "completion": "z", "completion_tokens": 3}]
    assert [json.loads(x) for x in s.errors_path.read_bytes().splitlines()] == [
        {"line": 2, "reason": "invalid JSON", "text": "x"},
        {"line": 3, "reason": "too long", "text": "y", "max_seq_len": 8}]
    assert "end: 2 sample(s) written, 2 bad line(s)" in s.log_path.read_text()


# --- the replicas' counters ----------------------------------------------------------------------

def replica(store, rank: int, size: int) -> Replicas:
    return Replicas(Dist(rank=rank, world_size=size, device=torch.device("cpu"),
                         backend="gloo", model_parallel_size=1), store)


def test_replicas_claim_distinct_chunks_and_share_progress():
    store = torch.distributed.HashStore()  # c10d's in-memory store, as torchrun's TCPStore
    a, b = replica(store, 0, 2), replica(store, 1, 2)
    assert [a.claim(), b.claim(), b.claim(), a.claim()] == [0, 1, 2, 3]
    a.finished(2, 30)
    b.finished(1, 5)
    a.report(), b.report()
    assert a.counters() == b.counters() == (3, 35, 0)


def test_rank_0_waits_for_the_done_and_gives_up_on_the_silent(monkeypatch):
    """Replica 1 finishes with its counts; replica 2 beat once and went silent: after the
    timeout it is lost, and the wait returns without it."""
    monkeypatch.setattr(replicas_module, "BEAT_SECONDS", 0.0)
    store = torch.distributed.HashStore()
    rank0, done, silent = (replica(store, r, 3) for r in range(3))
    silent.beat()
    done.end(End(Counts(samples=4, tokens=40, bad_lines=1), claimed=4))
    ticks = []
    ends, lost = rank0.wait_for_others(timeout=1.0, should_stop=lambda: False,
                                       tick=lambda: ticks.append(1))
    assert ends == {1: End(Counts(samples=4, tokens=40, bad_lines=1), claimed=4)}
    assert lost == [2] and ticks


def test_a_stopped_replica_is_told_apart_from_a_done_one():
    store = torch.distributed.HashStore()
    rank0, done, stopped = (replica(store, r, 3) for r in range(3))
    done.end(End(Counts(samples=6, bad_samples=2), claimed=8, chunks=2, seconds=1.5))
    stopped.end(End(Counts(samples=9), claimed=32, chunks=1, stopped="SIGTERM"))
    ends, lost = rank0.wait_for_others(timeout=5.0, should_stop=lambda: False)
    assert lost == [] and [ends[r].stopped for r in (1, 2)] == [None, "SIGTERM"]
    assert ends[1].describe(1) == "replica 1 done: 2 chunk(s), 6 sample(s) in 1.5 s"
    assert ends[2].describe(2) == "replica 2 stopped (SIGTERM) after 9 of its 32 claimed sample(s)"


def test_a_stop_reaches_every_replica_through_its_heartbeat(monkeypatch):
    """Rank 0 stops the run; another replica's heartbeat thread reads it (its decode loop only
    reads the attribute). The first reason stays."""
    monkeypatch.setattr(replicas_module, "BEAT_SECONDS", 0.01)
    store = torch.distributed.HashStore()
    rank0, other = replica(store, 0, 2), replica(store, 1, 2)
    other.start_heartbeat()
    try:
        rank0.stop_run("rank 0 got SIGINT")
        assert wait_until(lambda: other.run_stop) == "rank 0 got SIGINT"
        other.stop_run("replica 1 met a bad line (--strict)")  # too late: the first one stays
        assert other.run_stop == rank0.run_stop == "rank 0 got SIGINT"
    finally:
        other.stop_heartbeat()


def wait_until(condition, seconds: float = 30.0):
    """The condition's first true value, polled; the test fails if it never comes."""
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.005)
    return value


def test_a_replica_waits_for_rank_0s_verdict_while_rank_0_beats(monkeypatch):
    """The verdict once given; None when rank 0's heartbeat stands still for the timeout (rank 0
    is lost: no one can say the run is complete), or when the waiter is stopped."""
    monkeypatch.setattr(replicas_module, "POLL_SECONDS", 0.01)
    store = torch.distributed.HashStore()
    rank0, other = replica(store, 0, 2), replica(store, 1, 2)
    assert other.wait_for_verdict(0.2, should_stop=lambda: False) is None  # rank 0 silent
    assert other.wait_for_verdict(60, should_stop=lambda: True) is None
    rank0.give_verdict(Verdict(23, "23 sample(s) missing: replica 1 stopped (SIGTERM); ..."))
    assert other.wait_for_verdict(60, should_stop=lambda: False) == Verdict(
        23, "23 sample(s) missing: replica 1 stopped (SIGTERM); ...")


def test_each_replica_hears_the_samples_of_the_chunks_it_claims(tmp_path, tokenizer):
    """`on_claimed` tells a replica the samples of each chunk it takes, once read whole: written
    plus bad, they are what its last line counts against."""
    write_prompts(tmp_path, *({"prompt": LONG_PROMPT if i == 4 else f"prompt {i}", "id": i,
                               "num_samples": 1 + i % 3} for i in range(9)))
    s = settings(tmp_path, max_seq_len=32)
    counter = itertools.count()
    claimed = [[], []]
    shares = [list(pending_records(generation(s, tokenizer), set(), lambda: next(counter), 2,
                                reports_invalid=r == 0, on_claimed=claimed[r].append))
              for r in range(2)]  # replica 0 reads all it can first: it takes every chunk
    assert claimed[1] == [] and sum(claimed[0]) == count_pending(generation(s), set()) == 18
    assert claimed[0] == [1 + 2, 3 + 1, 2 + 3, 1 + 2, 3]  # chunks of 2 records
    made = [sum(len(w.samples) if isinstance(w, TokenizedRecord) else w.samples for w in share)
            for share in shares]
    assert made == [18, 0]
    [bad] = [w for w in shares[0] if isinstance(w, BadLine)]
    assert (bad.line, bad.samples) == (5, 2)  # too long: its 2 samples are bad, not missing


# --- the end of a run ----------------------------------------------------------------------------

def test_a_finished_completion_is_written_as_its_output_line(tmp_path, tokenizer, stop):
    write_prompts(tmp_path, {"prompt": "Hello", "key": "k"})
    s = settings(tmp_path, id_key="key")
    rec = record('{"prompt": "Hello", "key": "k"}')
    prompt = tokenizer.encode("Hello", bos=True)
    completion = Completion(Request(prompt, SamplingParams(), tag=RecordSample(rec, 0)),
                            tokenizer.encode("world", bos=False), None, "length", len(prompt))
    results = Results(generation(s, tokenizer), ONE_PROCESS, total=1)
    try:
        results.finished(completion)
        results.end(stop)
    finally:
        results.close()
    assert [json.loads(x) for x in s.out_path.read_bytes().splitlines()] == [
        output_line(completion, tokenizer, s)]
    assert "last line 4" in s.log_path.read_text()


def ended(s: Settings, stop: StopRequested, *items, done=frozenset()) -> None:
    """Deliver `items` (BadLines, or output lines) on one process, then end the run; the start
    announced the prompt file's samples not in the output yet."""
    task = generation(s)
    results = Results(task, ONE_PROCESS, total=count_pending(task, recover_output(s.out_path)),
                      resumed=bool(done))
    try:
        for item in items:
            if isinstance(item, BadLine):
                results.writer.bad_line(item)
            else:
                results.writer.output(item, 1)
        results.end(stop)
    finally:
        results.close()


LINE = {"id": 1, "sample": 0, "completion": "x", "completion_tokens": 1}


def test_a_clean_run_ends_quietly(tmp_path, stop):
    """Every announced sample written or in a bad line: the run ends without an exception, its
    summary counts them, and the files hold them; a resume adds only what is new."""
    write_prompts(tmp_path, {"prompt": "hi"}, "not json", {"prompt": "x" * 99})
    s = settings(tmp_path)

    def ends() -> list[str]:
        return [line.split(" end: ")[1] for line in s.log_path.read_text().splitlines()
                if " end: " in line]

    def errors() -> list[int]:
        return [json.loads(line)["line"] for line in s.errors_path.read_text().splitlines()]

    ended(s, stop, LINE, BadLine(3, "too long", "x", max_seq_len=8, samples=1))
    assert [json.loads(line) for line in s.out_path.read_text().splitlines()] == [LINE]
    assert errors() == [3]
    assert [e.split(" tokens ")[0] for e in ends()] == ["1 sample(s) written, 1 bad line(s), 1"]
    ended(s, stop, BadLine(2, "bad", "x"), BadLine(3, "too long", "x", max_seq_len=8,
                                                   samples=1), done={(1, 0)})  # a resume
    assert [json.loads(line) for line in s.out_path.read_text().splitlines()] == [LINE]
    assert errors() == [3, 2]  # line 3's error is not written twice
    assert [e.split(" tokens ")[0] for e in ends()] == ["1 sample(s) written, 1 bad line(s), 1",
                                                        "0 sample(s) written, 2 bad line(s), 0"]


def test_a_run_whose_output_lacks_a_sample_says_how_many_are_missing(tmp_path, stop):
    """The start announced 3 samples; 1 is written, 1 is in a bad line, 1 is nowhere."""
    write_prompts(tmp_path, {"prompt": "hi"}, {"prompt": "there"}, {"prompt": "x" * 99})
    s = settings(tmp_path)
    with pytest.raises(Incomplete) as e:
        ended(s, stop, LINE, BadLine(3, "too long", "x", max_seq_len=8, samples=1))
    assert str(e.value).startswith("1 sample(s) missing: the output holds fewer lines than "
                                   "were written")
    assert str(e.value).endswith("run the same command again to make them")
    assert "end: 1 sample(s) written, 1 missing (run the same command again), 1 bad line(s)" \
        in s.log_path.read_text()


def test_strict_ends_with_a_user_error_naming_the_first_bad_line(tmp_path, stop):
    s = settings(tmp_path, strict=True)
    with pytest.raises(UserError) as e:
        ended(s, stop, LINE, BadLine(3, "invalid JSON: oops", "x"), BadLine(5, "other", "y"))
    message = str(e.value)
    assert message.startswith(f"{s.prompt_path}: line 3: invalid JSON: oops (--strict")
    assert str(s.errors_path) in message


def test_a_run_in_which_every_line_was_bad_is_a_user_error(tmp_path, stop):
    write_prompts(tmp_path, "not json", "[1]")
    s = settings(tmp_path)
    with pytest.raises(UserError) as e:
        ended(s, stop, BadLine(1, "bad", "x"), BadLine(2, "bad", "y"))
    assert str(e.value) == f"every line of {s.prompt_path} is bad: the reasons are in " \
                           f"{s.errors_path}"
    # Bad lines after an earlier run's good ones: a resume with nothing new that fits.
    ended(s, stop, BadLine(1, "bad", "x"), done={(3, 0)})


def test_a_signal_ends_the_run_as_interrupted_with_what_remains(tmp_path, stop):
    write_prompts(tmp_path, {"prompt": "hi"}, {"prompt": "there"}, {"prompt": "you"})
    signal.raise_signal(signal.SIGTERM)  # caught: only noted
    assert stop and stop.signal == signal.SIGTERM
    with pytest.raises(Interrupted) as e:
        ended(settings(tmp_path), stop, LINE)
    assert e.value.signum == signal.SIGTERM
    assert str(e.value) == "stopped by SIGTERM: 2 sample(s) remain"
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
        check_no_clash(record, generation(s), resuming=True)
    with pytest.raises(UserError, match=r"pass --completion_key with another name"):
        check_no_clash(record, generation(s))


# --- work sharing and requests: a replica's share of the pending records ----------------------

def collect(s: Settings, tokenizer, replicas: int, done=frozenset()):
    return shares(s, tokenizer, replicas, done)


def test_pending_work_shards_records_disjointly_and_completely(tmp_path, tokenizer):
    write_prompts(tmp_path, *({"prompt": f"prompt number {i}", "id": f"r{i}"} for i in range(7)))
    s = settings(tmp_path)
    one = collect(s, tokenizer, 1)[0]
    assert [w.record.id for w in one] == [f"r{i}" for i in range(7)]
    shares = collect(s, tokenizer, 2)
    ids = [{w.record.id for w in share} for share in shares]
    assert ids[0].isdisjoint(ids[1])
    assert ids[0] | ids[1] == {f"r{i}" for i in range(7)}
    assert len(ids[0]) == 4 and len(ids[1]) == 3  # taking turns: balanced
    for share in shares:
        for w in share:
            assert isinstance(w, TokenizedRecord) and w.samples == [0]
            assert w.tokens == tokenizer.encode(w.record.prompt, bos=True)
            assert w.tokens[0] == tokenizer.bos_id


def test_pending_work_skips_done_pairs_and_rebalances_what_is_left(tmp_path, tokenizer):
    write_prompts(tmp_path, *({"prompt": f"p{i}", "id": i} for i in range(6)),
                  {"prompt": "many", "id": "m", "num_samples": 3})
    s = settings(tmp_path, num_samples=2)
    done = {(0, 0), (0, 1), (1, 0), (2, 1), (4, 0), (4, 1), ("m", 1)}
    shares = collect(s, tokenizer, 2, done)
    pending = {w.record.id: w.samples for share in shares for w in share}
    assert pending == {1: [1], 2: [0], 3: [0, 1], 5: [0, 1], "m": [0, 2]}
    ids = [[w.record.id for w in share] for share in shares]
    assert ids == [[1, 3, "m"], [2, 5]]  # fully done records are in no chunk
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
                  {"prompt": "short a", "id": "a"},      # chunk 0
                  "not json",                            # line 2: invalid, replica 0 reports
                  {"prompt": long_prompt, "id": "b"},    # chunk 1: too long
                  {"prompt": "short c", "id": "a"},      # line 4: duplicate id, replica 0
                  {"prompt": "short c", "id": "c"},      # chunk 2
                  {"prompt": long_prompt, "id": "d"})    # chunk 3: too long
    s = settings(tmp_path, max_seq_len=32)
    assert len(tokenizer.encode(long_prompt, bos=True)) > 31
    shares = collect(s, tokenizer, 2)
    kinds = [[(type(x).__name__, x.line if isinstance(x, BadLine) else x.record.id)
              for x in share] for share in shares]
    # Replica 0 claims chunk 0, replica 1 chunk 1; then each claims as it reaches past its own.
    assert kinds == [[("TokenizedRecord", "a"), ("BadLine", 2), ("BadLine", 4), ("BadLine", 6)],
                     [("BadLine", 3), ("TokenizedRecord", "c")]]
    too_long = shares[1][0]  # line 3's
    n = len(tokenizer.encode(long_prompt, bos=True))
    assert too_long.reason.startswith(f"the prompt has {n} tokens; --max_seq_len 32 allows at "
                                      "most 31")
    assert json.loads(too_long.text) == {"prompt": long_prompt, "id": "b"}
    assert too_long.max_seq_len == 32  # retried on a resume with a longer context
    assert all(x.max_seq_len is None for x in shares[0] if isinstance(x, BadLine)
               and x.line in (2, 4))  # invalid lines: no context tried
    # One replica reports everything.
    alone = collect(s, tokenizer, 1)[0]
    assert sorted(x.line for x in alone if isinstance(x, BadLine)) == [2, 3, 4, 6]


def test_a_prompt_of_exactly_max_seq_len_minus_1_tokens_is_accepted(tmp_path, tokenizer):
    write_prompts(tmp_path, {"prompt": "Hello world! This is a tiny corpus."})
    n = len(tokenizer.encode("Hello world! This is a tiny corpus.", bos=True))
    assert isinstance(collect(settings(tmp_path, max_seq_len=n + 1), tokenizer, 1)[0][0],
                      TokenizedRecord)
    assert isinstance(collect(settings(tmp_path, max_seq_len=n), tokenizer, 1)[0][0], BadLine)


def test_count_pending_uses_num_samples_and_per_record_overrides(tmp_path):
    write_prompts(tmp_path, {"prompt": "a"}, {"prompt": "b", "num_samples": 4}, "bad",
                  {"prompt": "c", "num_samples": 1}, {"prompt": "d", "id": 1})  # d: duplicate
    s = settings(tmp_path, num_samples=3)
    assert count_pending(generation(s), set()) == 3 + 4 + 1
    done = {(1, 0), (1, 2), (2, 3), (2, 9), (4, 0), ("x", 0)}
    assert count_pending(generation(s), done) == 1 + 3 + 0
    assert count_pending(generation(settings(tmp_path)), set()) == 1 + 4 + 1


def requests(tmp_path: Path, tokenizer, s: Settings, done=frozenset()):
    return [r for w in collect(s, tokenizer, 1, done)[0] for r in generation(s).requests(w)]


def test_requests_for_derives_a_seed_per_id_and_sample(tmp_path, tokenizer):
    write_prompts(tmp_path, {"prompt": "same", "id": "a"}, {"prompt": "same", "id": "b"},
                  {"prompt": "same", "id": 1})
    s = settings(tmp_path, num_samples=2, seed=11)
    reqs = requests(tmp_path, tokenizer, s)
    assert all(isinstance(r.tag, RecordSample) for r in reqs)
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
        assert r.tag == RecordSample(special[0].tag.record, sample)
        assert r.prompt_tokens == tokenizer.encode("b", bos=True)


# --- input fields named like output fields ---------------------------------------------------

@pytest.mark.parametrize("name", ["sample", "completion", "finish_reason", "prompt_tokens",
                                  "completion_tokens", "logprobs"])
def test_output_field_names_in_the_input_are_rejected_by_the_job_at_start(tmp_path, name):
    # A record reads fine (datasets with gold answers have such fields); the job refuses the
    # clash once, at start, naming the line, the field and the fix.
    item = parse(json.dumps({"prompt": "hi", name: 1}))
    assert isinstance(item, Record) and item.fields[name] == 1
    with pytest.raises(UserError) as e:
        check_no_clash(item, generation(settings(tmp_path)))
    message = str(e.value)
    assert f"line 7: field {name!r} is also an output field" in message
    assert ("--completion_key" if name == "completion" else "rename it in the input") in message
    write_prompts(tmp_path, {"prompt": "ok"}, {"prompt": "hi", name: 1})
    with pytest.raises(UserError, match=f"line 2: field {name!r} is also an output field"):
        count_pending(generation(settings(tmp_path)), set())


def test_a_completion_field_is_fine_under_another_completion_key(tmp_path):
    item = parse('{"prompt": "hi", "completion": "gold"}')
    check_no_clash(item, generation(settings(tmp_path, completion_key="generated")))
    with pytest.raises(UserError, match="field 'generated' is also an output field: pass "
                                        "--completion_key with another name"):
        check_no_clash(parse('{"prompt": "hi", "generated": "x"}'),
                       generation(settings(tmp_path, completion_key="generated")))


def test_an_id_field_is_reserved_when_the_ids_come_from_another_key(tmp_path):
    item = parse('{"prompt": "hi", "key": "a", "id": 3}', id_key="key", required=True)
    assert isinstance(item, Record) and item.id == "a"
    with pytest.raises(UserError, match="field 'id' is also an output field"):
        check_no_clash(item, generation(settings(tmp_path, id_key="key")))
    default = parse('{"prompt": "hi", "id": 3}')
    assert isinstance(default, Record)  # the default id key is fine
    check_no_clash(default, generation(settings(tmp_path)))


def test_an_id_field_is_fine_when_it_is_the_id_key(tmp_path):
    item = parse('{"prompt": "hi", "id": 3}', id_key="id", required=True)
    assert isinstance(item, Record) and item.id == 3
    check_no_clash(item, generation(settings(tmp_path, id_key="id")))


@pytest.mark.parametrize("key", OUTPUT_FIELDS)
def test_a_completion_key_that_is_another_output_field_is_refused(tmp_path, key):
    write_prompts(tmp_path, {"prompt": "hi"})
    with pytest.raises(UserError, match="--completion_key"):
        count_pending(generation(settings(tmp_path, completion_key=key)), set())


def test_min_tokens_ending_inside_a_character_still_cuts_at_the_stop_string(tmp_path, tokenizer):
    """The first min_tokens tokens decode to a replacement character where they end inside
    one: the stop string is looked for after the text they share with the whole."""
    new = tokenizer.encode(" €x and more", bos=False)
    prompt = tokenizer.encode("Hello", bos=True)
    heads = [tokenizer.decode_continuation(prompt, new[:n]) for n in range(len(new))]
    n = next(n for n, head in enumerate(heads) if head.endswith("\ufffd"))
    whole = tokenizer.decode_continuation(prompt, new)
    completion = completed(tokenizer, "Hello", new, "x", stop=("x",), min_tokens=n)
    assert output_line(completion, tokenizer, settings(tmp_path))["completion"] == \
        whole[:whole.index("x")]


def test_a_system_message_for_a_plain_prompt_without_chat_is_a_bad_line(tmp_path, tokenizer):
    write_prompts(tmp_path, {"prompt": "Hi", "system": "Answer in French."}, {"prompt": "Hi"})
    s = settings(tmp_path)
    [items] = shares(s, tokenizer, 1)
    assert isinstance(items[0], BadLine) and "--chat" in items[0].reason
    assert isinstance(items[1], TokenizedRecord)


# --- several replicas: the parts folder must be shared -------------------------------------------

def test_a_replica_that_cannot_see_the_parts_folder_stops_the_run_naming_it(tmp_path):
    s = settings(tmp_path)
    run = start_parts(s)
    check_shared_folder(s, ONE_PROCESS, run)  # rank 0's own probe: seen
    (parts_dir(s.out_path) / f".{run}.probe").unlink()  # as a node without the shared folder
    with pytest.raises(UserError, match=r"\.parts: replica\(s\) 0 cannot see this folder .* "
                                        r"filesystem every node shares"):
        check_shared_folder(s, ONE_PROCESS, run)
    check_shared_folder(s, ONE_PROCESS, "")  # one replica: nothing to check


@pytest.mark.parametrize("max_seq_len, context, advice", [
    (8, None, "shorten the prompt or raise --max_seq_len"),
    (8, 4096, "shorten the prompt or raise --max_seq_len (up to the model's context, 4096)"),
    (4096, 4096, "shorten the prompt: the model's context is 4096 tokens")])
def test_the_job_words_a_prompt_that_does_not_fit(tmp_path, max_seq_len, context, advice):
    """The engine states facts (`requests.fits`); the job's words name the flag and how far it
    goes."""
    task = Generation(settings(tmp_path, max_seq_len=max_seq_len),
                      Prompting(None, None, context_length=context))
    record = Record(1, 1, "p", {})
    assert task.length_problem(TokenizedRecord(record, [1] * (max_seq_len - 1), [0])) is None
    assert task.length_problem(TokenizedRecord(record, [], [0])) == "the prompt has no tokens"
    assert task.length_problem(TokenizedRecord(record, [1] * max_seq_len, [0])) == (
        f"the prompt has {max_seq_len} tokens; --max_seq_len {max_seq_len} allows at most "
        f"{max_seq_len - 1}: {advice}")


def test_the_job_words_a_text_that_cannot_be_scored(tmp_path):
    s = ScoreSettings(ckpt_dir=tmp_path, prompt_path=tmp_path / "p.jsonl",
                      out_path=tmp_path / "o.jsonl", max_seq_len=8)
    task = Scoring(s, Prompting(None, None, context_length=4096))
    record = Record(1, 1, None, {})
    assert task.length_problem(TokenizedRecord(record, [1] * 8, [0], 7)) is None
    assert "there is nothing to score" in task.length_problem(
        TokenizedRecord(record, [1] * 5, [0], 5))
    assert task.length_problem(TokenizedRecord(record, [1] * 9, [0], 1)) == (
        "the text has 9 tokens; --max_seq_len 8 allows at most 8: shorten the text or raise "
        "--max_seq_len (up to the model's context, 4096)")
