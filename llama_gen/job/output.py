"""The job's files: out.jsonl (the truth), its errors file, lock and progress log, and the
writer that fills them (global rank 0).

Output is only appended to, one whole line per write, or replaced atomically. On start-up the
output file is read back: a torn last line (a crash mid-write) is cut off, and every (id, sample)
pair already there is done. A batch request's line (OpenAI's batch output format) holds all of
its samples: (custom_id, i) for each of its choices i.
"""
from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonlines

from ..errors import UserError
from ..settings import JobSettings
from .openai_output import done_key
from .records import BadLine
from .replicas import Counts, Replicas

log = logging.getLogger(__name__)


def cut_torn_last_line(path: Path) -> int:
    """Truncate `path` after its last newline (a crash mid-write leaves a partial line);
    returns how many bytes were cut."""
    if not path.exists():
        return 0
    with path.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        tail_start = size
        while tail_start > 0:
            step = min(tail_start, 1 << 16)
            f.seek(tail_start - step)
            newline = f.read(step).rfind(b"\n")
            if newline >= 0:
                tail_start = tail_start - step + newline + 1
                break
            tail_start -= step
        if tail_start < size:
            f.truncate(tail_start)
            os.fsync(f.fileno())
    if size - tail_start:
        log.warning("%s: removed a torn last line (%d bytes) left by an interrupted run", path,
                    size - tail_start)
    return size - tail_start


def is_batch_line(line: Any) -> bool:
    """Whether an output line answers a batch request (llama-gen's own lines have a sample)."""
    return isinstance(line, dict) and "custom_id" in line and "sample" not in line


def done_pairs(line: Any) -> list[tuple[Any, int]]:
    """The (id, sample)s an output line holds; KeyError, TypeError or ValueError for a line of
    no kind llama-gen writes (a batch line must be a whole answer: error lines go elsewhere)."""
    if not is_batch_line(line):
        return [(line["id"], line["sample"])]
    custom_id = done_key(line)
    if custom_id is None:
        raise ValueError("not a whole answer")
    return [(custom_id, choice["index"]) for choice in line["response"]["body"]["choices"]]


def recover_output(path: Path) -> set[tuple[Any, int]]:
    """The (id, sample)s `path` already holds; a torn last line is cut off once the rest checks
    out."""
    done: set[tuple[Any, int]] = set()
    if not path.exists():
        return done
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                break
            try:
                done.update(done_pairs(json.loads(raw)))
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path}: line {number} is not a llama-gen output line; move the "
                                "file away or pass --overwrite") from None
    cut_torn_last_line(path)
    return done


def recorded_error_lines(path: Path) -> set[int]:
    """Line numbers already in the errors file (so a resume does not write them twice)."""
    cut_torn_last_line(path)
    if not path.exists():
        return set()
    lines = set()
    with path.open("rb") as f:
        for raw in f:
            try:
                lines.add(json.loads(raw)["line"])
            except (ValueError, KeyError, TypeError):
                pass
    return lines


