"""Continuous batching over rows of decoding state and a KV cache of blocks: prefill each prompt,
decode all rows together, and give a finished sequence's row and blocks to the next prompt at
once.

The path of a request:
- `Engine.generate` reads the requests, shortest prompt first within windows
  (`shortest_first_in_windows`), and runs the loop `Engine._run`.
- Each turn of the loop admits requests while a row is free and the free KV blocks hold their
  prompts (`_admit`, in `prefill_groups` of similar lengths); gives every decoding sequence the
  block its next token needs, preempting the newest sequences when blocks run out (`_make_room`:
  they are generated again from their prompts, to the same tokens); starts the groups it takes
  this turn (`_start`: a `Sequence` in its row); runs one `_step`; appends each sequence's new
  token (`Sequence.append`) and retires the finished ones (`_retire`).
- `_step` builds the step, runs one forward pass and samples: the decoding rows (one token each)
  and the new prompts (right-padded prefill segments; a long prompt chunk by chunk) are joined in
  one pass, so the layers' weights are read once for both. With `compile`, the decode rows take
  a compiled copy of the model at fixed shapes (CUDA graphs on GPUs) and the prefills an eager
  pass of their own. Only the tokens (and the logprobs asked for) come back to the host, in one
  copy per step.
- Retiring moves the last active sequence into the gap, so active rows stay contiguous (0..n-1):
  its row of the block table moves (`paging.BlockAllocator`), or, in an unpaged cache of one
  block of max_seq_len per row (the CPU's default, `paging.OneBlockPerRow`), its cache positions,
  so a decode step reads the cache as a plain view.

A prompt's own logprobs (echo with logprobs) come from `prompt_logprobs`, a teacher-forced pass of
their own; the scoring of whole texts uses the same pass.

`SlotEngine` holds what this engine shares with the static baseline (`baseline.StaticEngine`):
the cache and the rows' decoding state on the device, starting a sequence in a row, drawing
tokens, and the counters.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import UserError
from ..model.transformer import BlockTable, Step, Transformer
from ..text.stopping import StopWatch
from ..text.tokenizer import Tokenizer
from .blocks import BlockAllocator, OneBlockPerRow, blocks_for
from .sampling import apply_penalties, argmax, counter_uniform, sample, token_logprobs, top_logprobs

log = logging.getLogger(__name__)


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


def prompt_problem(n_tokens: int, max_seq_len: int) -> str | None:
    """Why a prompt of n_tokens cannot be generated from, or None: at least one token must fit."""
    if n_tokens == 0:
        return "the prompt has no tokens"
    if n_tokens > max_seq_len - 1:
        return (f"the prompt has {n_tokens} tokens; --max_seq_len {max_seq_len} allows at most "
                f"{max_seq_len - 1}")
    return None


def checked(request: Request, max_seq_len: int) -> Request:
    """The request, or ValueError if it cannot run (callers check `prompt_problem` first)."""
    if (problem := prompt_problem(len(request.prompt_tokens), max_seq_len)) is not None:
        raise ValueError(problem)
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


class ForwardTimer:
    """Time spent in forward passes, for benchmarks: on a GPU between CUDA events, read (one
    synchronisation) only when asked, so a decode step never waits for the device to time it;
    on the CPU by the clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = 0.0
        self._start: Any = None

    def __enter__(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start, end))
        else:
            self._seconds += time.perf_counter() - self._start

    def seconds(self) -> float:
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(a.elapsed_time(b) for a, b in self._events) / 1000
            self._events.clear()
        return self._seconds


