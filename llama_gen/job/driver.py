"""The batch job: prompts.jsonl in, one output line per (record, sample) out, exactly once.

`run_job` reads top to bottom: prepare (rank 0 takes the lock, merges the part files a killed
run left, recovers the output, checks the run's fingerprint, and tells every rank what is
done), feed (the chunks of pending records each replica claims, as engine requests), generate,
write (each replica's leader its own lines), and at the end rank 0 waits for the other replicas
(or declares them lost) and merges their part files into the output.

Processes: each model-parallel group's first rank (its leader) reads the prompt file, claims
chunks of it for its replica (`replicas.Replicas`) and hands their requests to its group; the
other ranks of the group receive the same requests from it and run the same schedule. With one
replica, its leader (global rank 0) writes --out_path itself; with several, every replica's
leader writes part files (`parts.py`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import itertools
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..cli.plan import Sizing
from ..engine.engine import (ADMISSION_WINDOW_BATCHES, Completion, Request, SamplingParams,
                             prompt_problem)
from ..engine.sampling import derive_seed
from ..engine.scoring import Scored, Scorer, ScoreRequest, score_problem
from ..errors import UserError
from ..model.args import ModelArgs
from ..model.transformer import Transformer
from ..runtime import distributed
from ..runtime.distributed import Dist
from ..settings import JobSettings, Settings
from ..text.chat import (ChatFormat, DialogError, chat_format_for, end_of_turn_ids, prompt_tokens,
                         reply_tokens, with_system)
from ..text.stopping import cut_at_stop
from ..text.tokenizer import Tokenizer
from .openai_output import Choice, request_id, response_line
from .output import JsonlAppender, OutputLock, Writer, recorded_error_lines, recover_output
from .parts import error_part_path, merge_parts, output_parts, part_path, parts_dir
from .records import BadLine, Form, Record, aliases_taken, read_records
from .replicas import Counts, End, Finished, Message, Replicas, StoreLost, Verdict
from .resume import prepare_output, run_fingerprint

log = logging.getLogger(__name__)

# A group's leader shares its stop request with the group every this many decode steps.
STOP_CHECK_STEPS = 8


def run_job(settings: Settings) -> None:
    """Run the whole job on this rank; raises UserError for what a user can fix. Its
    --max_seq_len is resolved before the output is prepared (a resume retries the prompts too
    long for a shorter one), its --max_batch_size once the model is loaded."""
    from ..text.tokenizer import find_tokenizer, load_tokenizer
    from .build import (load_model, model_parallel_size, read_model_args, resolve_dtype,
                        resolve_max_seq_len, size_cache)

    distributed.stop_if_launcher_dies()
    settings.check_paths()
    tokenizer = load_tokenizer(find_tokenizer(settings.ckpt_dir, settings.tokenizer_path))
    # A bad params.json, or chat flags the checkpoint cannot take, before any process group.
    args = read_model_args(settings.ckpt_dir, tokenizer, settings.rope_scaling_factor)
    prompting = Prompting.for_run(settings, tokenizer, args)
    dist = distributed.init_distributed(model_parallel_size(settings), settings.device)
    stop = StopRequested()
    lock = OutputLock(settings.lock_path, settings.out_path, settings.lock)
    results = feed = None
    try:
        dtype = resolve_dtype(settings.dtype, dist.device)
        settings = dataclasses.replace(
            settings, max_seq_len=resolve_max_seq_len(settings, args, dist, dtype))
        plan = prepare(settings, prompting, str(dtype), dist, lock, args.rope_scaling()[0])
        check_shared_folder(settings, dist, plan.run)
        results = Results(settings, dist, plan.total, tokenizer, plan.run, bool(plan.done),
                          args.context_length)
        model = sizing = None
        if plan.runs_model:
            model = load_model(settings.ckpt_dir, tokenizer, dist, dtype, args)
            sizing = size_cache(settings, model, dist)
            settings = dataclasses.replace(settings, max_batch_size=sizing.max_batch_size)
        feed = Feed(settings, plan.done, prompting, dist, results, stop,
                    results.replicas if dist.is_model_parallel_leader else None)
        if sizing is None:  # no sample to write: the feed only records bad lines
            for _ in feed.requests():
                pass
        else:
            for result in run_model(settings, sizing, model, tokenizer, dist, feed):
                results.finished(result)
        results.end(stop, feed.stopped(), feed.claimed, feed.chunks)
    except BaseException as e:
        if results is not None:
            results.abandon(e, *((feed.claimed, feed.chunks) if feed else ()))
        raise
    finally:
        if results is not None:
            results.close()
        lock.release()
        distributed.shutdown()


def run_model(settings: Settings, sizing: Sizing, model: Transformer, tokenizer: Tokenizer,
              dist: Dist, feed: Feed) -> Iterator[Completion | Scored]:
    """The engine's (or the scorer's) results for the feed's requests, in a KV cache of
    `sizing`."""
    from .build import make_engine
    if settings.score_keys is not None:
        scorer = Scorer(model, sizing.max_batch_size, settings.max_seq_len)
        yield from scorer.score(feed.requests(), feed.should_stop)
        return
    engine = make_engine(settings, model, tokenizer, dist, feed.prompting.stop_ids, sizing)
    yield from engine.generate(feed.requests(), feed.should_stop)
    stats = engine.stats
    if stats.preempted and dist.is_model_parallel_leader:
        log.log(logging.INFO if dist.is_writer else logging.WARNING,
                "the KV cache ran out of blocks: %d sequence(s) preempted and generated again "
                "(at most %d decoded at once, %d KV positions held); a larger cache (more "
                "memory, or a shorter --max_seq_len) avoids the repeated work", stats.preempted,
                stats.peak_running, stats.peak_kv_tokens)


# 1. Prepare ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What rank 0 found at the start, shared with every rank."""

    done: frozenset[tuple[Any, int]]  # (id, sample)s the output already holds
    total: int  # samples left to write
    run: str = ""  # this run's name in part files' names (several replicas)
    runs_model: bool = True  # some pending sample can run (else only bad lines are left)


