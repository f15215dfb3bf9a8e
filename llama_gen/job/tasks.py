"""The job's two tasks, generation and scoring, behind one interface (`Task`).

A task owns what differs between them: what a record must hold (its schema), how a record
becomes tokens, the requests it makes of them, what runs those requests (the engine or the
scorer), the line a result becomes, and the field of that line that progress counts. The job
drives a task and never asks which one it holds; `task_for` picks it from the settings' type.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from ..engine.memory import Sizing
from ..engine.requests import Completion, Request, SamplingParams, fits
from ..engine.sampling import derive_seed
from ..engine.scoring import Scored, Scorer, ScoreRequest, has_scored_part
from ..errors import UserError
from ..model.args import ModelArgs
from ..model.hf_checkpoint import generation_eos_ids
from ..model.transformer import Transformer
from ..runtime.distributed import Dist
from ..settings import JobSettings, ScoreSettings, Settings
from ..text.chat import (TEMPLATE, Chat, DialogError, chat_format_for, end_of_turn_ids,
                         dialog_tokens, reply_tokens, with_system)
from ..text.chat_template import ChatTemplate, load_chat_template
from ..text.tokenizer import Tokenizer
from .lines import BatchAnswers, completion_text, shown_ids
from .output import Tally
from .records import BadLine, PromptSchema, Record, RecordSchema, ScoreSchema, read_records

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizedRecord:
    """One record's pending samples, tokenized by the replica that owns it."""

    record: Record
    tokens: list[int]  # a prompt; scoring: the whole text
    samples: list[int]
    first_scored: int | None = None  # scoring: the first token of the scored part


@dataclass(frozen=True)
class RecordSample:
    """What a request carries back with its result: the record and which of its samples."""

    record: Record
    sample: int


class Task(Protocol):
    """What the job asks of generation and of scoring alike."""

    settings: JobSettings
    prompting: Prompting
    schema: RecordSchema  # what a record must hold
    tally: Tally  # the field a line counts, and the summary's words for it
    output_fields: tuple[str, ...]  # the fields a line adds to its record's
    named_output: str | None  # the output field a flag names (--completion_key), if any
    system_note: ClassVar[str]  # where --system goes, logged at the start where it is given

    def tokenize(self, record: Record, samples: list[int]) -> TokenizedRecord:
        """The record's tokens; DialogError for a dialog the chat format cannot take."""

    def length_problem(self, work: TokenizedRecord) -> str | None:
        """Why the tokens do not fit --max_seq_len, with what would make them fit."""

    def requests(self, work: TokenizedRecord) -> Iterator[Request | ScoreRequest]:
        """The requests for a record's pending samples, tagged with a `RecordSample`."""

    def run(self, model: Transformer, sizing: Sizing, dist: Dist,
            requests: Iterable[Request | ScoreRequest], should_stop: Callable[[], bool]
            ) -> Iterator[Completion | Scored]:
        """The results of `requests`, in the order they finish, from a KV cache of `sizing`."""

    def line(self, result: Completion | Scored) -> dict[str, Any] | None:
        """A result's output line; None while it waits for others (a batch request's)."""


def task_type(settings: JobSettings) -> type[Generation] | type[Scoring]:
    """Scoring for `llama-gen score`'s settings, generation for `llama-gen`'s: the one place
    that tells them apart."""
    return Scoring if isinstance(settings, ScoreSettings) else Generation


def task_for(settings: JobSettings, tokenizer: Tokenizer, args: ModelArgs) -> Task:
    """The task `settings` ask for, with the run's chat format (`Prompting.for_run`)."""
    kind = task_type(settings)
    if settings.system is not None and not settings.chats_every_prompt:
        log.info("%s", kind.system_note)
    return kind(settings, Prompting.for_run(settings, tokenizer, args))


def records_of(task: Task) -> Iterator[Record | BadLine]:
    """The prompt file's records, read by the task's schema."""
    s = task.settings
    return read_records(s.prompt_path, s.prompt_key, s.id_key, task.schema)