@dataclass
class TokenCounts:
    """Per slot, which tokens its prompt holds and how often each was generated: what the
    repetition, presence and frequency penalties read. Rows of slots whose requests have no
    penalties are not kept up to date (their penalties are neutral)."""

    in_prompt: torch.Tensor  # (slots, vocab) bool
    generated: torch.Tensor  # (slots, vocab) int32

    @classmethod
    def empty(cls, slots: int, vocab: int, device: torch.device) -> TokenCounts:
        return cls(torch.zeros(slots, vocab, dtype=torch.bool, device=device),
                   torch.zeros(slots, vocab, dtype=torch.int32, device=device))

    def restart(self, slot: int, prompt: list[int]) -> None:
        self.in_prompt[slot] = False
        self.in_prompt[slot, torch.tensor(prompt, device=self.in_prompt.device)] = True
        self.generated[slot] = 0

    def add(self, tokens: torch.Tensor, taken: torch.Tensor | None = None) -> None:
        """Count slot i's new token tokens[i], for slots 0..n-1 (where `taken`)."""
        rows = torch.arange(len(tokens), device=tokens.device)
        ones = self.generated.new_ones(()) if taken is None else taken.to(self.generated.dtype)
        self.generated.index_put_((rows, tokens), ones, accumulate=True)


# A teacher-forced pass turns hidden states into logits this many rows at a time, so it never
# holds a whole prompt's length x vocabulary floats.
LOGPROB_ROWS = 512


def prompt_logprobs(model: Transformer, tokens: list[int], slot: int,
                    table: BlockTable | None = None) -> list[float]:
    """log p(tokens[t] | tokens[:t]) for t = 1..n-1, teacher-forced. tokens[:-1] go through the
    model in passes of at most `prefill_chunk` tokens, written into cache slot `slot`, or the
    blocks of a paged cache's one-row `table` (scratch: the caller's next prefill overwrites
    it)."""
    device = model.output.weight.device
    ids = torch.tensor(tokens, device=device)
    chunk = prefill_chunk(len(tokens), masked=table is None or model.paged_reads != "flex")
    out = []
    for start in range(0, len(tokens) - 1, chunk):
        stop = min(start + chunk, len(tokens) - 1)
        step = model.make_step(torch.arange(start, stop, device=device)[None],
                               slice(slot, slot + 1), stop, fresh=start == 0, every_token=True,
                               table=table)
        hidden = model.final_hidden(ids[start:stop], step)  # (stop - start, dim)
        for row in range(0, stop - start, LOGPROB_ROWS):
            logits = model.logits(hidden[row:row + LOGPROB_ROWS])
            first = start + row + 1  # the token these logits predict
            out.append(token_logprobs(logits, ids[first:first + len(logits)]))
    return torch.cat(out).tolist() if out else []


def default_block_size(device: torch.device, max_seq_len: int) -> int:
    """Positions per KV block: 128 on GPUs (flex attention's block), so a sequence holds only
    what it uses; on the CPU one block of max_seq_len per row, where reads are plain views and
    memory is rarely what limits the batch."""
    return 128 if device.type == "cuda" else max_seq_len


