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

import dataclasses
import enum
import itertools
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from . import distributed
from .distributed import Dist
from .chat import (ChatFormat, DialogError, chat_format_for, end_of_turn_ids, prompt_tokens,
                   reply_tokens, with_system)
from .engine import (ADMISSION_WINDOW_BATCHES, Completion, Request, SamplingParams,
                     prompt_problem)
from .errors import UserError
from .model import Transformer
from .openai_batch import Choice, request_id, response_line
from .plan import Sizing
from .output import OutputLock, Writer, recover_output
from .parts import error_part_path, merge_parts, output_parts, part_path, parts_dir
from .records import BadLine, Form, Record, read_records
from .replicas import Counts, Finished, Message, Replicas
from .resume import prepare_output, run_fingerprint
from .sampling import derive_seed
from .scoring import Scored, Scorer, ScoreRequest, score_problem
from .settings import JobSettings, Settings
from .stopping import cut_at_stop
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

# A group's leader shares its stop request with the group every this many decode steps.
STOP_CHECK_STEPS = 8


def run_job(settings: Settings) -> None:
    """Run the whole job on this rank; raises UserError for what a user can fix. Its
    --max_seq_len is resolved before the output is prepared (a resume retries the prompts too
    long for a shorter one), its --max_batch_size once the model is loaded."""
    from .build import (load_model, model_parallel_size, read_model_args, resolve_dtype,
                        resolve_max_seq_len, size_cache)
    from .tokenizer import find_tokenizer, load_tokenizer

    distributed.stop_if_launcher_dies()
    settings.check_paths()
    tokenizer = load_tokenizer(find_tokenizer(settings.ckpt_dir, settings.tokenizer_path))
    # A bad params.json, or chat flags the checkpoint cannot take, before any process group.
    args = read_model_args(settings.ckpt_dir, tokenizer)
    prompting = Prompting.for_run(settings, tokenizer, args.norm_eps)
    dist = distributed.init_distributed(model_parallel_size(settings), settings.device)
    stop = StopRequested()
    lock = OutputLock(settings.lock_path, settings.out_path)
    results = None
    try:
        dtype = resolve_dtype(settings.dtype, dist.device)
        settings = dataclasses.replace(
            settings, max_seq_len=resolve_max_seq_len(settings, args, dist, dtype))
        plan = prepare(settings, tokenizer, str(dtype), dist, lock)
        check_shared_folder(settings, dist, plan.run)
        results = Results(settings, dist, plan.total, tokenizer, plan.run)
        model = sizing = None
        if plan.total:
            model = load_model(settings.ckpt_dir, tokenizer, dist, dtype)
            sizing = size_cache(settings, model, dist)
            settings = dataclasses.replace(settings, max_batch_size=sizing.max_batch_size)
        feed = Feed(settings, plan.done, prompting, dist, results, stop, results.replicas)
        if sizing is None:  # no sample to write: the feed only records bad lines
            for _ in feed.requests():
                pass
        else:
            for result in run_model(settings, sizing, model, tokenizer, dist, feed):
                results.finished(result)
        results.finish(stop, feed.chunks)
        end_of_run(settings, stop, results, plan)
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
        return scorer.score(feed.requests(), feed.should_stop)
    engine = make_engine(settings, model, tokenizer, dist, feed.prompting.stop_ids, sizing)
    return engine.generate(feed.requests(), feed.should_stop)


# 1. Prepare ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What rank 0 found at the start, shared with every rank."""

    done: frozenset[tuple[Any, int]]  # (id, sample)s the output already holds
    total: int  # samples left to write
    run: str = ""  # this run's name in part files' names (several replicas)