@dataclass(frozen=True)
class Prompting:
    """How a record becomes tokens: its text after bos, or its dialog (`messages`, or its prompt
    as one user message with --chat) in the checkpoint's chat format."""

    tokenizer: Tokenizer
    chat_format: Chat | None
    no_chat_format: str | None = None  # why there is none (a Llama 1 checkpoint)
    context_length: int | None = None  # the model's, where known: how far --max_seq_len goes
    eos_ids: frozenset[int] = frozenset()  # a Hugging Face folder's generation_config.json's

    @classmethod
    def for_run(cls, settings: JobSettings, tokenizer: Tokenizer, args: ModelArgs
                ) -> Prompting:
        """The run's chat format; a checkpoint without one is an error at once where the
        flags ask for chat, else for each record that brings a dialog. The folder's chat
        template is read unless a Meta format is asked for: one that does not parse is an error
        at once."""
        eos_ids = generation_eos_ids(settings.ckpt_dir, tokenizer.n_words)
        template = (load_chat_template(settings.ckpt_dir, tokenizer)
                    if settings.chat_format in (None, TEMPLATE) else None)
        try:
            chat = chat_format_for(tokenizer, args.norm_eps, settings.chat_format, template)
        except UserError as e:
            if settings.wants_chat:
                raise
            return cls(tokenizer, None, str(e), args.context_length, eos_ids)
        if isinstance(chat, ChatTemplate):
            log.info("chat format: the checkpoint's chat template (%s)", chat.source)
        elif template is not None:
            log.info("chat format: Meta's %s, which the checkpoint's chat template (%s) renders "
                     "alike", chat, template.source)
        return cls(tokenizer, chat, context_length=args.context_length, eos_ids=eos_ids)

    @property
    def stop_ids(self) -> frozenset[int]:
        """Where generation stops: the tokenizer's stop tokens, the chat format's ends of turn
        and the folder's generation_config.json's eos_token_id (Llama 3 instruct folders list
        all three of their ends)."""
        turn_ends = end_of_turn_ids(self.chat_format, self.tokenizer) if self.chat_format else ()
        return self.tokenizer.stop_ids | frozenset(turn_ends) | self.eos_ids

    @property
    def template_text(self) -> str | None:
        """The folder's chat template where the run renders dialogs with it: a resume must
        render them alike."""
        return self.chat_format.text if isinstance(self.chat_format, ChatTemplate) else None

    def format(self) -> Chat:
        """The chat format a dialog needs; DialogError where the checkpoint has none."""
        if self.chat_format is None:
            raise DialogError(self.no_chat_format)
        return self.chat_format

    def too_long(self, problem: str, what: str, max_seq_len: int) -> str:
        """A length `problem` with what makes a `what` fit: a longer --max_seq_len only as far
        as the model's context (a run refuses more)."""
        context = self.context_length
        if context is not None and max_seq_len is not None and max_seq_len >= context:
            return f"{problem}: shorten the {what}: the model's context is {context} tokens"
        up_to = f" (up to the model's context, {context})" if context is not None else ""
        return f"{problem}: shorten the {what} or raise --max_seq_len{up_to}"


