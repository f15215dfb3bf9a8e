"""What the engine is asked and what it gives back, on the host: a request and its sampling
parameters, the sequence a request becomes while it is generated, the record the runner returns
per row (`Draw`), the completion, and the engine's counters. Nothing here touches a tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..text.stopping import StopWatch
from ..text.tokenizer import Tokenizer


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. The defaults are the engine's neutral ones (greedy, the whole
    vocabulary, until a stop token or the end of the context); the CLI has its own."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # over prompt and generated tokens; 1: off
    presence_penalty: float = 0.0  # over generated tokens; 0: off
    frequency_penalty: float = 0.0
    max_gen_len: int | None = None  # None: until a stop token or the end of the context
    min_tokens: int = 0  # stop tokens and stop strings count only after this many tokens
    ignore_eos: bool = False  # stop tokens are generated like any other
    stop: tuple[str, ...] = ()  # stop strings, matched on the decoded text (needs a tokenizer)
    skip_special_tokens: bool = True  # stop strings are looked for in text without them
    seed: int = 0
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives returned per generated token
    echo: bool = False  # return the prompt's tokens (and logprobs) before the completion's

    @property
    def prompt_logprobs(self) -> bool:
        """Whether the prompt's own logprobs are returned."""
        return self.echo and self.logprobs

    @property
    def penalised(self) -> bool:
        return (self.repetition_penalty != 1 or self.presence_penalty != 0
                or self.frequency_penalty != 0)


@dataclass(frozen=True)
class Request:
    prompt_tokens: list[int]
    params: SamplingParams = SamplingParams()
    tag: Any = None  # the caller's handle, returned with the completion


@dataclass
class Completion:
    request: Request
    tokens: list[int]  # generated tokens, after the prompt's if echo; stop tokens not included
    logprobs: list[float | None] | None  # per token; None for a prompt's first token
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    stop_reason: str | int | None = None  # the stop string, or the stop token, that ended it
    # Per generated token, its most likely alternatives: (token, logprob), most likely first.
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # Whether the end of the context (max_seq_len) cut it, short of the max_gen_len it asked for
    context_limit: bool = False

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens) - (self.prompt_tokens if self.request.params.echo else 0)


class PromptUnfit(ValueError):
    """A prompt the context cannot generate from: it has no tokens, or leaves no position for
    one generated token. `n_tokens` and `max_seq_len` are the facts; the job words them."""

    def __init__(self, n_tokens: int, max_seq_len: int):
        self.n_tokens, self.max_seq_len = n_tokens, max_seq_len
        super().__init__("the prompt has no tokens" if n_tokens == 0 else
                         f"the prompt has {n_tokens} tokens; a context of {max_seq_len} "
                         f"positions holds at most {max_seq_len - 1}")


def fits(n_tokens: int, max_seq_len: int) -> bool:
    """Whether a prompt of n_tokens can be generated from: at least one token must fit."""
    return 0 < n_tokens <= max_seq_len - 1


def must_fit(request: Request, max_seq_len: int) -> Request:
    """The request, or PromptUnfit if it cannot run (callers check `fits` first)."""
    if not fits(len(request.prompt_tokens), max_seq_len):
        raise PromptUnfit(len(request.prompt_tokens), max_seq_len)
    return request


