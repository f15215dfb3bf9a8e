"""Where a rank's results go, and how its part of the run ends (`run_end` says how each end
reads)."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

from ..engine.requests import Completion
from ..engine.scoring import Scored
from ..runtime.distributed import Dist
from .output import Writer
from .parts import error_part_path, part_path
from .records import BadLine
from .replicas import Counts, End, Replicas, StoreLost, Verdict
from .run_end import StopRequested, end_alone, end_rank0, end_replica, why_the_run_stops
from .tasks import Task

log = logging.getLogger(__name__)


class Results:
    """Where this rank's results go: a replica's leader writes its own (--out_path with one
    replica, its part files with several); other ranks have none. At the end (`end`), every
    rank learns how the run went and raises what its exit status says; global rank 0 shows
    every replica's progress, waits for the others, merges their parts and checks that the
    output holds every sample the start announced."""

    def __init__(self, task: Task, dist: Dist, total: int, run: str = "",
                 resumed: bool = False, context_length: int | None = None):
        self.task, self.settings, self.dist, self.run = task, task.settings, dist, run
        self.total, self.resumed = total, resumed  # samples the start announced; done before?
        several = dist.data_parallel_size > 1
        self.replicas = Replicas(dist) if several else None  # every rank hears the verdict
        self.writer = None
        if dist.is_model_parallel_leader:
            replica, out = dist.data_parallel_rank, self.settings.out_path
            files = ((part_path(out, run, replica), error_part_path(out, run, replica))
                     if several else (None, None))
            self.writer = Writer(self.settings, total, *files, shows_progress=dist.is_writer,
                                 replicas=self.replicas, context_length=context_length,
                                 tally=task.tally)
        if self.replicas is not None and dist.is_model_parallel_leader:
            self.replicas.start_heartbeat()
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
        if self.writer is not None:
            line = self.task.line(result)
            if line is not None:
                self.writer.output(line, result.request.tag.record.line)

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
            end_alone(self, stop, own, stopped)
        elif self.dist.is_writer:
            end_rank0(self, stop, own)
        else:
            end_replica(self, stop, stopped)

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
                self.give_verdict(Verdict(-1, why_the_run_stops(0, reason)))

    def give_verdict(self, verdict: Verdict, readers: int = 0) -> None:
        """Tell the replicas whether the run is complete; wait for `readers` of them (those still
        there) to have heard it."""
        self._verdict_given = True
        self.replicas.give_verdict(verdict, readers)

    def _claimed(self, claimed: int | None) -> int:
        """The samples this replica took: all announced with one replica, none known without a
        feed with several."""
        return claimed if claimed is not None else 0 if self.replicas else self.total

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

    def close(self) -> None:
        if self.replicas is not None:
            self.replicas.stop_heartbeat()
        if self.writer is not None:
            self.writer.close()