@dataclass
class Generation:
    """`llama-gen`: completions of each record's prompt, `num_samples` of them, one line each
    (a batch request's samples in one line, in the API's format)."""

    settings: Settings
    prompting: Prompting
    batch_answers: BatchAnswers = field(init=False)

    system_note: ClassVar[str] = ("--system goes into dialogs (records with messages); with "
                                  "--chat, into every prompt")
    tally: ClassVar[Tally] = Tally("completion_tokens", "sample(s)", "written", "generated")
    named_output: str = field(init=False)
    schema: RecordSchema = field(init=False)
    output_fields: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.batch_answers = BatchAnswers(s, self.prompting and self.prompting.tokenizer)
        self.schema = PromptSchema(s.prompt_key, s.per_record())
        self.named_output = s.completion_key
        self.output_fields = (s.completion_key, *s.written_fields)

    def tokenize(self, record: Record, samples: list[int]) -> TokenizedRecord:
        own = self.settings.with_overrides(record.overrides)
        tokenizer = self.prompting.tokenizer
        if record.messages is None and not own.chat:
            if "system" in record.overrides:
                raise DialogError("a system message is for chat prompts: pass --chat, or give "
                                  "a dialog as 'messages'")
            return TokenizedRecord(record, tokenizer.encode(record.prompt, bos=True), samples)
        messages = record.messages or [{"role": "user", "content": record.prompt}]
        tokens = dialog_tokens(with_system(messages, own.system), self.prompting.format(),
                               tokenizer)
        return TokenizedRecord(record, tokens, samples)

    def length_problem(self, work: TokenizedRecord) -> str | None:
        """Why the prompt cannot be generated from, or None: it must leave room for a token
        in the context (settings without --max_seq_len check no length)."""
        n, max_seq_len = len(work.tokens), self.settings.max_seq_len
        if n == 0:
            return "the prompt has no tokens"
        if max_seq_len is None or fits(n, max_seq_len):
            return None
        return self.prompting.too_long(f"the prompt has {n} tokens; --max_seq_len {max_seq_len} "
                                       f"allows at most {max_seq_len - 1}", "prompt", max_seq_len)

    def requests(self, work: TokenizedRecord) -> Iterator[Request]:
        """A request per pending sample, with the record's settings and its own seed."""
        own = self.settings.with_overrides(work.record.overrides)
        for sample in work.samples:
            params = SamplingParams(
                temperature=own.temperature, top_p=own.top_p, top_k=own.top_k, min_p=own.min_p,
                repetition_penalty=own.repetition_penalty, presence_penalty=own.presence_penalty,
                frequency_penalty=own.frequency_penalty, max_gen_len=own.max_gen_len,
                min_tokens=own.min_tokens, ignore_eos=own.ignore_eos, stop=own.stop,
                skip_special_tokens=not own.keep_special_tokens,
                seed=derive_seed(own.seed, work.record.id, sample), logprobs=own.logprobs,
                top_logprobs=own.top_logprobs, echo=own.echo)
            yield Request(work.tokens, params, tag=RecordSample(work.record, sample))

    def run(self, model: Transformer, sizing: Sizing, dist: Dist, requests: Iterable[Request],
            should_stop: Callable[[], bool]) -> Iterator[Completion]:
        """The engine --scheduler names, stopping at the tokenizer's and the chat format's
        stop tokens; a note after a run that preempted sequences."""
        from .build import make_engine
        engine = make_engine(self.settings, model, self.prompting.tokenizer, dist,
                             self.prompting.stop_ids, sizing)
        yield from engine.generate(requests, should_stop)
        stats = engine.stats
        if stats.preempted and dist.is_model_parallel_leader:
            log.log(logging.INFO if dist.is_writer else logging.WARNING,
                    "the KV cache ran out of blocks: %d sequence(s) preempted and generated "
                    "again (at most %d decoded at once, %d KV positions held); a larger cache "
                    "(more memory, or a shorter --max_seq_len) avoids the repeated work",
                    stats.preempted, stats.peak_running, stats.peak_kv_tokens)

    def line(self, completion: Completion) -> dict[str, Any] | None:
        """The record's fields, then llama-gen's (a batch request's: its line once whole)."""
        record, sample = completion.request.tag.record, completion.request.tag.sample
        if record.batch is not None:
            return self.batch_answers.add(completion)
        tokenizer, request = self.prompting.tokenizer, completion.request
        p = request.params
        new_ids = completion.tokens[len(request.prompt_tokens):] if p.echo else completion.tokens
        text = completion_text(tokenizer, request.prompt_tokens, new_ids, p,
                               completion.stop_reason)
        if p.echo:
            chat = record.messages is not None or self.settings.chat
            text = (tokenizer.decode(shown_ids(tokenizer, request.prompt_tokens, p)) if chat
                    else record.prompt) + text
        line = {**record.fields, "id": record.id, "sample": sample,
                self.settings.completion_key: text, "finish_reason": completion.finish_reason}
        if completion.context_limit:  # only then: "length" short of max_gen_len
            line["context_limit"] = True
        line |= {"stop_reason": completion.stop_reason, "prompt_tokens": completion.prompt_tokens,
                 "completion_tokens": completion.completion_tokens}
        if completion.logprobs is not None:
            line["logprobs"] = completion.logprobs
            line["token_ids"] = completion.tokens
        if completion.top_logprobs is not None:
            line["top_logprobs"] = [[{"token_id": i, "token": tokenizer.token_text(i),
                                      "logprob": lp} for i, lp in alternatives]
                                    for alternatives in completion.top_logprobs]
        return line