def prepare(settings: Settings, tokenizer: Tokenizer, dtype: str, dist: Dist,
            lock: OutputLock) -> Plan:
    """Rank 0 locks and checks the output and counts the work; every rank gets the plan, or
    stops with rank 0's error."""
    outcome: Plan | str | None = None
    if dist.is_writer:
        try:
            lock.acquire()
            if output_parts(settings.out_path) or parts_dir(settings.out_path).is_dir():
                merge_parts(settings.out_path, settings.errors_path, prompt_order(settings))
            done = prepare_output(settings, run_fingerprint(settings, tokenizer.path, dtype))
            run = start_parts(settings) if dist.data_parallel_size > 1 else ""
            outcome = Plan(frozenset(done), count_pending(settings, done), run)
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
    """Samples still to write (for progress), in a pass that tokenizes nothing; a record whose
    fields clash with the output's is an error here, before any work."""
    pending = 0
    for item in records_of(settings):
        if isinstance(item, Record):
            if item.batch is None:  # a batch line's output holds none of its fields
                check_no_clash(item, settings, resuming=bool(done))
            n = settings.with_overrides(item.overrides).num_samples
            pending += sum((item.id, i) not in done for i in range(n))
    return pending


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

    SIGNAL = enum.auto()  # Ctrl-C or SIGTERM (end_of_run reports it as Interrupted)
    STRICT = enum.auto()  # --strict and a bad line (rank 0 reports the line)


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

    @classmethod
    def for_run(cls, settings: JobSettings, tokenizer: Tokenizer, norm_eps: float
                ) -> Prompting:
        """The run's chat format; a checkpoint without one is an error at once where the
        flags ask for chat, else for each record that brings a dialog."""
        if settings.system is not None and not settings.chats_every_prompt:
            log.info("--system goes into dialogs (records with messages)%s", "" if
                     settings.score_keys else "; with --chat, into every prompt")
        try:
            return cls(tokenizer, chat_format_for(tokenizer, norm_eps, settings.chat_format))
        except UserError as e:
            if settings.wants_chat:
                raise
            return cls(tokenizer, None, str(e))

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
                 reports_invalid: bool = True) -> Iterator[Work | BadLine]:
    """The records with samples still to write, tokenized, and the bad lines to report. With
    `claim` (several replicas), the pending records are cut into chunks of `chunk_records` and
    only the chunks `claim()` hands out are this replica's: it asks for another when it reaches
    past its last (so only when its consumer wants more). Invalid lines are reported by the
    replica that `reports_invalid` (every replica reads them), prompts too long for the context
    by the replica whose chunk holds them. A run resolves --max_seq_len first; settings that
    leave it None (no model to take it from) check no prompt's length."""
    pending, claimed = -1, -1
    for item in records_of(settings):
        if isinstance(item, BadLine):
            if reports_invalid:
                yield item
            continue
        n = settings.with_overrides(item.overrides).num_samples
        samples = [i for i in range(n) if (item.id, i) not in done]
        if not samples:
            continue
        pending += 1
        if claim is not None:
            chunk = pending // chunk_records
            if chunk > claimed:  # past the last chunk claimed: take the next free one
                claimed = claim()
            if chunk != claimed:
                continue
        shown = json.dumps(item.fields, ensure_ascii=False)[:1000]
        custom_id = item.batch and item.batch.custom_id
        own = settings.with_overrides(item.overrides)
        try:
            if settings.score_keys is None:
                tokens, first = prompting.tokens(item, own), None
                problem = prompt_problem(len(tokens), settings.max_seq_len or len(tokens) + 1)
            else:
                tokens, first = prompting.score_tokens(item, own)
                problem = score_problem(len(tokens), settings.max_seq_len or len(tokens), first)
        except DialogError as e:
            yield BadLine(item.line, str(e), shown, custom_id=custom_id)
            continue
        if problem:
            yield BadLine(item.line, problem, shown, max_seq_len=settings.max_seq_len,
                          custom_id=custom_id)
            continue
        yield Work(item, tokens, samples, first)


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
                                 reports_invalid=self.dist.data_parallel_rank == 0):
            if isinstance(item, BadLine):
                self.results.deliver(item)
                if self.settings.strict:  # no further line is read; the job stops as on Ctrl-C
                    self.ending = Ending.STRICT
                    return
            else:
                yield from requests_for(item, self.settings)

    def _stopping(self) -> bool:
        if self.stop and self.ending is None:
            self.ending = Ending.SIGNAL
        return self.ending is not None

    def should_stop(self) -> bool:
        """Asked by the engine before each forward pass: whether the leader stops (unfinished
        sequences are dropped), shared with its group every STOP_CHECK_STEPS passes."""
        self._decode_steps += 1
        if self.replicas is not None:
            self.replicas.beat()
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
    and per token its id, text, logprob and alternatives (when asked for). A special token the
    text leaves out has the empty text, so that the tokens join to the text (and completions'
    text_offset points into it); alternatives keep their names."""
    request, p = completion.request, completion.request.params
    assert not p.echo, "a batch request never echoes its prompt"
    ids = completion.tokens
    text = completion_text(tokenizer, request.prompt_tokens, ids, p, completion.stop_reason)
    shown = set(shown_ids(tokenizer, ids, p))
    tokens = [tokenizer.token_text(t) if t in shown else "" for t in ids]
    token_bytes = [list(tokenizer.token_bytes(t)) if t in shown else [] for t in ids]
    top = completion.top_logprobs
    return Choice(text, completion.finish_reason, list(ids), tokens, completion.logprobs,
                  None if top is None else [[(tokenizer.token_text(t), lp) for t, lp in alts]
                                            for alts in top], token_bytes)


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
    replica, its part files with several); other ranks have none. Global rank 0 shows every
    replica's progress and, at the end, waits for the others and merges their parts."""

    def __init__(self, settings: Settings, dist: Dist, total: int, tokenizer: Tokenizer,
                 run: str = ""):
        self.settings, self.dist, self.tokenizer, self.run = settings, dist, tokenizer, run
        leader, several = dist.is_model_parallel_leader, dist.data_parallel_size > 1
        self.replicas = Replicas(dist) if leader and several else None
        self.writer = None
        if leader:
            replica = dist.data_parallel_rank
            files = ((part_path(settings.out_path, run, replica),
                      error_part_path(settings.out_path, run, replica)) if several
                     else (None, None))
            self.writer = Writer(settings, total, *files, shows_progress=dist.is_writer,
                                 replicas=self.replicas)
        self.answers = Answers(settings, tokenizer)
        self.missing = 0  # samples not written: the replicas that were lost held them
        self.counts = Counts()  # every replica's, on rank 0 at the end

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

    def finish(self, stop: StopRequested, chunks: int = 0) -> None:
        """This replica is done. Every leader's files are synced; other replicas' leaders say so
        to rank 0; rank 0 waits for them (until stopped, or each is lost: silent for
        --replica_timeout), merges their parts and says how the run went."""
        if self.writer is None:
            return
        writer = self.writer
        writer.out.sync()
        writer.errors.sync()
        self.counts = dataclasses.replace(writer.counts)
        if self.replicas is not None:
            log.log(logging.INFO if self.dist.is_writer else logging.WARNING,
                    "replica %d done: %d chunk(s), %d sample(s) in %.1f s",
                    self.dist.data_parallel_rank, chunks, writer.counts.samples,
                    time.monotonic() - writer.start)
        if self.replicas is not None and not self.dist.is_writer:
            self.replicas.done(writer.counts)
            return
        if self.replicas is not None:
            self.replicas.report()
            others, lost = self.replicas.wait_for_others(
                self.settings.replica_timeout, lambda: bool(stop), writer.show)
            self.counts.add(others)
            writer.out.close()
            writer.errors.close()
            merge_start = time.perf_counter()
            merged = merge_parts(self.settings.out_path, self.settings.errors_path,
                                 prompt_order(self.settings))
            log.info("rank 0's time on the other replicas: %.3f s reading their progress (about "
                     "once a second), %.3f s merging %d line(s) of part files at the end",
                     self.replicas.progress_seconds, time.perf_counter() - merge_start, merged)
            if lost:  # what the lost replicas held: counted again after the merge
                self.missing = count_pending(self.settings,
                                             recover_output(self.settings.out_path))
                log.warning("replica(s) %s lost: their unwritten samples are left for the next "
                            "run", ", ".join(map(str, lost)))
        writer.finish(self.counts, self.missing)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class Incomplete(Exception):
    """Replicas were lost: the samples they held are not written (the next run makes them)."""


def end_of_run(settings: Settings, stop: StopRequested, results: Results, plan: Plan) -> None:
    """How the run ends for the user: a clean exit, or why it stopped early. Rank 0 hears of
    every replica's bad lines, so it is the one that reports --strict's."""
    writer_rank = results.dist.is_writer
    if writer_rank and settings.strict and (bad := results.first_bad_line):
        raise UserError(f"{settings.prompt_path}: line {bad.line}: {bad.reason} (--strict; see "
                        f"{settings.errors_path})")
    if stop.signal is not None:
        raise Interrupted(stop.signal)
    if not writer_rank:
        return
    if results.missing:
        raise Incomplete(f"{results.missing} sample(s) missing: a replica was lost (see the "
                         "log); run the same command again to make them")
    counts = results.counts
    if counts.bad_lines and not (counts.samples or plan.done):
        raise UserError(f"every line of {settings.prompt_path} is bad: the reasons are in "
                        f"{settings.errors_path}")
