"""The job's files: recovering out.jsonl, the errors file, appends, atomic writes, the lock, run
settings and resume checks, and the output line itself."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import llama_gen
from llama_gen.engine import Completion, Request, SamplingParams
from llama_gen.errors import UserError
from llama_gen.job import JobSettings, Writer, output_line, prepare_output, run_fingerprint
from llama_gen.output import (JsonlAppender, OutputLock, ProgressLog, recorded_error_lines,
                              recover_output, settings_differences, write_atomically)
from llama_gen.records import BadLine, Record, parse_line
from llama_gen.tiny_tokenizers import build_sentencepiece_model
from llama_gen.tokenizer import load_tokenizer


def out_line(id_, sample: int, **extra) -> bytes:
    return (json.dumps({"id": id_, "sample": sample, "completion": "x", **extra}) + "\n").encode()


# --- recover_output -----------------------------------------------------------------------------

def test_recover_a_missing_file_is_empty_and_creates_nothing(tmp_path):
    path = tmp_path / "out.jsonl"
    state = recover_output(path)
    assert (state.done, state.lines, state.torn_bytes) == (set(), 0, 0)
    assert not path.exists()


def test_recover_an_empty_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"")
    state = recover_output(path)
    assert (state.done, state.lines, state.torn_bytes) == (set(), 0, 0)


def test_recover_a_clean_file_leaves_it_alone(tmp_path):
    path = tmp_path / "out.jsonl"
    data = out_line("a", 0) + out_line("a", 1) + out_line(3, 0, note="é🦙")
    path.write_bytes(data)
    state = recover_output(path)
    assert state.done == {("a", 0), ("a", 1), (3, 0)}
    assert (state.lines, state.torn_bytes) == (3, 0)
    assert path.read_bytes() == data


def test_recover_cuts_a_torn_last_line_and_keeps_the_rest_byte_for_byte(tmp_path, caplog):
    path = tmp_path / "out.jsonl"
    good = out_line("a", 0) + out_line("b", 0, completion="ünïcode \u00e9")
    torn = out_line("c", 0)[:17]
    path.write_bytes(good + torn)
    with caplog.at_level(logging.WARNING, logger="llama_gen.output"):
        state = recover_output(path)
    assert path.read_bytes() == good
    assert state.torn_bytes == len(torn) == 17
    assert state.done == {("a", 0), ("b", 0)} and state.lines == 2
    assert "torn last line (17 bytes)" in caplog.text
    # A second recovery finds nothing more to cut.
    again = recover_output(path)
    assert again.torn_bytes == 0 and again.done == state.done and path.read_bytes() == good


def test_a_whole_json_object_without_its_newline_is_still_torn(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(out_line("a", 0) + out_line("b", 0).rstrip(b"\n"))
    state = recover_output(path)
    assert state.done == {("a", 0)}
    assert path.read_bytes() == out_line("a", 0)


def test_a_file_that_is_only_a_torn_line_ends_empty(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a", "sam')
    state = recover_output(path)
    assert (state.done, state.lines, state.torn_bytes) == (set(), 0, 16)
    assert path.read_bytes() == b""


def test_a_torn_line_cut_inside_a_multibyte_character(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(out_line("a", 0) + "{\"completion\": \"🦙".encode()[:-2])
    assert recover_output(path).done == {("a", 0)}
    assert path.read_bytes() == out_line("a", 0)


@pytest.mark.parametrize("middle", [b"not json\n", b"\n", b"[1, 2]\n", b'"text"\n',
                                    b'{"id": "b"}\n', b'{"sample": 0}\n'])
def test_a_middle_line_that_is_not_an_output_line_is_a_user_error(tmp_path, middle):
    path = tmp_path / "out.jsonl"
    data = out_line("a", 0) + middle + out_line("c", 0) + b'{"id": "torn'
    path.write_bytes(data)
    with pytest.raises(UserError, match=r"out\.jsonl: line 2 is not a llama-gen output line"):
        recover_output(path)
    assert path.read_bytes() == data  # nothing cut from a file we do not understand


def test_an_output_line_with_an_unhashable_id_is_a_user_error(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(out_line([1], 0))
    with pytest.raises(UserError, match="line 1"):
        recover_output(path)


# --- recorded_error_lines -----------------------------------------------------------------------

def test_recorded_error_lines(tmp_path):
    path = tmp_path / "out.jsonl.errors.jsonl"
    assert recorded_error_lines(path) == set()
    path.write_bytes(b'{"line": 2, "reason": "r", "text": "t"}\n'
                     b"garbage\n"
                     b'{"reason": "no line number"}\n'
                     b'[5]\n'
                     b'{"line": 9, "reason": "r", "text": "t"}\n'
                     b'{"line": 12, "reason": "torn')
    assert recorded_error_lines(path) == {2, 9}


# --- JsonlAppender, write_atomically, ProgressLog -----------------------------------------------

def test_jsonl_appender_writes_whole_lines_and_appends_across_instances(tmp_path):
    path = tmp_path / "out.jsonl"
    first = JsonlAppender(path)
    first.write({"id": 1, "completion": "a\nb"})
    assert path.read_bytes() == b'{"id": 1, "completion": "a\\nb"}\n'  # flushed at once
    first.write({"id": 2, "completion": "é🦙"})
    first.close()
    first.close()  # closing twice is harmless
    second = JsonlAppender(path, sync_every=0)
    second.write({"id": 3})
    second.close()
    data = path.read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") == 3
    assert [json.loads(x) for x in data.splitlines()] == [
        {"id": 1, "completion": "a\nb"}, {"id": 2, "completion": "é🦙"}, {"id": 3}]
    assert "é🦙".encode() in data  # written as UTF-8, not \u escapes


def test_write_atomically_replaces_the_content_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "out.jsonl.run.json"
    write_atomically(path, "first é\n")
    assert path.read_text(encoding="utf-8") == "first é\n"
    path.write_text("a much longer previous content\n" * 100)
    write_atomically(path, "")
    assert path.read_bytes() == b""
    write_atomically(path, "second\n")
    assert path.read_bytes() == b"second\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl.run.json"]


def test_progress_log_appends_timestamped_lines(tmp_path):
    path = tmp_path / "out.jsonl.log"
    for message in ("one", "two"):
        log = ProgressLog(path)
        log.write(message)
        log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(" one") and lines[1].endswith(" two")
    assert lines[0][4] == "-" and lines[0][13] == ":"  # "YYYY-MM-DD HH:MM:SS message"


# --- OutputLock ---------------------------------------------------------------------------------

HOLD_LOCK = """
import sys
from pathlib import Path
from llama_gen.output import OutputLock
lock = OutputLock(Path(sys.argv[1]))  # kept: the lock lives as long as its open file
lock.acquire()
print("locked", flush=True)
sys.stdin.readline()
"""

TRY_LOCK = """
import sys
from pathlib import Path
from llama_gen.errors import UserError
from llama_gen.output import OutputLock
try:
    OutputLock(Path(sys.argv[1])).acquire()