def write_atomically(path: Path, content: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("wb") as f:
        f.write(content.encode("utf-8") if isinstance(content, str) else content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class JsonlAppender:
    """Appends whole JSON lines; flushes every line, fsyncs every `sync_every` seconds and on
    close."""

    def __init__(self, path: Path, sync_every: float = 2.0):
        self.path = path
        self._file = path.open("ab")
        self._lines = jsonlines.Writer(self._file, flush=True,
                                       dumps=functools.partial(json.dumps, ensure_ascii=False))
        self._sync_every = sync_every
        self._last_sync = time.monotonic()

    def write(self, obj: dict[str, Any]) -> None:
        self._lines.write(obj)
        if time.monotonic() - self._last_sync >= self._sync_every:
            self.sync()

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()


class OutputLock:
    """An exclusive lock on `<out_path>.lock`, released when the process ends however it ends
    (none if not `wanted`: --lock false)."""

    def __init__(self, path: Path, out_path: Path, wanted: bool = True):
        self.path, self.out_path, self.wanted = path, out_path, wanted
        self._file = None

    def acquire(self) -> None:
        if not self.wanted:
            log.warning("%s: not locked (--lock false): no other job may write it meanwhile",
                        self.out_path)
            return
        f = self.path.open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise UserError(f"{self.out_path}: another llama-gen job ({holder}) is "
                            "writing this file; wait for it to finish or choose another "
                            "--out_path") from None
        except OSError as e:  # ENOSYS, EOPNOTSUPP, ENOLCK: no flock on this filesystem
            f.close()
            raise UserError(f"{self.path}: cannot lock it ({e.strerror}): its filesystem has no "
                            "flock (Lustre mounted without -o flock?). Mount it with flock, or "
                            "put --out_path on a filesystem that has it; or, making sure no "
                            "other job writes this --out_path, pass --lock false") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock
            self._file = None


class ProgressLog:
    """Human-readable progress lines at --logging_path, for `tail -f`; never read for
    correctness."""

    def __init__(self, path: Path):
        self._file = path.open("a", encoding="utf-8")

    def write(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._file.write(f"{stamp} {message}\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class Tally:
    """What a task's output lines count, and the summary's words for them."""

    tokens_field: str  # the field of a line that holds its tokens
    noun: str  # a line, counted ("sample(s)")
    done: str  # what became of the lines ("written")
    verb: str  # what became of their tokens ("generated")


class Writer:
    """A replica leader's side of the job: its output and errors files (--out_path's, or its part
    files when there are several replicas), and on global rank 0 progress for people (a bar on a
    terminal, the log for `tail -f`) and the final summary. With `replicas`, the progress shown
    is every replica's, from their shared counters."""

    def __init__(self, settings: JobSettings, total: int, out_path: Path | None = None,
                 errors_path: Path | None = None, shows_progress: bool = True,
                 replicas: Replicas | None = None, context_length: int | None = None, *,
                 tally: Tally):
        self.out = JsonlAppender(out_path or settings.out_path)
        self.errors = JsonlAppender(errors_path or settings.errors_path)
        # The errors file's lines, not written again (a part's are left to the merge).
        self.known_errors = recorded_error_lines(settings.errors_path) if errors_path is None \
            else set()
        self.replicas = replicas
        self.progress = ProgressLog(settings.log_path) if shows_progress else None
        self.total = total
        self.max_seq_len, self.context_length = settings.max_seq_len, context_length
        self.counts = Counts()
        self.tally = tally
        self.errors_path = settings.errors_path  # where the bad lines end up, parts merged
        self.start = self._last_report = self._last_console = time.monotonic()
        self._bar = self._logging_above_bar = None
        self._last_line = 0
        if shows_progress and sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm
            self._bar = tqdm(total=total, unit="sample", dynamic_ncols=True)
            self._logging_above_bar = logging_redirect_tqdm()  # log lines never cut the bar
            self._logging_above_bar.__enter__()
        if self.progress is not None:
            self.progress.write(f"start: {total} sample(s) to write to {settings.out_path}")

    def counts_of(self, line: dict[str, Any]) -> tuple[int, int]:
        """The samples and tokens a line holds (a batch line: its request's choices)."""
        if is_batch_line(line):
            body = line["response"]["body"]
            return len(body["choices"]), body["usage"]["completion_tokens"]
        return 1, line[self.tally.tokens_field]

    def output(self, line: dict[str, Any], source_line: int) -> None:
        self.out.write(line)
        samples, tokens = self.counts_of(line)
        self.counts.samples += samples
        self.counts.tokens += tokens
        self.counts.context_limited += line.get("context_limit") is True
        self._last_line = source_line
        if self.replicas is not None:
            self.replicas.finished(samples, tokens)
        self.show()

    def show(self) -> None:
        """Progress for people, at most once a second (and at the last sample): every
        replica's samples and tokens so far. A sample of a bad record counts as settled: the
        bar reaches its end when every sample is written or bad."""
        now = time.monotonic()
        settled = self.counts.samples + self.counts.bad_samples
        if self.progress is None or (now - self._last_report < 1.0 and settled != self.total):
            return
        self._last_report = now
        samples, tokens, bad = (self.replicas.counters() if self.replicas is not None
                                else (self.counts.samples, self.counts.tokens,
                                      self.counts.bad_samples))
        rate = tokens / self._elapsed()
        if self._bar is not None:
            self._bar.update(samples + bad - self._bar.n)
            self._bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)
        in_bad = f" and {bad} in bad lines" if bad else ""
        message = (f"done {samples}/{self.total} samples{in_bad}, last line "
                   f"{self._last_line}, {rate:.1f} tok/s")
        self.progress.write(message)
        if self._bar is None and now - self._last_console >= 30:
            self._last_console = now
            log.info(message)

    def bad_line(self, bad: BadLine) -> None:
        self.counts.bad_lines += 1
        self.counts.bad_samples += bad.samples
        if self.replicas is not None and bad.samples:
            self.replicas.finished(0, 0, bad.samples)
        if bad.samples:
            self.show()
        self.counts.first_bad_line = self.counts.first_bad_line or dataclasses.asdict(bad)
        if bad.line not in self.known_errors:
            self.known_errors.add(bad.line)
            self.errors.write(bad.as_json())

    def _elapsed(self) -> float:
        return max(time.monotonic() - self.start, 1e-9)

    def summary(self, counts: Counts | None = None, left: int = 0, stopped: bool = False
                ) -> str:
        """How the run went: these counts (by default this writer's own), and the samples it
        `left` unwritten: they remain (a stopped run) or are missing."""
        counts = counts or self.counts
        elapsed = self._elapsed()
        cut = (f", {counts.context_limited} cut short by {self._context_limit()}"
               if counts.context_limited else "")
        lost = (f", {left} {'remain' if stopped else 'missing'} (run the same command again)"
                if left else "")
        where = f"; the bad lines are in {self.errors_path}" if counts.bad_lines else ""
        tally = self.tally
        return (f"{counts.samples} {tally.noun} {tally.done}{cut}{lost}, {counts.bad_lines} "
                f"bad line(s), {counts.tokens} tokens {tally.verb} in {elapsed:.1f}s "
                f"({counts.tokens / elapsed:.1f} tok/s){where}")

    def _context_limit(self) -> str:
        """What cut completions short: --max_seq_len (to raise up to the model's context), or
        the model's context itself."""
        context = self.context_length
        if context is not None and self.max_seq_len is not None and self.max_seq_len >= context:
            return f"the model's context of {context} tokens"
        up_to = f", up to the model's context of {context}" if context is not None else ""
        given = f" {self.max_seq_len}" if self.max_seq_len is not None else ""
        return f"--max_seq_len{given} (raise it{up_to})"

    def finish(self, counts: Counts | None = None, left: int = 0, stopped: bool = False
               ) -> None:
        """Close the bar, then say how it went (in the log and on the console)."""
        self._close_bar()
        if self.progress is not None:
            summary = self.summary(counts, left, stopped)
            self.progress.write("end: " + summary)
            log.info("%s", summary)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._logging_above_bar.__exit__(None, None, None)
            self._bar = self._logging_above_bar = None

    def close(self) -> None:
        self._close_bar()
        self.out.close()
        self.errors.close()
        if self.progress is not None:
            self.progress.close()