def prepare(settings: Settings, prompting: Prompting, dtype: str, dist: Dist,
            lock: OutputLock, rope_scaling_factor: float | None = None) -> Plan:
    """Rank 0 locks and checks the output, counts the work and checks the pending lines before
    any model loads; every rank gets the plan, or stops with rank 0's error."""
    outcome: Plan | str | None = None
    if dist.is_writer:
        try:
            lock.acquire()
            if output_parts(settings.out_path) or parts_dir(settings.out_path).is_dir():
                merge_parts(settings.out_path, settings.errors_path, prompt_order(settings))
            done = prepare_output(settings, run_fingerprint(
                settings, prompting.tokenizer.path, dtype, rope_scaling_factor),
                functools.partial(check_edited_lines, settings))
            run = start_parts(settings) if dist.data_parallel_size > 1 else ""
            pending, written, aliases = count_samples(settings, done)
            if aliases:
                log.info("%s", aliases_taken(aliases))
            if written:  # what a stopped (or failed) run left, before anything else happens
                log.info("resuming: %d of %d sample(s) already in %s, %d to make", written,
                         written + pending, settings.out_path, pending)
            runs_model = pending > 0 and some_prompt_runs(settings, done, prompting)
            if pending and not runs_model:
                log.info("no pending prompt can run (each is in a bad line): the model is not "
                         "loaded")
            outcome = Plan(frozenset(done), pending, run, runs_model)
        except (UserError, OSError) as e:
            outcome = str(e)
    outcome = distributed.broadcast_from_rank0(outcome)
    if isinstance(outcome, str):
        raise UserError(outcome)
    if outcome.total == 0 and dist.is_writer:
        log.info("nothing to generate: no prompt in %s is left unanswered in %s (bad lines go "
                 "to %s)", settings.prompt_path, settings.out_path, settings.errors_path)
    return outcome


def prompt_order(settings: JobSettings) -> Callable[[tuple[Any, int]], tuple]:
    """Where an (id, sample) comes in the prompt file: merged part lines are sorted by it."""
    position = {item.id: i for i, item in enumerate(records_of(settings))
                if isinstance(item, Record)}
    end = len(position)
    return lambda key: (position.get(key[0], end), key[1])


def start_parts(settings: JobSettings) -> str:
    """This run's name for its part files, and a probe file in their folder that every
    replica's leader must see (`check_shared_folder`)."""
    run = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    folder = parts_dir(settings.out_path)
    folder.mkdir(exist_ok=True)
    (folder / f".{run}.probe").write_text(run)
    return run


def check_shared_folder(settings: JobSettings, dist: Dist, run: str) -> None:
    """With several replicas, every leader must see the parts folder rank 0 wrote in: all
    nodes write part files beside --out_path, which rank 0 merges."""
    if not run:
        return
    probe = parts_dir(settings.out_path) / f".{run}.probe"
    blind = distributed.gather_flags(dist.is_model_parallel_leader and not probe.exists())
    if blind:
        raise UserError(f"{parts_dir(settings.out_path)}: replica(s) "
                        f"{', '.join(str(r // dist.model_parallel_size) for r in blind)} cannot "
                        "see this folder rank 0 just wrote in; --out_path's folder must be on a "
                        "filesystem every node shares")


def count_pending(settings: Settings, done: set[tuple[Any, int]]) -> int:
    """Samples still to write, in a pass that tokenizes nothing; a record whose fields clash
    with the output's is an error here, before any work."""
    return count_samples(settings, done)[0]


def count_samples(settings: Settings, done: set[tuple[Any, int]]
                  ) -> tuple[int, int, set[str]]:
    """The prompt file's samples still to write, those `done` already holds, and the fields
    its records set by OpenAI's and vLLM's names (`records.ALIASES`)."""
    pending = written = 0
    aliases: set[str] = set()
    for item in records_of(settings):
        if isinstance(item, Record):
            aliases.update(item.aliases)
            if item.batch is None:  # a batch line's output holds none of its fields
                check_no_clash(item, settings, resuming=bool(done))
            n = settings.with_overrides(item.overrides).num_samples
            left = sum((item.id, i) not in done for i in range(n))
            pending, written = pending + left, written + n - left
    return pending, written, aliases


def check_edited_lines(settings: Settings, edited: set[int],
                       done: set[tuple[Any, int]]) -> None:
    """Prompt lines may change before they are answered (a bad line fixed in place), not
    after: the rest of an answered record's samples would answer another prompt. UserError
    where an `edited` line's record has a sample in the output, or an answered id is gone."""
    answered = {record_id for record_id, _ in done}
    seen = set()
    for item in records_of(settings):
        if not isinstance(item, Record):
            continue
        seen.add(item.id)
        if item.line in edited and item.id in answered:
            raise UserError(f"{settings.prompt_path}: line {item.line} (id "
                            f"{json.dumps(item.id)}) changed since its answer was written to "
                            f"{settings.out_path}; lines not answered yet, the bad ones "
                            "included, may change, answered ones may not: undo the change, or "
                            "pass --overwrite to start over (the old files are kept aside)")
    if gone := answered - seen:
        some = json.dumps(next(iter(gone)))
        raise UserError(f"{settings.out_path} holds answers for {len(gone)} id(s) that "
                        f"{settings.prompt_path} no longer has (e.g. {some}): an answered line "
                        "was changed or removed; undo the change, or pass --overwrite to start "
                        "over (the old files are kept aside)")


