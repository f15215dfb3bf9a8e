"""Generation over a fixed set of KV-cache slots: prefill each prompt, decode all slots together.

Two schedulers share the slots. "continuous": a finished sequence's slot takes the next prompt at
once, or else the last active sequence moves into it, so active slots stay contiguous (0..n-1)
and a decode step reads the cache as a plain view. New prompts are prefilled in the same forward
pass as the decoding slots, so the layers' weights are read once for both. "static": Meta's
reference loop, kept as the baseline to measure against: a batch starts together at its shortest
prompt, longer prompts are fed one forced token per step, and every row steps until the whole
batch is done.

With `compile`, decode steps run through a compiled copy of the model at fixed shapes (CUDA
graphs on GPUs); prefills then take an eager pass of their own.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .errors import UserError
from .model import Step, Transformer
from .sampling import argmax, counter_uniform, sample, token_logprobs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.6
    top_p: float = 0.9
    max_gen_len: int | None = None  # None: until a stop token or the end of the context
    seed: int = 0
    logprobs: bool = False
    echo: bool = False  # return the prompt's tokens (and logprobs) before the completion's


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
    finish_reason: Literal["stop", "length", "error"]
    prompt_tokens: int
    error: str | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens) - (self.prompt_tokens if self.request.params.echo else 0)


@dataclass
class _Sequence:
    request: Request
    budget: int  # how many tokens it may still generate
    slot: int = 0  # its KV-cache slot (continuous scheduler)
    generated: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    finish_reason: Literal["stop", "length"] | None = None

    @property
    def position(self) -> int:
        """Where the last sampled token goes in the cache."""
        return len(self.request.prompt_tokens) + len(self.generated) - 1

    def completion(self) -> Completion:
        req = self.request
        tokens = (req.prompt_tokens + self.generated) if req.params.echo else self.generated
        return Completion(req, list(tokens), self.logprobs if req.params.logprobs else None,
                          self.finish_reason or "length", len(req.prompt_tokens))


def prompt_problem(n_tokens: int, max_seq_len: int) -> str | None:
    """Why a prompt of n_tokens cannot be generated from, or None: at least one token must fit."""
    if n_tokens == 0:
        return "the prompt has no tokens"
    if n_tokens > max_seq_len - 1:
        return (f"the prompt has {n_tokens} tokens; --max_seq_len {max_seq_len} allows at most "
                f"{max_seq_len - 1}: shorten the prompt or raise --max_seq_len")
    return None


@dataclass
class EngineStats:
    """Counters of what the engine did, for benchmarks and tests (not timings of record)."""

    prefills: int = 0  # prompts prefilled
    prefill_tokens: int = 0  # tokens through prefill forward passes (padding included)
    decode_steps: int = 0  # decode forward passes
    slot_steps: int = 0  # rows computed by decode passes
    wasted_slot_steps: int = 0  # rows computed for sequences that had already finished
    refills: int = 0  # prompts admitted into a slot that a finished sequence left
    forward_seconds: float = 0.0  # wall time inside model forward passes

    @property
    def wasted_share(self) -> float:
        return self.wasted_slot_steps / max(self.slot_steps, 1)


class Engine:
    def __init__(self, model: Transformer, stop_ids: Iterable[int], max_batch_size: int,
                 max_seq_len: int, scheduler: Literal["continuous", "static"] = "continuous",
                 compile: bool = False):
        if scheduler not in ("continuous", "static"):
            raise ValueError(f"unknown scheduler {scheduler!r}")
        self.model = model
        self.device = model.output.weight.device
        self.stop_ids = frozenset(stop_ids)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.scheduler = scheduler
        self.stats = EngineStats()
        model.setup_cache(max_batch_size, max_seq_len)
        # Per-slot decoding state, kept on the device so a decode step copies nothing in.
        zeros = lambda dtype: torch.zeros(max_batch_size, device=self.device, dtype=dtype)  # noqa: E731
        self._next_token = zeros(torch.long)  # the last sampled token, input of the next step
        self._position = zeros(torch.long)  # where that token goes in the cache
        self._counter = zeros(torch.long)  # index of the token to draw next (the RNG counter)
        self._seed = zeros(torch.long)
        self._temperature = zeros(torch.float32)
        self._top_p = zeros(torch.float32)
        self._slot_state = (self._next_token, self._position, self._counter, self._seed,
                            self._temperature, self._top_p)
        self._compiled_decode = compile_decode(model) if compile else None

    def check(self, request: Request) -> str | None:
        """Why the request cannot run, or None."""
        return prompt_problem(len(request.prompt_tokens), self.max_seq_len)

    def generate(self, requests: Iterable[Request],
                 should_stop: Callable[[], bool] | None = None) -> Iterator[Completion]:
        """Completions in the order they finish; all model-parallel ranks must pass the same
        requests in the same order. `should_stop` is asked before every forward pass; when it
        says yes, unfinished sequences, and admitted prompts not yet prefilled, are dropped."""
        should_stop = should_stop or (lambda: False)
        if self.scheduler == "static":
            return self._static(iter(requests), should_stop)
        window = ADMISSION_WINDOW_BATCHES * self.max_batch_size
        return self._continuous(shortest_first_in_windows(iter(requests), window), should_stop)

    @torch.inference_mode()  # entered at each resumption of the generator
    def _continuous(self, pending: Iterator[Request],
                    should_stop: Callable[[], bool]) -> Iterator[Completion]:
        active: list[_Sequence] = []  # active[i] holds cache slot i
        queued: list[list[Request]] = []  # admitted, in prefill groups, not yet prefilled
        exhausted = started = False
        while True:
            admitted = []
            free = self.max_batch_size - len(active) - sum(map(len, queued))
            while not exhausted and len(admitted) < free:
                request = next(pending, None)
                if request is None:
                    exhausted = True
                elif (problem := self.check(request)) is not None:
                    yield _error(request, problem)
                else:
                    admitted.append(request)
            self.stats.refills += len(admitted) if started else 0
            started = True
            queued += prefill_groups(admitted)
            if not (active or queued) or should_stop():
                return
            self._step(active, take_prefill_groups(queued, PREFILL_TOKENS))
            for slot in reversed(range(len(active))):  # keep slots contiguous: fill the gap
                if active[slot].finish_reason:
                    yield active[slot].completion()
                    self._move(len(active) - 1, slot, active[-1].position)
                    active[-1].slot = slot
                    active[slot] = active[-1]
                    active.pop()

    @torch.inference_mode()
    def _static(self, pending: Iterator[Request],
                should_stop: Callable[[], bool]) -> Iterator[Completion]:
        while True:
            batch: list[_Sequence] = []
            while len(batch) < self.max_batch_size and (request := next(pending, None)):
                if (problem := self.check(request)) is not None:
                    yield _error(request, problem)
                else:
                    batch.append(_Sequence(request, self._budget(request)))
            if not batch:
                return
            stopped = yield from self._static_batch(batch, should_stop)
            if stopped:
                return

    def _budget(self, request: Request) -> int:
        budget = self.max_seq_len - len(request.prompt_tokens)
        max_gen_len = request.params.max_gen_len
        return budget if max_gen_len is None else min(budget, max_gen_len)

    def _set_slot(self, slot: int, seq: _Sequence) -> None:
        p = seq.request.params
        self._seed[slot] = p.seed
        self._temperature[slot] = p.temperature
        self._top_p[slot] = p.top_p
        self._counter[slot] = 0

    def _timed(self, compute: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        start = time.perf_counter()
        out = compute(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats.forward_seconds += time.perf_counter() - start
        return out

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, rows: slice, kv_len: int,
                 all_logits: bool = False, fresh: bool = False) -> torch.Tensor:
        step = self.model.make_step(positions, rows, kv_len, fresh)
        return self._timed(self.model, tokens, step, all_logits)

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor,
                kv_len: int) -> torch.Tensor:
        """Logits (n, vocab) of a decode step alone for slots 0..n-1, whose next tokens and
        positions are `tokens` and `positions` (n each), reading `kv_len` cache positions.
        The compiled step always spans every slot (padding rows, at position 0, count as
        wasted), and its cache reads are rounded up to a multiple of DECODE_KV_BUCKET, so a few
        shapes serve the whole run."""
        if self._compiled_decode is None:
            return self._timed(self.model.decode, tokens, positions, kv_len)
        n, slots = len(tokens), self.max_batch_size
        if n < slots:
            tokens = torch.cat((tokens, tokens.new_zeros(slots - n)))
            positions = torch.cat((positions, positions.new_zeros(slots - n)))
        self.stats.slot_steps += slots - n
        self.stats.wasted_slot_steps += slots - n
        kv_len = min(self.max_seq_len, -(-kv_len // DECODE_KV_BUCKET) * DECODE_KV_BUCKET)
        torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
        try:
            return self._timed(self._compiled_decode, tokens, positions, kv_len)[:n]
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

    def _prefill_step(self, group: list[Request],
                      slot: int) -> tuple[list[_Sequence], Step, torch.Tensor]:
        """The group's sequences in slots slot, slot+1..., and the step and tokens that prefill
        their prompts, right-padded, in one segment. Its outputs are each prompt's last token, or
        every token for a prompt that wants its logprobs (such a prompt goes alone)."""
        seqs = [_Sequence(request, self._budget(request), slot + i)
                for i, request in enumerate(group)]
        for seq in seqs:
            self._set_slot(seq.slot, seq)
        lengths = [len(r.prompt_tokens) for r in group]
        n, longest = len(group), max(lengths)
        tokens = torch.tensor([r.prompt_tokens + [0] * (longest - len(r.prompt_tokens))
                               for r in group], device=self.device)
        positions = torch.arange(longest, device=self.device).expand(n, longest)
        last = torch.tensor(lengths, device=self.device) - 1
        every_token = wants_prompt_logprobs(group[0])  # prefill_groups: such a prompt is alone
        step = self.model.make_step(positions, slice(slot, slot + n), longest, fresh=True,
                                    last=last, every_token=every_token)
        self._position[slot:slot + n] = last + 1
        self.stats.prefills += n
        self.stats.prefill_tokens += n * longest
        return seqs, step, tokens.view(-1)

    def _step(self, active: list[_Sequence], groups: list[list[Request]]) -> None:
        """One forward pass that decodes the active sequences (slots 0..n-1) and prefills the
        groups' prompts into the next slots, then one output-head pass (with `compile`: the
        compiled decode step, then the prefills' pass); every sequence, old and new, gets a
        token. The new sequences are appended to `active`."""
        n = len(active)
        steps, tokens = [], []
        decode_logits = None
        if n:
            self.stats.decode_steps += 1
            self.stats.slot_steps += n
            kv_lens = [s.position + 1 for s in active]
        if n and self._compiled_decode is not None:  # a pass of its own, at fixed shapes
            decode_logits = self._decode(self._next_token[:n], self._position[:n], max(kv_lens))
        elif n:
            chunks = (attention_chunks(kv_lens, CPU_ATTENTION_CHUNK)
                      if self.device.type == "cpu" else None)
            steps.append(self.model.make_step(self._position[:n, None], slice(0, n),
                                              max(kv_lens), chunks=chunks))
            tokens.append(self._next_token[:n])
        # The head's output has a row per step output: one per sequence, or every position of
        # a prompt that wants its logprobs (its last row then samples its first token).
        sample_rows, out_rows = list(range(n)), n
        prompt_logprobs = []  # (sequence, its prompt's first output row, its prompt)
        for group in groups:
            seqs, step, group_tokens = self._prefill_step(group, slot=len(active))
            if wants_prompt_logprobs(group[0]):
                prompt_logprobs.append((seqs[0], out_rows, group_tokens))
            out_rows += len(step.outputs)
            sample_rows += range(out_rows - len(seqs), out_rows)
            active += seqs
            steps.append(step)
            tokens.append(group_tokens)
        if steps:
            logits = self._timed(self.model, torch.cat(tokens) if len(tokens) > 1 else tokens[0],
                                 Step.join(steps))
            if decode_logits is not None:
                logits = torch.cat((decode_logits, logits))
        else:
            logits = decode_logits
        if n:
            self._position[:n] += 1
        for seq, row, prompt in prompt_logprobs:
            forced = logits[row:row + len(prompt) - 1].contiguous()  # see _sample_and_append
            seq.logprobs = [None] + token_logprobs(forced, prompt[1:]).tolist()
        if prompt_logprobs:
            logits = logits[torch.tensor(sample_rows, device=self.device)]
        self._sample_and_append(active, slice(0, len(active)), logits)

    def _draw(self, seqs: list[_Sequence], rows: slice, logits: torch.Tensor) -> torch.Tensor:
        """Next tokens for `rows` (one per seq), each from its own (seed, counter) stream."""
        if all(s.request.params.temperature == 0 for s in seqs):
            tokens = argmax(logits)
        else:
            uniform = counter_uniform(self._seed[rows], self._counter[rows])
            tokens = sample(logits, self._temperature[rows], self._top_p[rows], uniform)
        self._counter[rows] += 1
        return tokens

    def _sample_and_append(self, seqs: list[_Sequence], rows: slice, logits: torch.Tensor) -> None:
        want_logprobs = any(s.request.params.logprobs for s in seqs)
        if want_logprobs or any(s.request.params.temperature != 0 for s in seqs):
            # A CPU head without a packed weight (`kernels.linear`) returns a transposed view:
            # argmax reads it fast, but softmax on it is several times slower than a copy and a
            # softmax (6.1 ms vs 0.8 + 1.1 at 32 x 32000).
            logits = logits.contiguous()
        next_tokens = self._draw(seqs, rows, logits)
        self._next_token[rows] = next_tokens
        logprobs = token_logprobs(logits, next_tokens).tolist() if want_logprobs else None
        for i, (seq, token) in enumerate(zip(seqs, next_tokens.tolist())):
            self._append(seq, token, logprobs[i] if logprobs is not None else None)

    def _append(self, seq: _Sequence, token: int, logprob: float | None) -> None:
        if len(seq.generated) >= seq.budget:  # max_gen_len 0: the prompt alone
            seq.finish_reason = "length"
            return
        if token in self.stop_ids:
            seq.finish_reason = "stop"
            return
        seq.generated.append(token)
        if seq.request.params.logprobs:
            seq.logprobs.append(logprob)
        if len(seq.generated) >= seq.budget:
            seq.finish_reason = "length"

    def _move(self, src: int, dst: int, length: int) -> None:
        """Move slot src's sequence into slot dst: its first `length` cache positions and its
        decoding state."""
        if src == dst:
            return
        for block in self.model.layers:
            cache = block.attention.cache
            cache.k[dst, :, :length].copy_(cache.k[src, :, :length])
            cache.v[dst, :, :length].copy_(cache.v[src, :, :length])
        for state in self._slot_state:
            state[dst] = state[src]

    def _static_batch(self, batch: list[_Sequence], should_stop: Callable[[], bool]):
        """Meta's reference loop over one batch; returns True if stopped early."""
        n = len(batch)
        rows = slice(0, n)
        prompts = [s.request.prompt_tokens for s in batch]
        shortest = min(map(len, prompts))
        end = min(self.max_seq_len, max(len(p) + s.budget for p, s in zip(prompts, batch)))
        for slot, seq in enumerate(batch):
            self._set_slot(slot, seq)
            if wants_prompt_logprobs(seq.request):
                seq.logprobs = [None]
        tokens = torch.tensor([p[:shortest] for p in prompts], device=self.device)
        positions = torch.arange(shortest, device=self.device).expand(n, shortest)
        echo_lp = any(wants_prompt_logprobs(s.request) for s in batch)
        logits = self._forward(tokens, positions, rows, shortest, all_logits=echo_lp, fresh=True)
        self.stats.prefills += n
        self.stats.prefill_tokens += n * shortest
        if echo_lp:
            prompt_lp = token_logprobs(logits[:, :-1], tokens[:, 1:]).tolist()
            for seq, lps in zip(batch, prompt_lp):
                if wants_prompt_logprobs(seq.request):
                    seq.logprobs += lps
            logits = logits[:, -1]
        for s in batch:
            if s.budget <= 0:
                s.finish_reason = "length"
        for pos in range(shortest, end):  # choose the token at `pos` for every row
            forced = [pos < len(p) for p in prompts]
            drawn = self._draw(batch, rows, logits).tolist()
            self._counter[rows] -= torch.tensor(forced, device=self.device, dtype=torch.long)
            chosen = [p[pos] if f else t for p, f, t in zip(prompts, forced, drawn)]
            chosen_t = torch.tensor(chosen, device=self.device)
            want_logprobs = any(s.request.params.logprobs for s in batch)
            lps = token_logprobs(logits, chosen_t).tolist() if want_logprobs else [None] * n
            for seq, f, token, lp in zip(batch, forced, chosen, lps):
                if seq.finish_reason:
                    continue
                if not f:
                    self._append(seq, token, lp)
                elif wants_prompt_logprobs(seq.request):
                    seq.logprobs.append(lp)
            if all(s.finish_reason for s in batch) or pos == end - 1:
                break
            if should_stop():
                return True
            self.stats.decode_steps += 1
            self.stats.slot_steps += n
            self.stats.wasted_slot_steps += sum(1 for s in batch if s.finish_reason)
            logits = self._decode(chosen_t, torch.full((n,), pos, device=self.device), pos + 1)
        for seq in batch:
            yield seq.completion()
        return False