@dataclass(eq=False)
class Sequence:
    """A request being generated: its tokens so far and how many more it may take."""

    request: Request
    budget: int  # how many tokens it may generate in all
    context_budget: int  # how many the context leaves room for
    generated: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: str | int | None = None
    tokenizer: Tokenizer | None = None  # decodes for stop strings
    watch: StopWatch | None = None  # the stop strings, once min_tokens are generated
    admitted: int = 0  # when it was started, in the engine's order of starts

    @classmethod
    def start(cls, request: Request, max_seq_len: int,
              tokenizer: Tokenizer | None = None) -> Sequence:
        if request.params.stop and tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer")
        room = max_seq_len - len(request.prompt_tokens)
        max_gen_len = request.params.max_gen_len
        seq = cls(request, room if max_gen_len is None else min(room, max_gen_len), room,
                  tokenizer=tokenizer)
        seq._watch_from_here()
        return seq

    @property
    def position(self) -> int:
        """Where the last sampled token goes in the cache."""
        return len(self.request.prompt_tokens) + len(self.generated) - 1

    @property
    def may_stop(self) -> bool:
        """Whether a stop token would end it now (not before min_tokens, nor with ignore_eos)."""
        p = self.request.params
        return not p.ignore_eos and len(self.generated) >= p.min_tokens

    def append(self, token: int, logprob: float | None, stop_ids: frozenset[int],
               top: list[tuple[int, float]] | None = None) -> None:
        """Take the sampled token, or finish: at a stop token (dropped), at a stop string (the
        token that completes it is kept; the text is cut by `stopping.cut_at_stop`), or out of
        budget."""
        if len(self.generated) >= self.budget:  # max_gen_len 0: the prompt alone
            self.finish_reason = "length"
            return
        if token in stop_ids and self.may_stop:
            self.finish_reason, self.stop_reason = "stop", token
            return
        self.generated.append(token)
        if self.request.params.logprobs:
            self.logprobs.append(logprob)
        if top is not None:
            self.top_logprobs.append(top)
        if self.watch is not None and self._shown(token) and (
                matched := self.watch.add(token)) is not None:
            self.finish_reason, self.stop_reason = "stop", matched
        elif len(self.generated) >= self.budget:
            self.finish_reason = "length"
        self._watch_from_here()

    def _shown(self, token: int) -> bool:
        """Whether the token is in the text stop strings are looked for in."""
        return not (self.request.params.skip_special_tokens
                    and token in self.tokenizer.special_ids)

    def _watch_from_here(self) -> None:
        """Stop strings are looked for in the text after the first min_tokens tokens."""
        p = self.request.params
        if p.stop and len(self.generated) == p.min_tokens and self.watch is None:
            context = self.request.prompt_tokens + [t for t in self.generated if self._shown(t)]
            self.watch = StopWatch(self.tokenizer, context, p.stop)

    @property
    def context_limited(self) -> bool:
        """Whether it ran out of context before reaching its max_gen_len (or a stop)."""
        max_gen_len = self.request.params.max_gen_len
        return (self.finish_reason != "stop" and len(self.generated) >= self.context_budget
                and (max_gen_len is None or max_gen_len > self.context_budget))

    def completion(self) -> Completion:
        req = self.request
        tokens = (req.prompt_tokens + self.generated) if req.params.echo else self.generated
        return Completion(req, list(tokens), self.logprobs if req.params.logprobs else None,
                          self.finish_reason or "length", len(req.prompt_tokens),
                          self.stop_reason,
                          self.top_logprobs if req.params.top_logprobs else None,
                          self.context_limited)


@dataclass(frozen=True)
class Draw:
    """What the runner gives back for one row of a step: the token drawn (or forced), its
    logprob and its top alternatives (token, logprob), most likely first, where the row's
    request wants them; and, on the step that starts a request whose prompt's logprobs are
    wanted, those (from the prompt's second token on)."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    prompt_logprobs: list[float] | None = None


@dataclass
class EngineStats:
    """Counters of what the engine did, for benchmarks and tests (not timings of record)."""

    prefills: int = 0  # prompts prefilled
    decode_steps: int = 0  # decode forward passes
    slot_steps: int = 0  # rows computed by decode passes
    wasted_slot_steps: int = 0  # rows computed for sequences that had already finished
    refills: int = 0  # prompts admitted into a slot that a finished sequence left
    preempted: int = 0  # sequences dropped for want of KV blocks, to be generated again
    peak_running: int = 0  # most sequences decoding at once
    peak_kv_tokens: int = 0  # most KV positions held at once (whole blocks)

    @property
    def wasted_share(self) -> float:
        return self.wasted_slot_steps / max(self.slot_steps, 1)