except UserError as e:
    print(e)
    sys.exit(3)
print("acquired")
"""


def python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(llama_gen.__file__).parent.parent)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True,
                            stdout=subprocess.PIPE, **kwargs)


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock on tmp_path/out.jsonl."""
    proc = python(HOLD_LOCK, str(tmp_path / "out.jsonl"), stdin=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == "locked\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_held_by_another_process_is_refused_naming_the_holder(tmp_path, holder):
    lock = OutputLock(tmp_path / "out.jsonl")
    with pytest.raises(UserError) as e:
        lock.acquire()
    message = str(e.value)
    assert f"pid {holder.pid} on {os.uname().nodename}" in message
    assert str(tmp_path / "out.jsonl") in message and "--out_path" in message
    assert "out.jsonl.lock" not in message
    # The failed attempt did not wipe the holder's note.
    assert (tmp_path / "out.jsonl.lock").read_text() == f"pid {holder.pid} on " \
        f"{os.uname().nodename}"
    holder.stdin.write("\n")  # let it exit normally: its lock goes with it
    holder.stdin.flush()
    assert holder.wait(timeout=10) == 0
    lock.acquire()
    lock.release()


def test_a_killed_holder_leaves_the_lock_free(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    lock = OutputLock(tmp_path / "out.jsonl")
    lock.acquire()
    assert (tmp_path / "out.jsonl.lock").read_text() == f"pid {os.getpid()} on " \
        f"{os.uname().nodename}"
    lock.release()


def test_another_process_is_refused_while_we_hold_the_lock(tmp_path):
    lock = OutputLock(tmp_path / "out.jsonl")
    lock.acquire()
    try:
        proc = python(TRY_LOCK, str(tmp_path / "out.jsonl"))
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 3
        assert f"another llama-gen job (pid {os.getpid()} on" in out
    finally:
        lock.release()
    proc = python(TRY_LOCK, str(tmp_path / "out.jsonl"))
    out, _ = proc.communicate(timeout=10)
    assert (proc.returncode, out) == (0, "acquired\n")


def test_two_locks_in_one_process_exclude_each_other(tmp_path):
    # flock belongs to the open file description; each OutputLock opens its own, so a second
    # job in the same process (a test, an embedding caller) is refused too.
    first, second = OutputLock(tmp_path / "out.jsonl"), OutputLock(tmp_path / "out.jsonl")
    first.acquire()
    with pytest.raises(UserError, match=f"pid {os.getpid()}"):
        second.acquire()
    first.release()
    first.release()  # releasing twice is harmless
    second.acquire()
    with pytest.raises(UserError):
        first.acquire()
    second.release()


def test_locks_on_different_outputs_are_independent(tmp_path):
    a, b = OutputLock(tmp_path / "a.jsonl"), OutputLock(tmp_path / "b.jsonl")
    a.acquire()
    b.acquire()
    a.release()
    b.release()


# --- settings_differences and prepare_output -----------------------------------------------------

def test_settings_differences_lists_changed_added_and_removed_keys_sorted():
    old = {"seed": 0, "temperature": 0.6, "shards": [["a", 1]], "gone": "x", "same": None}
    new = {"seed": 0, "temperature": 0.7, "shards": [["a", 2]], "added": True, "same": None}
    assert settings_differences(old, new) == [
        'added: null -> true', 'gone: "x" -> null', 'shards: [["a", 1]] -> [["a", 2]]',
        "temperature: 0.6 -> 0.7"]
    assert settings_differences(new, dict(new)) == []


def job(tmp_path: Path, **kwargs) -> JobSettings:
    prompt = tmp_path / "prompts.jsonl"
    if not prompt.exists():
        prompt.write_text('{"prompt": "hi"}\n{"prompt": "there"}\n')
    return JobSettings(ckpt_dir=tmp_path, prompt_path=prompt, out_path=tmp_path / "out.jsonl",
                       **kwargs)


FINGERPRINT = {"checkpoint": "/ckpt", "prompt_file": "abc", "temperature": 0.6, "seed": 0,
               "id_key": None, "shards": [["consolidated.00.pth", 10]]}


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.name)


def test_first_run_writes_the_run_settings(tmp_path):
    s = job(tmp_path)
    assert prepare_output(s, FINGERPRINT) == set()
    assert json.loads(s.settings_path.read_text()) == FINGERPRINT
    assert s.settings_path.name == "out.jsonl.run.json"
    assert leftovers(tmp_path) == []


def test_resume_with_the_same_settings_returns_the_done_pairs(tmp_path):
    s = job(tmp_path)
    prepare_output(s, FINGERPRINT)
    s.out_path.write_bytes(out_line(1, 0) + out_line(2, 0) + b'{"id": 2, "sa')
    assert prepare_output(s, dict(FINGERPRINT)) == {(1, 0), (2, 0)}
    assert s.out_path.read_bytes() == out_line(1, 0) + out_line(2, 0)


def test_resume_with_changed_settings_is_refused_naming_the_difference(tmp_path):
    s = job(tmp_path)
    prepare_output(s, FINGERPRINT)
    s.out_path.write_bytes(out_line(1, 0))
    changed = {**FINGERPRINT, "temperature": 0.7, "id_key": "key"}
    with pytest.raises(UserError) as e:
        prepare_output(s, changed)
    message = str(e.value)
    assert 'id_key: null -> "key"' in message and "temperature: 0.6 -> 0.7" in message
    assert "--overwrite" in message
    assert json.loads(s.settings_path.read_text()) == FINGERPRINT  # untouched
    assert s.out_path.read_bytes() == out_line(1, 0)


def test_a_non_empty_output_without_run_settings_is_refused(tmp_path):
    s = job(tmp_path)
    s.out_path.write_bytes(b"someone else's data\n")
    with pytest.raises(UserError, match=r"not written by llama-gen \(no out\.jsonl\.run\.json\)"):
        prepare_output(s, FINGERPRINT)
    assert not s.settings_path.exists()
    assert s.out_path.read_bytes() == b"someone else's data\n"


def test_an_empty_output_without_run_settings_is_fine(tmp_path):
    s = job(tmp_path)
    s.out_path.write_bytes(b"")
    assert prepare_output(s, FINGERPRINT) == set()
    assert s.settings_path.exists()


def test_overwrite_empties_the_outputs_and_records_the_new_settings(tmp_path):
    s = job(tmp_path)
    prepare_output(s, FINGERPRINT)
    s.out_path.write_bytes(out_line(1, 0))
    s.errors_path.write_bytes(b'{"line": 2, "reason": "r", "text": "t"}\n')
    changed = {**FINGERPRINT, "seed": 5}
    again = job(tmp_path, overwrite=True)
    assert prepare_output(again, changed) == set()
    assert s.out_path.read_bytes() == b"" and s.errors_path.read_bytes() == b""
    assert json.loads(s.settings_path.read_text()) == changed
    assert leftovers(tmp_path) == []
    # Overwrite also takes a foreign file (no run settings) and a file it cannot parse.
    s.settings_path.unlink()
    s.out_path.write_bytes(b"not json\n")
    assert prepare_output(again, FINGERPRINT) == set()
    assert s.out_path.read_bytes() == b""


def test_prepare_output_reports_a_corrupt_middle_line(tmp_path):
    s = job(tmp_path)
    prepare_output(s, FINGERPRINT)
    s.out_path.write_bytes(out_line(1, 0) + b"oops\n" + out_line(2, 0))
    with pytest.raises(UserError, match="line 2 is not a llama-gen output line"):
        prepare_output(s, FINGERPRINT)


def test_run_fingerprint_survives_a_json_round_trip(tmp_path):
    # The resume check compares the stored JSON with a fresh fingerprint: any tuple or Path in it
    # would make every resume fail.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "params.json").write_text('{"dim": 64}')
    for i in range(2):
        (ckpt / f"consolidated.0{i}.pth").write_bytes(b"x" * (i + 3))
    tokenizer = load_tokenizer(build_sentencepiece_model(tmp_path / "t.model"))
    s = JobSettings(ckpt_dir=ckpt, prompt_path=job(tmp_path).prompt_path,
                    out_path=tmp_path / "out.jsonl", id_key="key", num_samples=2)
    fp = run_fingerprint(s, tokenizer, "torch.bfloat16")
    assert settings_differences(json.loads(json.dumps(fp)), fp) == []
    assert fp["shards"] == [["consolidated.00.pth", 3], ["consolidated.01.pth", 4]]
    prepare_output(s, fp)
    assert prepare_output(s, run_fingerprint(s, tokenizer, "torch.bfloat16")) == set()
    s.prompt_path.write_text('{"prompt": "changed"}\n')
    with pytest.raises(UserError, match="prompt_file: "):
        prepare_output(s, run_fingerprint(s, tokenizer, "torch.bfloat16"))


# --- the output line ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_sentencepiece_model(tmp_path_factory.mktemp("tok") / "t.model"))


def record(text: str) -> Record:
    item = parse_line(text.encode() + b"\n", 4, "prompt", "key", True)
    assert isinstance(item, Record)
    return item


def test_output_line_keeps_the_input_fields_and_adds_ours(tokenizer):
    rec = record('{"prompt": "Hello", "key": "k", "meta": {"a": 1}}')
    prompt = tokenizer.encode("Hello", bos=True)
    new = tokenizer.encode("world!", bos=False)  # SentencePiece: "▁world" carries the space
    request = Request(prompt, SamplingParams(), tag=(rec, 2))
    line = output_line(Completion(request, new, None, "stop", len(prompt)), tokenizer)
    assert line == {"prompt": "Hello", "key": "k", "meta": {"a": 1}, "id": "k", "sample": 2,
                    "completion": " world!", "finish_reason": "stop",
                    "prompt_tokens": len(prompt), "completion_tokens": len(new)}
    assert list(line)[:3] == ["prompt", "key", "meta"]


def test_output_line_with_echo_and_logprobs(tokenizer):
    rec = record('{"prompt": "Hello", "key": 5}')
    prompt = tokenizer.encode("Hello", bos=True)
    new = tokenizer.encode("world!", bos=False)
    request = Request(prompt, SamplingParams(echo=True, logprobs=True), tag=(rec, 0))
    logprobs = [None] + [-0.5] * (len(prompt) - 1 + len(new))
    line = output_line(Completion(request, prompt + new, logprobs, "length", len(prompt)),
                       tokenizer)
    assert line["completion"] == "Hello world!"
    assert line["completion_tokens"] == len(new) and line["prompt_tokens"] == len(prompt)
    assert line["logprobs"] == logprobs and line["finish_reason"] == "length"
    assert (line["id"], line["sample"]) == (5, 0)


# --- the writer's errors file (known bug) -------------------------------------------------------

def test_writer_repairs_a_torn_errors_file_before_appending(tmp_path):
    s = job(tmp_path)
    s.errors_path.write_bytes(b'{"line": 1, "reason": "r", "text": "t"}\n{"line": 3, "rea')
    writer = Writer(s, total=0)
    writer.bad_line(BadLine(5, "invalid JSON", "x"))
    writer.close()
    assert recorded_error_lines(s.errors_path) == {1, 5}
    for raw in s.errors_path.read_bytes().splitlines():
        json.loads(raw)


def test_lines_appended_to_the_prompt_file_are_a_resume_other_changes_are_not(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "params.json").write_text('{"dim": 64}')
    tokenizer = load_tokenizer(build_sentencepiece_model(tmp_path / "t.model"))
    s = JobSettings(ckpt_dir=ckpt, prompt_path=job(tmp_path).prompt_path,
                    out_path=tmp_path / "out.jsonl")
    first = s.prompt_path.read_text()

    def resume_after(content: str) -> None:
        s.prompt_path.write_text(content)
        prepare_output(s, run_fingerprint(s, tokenizer, "torch.float32"))

    resume_after(first)
    resume_after(first + '{"prompt": "appended"}\n')  # accepted, and becomes the new start
    assert json.loads(s.settings_path.read_text())["prompt_file_bytes"] == len(first) + 23
    grown = s.prompt_path.read_text()
    for changed in (grown.replace("hi", "ho"), grown[:-1] + ' "x"\n', first):
        s.prompt_path.write_text(grown)
        prepare_output(s, run_fingerprint(s, tokenizer, "torch.float32"))
        with pytest.raises(UserError, match="prompt_file: its content changed, beyond lines "
                                            "added at its end"):
            resume_after(changed)
    # After a last line without a newline, text that continues that line changes it: refused;
    # a newline first leaves it as it was.
    s.settings_path.unlink()  # a new job
    s.prompt_path.write_text(grown.rstrip("\n"))
    prepare_output(s, run_fingerprint(s, tokenizer, "torch.float32"))
    with pytest.raises(UserError, match="prompt_file"):
        resume_after(grown.rstrip("\n") + '{"prompt": "more"}\n')
    resume_after(grown + '{"prompt": "more"}\n')


def test_run_settings_of_an_earlier_version_without_the_prompt_size_still_resume(tmp_path):
    s = job(tmp_path)
    prepare_output(s, FINGERPRINT)
    assert prepare_output(s, {**FINGERPRINT, "prompt_file_bytes": 30}) == set()