# A compiled decode step reads the cache up to a multiple of this many positions: fewer shapes
# to compile and capture, at the cost of reading up to this many masked positions per slot.
DECODE_KV_BUCKET = 256


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
# less padding and prompts admitted together are prefilled in fuller passes: 2-8% on the
# benchmark's workload in alternating runs.
ADMISSION_WINDOW_BATCHES = 8


def shortest_first_in_windows(requests: Iterator[Request], window: int) -> Iterator[Request]:
    """The requests, read `window` at a time, each window sorted by prompt length (stable)."""
    while batch := list(itertools.islice(requests, window)):
        yield from sorted(batch, key=lambda r: len(r.prompt_tokens))


# Rows per decode attention call on the CPU. A call reads the cache up to the longest context
# in its rows, so smaller chunks read less but cost more calls. With 32 slots, on 128 of the
# benchmark's prompts, chunks of 8 were 8% (best of 3) to 14% (median) faster than one call, and
# chunks of 4 slower than 8.
CPU_ATTENTION_CHUNK = 8


def attention_chunks(kv_lens: list[int], rows: int) -> tuple[tuple[int, int, int], ...] | None:
    """(start, stop, kv_len) for consecutive runs of `rows` rows; None when one run covers all."""
    if len(kv_lens) <= rows:
        return None
    return tuple((a, min(a + rows, len(kv_lens)), max(kv_lens[a:a + rows]))
                 for a in range(0, len(kv_lens), rows))


