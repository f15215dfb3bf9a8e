"""A replica's share of the work: the pending records it claims, tokenized by the task, as
requests for its model-parallel group; and the bad lines it reports."""
from __future__ import annotations

import dataclasses
import enum
import itertools
import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..engine.requests import Request
from ..engine.scheduler import ADMISSION_WINDOW_BATCHES
from ..engine.scoring import ScoreRequest
from ..runtime import distributed
from ..runtime.distributed import Dist
from ..text.chat import DialogError
from .output import Writer
from .records import BadLine, Record
from .replicas import Replicas
from .tasks import Task, TokenizedRecord, records_of

if TYPE_CHECKING:
    from .run_end import StopRequested

# A group's leader shares its stop request with the group every this many decode steps.
STOP_CHECK_STEPS = 8


class StopCause(enum.Enum):
    """Why a feed stopped before its work was done: it reads no further line, and its group
    drops the sequences it has not finished."""

    SIGNAL = enum.auto()  # Ctrl-C or SIGTERM to this process
    STRICT = enum.auto()  # --strict and a bad line (rank 0 reports the line)
    RUN_STOPPED = enum.auto()  # another replica stopped the whole run


def pending_records(task: Task, done: set[tuple[Any, int]],
                    claim: Callable[[], int] | None = None, chunk_records: int = 1,
                    reports_invalid: bool = True,
                    on_claimed: Callable[[int], None] = lambda samples: None
                    ) -> Iterator[TokenizedRecord | BadLine]:
    """The records with samples still to write, tokenized, and the bad lines to report. With
    `claim` (several replicas), the pending records are cut into chunks of `chunk_records` and
    only the chunks `claim()` hands out are this replica's: it asks for another when it reaches
    past its last (so only when its consumer wants more). `on_claimed` hears the samples of
    each record taken (of each chunk, once read whole). Invalid lines are reported by the
    replica that `reports_invalid` (every replica reads them), records bad once tokenized (a
    prompt too long for the context, a dialog the format cannot take) by the replica whose
    chunk holds them. A run resolves --max_seq_len first; settings that leave it None (no model
    to take it from) check no prompt's length."""
    for item in _owned_records(task, done, claim, chunk_records, reports_invalid, on_claimed):
        if isinstance(item, BadLine):
            yield item
            continue
        record, samples = item
        shown = json.dumps(record.fields, ensure_ascii=False)[:1000]
        custom_id = record.batch and record.batch.custom_id
        try:
            work = task.tokenize(record, samples)
        except DialogError as e:
            yield BadLine(record.line, str(e), shown, custom_id=custom_id, samples=len(samples))
            continue
        if problem := task.length_problem(work):
            yield BadLine(record.line, problem, shown, max_seq_len=task.settings.max_seq_len,
                          custom_id=custom_id, samples=len(samples))
            continue
        yield work


def _owned_records(task: Task, done: set[tuple[Any, int]],
                   claim: Callable[[], int] | None, chunk_records: int, reports_invalid: bool,
                   on_claimed: Callable[[int], None]
                   ) -> Iterator[tuple[Record, list[int]] | BadLine]:
    """This replica's pending records with their pending samples, and the invalid lines it
    reports, in file order. A claimed chunk is read whole before any of it is handed on, so
    that `on_claimed` knows its samples from the start."""
    pending, claimed = -1, -1
    held: list[tuple[Record, list[int]] | BadLine] = []  # the claimed chunk, as read so far
    held_records = held_samples = 0
    for item in records_of(task):
        if isinstance(item, BadLine):
            if reports_invalid:
                if held:
                    held.append(item)
                else:
                    yield item
            continue
        n = task.settings.with_overrides(item.overrides).num_samples
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


class RequestFeed:
    """A model-parallel group's requests: its leader reads its replica's share of the work and
    broadcasts it to the group an admission window at a time, as token ids and settings (the
    other ranks need no record: only the leader makes output lines); its leader writes the bad
    lines to `writer`. `max_batch_size`: the sequences run at once (None: no model runs)."""

    def __init__(self, task: Task, done: frozenset, dist: Dist, writer: Writer | None,
                 stop: StopRequested, replicas: Replicas | None = None,
                 max_batch_size: int | None = None):
        self.task, self.done, self.dist, self.writer = task, done, dist, writer
        self.stop, self.replicas = stop, replicas
        self.window = ADMISSION_WINDOW_BATCHES * (max_batch_size or 1)  # samples
        self.stop_cause: StopCause | None = None
        self.chunks = 0  # chunks this replica claimed
        self.claimed = 0  # the samples of the records it took
        self._decode_steps = 0

    def requests(self) -> Iterator[Request | ScoreRequest]:
        own = self._leader_requests() if self.dist.is_model_parallel_leader else None
        while True:
            taken = ([] if own is None or self._stopping()
                     else list(itertools.islice(own, self.window)))
            shared = distributed.broadcast_from_model_parallel_leader(
                [dataclasses.replace(request, tag=None) for request in taken])
            if not shared:
                return
            yield from taken if own is not None else shared

    def _claim(self) -> int:
        self.chunks += 1
        return self.replicas.claim()

    def _leader_requests(self) -> Iterator[Request | ScoreRequest]:
        # A chunk is about an admission window of samples: a replica holds at most one chunk
        # it has not started, so replicas finish within about one chunk's time of each other.
        settings = self.task.settings
        chunk_records = max(1, self.window // settings.num_samples)
        claim = None if self.replicas is None else self._claim
        for item in pending_records(self.task, self.done, claim, chunk_records,
                                    reports_invalid=self.dist.data_parallel_rank == 0,
                                    on_claimed=self._count_claimed):
            if isinstance(item, BadLine):
                self.writer.bad_line(item)
                if settings.strict:  # no further line is read; the job stops as on Ctrl-C
                    self.stop_cause = StopCause.STRICT
                    return
            else:
                yield from self.task.requests(item)

    def _count_claimed(self, samples: int) -> None:
        self.claimed += samples

    def _stopping(self) -> bool:
        if self.stop_cause is None:
            if self.stop:
                self.stop_cause = StopCause.SIGNAL
            elif self.replicas is not None and self.replicas.run_stop is not None:
                self.stop_cause = StopCause.RUN_STOPPED
        return self.stop_cause is not None

    def stopped(self) -> str | None:
        """Why this replica stopped before its work was done (its leader's word, on every rank
        of its group); None if it did not."""
        why = None
        if self.dist.is_model_parallel_leader:
            why = {None: None, StopCause.SIGNAL: self.stop.name, StopCause.STRICT: "--strict",
                   StopCause.RUN_STOPPED: self.replicas and self.replicas.run_stop
                   }[self.stop_cause]
        return distributed.broadcast_from_model_parallel_leader(why)

    def should_stop(self) -> bool:
        """Asked by the engine before each forward pass: whether the leader stops (unfinished
        sequences are dropped), shared with its group every STOP_CHECK_STEPS passes."""
        self._decode_steps += 1
        return (self._decode_steps % STOP_CHECK_STEPS == 0
                and distributed.leader_flag(self._stopping(), self.dist.device))
