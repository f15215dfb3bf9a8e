"""The job's files: recovering out.jsonl, the errors file, appends, atomic writes, the lock,
the progress log and the writer. (What the job puts in them, and the resume rules, are in
test_job.py and test_resume.py.)"""
from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import llama_gen
from llama_gen.errors import UserError
from llama_gen.job.openai_batch import BatchRequest
from llama_gen.job.openai_output import Choice, error_line, response_line
from llama_gen.job.output import (JsonlAppender, OutputLock, ProgressLog, Writer,
                                  recorded_error_lines, recover_output, write_atomically)
from llama_gen.job.records import BadLine
from llama_gen.job.tasks import Generation
from llama_gen.settings import Settings


def out_line(id_, sample: int, **extra) -> bytes:
    return (json.dumps({"id": id_, "sample": sample, "completion": "x", **extra}) + "\n").encode()


def lock_on(out_path: Path) -> OutputLock:
    return OutputLock(out_path.with_name(out_path.name + ".lock"), out_path)


# --- recover_output -----------------------------------------------------------------------------

def test_recover_a_missing_file_is_empty_and_creates_nothing(tmp_path):
    path = tmp_path / "out.jsonl"
    assert recover_output(path) == set()
    assert not path.exists()


def test_recover_an_empty_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"")
    assert recover_output(path) == set()
    assert path.read_bytes() == b""


def test_recover_a_clean_file_leaves_it_alone(tmp_path):
    path = tmp_path / "out.jsonl"
    data = out_line("a", 0) + out_line("a", 1) + out_line(3, 0, note="é🦙")
    path.write_bytes(data)
    assert recover_output(path) == {("a", 0), ("a", 1), (3, 0)}
    assert path.read_bytes() == data


def test_recover_cuts_a_torn_last_line_and_keeps_the_rest_byte_for_byte(tmp_path, caplog):
    path = tmp_path / "out.jsonl"
    good = out_line("a", 0) + out_line("b", 0, completion="ünïcode \u00e9")
    torn = out_line("c", 0)[:17]
    path.write_bytes(good + torn)
    with caplog.at_level(logging.WARNING, logger="llama_gen.job.output"):
        done = recover_output(path)
    assert path.read_bytes() == good and len(torn) == 17
    assert done == {("a", 0), ("b", 0)}
    assert "torn last line (17 bytes)" in caplog.text
    # A second recovery finds nothing more to cut.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llama_gen.job.output"):
        assert recover_output(path) == done and path.read_bytes() == good
    assert "torn" not in caplog.text