class SlotEngine:
    """What both schedulers share: the model over a KV cache, `max_batch_size` rows of decoding
    state (kept on the device so a decode step copies nothing in), starting a sequence in a row,
    drawing tokens and the counters. `tokenizer` is needed only by requests with stop strings.

    The cache holds `kv_cache_tokens` positions (default: max_seq_len for every row) in blocks
    of `kv_block_size` (default: `default_block_size`). A row holds the blocks its sequence
    needs (`self.blocks`); with one block of max_seq_len per row the cache is unpaged."""

    def __init__(self, model: Transformer, stop_ids: Iterable[int], max_batch_size: int,
                 max_seq_len: int, tokenizer: Tokenizer | None = None, *,
                 kv_cache_tokens: int | None = None, kv_block_size: int | None = None):
        self.model = model
        self.forward_timer: ForwardTimer | None = None  # set one to time forward passes
        self.device = model.output.weight.device
        self.stop_ids = frozenset(stop_ids)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.stats = EngineStats()
        self.blocks = self._setup_cache(kv_cache_tokens, kv_block_size)
        def zeros(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(max_batch_size, device=self.device, dtype=dtype)
        self._next_token = zeros(torch.long)  # the last sampled token, input of the next step
        self._position = zeros(torch.long)  # where that token goes in the cache
        self._counter = zeros(torch.long)  # index of the token to draw next (the RNG counter)
        self._seed = zeros(torch.long)
        self._temperature = zeros(torch.float32)
        self._top_p = zeros(torch.float32)
        self._top_k = zeros(torch.long)
        self._min_p = zeros(torch.float32)
        self._repetition = zeros(torch.float32)
        self._presence = zeros(torch.float32)
        self._frequency = zeros(torch.float32)
        self._stop_id_tensor = torch.tensor(sorted(self.stop_ids), dtype=torch.long,
                                            device=self.device)
        self._counts: TokenCounts | None = None  # made when a request first asks for penalties
        self._slot_state = [self._next_token, self._position, self._counter, self._seed,
                            self._temperature, self._top_p, self._top_k, self._min_p,
                            self._repetition, self._presence, self._frequency]

    def _setup_cache(self, kv_cache_tokens: int | None,
                     kv_block_size: int | None) -> BlockAllocator | OneBlockPerRow:
        rows, longest = self.max_batch_size, self.max_seq_len
        size = min(kv_block_size or default_block_size(self.device, longest), longest)
        tokens = rows * longest if kv_cache_tokens is None else kv_cache_tokens
        n_blocks = tokens // size
        if n_blocks * size < longest:
            raise ValueError(f"a KV cache of {tokens} positions cannot hold one sequence of "
                             f"max_seq_len {longest}")
        if size == longest and n_blocks >= rows:
            self.model.setup_cache(rows, longest)
            return OneBlockPerRow(rows, longest)
        self.model.setup_cache(rows, longest, blocks=n_blocks + 1, block_size=size)  # + the sink
        return BlockAllocator(n_blocks, size, rows, longest, self.device)

    def _start(self, request: Request, slot: int) -> Sequence:
        """A sequence for the request in row `slot`, whose blocks hold its prompt and first
        token, with its prompt's logprobs if it wants them (the row's cache is their scratch
        until the prompt is prefilled)."""
        seq = Sequence.start(request, self.max_seq_len, self.tokenizer)
        grown = self.blocks.extend(slot, len(request.prompt_tokens) + 1)
        assert grown, "admission counts free blocks"
        p = request.params
        self._seed[slot], self._counter[slot] = p.seed, 0
        self._temperature[slot], self._top_p[slot] = p.temperature, p.top_p
        self._top_k[slot], self._min_p[slot] = p.top_k, p.min_p
        self._repetition[slot], self._presence[slot] = p.repetition_penalty, p.presence_penalty
        self._frequency[slot] = p.frequency_penalty
        if p.penalised:
            if self._counts is None:
                self._counts = TokenCounts.empty(self.max_batch_size, self.model.args.vocab_size,
                                                 self.device)
                self._slot_state += [self._counts.in_prompt, self._counts.generated]
            self._counts.restart(slot, request.prompt_tokens)
        if p.prompt_logprobs:
            seq.logprobs = [None] + self._timed(prompt_logprobs, self.model,
                                                request.prompt_tokens, slot,
                                                self.blocks.rows(slot, slot + 1))
        return seq

    def _draw(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """Next tokens for slots 0..n-1 (one per seq), each from its own (seed, counter) stream;
        their counters advance. In order: penalties, stop tokens held back until min_tokens,
        then greedy, or temperature and top-k / top-p / min-p (`sampling.sample`)."""
        rows = slice(0, len(seqs))
        params = [s.request.params for s in seqs]
        if self._counts is not None and any(p.penalised for p in params):
            logits = apply_penalties(logits, self._counts.in_prompt[rows],
                                     self._counts.generated[rows], self._repetition[rows],
                                     self._presence[rows], self._frequency[rows])
        if held := [i for i, s in enumerate(seqs) if not s.may_stop and not
                    s.request.params.ignore_eos]:
            logits = logits.index_put((torch.tensor(held, device=self.device)[:, None],
                                       self._stop_id_tensor), torch.tensor(float("-inf")))
        if all(p.temperature == 0 for p in params):
            tokens = argmax(logits)
        else:
            uniform = counter_uniform(self._seed[rows], self._counter[rows])
            tokens = sample(logits, self._temperature[rows], self._top_p[rows], uniform,
                            self._top_k[rows] if any(p.top_k for p in params) else None,
                            self._min_p[rows] if any(p.min_p for p in params) else None)
        self._counter[rows] += 1
        return tokens

    def _count(self, tokens: torch.Tensor, taken: torch.Tensor | None = None) -> None:
        """Count the tokens slots 0..n-1 took (where `taken`), for the penalties."""
        if self._counts is not None:
            self._counts.add(tokens, taken)

    def _detail(self, seqs: list[Sequence], logits: torch.Tensor, tokens: torch.Tensor
                ) -> tuple[list[int], list[float | None], list[list[tuple[int, float]] | None]]:
        """The tokens, each one's logprob and its top alternatives where its sequence wants
        them (under the model's own distribution: before penalties, temperature and filters),
        in one copy from the device: float32 columns, exact for token ids below 2 ** 24."""
        n = len(seqs)
        columns = [tokens.float()[:, None]]
        if wants_logprobs := any(s.request.params.logprobs for s in seqs):
            columns.append(token_logprobs(logits, tokens)[:, None])
        if k := max(s.request.params.top_logprobs for s in seqs):
            columns += top_logprobs(logits, k)[::-1]  # ids, then their logprobs
        host = torch.cat([c.float() for c in columns], dim=1).tolist() if len(columns) > 1 \
            else [[t] for t in tokens.tolist()]
        logprobs: list[float | None] = [row[1] for row in host] if wants_logprobs else [None] * n
        tops: list[list[tuple[int, float]] | None] = [None] * n
        first = 1 + wants_logprobs
        for i, row in enumerate(host):
            if want := seqs[i].request.params.top_logprobs:
                tops[i] = [(int(t), v) for t, v in zip(row[first:first + want],
                                                       row[first + k:first + k + want])]
        return [int(row[0]) for row in host], logprobs, tops

    def _timed(self, compute: Callable[..., Any], *args: Any) -> Any:
        if self.forward_timer is None:
            return compute(*args)
        with self.forward_timer:
            return compute(*args)


class Engine(SlotEngine):
    """Continuous batching (see the module's docstring); `compile` runs decode steps through
    `compile_decode`."""

    def __init__(self, model: Transformer, stop_ids: Iterable[int], max_batch_size: int,
                 max_seq_len: int, *, tokenizer: Tokenizer | None = None,
                 compile: bool = False, kv_cache_tokens: int | None = None,
                 kv_block_size: int | None = None):
        super().__init__(model, stop_ids, max_batch_size, max_seq_len, tokenizer,
                         kv_cache_tokens=kv_cache_tokens, kv_block_size=kv_block_size)
        self._compiled_decode = compile_decode(model) if compile else None
        self._admitted = itertools.count()  # admission order: the newest is preempted first
        # Free blocks admission leaves for the decoding sequences to grow into, so admitting a
        # prompt does not force a preemption a few steps later (vLLM keeps 1% too).
        self._reserve = 0 if self.blocks.moves_data else -(-self.blocks.n_blocks // 100)

    def generate(self, requests: Iterable[Request],
                 should_stop: Callable[[], bool] | None = None) -> Iterator[Completion]:
        """Completions in the order they finish; all model-parallel ranks must pass the same
        requests in the same order. `should_stop` is asked before every forward pass; when it
        says yes, unfinished sequences, and admitted prompts not yet prefilled, are dropped.
        A request that cannot run (`prompt_problem`) raises ValueError when it is reached."""
        window = ADMISSION_WINDOW_BATCHES * self.max_batch_size
        return self._run(shortest_first_in_windows(iter(requests), window),
                         should_stop or (lambda: False))

    @torch.inference_mode()  # entered at each resumption of the generator
    def _run(self, pending: Iterator[Request],
             should_stop: Callable[[], bool]) -> Iterator[Completion]:
        active: list[Sequence] = []  # active[i] holds row i
        queued: list[list[Request]] = []  # admitted, in prefill groups, not yet prefilled
        waiting: list[Request] = []  # preempted or not yet fitting, taken before `pending`
        first = True
        while True:
            # Admit requests into the free rows, as far as free blocks allow.
            admitted = self._admit(waiting, pending, active, queued)
            self.stats.refills += 0 if first else len(admitted)
            first = False
            queued += prefill_groups(admitted)
            if not (active or queued) or should_stop():
                return
            # Blocks for each decoding sequence's next token, preempting the newest if need be.
            self._make_room(active, waiting)
            # One forward pass: decode the active sequences, prefill the groups taken.
            groups = self._start_groups(take_prefill_groups(queued, PREFILL_TOKENS), len(active),
                                        waiting)
            tokens, logprobs, tops = self._step(active, groups)
            active += itertools.chain.from_iterable(groups)
            self._note_peaks(len(active))
            # Each sequence takes its token; the finished leave.
            for seq, token, logprob, top in zip(active, tokens, logprobs, tops):
                seq.append(token, logprob, self.stop_ids, top)
            yield from self._retire(active)

    def _admit(self, waiting: list[Request], pending: Iterator[Request],
               active: list[Sequence], queued: list[list[Request]]) -> list[Request]:
        """Requests to start, `waiting` ones first: while a row is free and the free blocks,
        less those the queued prompts will take and a reserve for the decoding sequences to
        grow into, hold the next one's prompt and first token."""
        rows = self.max_batch_size - len(active) - sum(map(len, queued))
        size = self.blocks.block_size
        spare = (self.blocks.free_blocks - self._reserve
                 - sum(blocks_for(len(r.prompt_tokens) + 1, size) for g in queued for r in g))
        admitted = []
        while len(admitted) < rows:
            if not waiting:
                request = next(pending, None)
                if request is None:
                    break
                waiting.append(checked(request, self.max_seq_len))
            need = blocks_for(len(waiting[0].prompt_tokens) + 1, size)
            if need > spare and (active or admitted or queued):
                break
            spare -= need
            admitted.append(waiting.pop(0))
        return admitted

    def _make_room(self, active: list[Sequence], waiting: list[Request]) -> None:
        """Blocks for every active sequence's next position. When too few are free, the newest
        sequences are preempted: their blocks freed, their requests put back to run again
        from the start (the same tokens: each draw depends only on its request)."""
        size = self.blocks.block_size
        short = [seq for row, seq in enumerate(active)
                 if seq.position + 1 > self.blocks.held(row) * size]
        for seq in sorted(short, key=lambda s: s.admitted):
            while seq in active and not self.blocks.extend(active.index(seq), seq.position + 1):
                self._preempt(active, max(active, key=lambda s: s.admitted), waiting)

    def _preempt(self, active: list[Sequence], seq: Sequence, waiting: list[Request]) -> None:
        row = active.index(seq)
        self.blocks.release(row)
        self._move(len(active) - 1, row, active[-1].position)
        active[row] = active[-1]
        active.pop()
        waiting.insert(0, seq.request)
        self.stats.preempted += 1

    def _note_peaks(self, running: int) -> None:
        stats = self.stats
        stats.peak_running = max(stats.peak_running, running)
        stats.peak_kv_tokens = max(stats.peak_kv_tokens,
                                   self.blocks.held_blocks * self.blocks.block_size)

    def _start_groups(self, groups: list[list[Request]], slot: int,
                      waiting: list[Request]) -> list[list[Sequence]]:
        """The groups' sequences, in rows slot, slot + 1, ..., as far as free blocks hold their
        prompts; the groups that do not fit go back to the front of `waiting`."""
        started: list[list[Sequence]] = []
        for i, group in enumerate(groups):
            size = self.blocks.block_size
            if sum(blocks_for(len(r.prompt_tokens) + 1, size) for r in group) > \
                    self.blocks.free_blocks:  # decoding sequences took the blocks since
                waiting[:0] = itertools.chain.from_iterable(groups[i:])
                break
            started.append([self._start(request, slot + j) for j, request in enumerate(group)])
            slot += len(group)
        for seq in itertools.chain.from_iterable(started):
            seq.admitted = next(self._admitted)
        return started

    def _step(self, active: list[Sequence], groups: list[list[Sequence]]
              ) -> tuple[list[int], list[float | None], list[list[tuple[int, float]] | None]]:
        """One forward pass that decodes the active sequences (slots 0..n-1) and prefills the
        groups' prompts into the next slots, then a token for each sequence, old and new in that
        order, with its logprob and top alternatives (None where not wanted)."""
        self.blocks.flush()  # the step's table changes reach the device before its passes
        slot = len(active)
        prefills = []
        for group in groups:
            prefills.append(self._prefill_step(group, slot))
            slot += len(group)
        logits = self._forward([s.position + 1 for s in active], prefills)
        return self._sample(active + list(itertools.chain.from_iterable(groups)), logits)

    def _prefill_step(self, group: list[Sequence], slot: int) -> tuple[Step, torch.Tensor]:
        """The step and tokens that prefill the group's prompts, right-padded, into slots
        slot, slot + 1, ...; its outputs are each prompt's last token. A prompt longer than a
        pass allows (`prefill_chunk`) is alone in its group: its first chunks go through passes
        of their own here, and the step is its last chunk."""
        prompts = [seq.request.prompt_tokens for seq in group]
        n, longest = len(prompts), max(map(len, prompts))
        if longest > PREFILL_TOKENS:
            return self._chunked_prefill(prompts[0], slot)
        tokens = torch.tensor([p + [0] * (longest - len(p)) for p in prompts], device=self.device)
        positions = torch.arange(longest, device=self.device).expand(n, longest)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        step = self.model.make_step(positions, slice(slot, slot + n), longest, fresh=True,
                                    last=last, table=self.blocks.rows(slot, slot + n))
        self._position[slot:slot + n] = last + 1
        self.stats.prefills += n
        return step, tokens.view(-1)

    def _chunked_prefill(self, prompt: list[int], slot: int) -> tuple[Step, torch.Tensor]:
        table = self.blocks.rows(slot, slot + 1)
        chunk = prefill_chunk(len(prompt), masked=table is None or self.model.paged_reads != "flex")
        tokens = torch.tensor(prompt, device=self.device)
        starts = range(0, len(prompt), chunk)
        for start in starts:
            stop = min(start + chunk, len(prompt))
            step = self.model.make_step(torch.arange(start, stop, device=self.device)[None],
                                        slice(slot, slot + 1), stop, fresh=start == 0,
                                        table=table)
            if stop == len(prompt):
                break
            self._timed(self.model.final_hidden, tokens[start:stop], step)  # fills the cache
        self._position[slot] = len(prompt)
        self.stats.prefills += 1
        return step, tokens[start:]

    def _forward(self, kv_lens: list[int],
                 prefills: list[tuple[Step, torch.Tensor]]) -> torch.Tensor:
        """Logits (rows, vocab): one row per decoding slot 0..n-1 (slot i reads kv_lens[i]
        cache positions), then one per prefilled prompt. Both share one pass, except that with
        `compile` the decode rows take the compiled step."""
        n = len(kv_lens)
        steps = [step for step, _ in prefills]
        tokens = [group_tokens for _, group_tokens in prefills]
        parts = []
        if n:
            self.stats.decode_steps += 1
            self.stats.slot_steps += n
        if n and self._compiled_decode is not None:
            parts.append(self._decode_compiled(n, max(kv_lens)))
        elif n:
            chunks = (attention_chunks(kv_lens, CPU_ATTENTION_CHUNK)
                      if self.device.type == "cpu" else None)
            steps.insert(0, self.model.make_step(self._position[:n, None], slice(0, n),
                                                 max(kv_lens), chunks=chunks,
                                                 table=self.blocks.rows(0, n)))
            tokens.insert(0, self._next_token[:n])
        if steps:
            parts.append(self._timed(self.model, torch.cat(tokens) if len(tokens) > 1
                                     else tokens[0], Step.join(steps)))
        if n:
            self._position[:n] += 1
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor
                ) -> tuple[list[int], list[float | None], list[list[tuple[int, float]] | None]]:
        """Tokens for slots 0..n-1 from their logits rows, with the detail they want."""
        tokens = self._draw(seqs, logits)
        self._count(tokens)
        self._next_token[:len(seqs)] = tokens
        return self._detail(seqs, logits, tokens)

    def _decode_compiled(self, n: int, kv_len: int) -> torch.Tensor:
        """Logits (n, vocab) of the compiled decode step for rows 0..n-1. It always spans every
        row (padding rows, at position 0, count as wasted; in a paged cache they write to the
        sink), and its reads of an unpaged cache are rounded up to `decode_kv_bucket`, so a few
        shapes serve the whole run (one with flex attention, which reads by block mask)."""
        tokens, positions = self._next_token[:n], self._position[:n]
        padding = self.max_batch_size - n
        if padding:
            tokens = torch.cat((tokens, tokens.new_zeros(padding)))
            positions = torch.cat((positions, positions.new_zeros(padding)))
        self.stats.slot_steps += padding
        self.stats.wasted_slot_steps += padding
        table = self.blocks.rows(0, self.max_batch_size)
        if table is not None and self.model.paged_reads == "flex":
            kv_len = self.max_seq_len  # unused: flex's block mask bounds each row's reads
        else:
            kv_len = decode_kv_bucket(kv_len, self.max_seq_len)
        blocks = () if table is None else (table.blocks, table.place)
        torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
        try:
            return self._timed(self._compiled_decode, tokens, positions, kv_len, *blocks)[:n]
        except Exception as e:
            from torch._dynamo.exc import TorchDynamoException  # loaded by compiling already
            if not isinstance(e, TorchDynamoException):
                raise
            # The compiler failed, e.g. no C++ compiler for inductor's CPU kernels.
            cause = getattr(e, "inner_exception", None) or e
            reason = next((line for line in str(cause).splitlines() if line.strip()),
                          type(cause).__name__)
            log.debug("torch.compile failed", exc_info=True)
            raise UserError(f"--compile: torch.compile failed ({reason}); run without "
                            "--compile") from None

    def _retire(self, active: list[Sequence]) -> Iterator[Completion]:
        """Completions of the finished sequences; the last active sequence fills each gap."""
        for slot in reversed(range(len(active))):
            if active[slot].finish_reason:
                yield active[slot].completion()
                self.blocks.release(slot)
                self._move(len(active) - 1, slot, active[-1].position)
                active[slot] = active[-1]
                active.pop()

    def _move(self, src: int, dst: int, length: int) -> None:
        """Move row src's sequence into row dst (which holds no blocks): its blocks, or in an
        unpaged cache its first `length` cache positions, and its decoding state."""
        if src == dst:
            return
        for state in self._slot_state:
            state[dst] = state[src]
        self.blocks.move(src, dst)
        if not self.blocks.moves_data:
            return
        for layer in self.model.layers:
            cache = layer.attention.cache
            for t in (cache.k, cache.v):
                slots = cache.slots(t)
                slots[dst, :, :length].copy_(slots[src, :, :length])


# A compiled decode step reads an unpaged cache up to this many positions times a power of two:
# a few shapes to compile and capture (log2 of max_seq_len / 256 + 1 at most), at the cost of
# reading up to half of them masked.
DECODE_KV_BUCKET = 256


def decode_kv_bucket(kv_len: int, max_seq_len: int) -> int:
    """The cache length a compiled decode step reads for contexts up to kv_len."""
    bucket = DECODE_KV_BUCKET
    while bucket < kv_len:
        bucket *= 2
    return min(bucket, max_seq_len)


def compile_decode(model: Transformer) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """`model.decode` compiled whole (`torch.compile`, no graph breaks allowed); on CUDA
    replayed as CUDA graphs, one launch per step instead of several per layer, one graph per
    cache length. The first call compiles for its shapes, a second cache length recompiles with
    the length symbolic, and reading the whole cache may compile once more. The KV cache, a
    tensor attribute of the model's modules, is taken to keep its address, so its in-place
    writes do not stop CUDA graphs."""
    mode = "reduce-overhead" if model.output.weight.device.type == "cuda" else None
    return torch.compile(model.decode, mode=mode, fullgraph=True)


# The continuous scheduler admits requests shortest prompt first within windows of this many
# batches. Sequences decoding side by side then have similar contexts, so attention chunks read
# less padding, and prompts admitted together are prefilled in fuller passes (measured in
# docs/benchmarks.md).
ADMISSION_WINDOW_BATCHES = 8


def shortest_first_in_windows(requests: Iterator[Request], window: int) -> Iterator[Request]:
    """The requests, read `window` at a time, each window sorted by prompt length (stable)."""
    while batch := list(itertools.islice(requests, window)):
        yield from sorted(batch, key=lambda r: len(r.prompt_tokens))


# Rows per decode attention call on the CPU. A call reads the cache up to the longest context
# in its rows, so smaller chunks read less but cost more calls; 8 was the best trade-off at the
# benchmark's 32 slots (docs/benchmarks.md).
CPU_ATTENTION_CHUNK = 8


def attention_chunks(kv_lens: list[int], rows: int) -> tuple[tuple[int, int, int], ...] | None:
    """(start, stop, kv_len) for consecutive runs of `rows` rows; None when one run covers all."""
    if len(kv_lens) <= rows:
        return None
    return tuple((a, min(a + rows, len(kv_lens)), max(kv_lens[a:a + rows]))
                 for a in range(0, len(kv_lens), rows))


PREFILL_PADDING = 1.25  # padded tokens / real tokens a batched prefill may reach
# Most prompt tokens (padding included) prefilled in one forward pass: a group of shorter
# prompts, or a chunk of a longer prompt. It bounds a pass's hidden states whatever the batch
# size and prompt length.
PREFILL_TOKENS = 4096
# Most elements of the attention mask a chunk of a long prompt may build where reads need one
# (an unpaged cache, or gathered blocks): queries x keys, 128 MiB of float32.
PREFILL_MASK_ELEMENTS = 2 ** 25


def prefill_chunk(n_tokens: int, masked: bool) -> int:
    """Tokens per pass when a prompt of n_tokens is prefilled in chunks: PREFILL_TOKENS, or
    fewer where each chunk's mask (its tokens x up to n_tokens keys) would pass its bound."""
    if not masked:
        return PREFILL_TOKENS
    return max(1, min(PREFILL_TOKENS, PREFILL_MASK_ELEMENTS // n_tokens))


def prefill_groups(requests: list[Request]) -> list[list[Request]]:
    """Requests to prefill together: similar lengths (shortest first), so padding stays small."""
    groups: list[list[Request]] = []
    for request in sorted(requests, key=lambda r: len(r.prompt_tokens)):
        n = len(request.prompt_tokens)  # the longest so far: the group pads to it
        group = groups[-1] if groups else []
        real = sum(len(r.prompt_tokens) for r in group) + n
        padded = n * (len(group) + 1)
        if group and padded <= PREFILL_PADDING * real and padded <= PREFILL_TOKENS:
            group.append(request)
        else:
            groups.append([request])
    return groups


def take_prefill_groups(queued: list[list[Request]], budget: int) -> list[list[Request]]:
    """Remove and return groups from the front of `queued` while their padded tokens stay
    within `budget` (the first one whatever its size)."""
    taken, tokens = 0, 0
    while taken < len(queued):
        group = queued[taken]
        tokens += len(group) * max(len(r.prompt_tokens) for r in group)
        if taken and tokens > budget:
            break
        taken += 1
    groups = queued[:taken]
    del queued[:taken]
    return groups
