"""Generation over a fixed set of KV-cache slots: prefill each prompt, decode all slots together.

Slots are kept contiguous (0..n-1), so a decode step reads the cache as a plain view: a finished
sequence's slot takes the next prompt, or else the last active sequence moves into it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .model import Transformer
from .sampling import counter_uniform, sample, token_logprobs


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


class Engine:
    def __init__(self, model: Transformer, stop_ids: Iterable[int], max_batch_size: int,
                 max_seq_len: int):
        self.model = model
        self.device = model.output.weight.device
        self.stop_ids = frozenset(stop_ids)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        model.setup_cache(max_batch_size, max_seq_len)

    def check(self, request: Request) -> str | None:
        """Why the request cannot run, or None."""
        return prompt_problem(len(request.prompt_tokens), self.max_seq_len)

    @torch.inference_mode()
    def generate(self, requests: Iterable[Request],
                 should_stop: Callable[[], bool] | None = None) -> Iterator[Completion]:
        """Completions in the order they finish; all model-parallel ranks must pass the same
        requests in the same order. `should_stop` is asked before every decode step; when it
        says yes, unfinished sequences are dropped."""
        pending = iter(requests)
        active: list[_Sequence] = []
        exhausted = False
        while True:
            while not exhausted and len(active) < self.max_batch_size:
                request = next(pending, None)
                if request is None:
                    exhausted = True
                elif (problem := self.check(request)) is not None:
                    yield Completion(request, [], None, "error", len(request.prompt_tokens),
                                     problem)
                else:
                    seq = self._prefill(request, slot=len(active))
                    if seq.finish_reason:
                        yield seq.completion()
                    else:
                        active.append(seq)
            if not active or (should_stop is not None and should_stop()):
                return
            self._decode(active)
            for slot in reversed(range(len(active))):
                if active[slot].finish_reason:
                    yield active[slot].completion()
                    self._move(len(active) - 1, slot, active[-1].position)
                    active[slot] = active[-1]
                    active.pop()

    def _prefill(self, request: Request, slot: int) -> _Sequence:
        params, prompt = request.params, request.prompt_tokens
        budget = self.max_seq_len - len(prompt)
        if params.max_gen_len is not None:
            budget = min(budget, params.max_gen_len)
        seq = _Sequence(request, budget)
        tokens = torch.tensor([prompt], device=self.device)
        positions = torch.arange(len(prompt), device=self.device).unsqueeze(0)
        want_prompt_logprobs = params.echo and params.logprobs
        step = self.model.make_step(positions, slice(slot, slot + 1), kv_len=len(prompt))
        logits = self.model(tokens, step, all_logits=want_prompt_logprobs)
        if want_prompt_logprobs:
            seq.logprobs = [None] + token_logprobs(logits[0, :-1], tokens[0, 1:]).tolist()
            logits = logits[:, -1]
        if budget <= 0:
            seq.finish_reason = "length"
            return seq
        self._sample_and_append([seq], logits)
        return seq

    def _decode(self, active: list[_Sequence]) -> None:
        tokens = torch.tensor([[s.generated[-1]] for s in active], device=self.device)
        positions = torch.tensor([[s.position] for s in active], device=self.device)
        kv_len = max(s.position for s in active) + 1
        step = self.model.make_step(positions, slice(0, len(active)), kv_len)
        self._sample_and_append(active, self.model(tokens, step))

    def _sample_and_append(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        params = [s.request.params for s in seqs]
        temperature = torch.tensor([p.temperature for p in params], device=self.device)
        top_p = torch.tensor([p.top_p for p in params], device=self.device)
        seeds = torch.tensor([p.seed for p in params], device=self.device, dtype=torch.long)
        counters = torch.tensor([len(s.generated) for s in seqs], device=self.device)
        next_tokens = sample(logits, temperature, top_p, counter_uniform(seeds, counters))
        logprobs = token_logprobs(logits, next_tokens).tolist() if any(p.logprobs for p in params) \
            else None
        for i, (seq, token) in enumerate(zip(seqs, next_tokens.tolist())):
            if token in self.stop_ids:
                seq.finish_reason = "stop"
                continue
            seq.generated.append(token)
            if logprobs is not None:
                seq.logprobs.append(logprobs[i])
            if len(seq.generated) >= seq.budget:
                seq.finish_reason = "length"

    def _move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cache positions of slot src into slot dst."""
        if src == dst:
            return
        for block in self.model.layers:
            cache = block.attention.cache
            cache.k[dst, :, :length].copy_(cache.k[src, :, :length])
            cache.v[dst, :, :length].copy_(cache.v[src, :, :length])