@dataclass
class Scoring:
    """`llama-gen score`: the log-likelihood of each record's scored part (a whole text, a
    completion given its prompt, or a dialog's last reply), one line per record."""

    settings: ScoreSettings
    prompting: Prompting

    system_note: ClassVar[str] = "--system goes into dialogs (records with messages)"
    tally: ClassVar[Tally] = Tally("n_tokens", "record(s)", "scored", "scored")
    named_output: ClassVar[None] = None
    schema: RecordSchema = field(init=False)
    output_fields: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.schema = ScoreSchema(s.prompt_key, s.per_record(), s.text_key, s.completion_key)
        self.output_fields = s.written_fields

    def tokenize(self, record: Record, samples: list[int]) -> TokenizedRecord:
        """A whole text after bos, a completion after its prompt (the tokens of prompt +
        completion past those they share with the prompt's own), or a dialog's last reply."""
        tokenizer = self.prompting.tokenizer
        if record.messages is not None:
            own = self.settings.with_overrides(record.overrides)
            context, reply = reply_tokens(with_system(record.messages, own.system),
                                          self.prompting.format(), tokenizer)
            return TokenizedRecord(record, context + reply, samples, len(context))
        if record.prompt is None:
            return TokenizedRecord(record, tokenizer.encode(record.target, bos=True), samples, 1)
        prompt = tokenizer.encode(record.prompt, bos=True)
        whole = tokenizer.encode(record.prompt + record.target, bos=True)
        shared = next((i for i, (a, b) in enumerate(zip(prompt, whole)) if a != b),
                      min(len(prompt), len(whole)))
        return TokenizedRecord(record, whole, samples, max(shared, 1))

    def length_problem(self, work: TokenizedRecord) -> str | None:
        """Why the text cannot be scored, or None: it needs a part to score, and the whole of
        it in the context (settings without --max_seq_len check no length)."""
        n, max_seq_len = len(work.tokens), self.settings.max_seq_len
        if not has_scored_part(n, work.first_scored):
            return ("there is nothing to score: the part to score (the text, the completion or "
                    "the last assistant message) has no tokens")
        if max_seq_len is None or n <= max_seq_len:
            return None
        return self.prompting.too_long(f"the text has {n} tokens; --max_seq_len {max_seq_len} "
                                       f"allows at most {max_seq_len}", "text", max_seq_len)

    def requests(self, work: TokenizedRecord) -> Iterator[ScoreRequest]:
        """One request: a text has one score (sample 0)."""
        yield ScoreRequest(work.tokens, work.first_scored, tag=RecordSample(work.record, 0))

    def run(self, model: Transformer, sizing: Sizing, dist: Dist,
            requests: Iterable[ScoreRequest], should_stop: Callable[[], bool]
            ) -> Iterator[Scored]:
        scorer = Scorer(model, sizing.max_batch_size, self.settings.max_seq_len)
        return scorer.score(requests, should_stop)

    def line(self, scored: Scored) -> dict[str, Any]:
        """The record's fields, then the log-likelihood of its scored part."""
        record = scored.request.tag.record
        line = {**record.fields, "id": record.id, "sample": 0, "logprob": scored.total,
                "n_tokens": scored.n_tokens, "mean_logprob": scored.mean}
        if self.settings.logprobs:
            line["token_logprobs"] = scored.logprobs
            line["token_ids"] = scored.request.tokens[scored.request.first_scored:]
        return line


def with_settings(task: Task, settings: JobSettings) -> Task:
    """The same task over `settings` (once a run has resolved --max_seq_len)."""
    return dataclasses.replace(task, settings=settings)
