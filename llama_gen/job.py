"""The batch job: prompts.jsonl in, one output line per (record, sample) out, exactly once.

Global rank 0 is the only writer. Each model-parallel group's first rank (its leader) reads the
prompt file, takes its data-parallel share of the pending records, tokenizes them and hands them
to the engine; the group's other ranks receive the same requests from it. Finished samples go to
rank 0 directly (replica 0) or through the mailbox (other replicas).
"""
from __future__ import annotations

import hashlib
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import distributed
from .engine import Completion, Engine, Request, SamplingParams, prompt_problem
from .errors import UserError
from .replicas import Mailbox
from .output import (JsonlAppender, OutputLock, ProgressLog, recorded_error_lines, recover_output,
                     settings_differences, write_atomically)
from .records import BadLine, Record, read_records
from .sampling import derive_seed
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobSettings:
    ckpt_dir: Path
    prompt_path: Path
    out_path: Path
    logging_path: Path | None = None
    tokenizer_path: Path | None = None
    max_seq_len: int = 1024
    max_batch_size: int = 8
    max_gen_len: int = 256
    temperature: float = 0.6
    top_p: float = 0.9
    seed: int = 0
    dtype: str | None = None
    prompt_key: str = "prompt"
    id_key: str | None = None
    num_samples: int = 1
    logprobs: bool = False
    echo: bool = False
    strict: bool = False
    overwrite: bool = False
    model_parallel_size: int | None = None
    device: str | None = None
    scheduler: str = "continuous"
    compile: bool = False

    @property
    def errors_path(self) -> Path:
        return self.out_path.with_name(self.out_path.name + ".errors.jsonl")

    @property
    def settings_path(self) -> Path:
        return self.out_path.with_name(self.out_path.name + ".run.json")

    @property
    def log_path(self) -> Path:
        return self.logging_path or self.out_path.with_name(self.out_path.name + ".log")

    def check(self) -> None:
        """Flag and path errors, before any model loads."""
        for name in ("max_seq_len", "max_batch_size", "max_gen_len", "num_samples"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1")
        if self.temperature < 0:
            raise UserError("--temperature must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise UserError("--top_p must be in (0, 1]")
        if self.scheduler not in ("continuous", "static"):
            raise UserError(f"--scheduler {self.scheduler!r} is not continuous or static")
        if self.model_parallel_size is not None and self.model_parallel_size < 1:
            raise UserError("--model_parallel_size must be at least 1 (default: the shard count "
                            "when it divides the number of processes)")
        if not self.ckpt_dir.is_dir():
            raise UserError(f"--ckpt_dir {self.ckpt_dir}: no such directory (it holds "
                            "params.json and consolidated.NN.pth)")
        if not self.prompt_path.is_file():
            what = "a directory, not a file" if self.prompt_path.is_dir() else "no such file"
            raise UserError(f"--prompt_path {self.prompt_path}: {what}")
        for name, path in (("--out_path", self.out_path), ("--logging_path", self.log_path)):
            if not path.parent.is_dir():
                raise UserError(f"{name} {path}: directory {path.parent} does not exist")
            if path.is_dir():
                raise UserError(f"{name} {path} is a directory: name a file in it")
        # Every file the job writes must be its own: none may be the prompt file or another.
        written = {"--out_path": self.out_path, "the errors file": self.errors_path,
                   "the run settings": self.settings_path,
                   "the lock": OutputLock.path_for(self.out_path), "--logging_path": self.log_path}
        seen = {self.prompt_path.resolve(): "the prompt file"}
        for name, path in written.items():
            if (other := seen.setdefault(path.resolve(), name)) != name:
                raise UserError(f"{name} must not be {other} ({path}): write it elsewhere")


def file_digest(path: Path, size: int | None = None) -> str:
    """sha256 of the file, or of its first `size` bytes."""
    h = hashlib.sha256()
    left = path.stat().st_size if size is None else size
    with path.open("rb") as f:
        while left > 0 and (chunk := f.read(min(left, 1 << 20))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def prompt_file_grew(old: dict[str, Any], path: Path) -> bool:
    """Whether the prompt file only had lines appended since `old` (a run's fingerprint) was
    taken: its first bytes are the file then, and a newline ends the last line then (so that
    line reads as before)."""
    size = old.get("prompt_file_bytes")
    if not isinstance(size, int) or not 0 < size < path.stat().st_size:
        return False
    with path.open("rb") as f:
        f.seek(size - 1)
        ends_a_line = b"\n" in f.read(2)  # the old last byte, or the first new one
    return ends_a_line and file_digest(path, size) == old.get("prompt_file")


def run_fingerprint(s: JobSettings, tokenizer: Tokenizer, dtype: str) -> dict[str, Any]:
    """What a completion depends on; a resume must match it exactly."""
    shards = sorted(s.ckpt_dir.glob("consolidated.*.pth"))
    prompt_bytes = s.prompt_path.stat().st_size  # lines appended from now on come after it
    return {
        "checkpoint": str(s.ckpt_dir.resolve()),
        "params.json": file_digest(s.ckpt_dir / "params.json"),
        "shards": [[p.name, p.stat().st_size] for p in shards],
        "tokenizer": file_digest(tokenizer.path),
        "prompt_file": file_digest(s.prompt_path, prompt_bytes),
        "prompt_file_bytes": prompt_bytes,
        "dtype": dtype,
        **{k: getattr(s, k) for k in ("prompt_key", "id_key", "max_seq_len", "max_gen_len",
                                      "temperature", "top_p", "seed", "num_samples", "logprobs",
                                      "echo")},
    }


def prepare_output(s: JobSettings, fingerprint: dict[str, Any]) -> set[tuple[Any, int]]:
    """Rank 0: check the run settings against the output's, recover it; the done (id, sample)s."""
    if s.overwrite:
        for path in (s.out_path, s.errors_path):
            if path.exists():
                write_atomically(path, "")
    elif s.settings_path.exists():
        old = json.loads(s.settings_path.read_text(encoding="utf-8"))
        diff = settings_differences(old, fingerprint, ignore={"prompt_file", "prompt_file_bytes"})
        if old.get("prompt_file") != fingerprint["prompt_file"]:
            if prompt_file_grew(old, s.prompt_path):
                log.info("%s has new lines since the last run: they are answered too",
                         s.prompt_path)
            else:
                diff.append("prompt_file: its content changed, beyond lines added at its end")
        if diff:
            raise UserError(f"{s.out_path} was written with other settings ({'; '.join(diff)}); "
                            "resume with the same command and files, or pass --overwrite to "
                            "start over")
    elif s.out_path.exists() and s.out_path.stat().st_size:
        raise UserError(f"{s.out_path} exists but was not written by llama-gen (no "
                        f"{s.settings_path.name}); choose another --out_path or pass --overwrite")
    write_atomically(s.settings_path, json.dumps(fingerprint, indent=1) + "\n")
    return recover_output(s.out_path).done


@dataclass
class Work:
    """One record's pending samples, tokenized by the replica that owns it."""

    record: Record
    prompt_tokens: list[int]
    samples: list[int]


def count_pending(s: JobSettings, done: set[tuple[Any, int]]) -> int:
    """Samples still to write (for progress display); a cheap pass without tokenizing."""
    return sum(sum((item.id, i) not in done for i in range(item.overrides.num_samples
                                                           or s.num_samples))
               for item in read_records(s.prompt_path, s.prompt_key, s.id_key)
               if isinstance(item, Record))


def pending_work(s: JobSettings, done: set[tuple[Any, int]], tokenizer: Tokenizer, replica: int,
                 replicas: int) -> Iterator[Work | BadLine]:
    """This replica's share of the records with samples still to write, tokenized, and the bad
    lines it should report: invalid lines are reported by replica 0 (every replica reads them),
    prompts too long for the context by the replica that owns them."""
    owned = 0
    for item in read_records(s.prompt_path, s.prompt_key, s.id_key):
        if isinstance(item, BadLine):
            if replica == 0:
                yield item
            continue
        n = item.overrides.num_samples or s.num_samples
        samples = [i for i in range(n) if (item.id, i) not in done]
        if not samples:
            continue
        owned += 1
        if (owned - 1) % replicas != replica:
            continue
        tokens = tokenizer.encode(item.prompt, bos=True)
        if problem := prompt_problem(len(tokens), s.max_seq_len):
            yield BadLine(item.line, problem, json.dumps(item.fields, ensure_ascii=False)[:1000])
            continue
        yield Work(item, tokens, samples)


def requests_for(work: Work, s: JobSettings) -> Iterator[Request]:
    o = work.record.overrides
    for sample in work.samples:
        seed = derive_seed(o.seed if o.seed is not None else s.seed, work.record.id, sample)
        params = SamplingParams(
            temperature=o.temperature if o.temperature is not None else s.temperature,
            top_p=o.top_p if o.top_p is not None else s.top_p,
            max_gen_len=o.max_gen_len or s.max_gen_len, seed=seed, logprobs=s.logprobs,
            echo=s.echo)
        yield Request(work.prompt_tokens, params, tag=(work.record, sample))


def output_line(c: Completion, tokenizer: Tokenizer) -> dict[str, Any]:
    record, sample = c.request.tag
    prompt_ids = c.request.prompt_tokens
    new_ids = c.tokens[len(prompt_ids):] if c.request.params.echo else c.tokens
    text = tokenizer.decode_continuation(prompt_ids, new_ids)
    line = {**record.fields, "id": record.id, "sample": sample,
            "completion": record.prompt + text if c.request.params.echo else text,
            "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens}
    if c.logprobs is not None:
        line["logprobs"] = c.logprobs
    return line


class StopRequested:
    """SIGINT/SIGTERM: stop admitting work, write what is done, exit non-zero."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __bool__(self) -> bool:
        return self.signal is not None


class Writer:
    """Rank 0's side: output and errors files, progress for people, the final summary."""

    def __init__(self, s: JobSettings, total: int):
        self.out = JsonlAppender(s.out_path)
        self.errors = JsonlAppender(s.errors_path)
        self.known_errors = recorded_error_lines(s.errors_path)
        self.progress = ProgressLog(s.log_path)
        self.total = total
        self.samples = self.tokens = self.bad_lines = 0
        self.start = self._last_report = self._last_console = time.monotonic()
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total, unit="sample", dynamic_ncols=True)
        self.progress.write(f"start: {total} sample(s) to write to {s.out_path}")

    def output(self, line: dict[str, Any], source_line: int) -> None:
        self.out.write(line)
        self.samples += 1
        self.tokens += line["completion_tokens"]
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(f"{self.tokens / self._elapsed():.0f} tok/s", refresh=False)
        now = time.monotonic()
        if now - self._last_report >= 1.0 or self.samples == self.total:
            self._last_report = now
            message = (f"done {self.samples}/{self.total} samples, last line {source_line}, "
                       f"{self.tokens / self._elapsed():.1f} tok/s")
            self.progress.write(message)
            if self._bar is None and now - self._last_console >= 30:
                self._last_console = now
                log.info(message)

    def bad_line(self, bad: BadLine) -> None:
        self.bad_lines += 1
        if bad.line not in self.known_errors:
            self.known_errors.add(bad.line)
            self.errors.write(asdict(bad))

    def _elapsed(self) -> float:
        return max(time.monotonic() - self.start, 1e-9)

    def summary(self) -> str:
        elapsed = self._elapsed()
        return (f"{self.samples} sample(s) written, {self.bad_lines} bad line(s), "
                f"{self.tokens} tokens generated in {elapsed:.1f}s "
                f"({self.tokens / elapsed:.1f} tok/s)")

    def finish(self) -> None:
        """Close the bar, then say how it went (in the log and on the console)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.progress.write("end: " + self.summary())
        log.info("%s", self.summary())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self.out.close()
        self.errors.close()
        self.progress.close()


def run_job(s: JobSettings) -> None:
    """Run the whole job on this rank; raises UserError for what a user can fix."""
    from .build import default_model_parallel_size, load_model, read_model_args, resolve_dtype
    from .checkpoint import find_shards
    from .tokenizer import find_tokenizer, load_tokenizer

    distributed.stop_if_launcher_dies()
    s.check()
    tokenizer = load_tokenizer(find_tokenizer(s.ckpt_dir, s.tokenizer_path))
    read_model_args(s.ckpt_dir, tokenizer)
    n_shards = len(find_shards(s.ckpt_dir))
    world_size = distributed.launch_env().world_size
    info = distributed.init_distributed(
        s.model_parallel_size or default_model_parallel_size(world_size, n_shards), s.device)
    stop = StopRequested()
    lock = OutputLock(s.out_path)
    writer: Writer | None = None
    try:
        dtype = resolve_dtype(s.dtype, info.device)
        outcome: tuple[str, Any] = ("", None)
        if info.is_writer:
            try:
                lock.acquire()
                done = prepare_output(s, run_fingerprint(s, tokenizer, str(dtype)))
                outcome = ("ok", (done, count_pending(s, done)))
            except (UserError, OSError) as e:  # every rank stops with the same message
                outcome = ("error", str(e))
        kind, value = distributed.broadcast_from_rank0(outcome)
        if kind == "error":
            raise UserError(value)
        done, total = value
        if total == 0 and info.is_writer:
            log.info("nothing to generate: no prompt in %s is left unanswered in %s (bad lines "
                     "go to %s)", s.prompt_path, s.out_path, s.errors_path)
        model = load_model(s.ckpt_dir, tokenizer, info, dtype)
        engine = Engine(model, tokenizer.stop_ids, s.max_batch_size, s.max_seq_len, s.scheduler,
                        compile=s.compile)
        if s.compile and info.rank == 0:
            log.info("--compile: the first decode steps compile the model (a minute or more "
                     "for large models)%s", "" if info.device.type == "cuda" else
                     "; on the CPU the compiled step is not faster than the eager one")
        mailbox = Mailbox(info) if info.data_parallel_size > 1 else None
        leader = info.model_parallel_rank == 0
        writer = Writer(s, total) if info.is_writer else None
        strict_failure: list[BadLine] = []

        def deliver(message: dict[str, Any]) -> None:
            if writer is None:
                mailbox.send(message)
            elif "output" in message:
                writer.output(message["output"], message["line"])
            else:
                bad = BadLine(**message["bad_line"])
                writer.bad_line(bad)
                if s.strict:
                    strict_failure.append(bad)

        def leader_requests() -> Iterator[Request | None]:
            for item in pending_work(s, done, tokenizer, info.data_parallel_rank,
                                     info.data_parallel_size):
                if isinstance(item, BadLine):
                    deliver({"bad_line": asdict(item)})
                    if s.strict:  # no further line is read; the job stops as on Ctrl-C
                        stop.signal = stop.signal or -1
                        return
                else:
                    yield from requests_for(item, s)

        def group_requests() -> Iterator[Request]:
            source = leader_requests() if leader else None
            while True:
                request = None if (not leader or stop) else next(source, None)
                request = distributed.broadcast_from_model_parallel_leader(request)
                if request is None:
                    return
                yield request

        decode_steps = 0

        def should_stop() -> bool:
            """The leader's stop request, shared with its group every 8 decode steps."""
            nonlocal decode_steps
            decode_steps += 1
            return decode_steps % 8 == 0 and distributed.leader_flag(bool(stop), info.device)

        for completion in engine.generate(group_requests(), should_stop):
            if leader:
                record, _ = completion.request.tag
                deliver({"output": output_line(completion, tokenizer), "line": record.line})
            if writer is not None and mailbox is not None:
                for message in mailbox.receive():
                    deliver(message)
        if mailbox is not None:
            if leader and writer is None:
                mailbox.close()
            while writer is not None and not mailbox.all_closed():
                for message in mailbox.receive():
                    deliver(message)
                time.sleep(0.05)
        if writer is not None:
            writer.finish()
        if strict_failure:
            bad = strict_failure[0]
            raise UserError(f"{s.prompt_path}: line {bad.line}: {bad.reason} (--strict; see "
                            f"{s.errors_path})")
        if stop.signal not in (None, -1):
            raise Interrupted(stop.signal)
    finally:
        if writer is not None:
            writer.close()
        lock.release()
        distributed.shutdown()


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