def some_prompt_runs(settings: Settings, done: set[tuple[Any, int]],
                     prompting: Prompting) -> bool:
    """Whether a pending record makes a prompt that runs, read up to the first one that does;
    with --strict, every pending line is checked (tokenized too) and the first bad one ends
    the run here, before the model loads, as it would have ended it later."""
    runs = False
    for item in pending_work(settings, done, prompting):
        if isinstance(item, BadLine) and settings.strict:
            if item.line not in recorded_error_lines(settings.errors_path):
                errors = JsonlAppender(settings.errors_path)
                errors.write(item.as_json())
                errors.close()
            raise UserError(f"{settings.prompt_path}: line {item.line}: {item.reason} (--strict, "
                            f"checked before the model loads; see {settings.errors_path})")
        if isinstance(item, Work):
            runs = True
            if not settings.strict:
                break
    return runs


def records_of(settings: JobSettings) -> Iterator[Record | BadLine]:
    """The prompt file's records, in the form the command needs."""
    form = Form(settings.prompt_key, settings.per_record(), settings.score_keys)
    return read_records(settings.prompt_path, settings.prompt_key, settings.id_key, form)


def check_no_clash(record: Record, settings: JobSettings, resuming: bool = False) -> None:
    """Output lines hold the record's fields and llama-gen's: none may have both."""
    generating = settings.score_keys is None
    written = settings.written_fields
    ours = [settings.completion_key, *written] if generating else list(written)
    taken = [k for k in ours if k in record.fields
             and not (k == "id" and settings.id_key in (None, "id"))]  # the id, written as is
    if not taken:
        return
    if taken[0] != settings.completion_key or not generating:
        fix = f"rename it in the input (llama-gen writes {', '.join(written)})"
    elif resuming:  # the output's lines were written with this --completion_key
        fix = ("rename it in the input, or start over with another name (--completion_key "
               "generated --overwrite)")
    else:
        fix = "pass --completion_key with another name (--completion_key generated)"
    raise UserError(f"{settings.prompt_path}: line {record.line}: field {taken[0]!r} is also "
                    f"an output field: {fix}")


# 2. Feed -------------------------------------------------------------------------------------

class Ending(enum.Enum):
    """Why a feed stopped before its work was done: it reads no further line, and its group
    drops the sequences it has not finished."""

    SIGNAL = enum.auto()  # Ctrl-C or SIGTERM to this process
    STRICT = enum.auto()  # --strict and a bad line (rank 0 reports the line)
    RUN_STOPPED = enum.auto()  # another replica stopped the whole run


@dataclass(frozen=True)
class Work:
    """One record's pending samples, tokenized by the replica that owns it."""

    record: Record
    prompt_tokens: list[int]  # scoring: the whole text
    samples: list[int]
    first_scored: int | None = None  # scoring: the first token of the scored part


@dataclass(frozen=True)
class Tag:
    """What a request carries back with its completion."""

    record: Record
    sample: int


@dataclass(frozen=True)
class Prompting:
    """How a record becomes prompt tokens: its text after bos, or its dialog (`messages`, or
    its prompt as one user message with --chat) in the checkpoint's chat format."""

    tokenizer: Tokenizer
    chat_format: ChatFormat | None
    no_chat_format: str | None = None  # why there is none (a Llama 1 checkpoint)
    context_length: int | None = None  # the model's, where known: how far --max_seq_len goes

    @classmethod
    def for_run(cls, settings: JobSettings, tokenizer: Tokenizer, args: ModelArgs
                ) -> Prompting:
        """The run's chat format; a checkpoint without one is an error at once where the
        flags ask for chat, else for each record that brings a dialog."""
        if settings.system is not None and not settings.chats_every_prompt:
            log.info("--system goes into dialogs (records with messages)%s", "" if
                     settings.score_keys else "; with --chat, into every prompt")
        try:
            return cls(tokenizer, chat_format_for(tokenizer, args.norm_eps, settings.chat_format),
                       context_length=args.context_length)
        except UserError as e:
            if settings.wants_chat:
                raise
            return cls(tokenizer, None, str(e), args.context_length)

    @property
    def stop_ids(self) -> frozenset[int]:
        """Where generation stops: the tokenizer's stop tokens and the chat format's ends of
        turn."""
        turn_ends = end_of_turn_ids(self.chat_format, self.tokenizer) if self.chat_format else ()
        return self.tokenizer.stop_ids | frozenset(turn_ends)

    def score_tokens(self, record: Record, own: JobSettings) -> tuple[list[int], int]:
        """A scored record's tokens, and where its scored part starts: a whole text after bos,
        a completion after its prompt (the tokens of prompt + completion past those they share
        with the prompt's own), or a dialog's last reply (DialogError if it is not one)."""
        if record.messages is not None:
            if self.chat_format is None:
                raise DialogError(self.no_chat_format)
            context, reply = reply_tokens(with_system(record.messages, own.system),
                                          self.chat_format, self.tokenizer)
            return context + reply, len(context)
        if record.prompt is None:
            return self.tokenizer.encode(record.target, bos=True), 1
        prompt = self.tokenizer.encode(record.prompt, bos=True)
        whole = self.tokenizer.encode(record.prompt + record.target, bos=True)
        shared = next((i for i, (a, b) in enumerate(zip(prompt, whole)) if a != b),
                      min(len(prompt), len(whole)))
        return whole, max(shared, 1)

    def tokens(self, record: Record, own: Settings) -> list[int]:
        """The record's prompt tokens; DialogError for a dialog the format cannot take."""
        if record.messages is None and not own.chat:
            if "system" in record.overrides:
                raise DialogError("a system message is for chat prompts: pass --chat, or give "
                                  "a dialog as 'messages'")
            return self.tokenizer.encode(record.prompt, bos=True)
        if self.chat_format is None:
            raise DialogError(self.no_chat_format)
        messages = record.messages or [{"role": "user", "content": record.prompt}]
        return prompt_tokens(with_system(messages, own.system), self.chat_format, self.tokenizer)


