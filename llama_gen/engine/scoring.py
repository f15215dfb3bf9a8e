"""Teacher-forced scoring (`llama-gen score`): the log-likelihood of texts under the model, on the
prefill path alone, batched.

The path of a request:
- `Scorer.score` reads the requests in windows, sorts each window by length and cuts it into
  groups of similar lengths (`score_groups`): each group is a right-padded rectangle of texts in
  consecutive cache slots.
- `plan_passes` lays the groups side by side into forward passes of at most PREFILL_TOKENS
  tokens (padding included) and `max_batch_size` rows, so the layers' weights are read once for
  all of them. A text too long for one pass is cut along its length into pieces that go through
  its slot's KV cache pass after pass, as `passes.prompt_logprobs` does for one prompt.
- A pass keeps the final hidden states of scored positions only and maps them to logits at most
  LOGPROB_ROWS rows at a time, so memory stays bounded: never a length x vocabulary tensor.

The schedule depends on the requests' lengths alone, so every model-parallel rank that is given
the same requests runs the same passes.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model.transformer import Step, Transformer
from . import limits
from .sampling import token_logprobs
from .scheduler import ADMISSION_WINDOW_BATCHES


@dataclass(frozen=True)
class ScoreRequest:
    """Score tokens[first_scored:], each given every token before it."""

    tokens: list[int]
    first_scored: int  # >= 1: the first token has no context to be scored in
    tag: Any = None  # the caller's handle, returned with the result

    def __post_init__(self):
        if self.first_scored < 1:
            raise ValueError(f"first_scored is {self.first_scored}; it must be at least 1")

    @property
    def input_length(self) -> int:
        """Tokens that go through the model: all but the last, whose successor is not scored."""
        return len(self.tokens) - 1


@dataclass
class Scored:
    """A request's result: one logprob per scored token."""

    request: ScoreRequest
    logprobs: list[float]  # log p(tokens[t] | tokens[:t]) for t = first_scored..n-1

    @property
    def total(self) -> float:
        """The log-likelihood of the scored tokens (their logprobs' sum)."""
        return math.fsum(self.logprobs)

    @property
    def n_tokens(self) -> int:
        return len(self.logprobs)

    @property
    def mean(self) -> float:
        return self.total / self.n_tokens


def has_scored_part(n_tokens: int, first_scored: int = 1) -> bool:
    """Whether a text of n_tokens has tokens from `first_scored` on to score."""
    return n_tokens > first_scored


def must_fit(request: ScoreRequest, max_seq_len: int) -> ScoreRequest:
    """The request, or ValueError if it cannot be scored (callers check `has_scored_part` and
    its length against the context first)."""
    n, first = len(request.tokens), request.first_scored
    if not has_scored_part(n, first):
        raise ValueError(f"a text of {n} tokens has nothing to score from token {first} on")
    if n > max_seq_len:
        raise ValueError(f"a text of {n} tokens does not fit a context of {max_seq_len}")
    return request


@dataclass
class Group:
    """Texts scored side by side, right-padded to the longest's input, in consecutive slots."""

    requests: list[ScoreRequest]
    logprobs: list[list[float]] = field(init=False)  # per request, so far

    def __post_init__(self):
        self.logprobs = [[] for _ in self.requests]

    @property
    def length(self) -> int:
        return max(r.input_length for r in self.requests)


@dataclass(frozen=True)
class GroupSlice:
    """Positions start..stop-1 of a group's rows, in cache slots slot, slot + 1, ... in one pass.
    A group's pieces run in consecutive passes, in order; the last finishes the group."""

    group: Group
    slot: int
    start: int
    stop: int

    @property
    def n_tokens(self) -> int:
        return len(self.group.requests) * (self.stop - self.start)

    @property
    def last(self) -> bool:
        return self.stop == self.group.length

    @property
    def real_tokens(self) -> int:
        return sum(min(self.stop, r.input_length) - self.start for r in self.group.requests)

    def scored(self, offset: int) -> tuple[list[int], list[int], list[int]]:
        """Laid out from token `offset` of its pass: the indices of the tokens whose logits score
        a token (positions from first_scored - 1, padding excluded), the tokens they score,
        and how many each row has."""
        indices, targets, counts = [], [], []
        for row, request in enumerate(self.group.requests):
            positions = range(max(self.start, request.first_scored - 1),
                              min(self.stop, request.input_length))
            first = offset + row * (self.stop - self.start) - self.start
            indices += [first + p for p in positions]
            targets += request.tokens[positions.start + 1:positions.stop + 1]
            counts.append(len(positions))
        return indices, targets, counts


# Padded tokens / real tokens a group may reach. Tighter than the engine's PREFILL_PADDING: groups
# share passes (Step.join), so a smaller group costs only an attention call per layer, while
# padding costs every layer's products (docs/benchmarks.md, "Scoring").
SCORE_PADDING = 1.05
# Rows of logits at a time, within limits.LOGPROB_ROWS: on the CPU the head and log-softmax took
# half the time per token at 256 rows x 32000 as at 512 (docs/benchmarks.md, "Scoring").
SCORE_LOGIT_ROWS = 256


def score_groups(requests: list[ScoreRequest], max_rows: int,
                 max_tokens: int) -> list[Group]:
    """Groups of similar lengths (shortest first): at most `max_rows` texts each, their padded
    tokens within SCORE_PADDING x their real ones and within `max_tokens`, unless a text alone
    exceeds it."""
    groups: list[list[ScoreRequest]] = []
    for request in sorted(requests, key=lambda r: r.input_length):
        n = request.input_length  # the longest so far: the group pads to it
        members = groups[-1] if groups else []
        real = sum(r.input_length for r in members) + n
        padded = n * (len(members) + 1)
        if (members and len(members) < max_rows and padded <= SCORE_PADDING * real
                and padded <= max_tokens):
            members.append(request)
        else:
            groups.append([request])
    return [Group(members) for members in groups]