PREFILL_PADDING = 1.25  # padded tokens / real tokens a batched prefill may reach
# Most prompt tokens (padding included) prefilled in one forward pass: a group of shorter
# prompts, or one longer prompt alone. It bounds a pass's hidden states whatever the batch size
# (a prompt that wants its logprobs adds its logits, length x vocabulary, on top).
PREFILL_TOKENS = 4096


def wants_prompt_logprobs(request: Request) -> bool:
    return request.params.echo and request.params.logprobs


def prefill_groups(requests: list[Request]) -> list[list[Request]]:
    """Requests to prefill together: similar lengths (shortest first), so padding stays small.
    A request that wants its prompt's logprobs goes alone (its logits for every position)."""
    alone = [[r] for r in requests if wants_prompt_logprobs(r)]
    groups: list[list[Request]] = []
    for request in sorted((r for r in requests if not wants_prompt_logprobs(r)),
                          key=lambda r: len(r.prompt_tokens)):
        n = len(request.prompt_tokens)  # the longest so far: the group pads to it
        group = groups[-1] if groups else []
        real = sum(len(r.prompt_tokens) for r in group) + n
        padded = n * (len(group) + 1)
        if group and padded <= PREFILL_PADDING * real and padded <= PREFILL_TOKENS:
            group.append(request)
        else:
            groups.append([request])
    return groups + alone


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


def _error(request: Request, problem: str) -> Completion:
    return Completion(request, [], None, "error", len(request.prompt_tokens), problem)
