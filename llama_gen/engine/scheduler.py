"""Continuous batching, decided on the host: which requests run, in which rows, and what one
forward pass does. Nothing here touches a tensor; the runner executes each `StepPlan`.

The path of a request:
- `start` reads the requests, shortest prompt first within windows
  (`shortest_first_in_windows`).
- Each `schedule` admits requests while a row is free and the free KV blocks hold their prompts
  (`_admit`, in `prefill_groups` of similar lengths); gives every decoding sequence the block its
  next token needs, preempting the newest sequences when blocks run out (`_make_room`: they are
  generated again from their prompts, to the same tokens); starts the groups it takes this step
  in the rows after the decoding ones (`_start_groups`); and returns the step's plan.
- `postprocess` gives each sequence its row's `Draw` (`Sequence.append`) and retires the
  finished ones: the last running sequence moves into each gap, so running rows stay contiguous
  (0..n-1) and a decode step reads them as one slice.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from . import limits
from .blocks import BlockAllocator, OneBlockPerRow, blocks_for
from .requests import Completion, Draw, EngineStats, Request, Sequence, must_fit

# The continuous scheduler admits requests shortest prompt first within windows of this many
# batches. Sequences decoding side by side then have similar contexts, so attention chunks read
# less padding, and prompts admitted together are prefilled in fuller passes.
ADMISSION_WINDOW_BATCHES = 8


@dataclass(frozen=True)
class Move:
    """Row src's sequence moves into row dst, which holds nothing; in an unpaged cache its
    first `length` positions move with it."""

    src: int
    dst: int
    length: int


@dataclass(frozen=True)
class Prefill:
    """Prompts prefilled side by side (right-padded) into rows row, row + 1, ...; a prompt
    longer than a pass allows is alone, and prefilled chunk by chunk."""

    row: int
    prompts: list[list[int]]


@dataclass
class StepPlan:
    """One step, in the order the runner does it: the moves; the block table's changed rows;
    requests loaded into their rows; one forward pass that decodes rows 0..len(decode)-1 (row i
    reads decode[i] cache positions) and prefills the groups in the rows after them; a token for
    each of these rows, in row order."""

    moves: list[Move] = field(default_factory=list)
    table: dict[int, list[int]] = field(default_factory=dict)
    loads: list[tuple[int, Request]] = field(default_factory=list)
    decode: list[int] = field(default_factory=list)
    prefills: list[Prefill] = field(default_factory=list)
    held: list[int] = field(default_factory=list)  # rows whose stop tokens are held back
    forced: dict[int, int] | None = None  # rows whose token is given (their prompt's), not drawn


def held_rows(seqs: list[Sequence]) -> list[int]:
    """The rows whose stop tokens may not be drawn yet (min_tokens, unless ignore_eos)."""
    return [i for i, s in enumerate(seqs) if not s.may_stop and not s.request.params.ignore_eos]


class Scheduler:
    """Continuous batching over `max_batch_size` rows and the cache's `blocks`."""

    def __init__(self, blocks: BlockAllocator | OneBlockPerRow, max_batch_size: int,
                 max_seq_len: int, stop_ids: frozenset[int], tokenizer, stats: EngineStats):
        self.blocks = blocks
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.stop_ids, self.tokenizer, self.stats = stop_ids, tokenizer, stats
        self._admitted = itertools.count()  # admission order: the newest is preempted first
        # Free blocks admission leaves for the decoding sequences to grow into, so admitting a
        # prompt does not force a preemption a few steps later (vLLM keeps 1% too).
        self._reserve = 0 if blocks.moves_data else -(-blocks.n_blocks // 100)
        self.start(iter(()))

    def start(self, requests: Iterator[Request]) -> None:
        """Schedule these requests from now on; what ran before is dropped."""
        for row in range(self.max_batch_size):
            self.blocks.release(row)
        window = ADMISSION_WINDOW_BATCHES * self.max_batch_size
        self.pending = shortest_first_in_windows(requests, window)
        self.running: list[Sequence] = []  # running[i] holds row i
        self.queued: list[list[Request]] = []  # admitted, in prefill groups, not yet prefilled
        self.waiting: list[Request] = []  # preempted or not yet fitting, before `pending`
        self._moves: list[Move] = []
        self._refilling = False  # the first admissions fill empty rows, later ones refill

    def schedule(self) -> StepPlan | None:
        """The next step's plan, or None when every request is done."""
        admitted = self._admit()
        self.stats.refills += len(admitted) if self._refilling else 0
        self._refilling = True
        self.queued += prefill_groups(admitted)
        if not (self.running or self.queued):
            return None
        self._make_room()
        decode = [seq.position + 1 for seq in self.running]
        loads, prefills = self._start_groups(take_prefill_groups(self.queued,
                                                                 limits.PREFILL_TOKENS))
        plan = StepPlan(self._moves, self.blocks.changes(), loads, decode, prefills,
                        held_rows(self.running))
        self._moves = []
        self._note_peaks()
        return plan

    def postprocess(self, draws: list[Draw]) -> Iterator[Completion]:
        """Each sequence takes its row's draw; the completions of the finished, which leave."""
        for seq, draw in zip(self.running, draws):
            if draw.prompt_logprobs is not None:
                seq.logprobs = [None, *draw.prompt_logprobs]
            seq.append(draw.token, draw.logprob, self.stop_ids, draw.top)
        for row in reversed(range(len(self.running))):
            if self.running[row].finish_reason:
                yield self.running[row].completion()
                self._leave(row)

    def _admit(self) -> list[Request]:
        """Requests to start, `waiting` ones first: while a row is free and the free blocks,
        less those the queued prompts will take and a reserve for the decoding sequences to
        grow into, hold the next one's prompt and first token."""
        rows = self.max_batch_size - len(self.running) - sum(map(len, self.queued))
        size = self.blocks.block_size
        spare = (self.blocks.free_blocks - self._reserve
                 - sum(blocks_for(len(r.prompt_tokens) + 1, size) for g in self.queued for r in g))
        admitted, waiting = [], self.waiting
        while len(admitted) < rows:
            if not waiting:
                request = next(self.pending, None)
                if request is None:
                    break
                waiting.append(must_fit(request, self.max_seq_len))
            need = blocks_for(len(waiting[0].prompt_tokens) + 1, size)
            if need > spare and (self.running or admitted or self.queued):
                break
            spare -= need
            admitted.append(waiting.pop(0))
        return admitted

    def _make_room(self) -> None:
        """Blocks for every running sequence's next position. When too few are free, the newest
        sequences are preempted: their blocks freed, their requests put back to run again
        from the start (the same tokens: each draw depends only on its request)."""
        running, size = self.running, self.blocks.block_size
        short = [seq for row, seq in enumerate(running)
                 if seq.position + 1 > self.blocks.held(row) * size]
        for seq in sorted(short, key=lambda s: s.admitted):
            while seq in running and not self.blocks.extend(running.index(seq), seq.position + 1):
                self._preempt(max(running, key=lambda s: s.admitted))

    def _preempt(self, seq: Sequence) -> None:
        self._leave(self.running.index(seq))
        self.waiting.insert(0, seq.request)
        self.stats.preempted += 1

    def _leave(self, row: int) -> None:
        """The row's sequence leaves: its blocks are freed and the last running sequence moves
        into its row."""
        running, last = self.running, len(self.running) - 1
        self.blocks.release(row)
        if row != last:
            self._moves.append(Move(last, row, running[last].position))
            self.blocks.move(last, row)
            running[row] = running[last]
        running.pop()

    def _start_groups(self, groups: list[list[Request]]
                      ) -> tuple[list[tuple[int, Request]], list[Prefill]]:
        """Start the groups' sequences in the rows after the running ones, as far as free
        blocks hold their prompts; the groups that do not fit go back to the front of
        `waiting`. Their loads and prefills."""
        loads, prefills, row = [], [], len(self.running)
        for i, group in enumerate(groups):
            size = self.blocks.block_size
            if sum(blocks_for(len(r.prompt_tokens) + 1, size) for r in group) > \
                    self.blocks.free_blocks:  # decoding sequences took the blocks since
                self.waiting[:0] = itertools.chain.from_iterable(groups[i:])
                break
            prefills.append(Prefill(row, [r.prompt_tokens for r in group]))
            for request in group:
                self.running.append(Sequence.start(request, self.max_seq_len, self.tokenizer))
                grown = self.blocks.extend(row, len(request.prompt_tokens) + 1)
                assert grown, "admission counts free blocks"
                loads.append((row, request))
                row += 1
        for seq in self.running[len(self.running) - len(loads):]:
            seq.admitted = next(self._admitted)
        return loads, prefills

    def _note_peaks(self) -> None:
        stats = self.stats
        stats.peak_running = max(stats.peak_running, len(self.running))
        stats.peak_kv_tokens = max(stats.peak_kv_tokens,
                                   self.blocks.held_blocks * self.blocks.block_size)


def shortest_first_in_windows(requests: Iterator[Request], window: int) -> Iterator[Request]:
    """The requests, read `window` at a time, each window sorted by prompt length (stable)."""
    while batch := list(itertools.islice(requests, window)):
        yield from sorted(batch, key=lambda r: len(r.prompt_tokens))


def prefill_groups(requests: list[Request]) -> list[list[Request]]:
    """Requests to prefill together: similar lengths (shortest first), so padding stays small."""
    groups: list[list[Request]] = []
    for request in sorted(requests, key=lambda r: len(r.prompt_tokens)):
        n = len(request.prompt_tokens)  # the longest so far: the group pads to it
        group = groups[-1] if groups else []
        real = sum(len(r.prompt_tokens) for r in group) + n
        padded = n * (len(group) + 1)
        if group and padded <= limits.PREFILL_PADDING * real and padded <= limits.PREFILL_TOKENS:
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