def pending_work(settings: Settings, done: set[tuple[Any, int]], prompting: Prompting,
                 claim: Callable[[], int] | None = None, chunk_records: int = 1,
                 reports_invalid: bool = True,
                 on_claimed: Callable[[int], None] = lambda samples: None
                 ) -> Iterator[Work | BadLine]:
    """The records with samples still to write, tokenized, and the bad lines to report. With
    `claim` (several replicas), the pending records are cut into chunks of `chunk_records` and
    only the chunks `claim()` hands out are this replica's: it asks for another when it reaches
    past its last (so only when its consumer wants more). `on_claimed` hears the samples of
    each record taken (of each chunk, once read whole). Invalid lines are reported by the
    replica that `reports_invalid` (every replica reads them), records bad once tokenized (a
    prompt too long for the context, a dialog the format cannot take) by the replica whose
    chunk holds them. A run resolves --max_seq_len first; settings that leave it None (no model
    to take it from) check no prompt's length."""
    for item in _owned_records(settings, done, claim, chunk_records, reports_invalid,
                               on_claimed):
        if isinstance(item, BadLine):
            yield item
            continue
        record, samples = item
        shown = json.dumps(record.fields, ensure_ascii=False)[:1000]
        custom_id = record.batch and record.batch.custom_id
        own = settings.with_overrides(record.overrides)
        try:
            if settings.score_keys is None:
                tokens, first = prompting.tokens(record, own), None
                problem = prompt_problem(len(tokens), settings.max_seq_len or len(tokens) + 1)
            else:
                tokens, first = prompting.score_tokens(record, own)
                problem = score_problem(len(tokens), settings.max_seq_len or len(tokens), first)
        except DialogError as e:
            yield BadLine(record.line, str(e), shown, custom_id=custom_id, samples=len(samples))
            continue
        if problem:
            problem += ": " + lengthening_advice(settings.max_seq_len, prompting.context_length,
                                                 "text" if settings.score_keys else "prompt")
            yield BadLine(record.line, problem, shown, max_seq_len=settings.max_seq_len,
                          custom_id=custom_id, samples=len(samples))
            continue
        yield Work(record, tokens, samples, first)


def lengthening_advice(max_seq_len: int | None, context: int | None, what: str) -> str:
    """What makes a `what` too long for --max_seq_len fit: a longer --max_seq_len only as far
    as the model's context (a run refuses more)."""
    if context is not None and max_seq_len is not None and max_seq_len >= context:
        return f"shorten the {what}: the model's context is {context} tokens"
    up_to = f" (up to the model's context, {context})" if context is not None else ""
    return f"shorten the {what} or raise --max_seq_len{up_to}"


def _owned_records(settings: Settings, done: set[tuple[Any, int]],
                   claim: Callable[[], int] | None, chunk_records: int, reports_invalid: bool,
                   on_claimed: Callable[[int], None]
                   ) -> Iterator[tuple[Record, list[int]] | BadLine]:
    """This replica's pending records with their pending samples, and the invalid lines it
    reports, in file order. A claimed chunk is read whole before any of it is handed on, so
    that `on_claimed` knows its samples from the start."""
    pending, claimed = -1, -1
    held: list[tuple[Record, list[int]] | BadLine] = []  # the claimed chunk, as read so far
    held_records = held_samples = 0
    for item in records_of(settings):
        if isinstance(item, BadLine):
            if reports_invalid:
                if held:
                    held.append(item)
                else:
                    yield item
            continue
        n = settings.with_overrides(item.overrides).num_samples
        samples = [i for i in range(n) if (item.id, i) not in done]
        if not samples:
            continue
        pending += 1
        if claim is None:
            on_claimed(len(samples))
            yield item, samples
            continue
        chunk = pending // chunk_records
        if chunk > claimed:  # past the last chunk claimed: take the next free one
            claimed = claim()
        if chunk != claimed:
            continue
        held.append((item, samples))
        held_records, held_samples = held_records + 1, held_samples + len(samples)
        if held_records == chunk_records:
            on_claimed(held_samples)
            yield from held
            held, held_records, held_samples = [], 0, 0
    if held:
        on_claimed(held_samples)
        yield from held