def plan_passes(groups: list[Group], max_rows: int, max_tokens: int) -> list[list[GroupSlice]]:
    """Forward passes of whole groups side by side, each within `max_rows` slots and
    `max_tokens` padded tokens; a group longer than `max_tokens` is cut along its length into
    passes of its own (its pieces in slots from 0)."""
    passes: list[list[GroupSlice]] = []
    current: list[GroupSlice] = []
    rows = tokens = 0
    for group in groups:
        n, length = len(group.requests), group.length
        if n * length > max_tokens:
            assert n == 1, "a group of several texts fits one pass"  # score_groups' invariant
            passes += [[GroupSlice(group, 0, start, min(start + max_tokens, length))]
                       for start in range(0, length, max_tokens)]
            continue
        if current and (rows + n > max_rows or tokens + n * length > max_tokens):
            passes.append(current)
            current, rows, tokens = [], 0, 0
        current.append(GroupSlice(group, rows, 0, length))
        rows, tokens = rows + n, tokens + n * length
    return passes + [current] if current else passes


@dataclass
class ScorerStats:
    """Counters for benchmarks and tests (not timings of record)."""

    passes: int = 0
    tokens: int = 0  # real input tokens through the model
    padded_tokens: int = 0  # tokens computed, padding included

    @property
    def padding_share(self) -> float:
        return 1 - self.tokens / max(self.padded_tokens, 1)


# Requests are read, sorted and grouped this many batches at a time, as the engine admits them.
SCORE_WINDOW_BATCHES = ADMISSION_WINDOW_BATCHES


class Scorer:
    """Teacher-forced log-likelihoods over a KV cache of `max_batch_size` slots (see the
    module's docstring)."""

    def __init__(self, model: Transformer, max_batch_size: int, max_seq_len: int):
        self.model = model
        self.device = model.output.weight.device
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.stats = ScorerStats()
        model.setup_cache(max_batch_size, max_seq_len)

    def score(self, requests: Iterable[ScoreRequest],
              should_stop: Callable[[], bool] | None = None) -> Iterator[Scored]:
        """Each request's result once, in the order they finish. `should_stop` is asked before
        every forward pass; when it says yes, unfinished requests are dropped. A request that
        cannot be scored (`score_problem`) raises ValueError when its window is read."""
        return self._run(iter(requests), should_stop or (lambda: False))

    @torch.inference_mode()  # entered at each resumption of the generator
    def _run(self, pending: Iterator[ScoreRequest],
             should_stop: Callable[[], bool]) -> Iterator[Scored]:
        window = SCORE_WINDOW_BATCHES * self.max_batch_size
        while batch := [must_fit(r, self.max_seq_len) for r in itertools.islice(pending, window)]:
            max_tokens = limits.PREFILL_TOKENS
            groups = score_groups(batch, self.max_batch_size, max_tokens)
            for pieces in plan_passes(groups, self.max_batch_size, max_tokens):
                if should_stop():
                    return
                self._pass(pieces)
                for piece in pieces:
                    if piece.last:
                        group = piece.group
                        yield from map(Scored, group.requests, group.logprobs)

    def _pass(self, pieces: list[GroupSlice]) -> None:
        """One forward pass over the pieces; each row's new logprobs join its group's."""
        steps, inputs, outputs, targets, counts = [], [], [], [], []
        offset = 0
        for piece in pieces:
            step, tokens = self._piece_step(piece)
            steps.append(step)
            inputs.append(tokens)
            piece_outputs, piece_targets, piece_counts = piece.scored(offset)
            outputs += piece_outputs
            targets += piece_targets
            counts += piece_counts
            offset += piece.n_tokens
        self.stats.passes += 1
        self.stats.tokens += sum(piece.real_tokens for piece in pieces)
        self.stats.padded_tokens += offset
        scored = torch.tensor(outputs, device=self.device, dtype=torch.long)
        step = dataclasses.replace(Step.join(steps), outputs=scored)
        hidden = self.model.final_hidden(torch.cat(inputs), step)  # (n_scored, dim)
        values = iter(self._logprobs(hidden, torch.tensor(targets, device=self.device)))
        rows = (logprobs for piece in pieces for logprobs in piece.group.logprobs)
        for logprobs, count in zip(rows, counts):
            logprobs += itertools.islice(values, count)

    def _piece_step(self, piece: GroupSlice) -> tuple[Step, torch.Tensor]:
        """The piece's step (every token an output, for the caller to narrow) and its tokens,
        each row's input right-padded."""
        start, stop = piece.start, piece.stop
        rows = [r.tokens[start:min(stop, r.input_length)] for r in piece.group.requests]
        tokens = torch.tensor([row + [0] * (stop - start - len(row)) for row in rows],
                              device=self.device)
        positions = torch.arange(start, stop, device=self.device).expand(len(rows), -1)
        step = self.model.make_step(positions, slice(piece.slot, piece.slot + len(rows)), stop,
                                    fresh=start == 0, every_token=True)
        return step, tokens.view(-1)

    def _logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> list[float]:
        """log p(targets[i]) under the logits of hidden[i], SCORE_LOGIT_ROWS rows at a time (at
        most limits.LOGPROB_ROWS): one copy to the host for the whole pass."""
        rows = min(SCORE_LOGIT_ROWS, limits.LOGPROB_ROWS)
        parts = [token_logprobs(self.model.logits(hidden[a:a + rows]), targets[a:a + rows])
                 for a in range(0, len(hidden), rows)]
        return torch.cat(parts).tolist() if parts else []