def test_a_whole_json_object_without_its_newline_is_still_torn(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(out_line("a", 0) + out_line("b", 0).rstrip(b"\n"))
    assert recover_output(path) == {("a", 0)}
    assert path.read_bytes() == out_line("a", 0)


def test_a_file_that_is_only_a_torn_line_ends_empty(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a", "sam')
    assert recover_output(path) == set()
    assert path.read_bytes() == b""  # the 16 torn bytes cut


def test_a_torn_line_cut_inside_a_multibyte_character(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(out_line("a", 0) + "{\"completion\": \"🦙".encode()[:-2])
    assert recover_output(path) == {("a", 0)}
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
from llama_gen.job.output import OutputLock
out = Path(sys.argv[1])
# kept: the lock lives as long as its open file
lock = OutputLock(out.with_name(out.name + ".lock"), out)
lock.acquire()
print("locked", flush=True)
sys.stdin.readline()
"""

TRY_LOCK = """
import sys
from pathlib import Path
from llama_gen.errors import UserError
from llama_gen.job.output import OutputLock
try:
    out = Path(sys.argv[1])
    OutputLock(out.with_name(out.name + ".lock"), out).acquire()
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
    lock = lock_on(tmp_path / "out.jsonl")
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
    lock = lock_on(tmp_path / "out.jsonl")
    lock.acquire()
    assert (tmp_path / "out.jsonl.lock").read_text() == f"pid {os.getpid()} on " \
        f"{os.uname().nodename}"
    lock.release()


def test_a_filesystem_without_flock_is_named_with_the_ways_to_run(tmp_path, monkeypatch):
    """Lustre mounted without -o flock answers flock with ENOSYS: say that it is the lock, and
    how to run safely without it."""
    import errno
    import fcntl

    def no_flock(f, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", no_flock)  # what such a filesystem answers
    with pytest.raises(UserError) as e:
        lock_on(tmp_path / "out.jsonl").acquire()
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'out.jsonl.lock'}: cannot lock it (Function not "
                              "implemented): its filesystem has no flock")
    assert "--lock false" in message and "\n" not in message
    unlocked = OutputLock(tmp_path / "out.jsonl.lock", tmp_path / "out.jsonl", wanted=False)
    unlocked.acquire()  # asks nothing of the filesystem
    unlocked.release()


def test_another_process_is_refused_while_we_hold_the_lock(tmp_path):
    lock = lock_on(tmp_path / "out.jsonl")
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
    first, second = lock_on(tmp_path / "out.jsonl"), lock_on(tmp_path / "out.jsonl")
    first.acquire()
    with pytest.raises(UserError, match=f"pid {os.getpid()}"):
        second.acquire()
    first.release()
    first.release()  # releasing twice is harmless
    second.acquire()
    with pytest.raises(UserError):
        first.acquire()
    second.release()


def test_a_lock_file_left_behind_does_not_block_the_next_run(tmp_path):
    # A start that failed (or any ended run) leaves out.jsonl.lock on disk: only a live holder
    # counts.
    lock = lock_on(tmp_path / "out.jsonl")
    lock.acquire()
    lock.release()
    assert (tmp_path / "out.jsonl.lock").exists()
    again = lock_on(tmp_path / "out.jsonl")
    again.acquire()
    again.release()


def test_locks_on_different_outputs_are_independent(tmp_path):
    a, b = lock_on(tmp_path / "a.jsonl"), lock_on(tmp_path / "b.jsonl")
    a.acquire()
    b.acquire()
    a.release()
    b.release()


# --- Writer ------------------------------------------------------------------------------------

def test_writer_repairs_a_torn_errors_file_before_appending(tmp_path):
    s = Settings(ckpt_dir=tmp_path, prompt_path=tmp_path / "prompts.jsonl",
                 out_path=tmp_path / "out.jsonl")
    s.errors_path.write_bytes(b'{"line": 1, "reason": "r", "text": "t"}\n{"line": 3, "rea')
    writer = Writer(s, total=0, tally=Generation.tally)
    writer.bad_line(BadLine(5, "invalid JSON", "x"))
    writer.close()
    assert recorded_error_lines(s.errors_path) == {1, 5}
    for raw in s.errors_path.read_bytes().splitlines():
        json.loads(raw)


def test_writer_appends_lines_counts_them_and_logs_progress(tmp_path):
    s = Settings(ckpt_dir=tmp_path, prompt_path=tmp_path / "prompts.jsonl",
                 out_path=tmp_path / "out.jsonl", logging_path=tmp_path / "progress.log")
    s.errors_path.write_bytes(b'{"line": 2, "reason": "r", "text": "t"}\n')
    writer = Writer(s, total=2, tally=Generation.tally)
    writer.output({"id": 1, "sample": 0, "completion": "é", "completion_tokens": 3}, 1)
    writer.bad_line(BadLine(2, "invalid JSON", "x"))  # already recorded: counted, not rewritten
    writer.bad_line(BadLine(4, "too long", "y", max_seq_len=16))
    writer.output({"id": 3, "sample": 0, "completion": "z", "completion_tokens": 4}, 3)
    writer.finish()
    writer.close()
    assert [json.loads(x) for x in s.out_path.read_bytes().splitlines()] == [
        {"id": 1, "sample": 0, "completion": "é", "completion_tokens": 3},
        {"id": 3, "sample": 0, "completion": "z", "completion_tokens": 4}]
    assert [json.loads(x) for x in s.errors_path.read_bytes().splitlines()] == [
        {"line": 2, "reason": "r", "text": "t"},
        {"line": 4, "reason": "too long", "text": "y", "max_seq_len": 16}]
    assert (writer.counts.samples, writer.counts.tokens, writer.counts.bad_lines) == (2, 7, 2)
    assert writer.summary().startswith("2 sample(s) written, 2 bad line(s), 7 tokens generated")
    assert "cut short" not in writer.summary()  # only where the context cut one
    log = (tmp_path / "progress.log").read_text()
    assert "start: 2 sample(s) to write to" in log and "done 2/2 samples, last line 3" in log
    assert "end: 2 sample(s) written" in log
    assert not (tmp_path / "out.jsonl.log").exists()  # --logging_path replaces the default


@pytest.mark.parametrize("max_seq_len, context, cut_by", [
    (None, None, "--max_seq_len (raise it)"),
    (64, 4096, "--max_seq_len 64 (raise it, up to the model's context of 4096)"),
    (4096, 4096, "the model's context of 4096 tokens"),  # raising --max_seq_len is refused
])
def test_the_summary_counts_completions_cut_by_the_context(tmp_path, max_seq_len, context,
                                                           cut_by):
    s = Settings(ckpt_dir=tmp_path, prompt_path=tmp_path / "prompts.jsonl",
                 out_path=tmp_path / "out.jsonl", max_seq_len=max_seq_len)
    writer = Writer(s, total=3, context_length=context, tally=Generation.tally)
    writer.output({"id": 1, "sample": 0, "finish_reason": "length", "context_limit": True,
                   "completion_tokens": 5}, 1)
    writer.output({"id": 2, "sample": 0, "finish_reason": "length", "completion_tokens": 2}, 2)
    writer.output({"id": 3, "sample": 0, "finish_reason": "length", "context_limit": True,
                   "completion_tokens": 5}, 3)
    writer.finish()
    writer.close()
    assert writer.summary().startswith(f"3 sample(s) written, 2 cut short by {cut_by}, 0 bad "
                                       "line(s), 12 tokens generated")
    assert f"2 cut short by {cut_by}" in s.log_path.read_text()
    assert recover_output(s.out_path) == {(1, 0), (2, 0), (3, 0)}  # the key changes no resume


# --- batch request lines (OpenAI's batch output format) ------------------------------------------

def batch_out(custom_id: str, n: int, tokens: int = 3) -> bytes:
    """A request's whole answer as response_line writes it."""
    request = BatchRequest(custom_id, "completion", None, "Once", {"num_samples": n})
    choices = [Choice(f"t{i}", "length", list(range(tokens)), ["a"] * tokens) for i in range(n)]
    line = response_line(request, choices, 2, "llama", "req_1", 1_700_000_000)
    return (json.dumps(line) + "\n").encode()


def test_recover_a_batch_line_marks_each_of_its_choices_done(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(out_line("a", 0) + batch_out("r-1", 3) + batch_out("r-2", 1)
                     + batch_out("r-3", 2)[:40])
    assert recover_output(path) == {("a", 0), ("r-1", 0), ("r-1", 1), ("r-1", 2), ("r-2", 0)}
    assert path.read_bytes().endswith(batch_out("r-2", 1))  # the torn answer cut off


def test_a_plain_line_with_a_custom_id_field_is_a_plain_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(out_line(4, 0, custom_id="from the input"))
    assert recover_output(path) == {(4, 0)}


@pytest.mark.parametrize("bad", [
    error_line("r-1", "bad", "invalid_request", request_id="r"),  # errors never go to out.jsonl
    {"custom_id": "r-1", "response": {"status_code": 200, "body": {}}, "error": None},
    {"custom_id": "r-1", "response": {"status_code": 200, "body": {"choices": [{"index": [0]}]}},
     "error": None},
])
def test_a_batch_line_that_is_not_a_whole_answer_is_a_user_error(tmp_path, bad):
    path = tmp_path / "out.jsonl"
    path.write_bytes(batch_out("r-0", 1) + (json.dumps(bad) + "\n").encode())
    with pytest.raises(UserError, match="line 2 is not a llama-gen output line"):
        recover_output(path)


def test_writer_counts_a_batch_lines_choices_and_writes_batch_errors_in_the_api_shape(tmp_path):
    s = Settings(ckpt_dir=tmp_path, prompt_path=tmp_path / "prompts.jsonl",
                 out_path=tmp_path / "out.jsonl")
    writer = Writer(s, total=4, tally=Generation.tally)
    writer.output(json.loads(batch_out("r-1", 3, tokens=5)), 1)
    writer.output({"id": 2, "sample": 0, "completion": "z", "completion_tokens": 4}, 2)
    writer.bad_line(BadLine(3, "body.n must be an integer in [1, 1024], got 0", "{}", custom_id="r-3"))
    writer.bad_line(BadLine(4, "invalid JSON", "x"))
    writer.finish()
    writer.close()
    assert (writer.counts.samples, writer.counts.tokens, writer.counts.bad_lines) == (4, 19, 2)
    first, second = [json.loads(x) for x in s.errors_path.read_bytes().splitlines()]
    assert (first["custom_id"], first["line"], first["error"]["code"]) == (
        "r-3", 3, "invalid_request")
    assert second == {"line": 4, "reason": "invalid JSON", "text": "x"}
    assert recorded_error_lines(s.errors_path) == {3, 4}
    assert recover_output(s.out_path) == {("r-1", 0), ("r-1", 1), ("r-1", 2), (2, 0)}


class Terminal(io.StringIO):
    """What a terminal receives (the bar is drawn only on one)."""

    def isatty(self) -> bool:
        return True


def test_the_bar_ends_full_when_lines_are_bad_and_log_lines_never_cut_it(tmp_path, monkeypatch):
    """A bad record's samples settle the bar too, so it reaches 3/3; a log line printed while
    it is drawn starts on a line of its own; the summary names the errors file."""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    handler = logging.StreamHandler(terminal)
    logging.getLogger().addHandler(handler)  # as the CLI's basicConfig does, on stderr
    try:
        prompts = tmp_path / "p.jsonl"
        prompts.write_text('{"prompt": "a"}\n')
        s = Settings(ckpt_dir=tmp_path, prompt_path=prompts, out_path=tmp_path / "out.jsonl")
        writer = Writer(s, total=3, tally=Generation.tally)
        writer.output({"id": 1, "sample": 0, "completion": "x", "completion_tokens": 1}, 1)
        logging.getLogger("llama_gen").warning("a message")
        writer.bad_line(BadLine(2, "too long", "x", samples=1))
        writer.output({"id": 3, "sample": 0, "completion": "x", "completion_tokens": 1}, 3)
        writer.finish()
        writer.close()
    finally:
        logging.getLogger().removeHandler(handler)
    shown = terminal.getvalue()
    assert "| 3/3 [" in shown and "100%" in shown
    assert "\ra message\n" in shown, repr(shown)  # the bar cleared first, drawn again after
    assert s.log_path.read_text().rstrip().endswith(f"; the bad lines are in {s.errors_path}")