def requests_for(work: Work, settings: JobSettings) -> Iterator[Request | ScoreRequest]:
    """A request per pending sample, with the record's settings and its own seed (scoring: one
    request, sample 0)."""
    if work.first_scored is not None:
        yield ScoreRequest(work.prompt_tokens, work.first_scored, tag=Tag(work.record, 0))
        return
    own = settings.with_overrides(work.record.overrides)
    for sample in work.samples:
        params = SamplingParams(
            temperature=own.temperature, top_p=own.top_p, top_k=own.top_k, min_p=own.min_p,
            repetition_penalty=own.repetition_penalty, presence_penalty=own.presence_penalty,
            frequency_penalty=own.frequency_penalty, max_gen_len=own.max_gen_len,
            min_tokens=own.min_tokens, ignore_eos=own.ignore_eos, stop=own.stop,
            skip_special_tokens=not own.keep_special_tokens,
            seed=derive_seed(own.seed, work.record.id, sample), logprobs=own.logprobs,
            top_logprobs=own.top_logprobs, echo=own.echo)
        yield Request(work.prompt_tokens, params, tag=Tag(work.record, sample))


class Feed:
    """A model-parallel group's requests: its leader reads its replica's share of the work and
    broadcasts it to the group an admission window at a time, as token ids and settings (the
    other ranks need no record: only the leader makes output lines); bad lines go to
    `results`."""

    def __init__(self, settings: Settings, done: frozenset, prompting: Prompting, dist: Dist,
                 results: Results, stop: StopRequested, replicas: Replicas | None = None):
        self.settings, self.done, self.prompting, self.dist = settings, done, prompting, dist
        self.results, self.stop, self.replicas = results, stop, replicas
        self.ending: Ending | None = None
        self.chunks = 0  # chunks this replica claimed
        self.claimed = 0  # the samples of the records it took
        self._decode_steps = 0

    def requests(self) -> Iterator[Request | ScoreRequest]:
        own = self._leader_requests() if self.dist.is_model_parallel_leader else None
        # max_batch_size is None (auto) only where no model is loaded: bad lines alone
        window = ADMISSION_WINDOW_BATCHES * (self.settings.max_batch_size or 1)
        while True:
            taken = [] if own is None or self._stopping() else list(itertools.islice(own, window))
            shared = distributed.broadcast_from_model_parallel_leader(
                [dataclasses.replace(request, tag=None) for request in taken])
            if not shared:
                return
            yield from taken if own is not None else shared

    def _claim(self) -> int:
        self.chunks += 1
        return self.replicas.claim()

    def _leader_requests(self) -> Iterator[Request]:
        # A chunk is about an admission window of samples: a replica holds at most one chunk
        # it has not started, so replicas finish within about one chunk's time of each other.
        window = ADMISSION_WINDOW_BATCHES * (self.settings.max_batch_size or 1)
        chunk_records = max(1, window // self.settings.num_samples)
        claim = None if self.replicas is None else self._claim
        for item in pending_work(self.settings, self.done, self.prompting, claim, chunk_records,
                                 reports_invalid=self.dist.data_parallel_rank == 0,
                                 on_claimed=self._count_claimed):
            if isinstance(item, BadLine):
                self.results.deliver(item)
                if self.settings.strict:  # no further line is read; the job stops as on Ctrl-C
                    self.ending = Ending.STRICT
                    return
            else:
                yield from requests_for(item, self.settings)

    def _count_claimed(self, samples: int) -> None:
        self.claimed += samples

    def _stopping(self) -> bool:
        if self.ending is None:
            if self.stop:
                self.ending = Ending.SIGNAL
            elif self.replicas is not None and self.replicas.run_stop is not None:
                self.ending = Ending.RUN_STOPPED
        return self.ending is not None

    def stopped(self) -> str | None:
        """Why this replica stopped before its work was done (its leader's word, on every rank
        of its group); None if it did not."""
        why = None
        if self.dist.is_model_parallel_leader:
            why = {None: None, Ending.SIGNAL: self.stop.name, Ending.STRICT: "--strict",
                   Ending.RUN_STOPPED: self.replicas and self.replicas.run_stop}[self.ending]
        return distributed.broadcast_from_model_parallel_leader(why)

    def should_stop(self) -> bool:
        """Asked by the engine before each forward pass: whether the leader stops (unfinished
        sequences are dropped), shared with its group every STOP_CHECK_STEPS passes."""
        self._decode_steps += 1
        return (self._decode_steps % STOP_CHECK_STEPS == 0
                and distributed.leader_flag(self._stopping(), self.dist.device))


# 3. Generate: engine.generate, in run_job. 4. Collect ----------------------------------------

def output_line(completion: Completion, tokenizer: Tokenizer,
                settings: Settings) -> dict[str, Any]:
    """A completion's output line: its record's fields, then llama-gen's."""
    tag, request = completion.request.tag, completion.request
    p = request.params
    new_ids = completion.tokens[len(request.prompt_tokens):] if p.echo else completion.tokens
    text = completion_text(tokenizer, request.prompt_tokens, new_ids, p, completion.stop_reason)
    if p.echo:
        chat = tag.record.messages is not None or settings.chat
        text = (tokenizer.decode(shown_ids(tokenizer, request.prompt_tokens, p)) if chat
                else tag.record.prompt) + text
    line = {**tag.record.fields, "id": tag.record.id, "sample": tag.sample,
            settings.completion_key: text, "finish_reason": completion.finish_reason}
    if completion.context_limit:  # only then: "length" short of max_gen_len
        line["context_limit"] = True
    line |= {"stop_reason": completion.stop_reason, "prompt_tokens": completion.prompt_tokens,
             "completion_tokens": completion.completion_tokens}
    if completion.logprobs is not None:
        line["logprobs"] = completion.logprobs
        line["token_ids"] = completion.tokens
    if completion.top_logprobs is not None:
        line["top_logprobs"] = [[{"token_id": i, "token": tokenizer.token_text(i), "logprob": lp}
                                 for i, lp in alternatives]
                                for alternatives in completion.top_logprobs]
    return line


def score_line(scored: Scored, settings: JobSettings) -> dict[str, Any]:
    """A scored record's output line: its fields, then the log-likelihood of its scored part."""
    record = scored.request.tag.record
    line = {**record.fields, "id": record.id, "sample": 0, "logprob": scored.total,
            "n_tokens": scored.n_tokens, "mean_logprob": scored.mean}
    if settings.logprobs:
        line["token_logprobs"] = scored.logprobs
        line["token_ids"] = scored.request.tokens[scored.request.first_scored:]
    return line


def shown_ids(tokenizer: Tokenizer, ids: list[int], params: SamplingParams) -> list[int]:
    """The ids whose text a completion shows: special tokens only if asked to keep them."""
    if not params.skip_special_tokens:
        return ids
    return [t for t in ids if t not in tokenizer.special_ids]


def completion_text(tokenizer: Tokenizer, prompt_ids: list[int], new_ids: list[int],
                    params: SamplingParams, stop_reason: str | int | None) -> str:
    """The generated text, cut before the stop string that ended it. Stop strings count only
    after the first min_tokens tokens, as the engine looked for them."""
    shown = shown_ids(tokenizer, new_ids, params)
    text = tokenizer.decode_continuation(prompt_ids, shown)
    if isinstance(stop_reason, str):
        n_head = len(shown_ids(tokenizer, new_ids[:params.min_tokens], params))
        head_text = tokenizer.decode_continuation(prompt_ids, shown[:n_head]) if n_head else ""
        head = len(os.path.commonprefix([head_text, text]))  # a split character: U+FFFD there
        text = text[:head] + cut_at_stop(text[head:], params.stop)[0]
    return text


def batch_choice(completion: Completion, tokenizer: Tokenizer) -> Choice:
    """A batch request's completion as one of its choices: the text an output line would hold,
    and per token its id, text (a special token's name, sampled or an alternative), bytes,
    logprob and alternatives (when asked for). A special token the text leaves out is marked
    so, for completions' text_offset to point into the text."""
    request, p = completion.request, completion.request.params
    assert not p.echo, "a batch request never echoes its prompt"
    ids = completion.tokens
    text = completion_text(tokenizer, request.prompt_tokens, ids, p, completion.stop_reason)
    shown = set(shown_ids(tokenizer, ids, p))
    top = completion.top_logprobs
    return Choice(text, completion.finish_reason, list(ids),
                  [tokenizer.token_text(t) for t in ids], completion.logprobs,
                  None if top is None else [[(tokenizer.token_text(t), lp) for t, lp in alts]
                                            for alts in top],
                  [list(tokenizer.token_bytes(t)) for t in ids], [t in shown for t in ids])


class Answers:
    """Batch requests' choices, held until a request has all of them: its output line holds
    them all. What is held when the run stops is dropped (the next run makes it again)."""

    def __init__(self, settings: Settings, tokenizer: Tokenizer):
        self.settings, self.tokenizer = settings, tokenizer
        self.model = settings.ckpt_dir.resolve().name  # for a body that names no model
        self._held: dict[str, dict[int, Choice]] = {}

    def add(self, completion: Completion) -> dict[str, Any] | None:
        """The request's output line once this completion is its last choice, else None."""
        record, sample = completion.request.tag.record, completion.request.tag.sample
        held = self._held.setdefault(record.batch.custom_id, {})
        held[sample] = batch_choice(completion, self.tokenizer)
        n = self.settings.with_overrides(record.overrides).num_samples
        if len(held) < n:
            return None
        del self._held[record.batch.custom_id]
        return response_line(record.batch, [held[i] for i in range(n)],
                             completion.prompt_tokens, self.model,
                             request_id(record.batch.custom_id), int(time.time()))


class Results:
    """Where this rank's results go: a replica's leader writes its own (--out_path with one
    replica, its part files with several); other ranks have none. At the end (`end`), every
    rank learns how the run went and raises what its exit status says; global rank 0 shows
    every replica's progress, waits for the others, merges their parts and checks that the
    output holds every sample the start announced."""

    def __init__(self, settings: Settings, dist: Dist, total: int, tokenizer: Tokenizer,
                 run: str = "", resumed: bool = False, context_length: int | None = None):
        self.settings, self.dist, self.tokenizer, self.run = settings, dist, tokenizer, run
        self.total, self.resumed = total, resumed  # samples the start announced; done before?
        several = dist.data_parallel_size > 1
        self.replicas = Replicas(dist) if several else None  # every rank hears the verdict
        self.writer = None
        if dist.is_model_parallel_leader:
            replica = dist.data_parallel_rank
            files = ((part_path(settings.out_path, run, replica),
                      error_part_path(settings.out_path, run, replica)) if several
                     else (None, None))
            self.writer = Writer(settings, total, *files, shows_progress=dist.is_writer,
                                 replicas=self.replicas, context_length=context_length)
        if self.replicas is not None and dist.is_model_parallel_leader:
            self.replicas.start_heartbeat()
        self.answers = Answers(settings, tokenizer)
        self.missing = 0  # samples the run should have written and did not
        self.counts = Counts()  # this replica's; every replica's on rank 0 at the end
        self._marked = False  # this replica's end is said (and marked for rank 0)
        self._verdict_given = False  # rank 0: the others have heard how the run went

    @property
    def first_bad_line(self) -> BadLine | None:
        bad = self.counts.first_bad_line
        return None if bad is None else BadLine(**bad)

    def finished(self, result: Completion | Scored) -> None:
        """A result every rank of the group has; its leader makes the line and writes it (a
        batch request's once all of its samples are in: they are all on this replica)."""
        if self.dist.is_model_parallel_leader:
            record = result.request.tag.record
            if isinstance(result, Scored):
                line = score_line(result, self.settings)
            elif record.batch is not None:
                line = self.answers.add(result)
            else:
                line = output_line(result, self.tokenizer, self.settings)
            if line is not None:
                self.deliver(Finished(line, record.line))

    def deliver(self, message: Message) -> None:
        if isinstance(message, Finished):
            self.writer.output(message.output, message.source_line)
        else:
            self.writer.bad_line(message)

    # The end ---------------------------------------------------------------------------------

    def end(self, stop: StopRequested, stopped: str | None = None, claimed: int | None = None,
            chunks: int = 0) -> None:
        """End this rank's part of the run: return if the run is complete, else raise what its
        exit status says (Interrupted, Incomplete, UserError). `stopped`: why this replica
        stopped before its work was done (its leader's word, the same on every rank of its
        group), None if it did not; `claimed`: the samples it took (default: all announced)."""
        own = None
        if self.writer is not None:
            own = self._close_own(End(Counts(), self._claimed(claimed), chunks,
                                      stopped=stopped))
        if self.replicas is None:
            self._end_alone(stop, own, stopped)
        elif self.dist.is_writer:
            self._end_rank0(stop, own)
        else:
            self._end_replica(stop, stopped)

    def abandon(self, error: BaseException, claimed: int | None = None, chunks: int = 0
                ) -> None:
        """After an error on this rank (before or during `end`), with several replicas: its
        replica is stopped, not done (its leader marks it, unless it did already), and an error
        on rank 0 stops the run and gives the others its verdict. Best effort: the error itself
        is what this process reports."""
        if self.replicas is None:
            return
        reason = ("the store is gone" if isinstance(error, StoreLost)
                  else f"error: {type(error).__name__}")
        with contextlib.suppress(StoreLost):  # files unsynced: a stopped replica's are not read
            if self.writer is not None and not self._marked:
                self._close_own(End(Counts(), self._claimed(claimed), chunks, stopped=reason),
                                sync=False)
        with contextlib.suppress(StoreLost):
            if self.dist.is_writer and not self._verdict_given:
                self.replicas.stop_run(why_the_run_stops(0, reason))
                self._give_verdict(Verdict(-1, why_the_run_stops(0, reason)))

    def _claimed(self, claimed: int | None) -> int:
        """The samples this replica took: all announced with one replica, none known without a
        feed with several."""
        return claimed if claimed is not None else 0 if self.replicas else self.total

    def _give_verdict(self, verdict: Verdict) -> None:
        self._verdict_given = True
        self.replicas.give_verdict(verdict)

    def _close_own(self, end: End, sync: bool = True) -> End:
        """A leader's files synced (before rank 0 may read them), its end with its counts said
        (and, but on rank 0, marked for rank 0)."""
        writer = self.writer
        if sync:
            writer.out.sync()
            writer.errors.sync()
        self.counts = dataclasses.replace(writer.counts)
        end = dataclasses.replace(end, counts=dataclasses.replace(writer.counts),
                                  seconds=time.monotonic() - writer.start)
        if self.replicas is not None:
            replica = self.dist.data_parallel_rank
            log.log(logging.INFO if replica == 0 else logging.WARNING, "%s",
                    end.describe(replica))
            if replica != 0:
                self.replicas.end(end)
        self._marked = True
        return end

    def _end_alone(self, stop: StopRequested, own: End | None, stopped: str | None) -> None:
        """One replica: its leader (rank 0) counts in memory after a stop, from the output
        otherwise; the other ranks of its group hear its verdict."""
        if own is None:
            verdict = distributed.broadcast_from_rank0(None)
            if stop.signal is not None:
                raise Interrupted(stop.signal)
            if verdict.missing:
                raise Incomplete("")
            return
        stopped, left = stopped or stop.name, -1
        try:
            if stopped is None:
                self.missing = left = self._missing_after_the_end()
            else:
                left = max(0, self.total - self.counts.samples - self.counts.bad_samples)
        finally:  # the other ranks wait for it whatever happened here
            if self.dist.world_size > 1:
                distributed.broadcast_from_rank0(Verdict(left))
        self._report(stop, stopped, left, [])

    def _end_rank0(self, stop: StopRequested, own: End) -> None:
        """Several replicas, rank 0: wait for every other replica to end or be lost; then merge
        their parts and count from the output, or, if the run was stopped, count what remains
        from the store's counters (seconds) and leave the parts for the next start to merge
        (other replicas may still be appending to them)."""
        replicas, writer = self.replicas, self.writer
        replicas.report()
        ends, lost = {}, []
        if own.stopped is None:
            ends, lost = replicas.wait_for_others(
                self.settings.replica_timeout,
                lambda: bool(stop) or replicas.run_stop is not None, writer.show)
        stopped = own.stopped or stop.name or replicas.run_stop
        if stopped is not None:
            replicas.stop_run(why_the_run_stops(0, stopped))  # unless another did first
            deadline = time.monotonic() + STOP_WAIT_SECONDS
            ends, lost = replicas.wait_for_others(
                self.settings.replica_timeout, lambda: time.monotonic() > deadline, writer.show)
            for end in ends.values():
                self.counts.add(end.counts)
            samples, tokens, bad_samples = replicas.counters()
            left = max(0, self.total - samples - bad_samples)
            self.counts.samples, self.counts.tokens = samples, tokens
            self._give_verdict(Verdict(left, f"the run was stopped ({stopped})"))
            self._report(stop, stopped, left, [])
            return
        for end in ends.values():
            self.counts.add(end.counts)
        writer.out.close()
        writer.errors.close()
        merge_start = time.perf_counter()
        merged = merge_parts(self.settings.out_path, self.settings.errors_path,
                             prompt_order(self.settings))
        merge_seconds = time.perf_counter() - merge_start
        self.missing = self._missing_after_the_end()
        self.counts.samples = self.total - self.missing - self.counts.bad_samples  # on disk
        log.info("rank 0's time on the other replicas: %.3f s reading their progress (about "
                 "once a second), %.3f s merging %d line(s) of part files at the end",
                 replicas.progress_seconds, merge_seconds, merged)
        causes = [f"replica {r} was lost" for r in lost] + [
            f"replica {r} stopped ({end.stopped})" for r, end in ends.items() if end.stopped]
        self._give_verdict(Verdict(self.missing, self._missing_message(causes)))
        self._report(stop, None, self.missing, causes)

    def _end_replica(self, stop: StopRequested, stopped: str | None) -> None:
        """Several replicas, any rank but 0: a stop ends it at once; otherwise it waits for
        rank 0's verdict, so that it exits 0 only from a run that is complete (torchrun waits
        at its exit barrier only for nodes whose workers all exit 0)."""
        replica = self.dist.data_parallel_rank
        if stopped == "--strict" and self.writer is not None:
            self.replicas.stop_run(why_the_run_stops(replica, stopped))
        if stopped is not None and stop.signal is None:
            raise Incomplete("")  # its leader's last line said why
        verdict = None
        if stop.signal is None:
            verdict = self.replicas.wait_for_verdict(self.settings.replica_timeout,
                                                     lambda: bool(stop))
        if stop.signal is not None:  # before or while it waited: its own work is written
            raise Interrupted(stop.signal)
        if verdict is not None and not verdict.missing:
            return
        if self.writer is not None:
            log.warning("replica %d: %s", replica,
                        "rank 0 was lost before it could say whether the run is complete; run "
                        "the same command again" if verdict is None
                        else f"the run is incomplete: {verdict.message}")
        raise Incomplete("")

    def _missing_after_the_end(self) -> int:
        """Samples the start announced that are neither in the output nor in a bad line, counted
        from the output as it is now."""
        left = count_pending(self.settings, recover_output(self.settings.out_path))
        return max(0, left - self.counts.bad_samples)

    def _missing_message(self, causes: list[str]) -> str:
        why = "; ".join(causes) if causes else (
            "the output holds fewer lines than were written (were files beside it changed "
            "during the run?)")
        return (f"{self.missing} sample(s) missing: {why}; run the same command again to make "
                "them")

    def _report(self, stop: StopRequested, stopped: str | None, left: int,
                causes: list[str]) -> None:
        """Rank 0: the summary, then what the exit status says: --strict's bad line, a stop, a
        run that misses samples, or a run in which every line was bad."""
        self.writer.finish(self.counts, left, stopped is not None)
        if self.settings.strict and (bad := self.first_bad_line):
            raise UserError(f"{self.settings.prompt_path}: line {bad.line}: {bad.reason} "
                            f"(--strict; see {self.settings.errors_path})")
        if stopped is not None and stop.signal is not None:
            raise Interrupted(stop.signal, left)
        if stopped is not None:
            raise Incomplete(f"the run was stopped ({stopped}): {left} sample(s) remain; run "
                             "the same command again to make them")
        if left:
            raise Incomplete(self._missing_message(causes))
        if self.counts.bad_lines and not (self.counts.samples or self.resumed):
            raise UserError(f"every line of {self.settings.prompt_path} is bad: the reasons "
                            f"are in {self.settings.errors_path}")

    def close(self) -> None:
        if self.replicas is not None:
            self.replicas.stop_heartbeat()
        if self.writer is not None:
            self.writer.close()


def why_the_run_stops(replica: int, stopped: str) -> str:
    """A replica's stop, as the reason the others give for theirs."""
    who = "rank 0" if replica == 0 else f"replica {replica}"
    if stopped.startswith("SIG"):
        return f"{who} got {stopped}"
    if stopped == "--strict":
        return f"{who} met a bad line (--strict)"
    return f"{who} stopped ({stopped})"


# Rank 0, stopped, waits this long for the other replicas' ends before it counts what remains.
STOP_WAIT_SECONDS = 5.0


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

    @property
    def name(self) -> str | None:
        return None if self.signal is None else signal.Signals(self.signal).name


class Interrupted(Exception):
    """Stopped by a signal: what was finished is written; `left` samples remain."""

    def __init__(self, signum: int, left: int | None = None):
        remain = "" if left is None else f": {left} sample(s) remain"
        super().__init__(f"stopped by {signal.Signals(signum).name}{remain}")
        self.signum = signum


class Incomplete(Exception):
    """The run ended without some of its samples (a replica was lost or stopped): the next run
    makes them. Its message is rank 0's; other ranks raise it empty (their log said why)."""
