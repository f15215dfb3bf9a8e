"""How a run ends, and what its exit status says: complete, stopped by a signal (`Interrupted`),
missing samples (`Incomplete`) or a user's error.

`Results.end` picks one of three ends. One replica (`end_alone`): its leader counts what is
written and tells the other ranks of its group. Several, on rank 0 (`end_rank0`): it waits for
every other replica to end or be lost, merges their part files and counts from the output, or,
after a stop, counts from the store's counters. Several, on any other rank (`end_replica`): it
waits for rank 0's verdict, so that only a complete run exits 0.
"""
from __future__ import annotations

import logging
import signal
import time
from typing import TYPE_CHECKING

from ..errors import UserError
from ..runtime import distributed
from .output import recover_output
from .parts import merge_parts
from .prepare import count_pending, prompt_order
from .replicas import End, Verdict

if TYPE_CHECKING:
    from .results import Results

log = logging.getLogger(__name__)

# Rank 0, stopped, waits this long for the other replicas' ends before it counts what remains.
STOP_WAIT_SECONDS = 5.0


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

    @property
    def name(self) -> str | None:
        return None if self.signal is None else signal.Signals(self.signal).name


class Interrupted(Exception):
    """Stopped by a signal: what was finished is written; `left` samples remain."""

    def __init__(self, signum: int, left: int | None = None):
        remain = "" if left is None else f": {left} sample(s) remain"
        super().__init__(f"stopped by {signal.Signals(signum).name}{remain}")
        self.signum = signum


class Incomplete(Exception):
    """The run ended without some of its samples (a replica was lost or stopped): the next run
    makes them. Its message is rank 0's; other ranks raise it empty (their log said why)."""


def why_the_run_stops(replica: int, stopped: str) -> str:
    """A replica's stop, as the reason the others give for theirs."""
    who = "rank 0" if replica == 0 else f"replica {replica}"
    if stopped.startswith("SIG"):
        return f"{who} got {stopped}"
    if stopped == "--strict":
        return f"{who} met a bad line (--strict)"
    return f"{who} stopped ({stopped})"


def end_alone(results: Results, stop: StopRequested, own: End | None,
              stopped: str | None) -> None:
    """One replica: its leader (rank 0) counts in memory after a stop, from the output
    otherwise; the other ranks of its group hear its verdict."""
    if own is None:
        verdict = distributed.broadcast_from_rank0(None)
        if stop.signal is not None:
            raise Interrupted(stop.signal)
        if verdict.missing:
            raise Incomplete("")
        return
    stopped, left = stopped or stop.name, -1
    try:
        if stopped is None:
            left = missing_after_the_end(results)
        else:
            left = max(0, results.total - results.counts.samples - results.counts.bad_samples)
    finally:  # the other ranks wait for it whatever happened here
        if results.dist.world_size > 1:
            distributed.broadcast_from_rank0(Verdict(left))
    report(results, stop, stopped, left, [])


def end_rank0(results: Results, stop: StopRequested, own: End) -> None:
    """Several replicas, rank 0: wait for every other replica to end or be lost; then merge
    their parts and count from the output, or, if the run was stopped, count what remains from
    the store's counters (`end_rank0_stopped`)."""
    replicas, writer = results.replicas, results.writer
    replicas.report()
    ends, lost = {}, []
    if own.stopped is None:
        ends, lost = replicas.wait_for_others(
            results.settings.replica_timeout,
            lambda: bool(stop) or replicas.run_stop is not None, writer.show)
    stopped = own.stopped or stop.name or replicas.run_stop
    if stopped is not None:
        end_rank0_stopped(results, stop, stopped)
        return
    for end in ends.values():
        results.counts.add(end.counts)
    writer.out.close()
    writer.errors.close()
    settings = results.settings
    merge_start = time.perf_counter()
    merged = merge_parts(settings.out_path, settings.errors_path, prompt_order(results.task))
    merge_seconds = time.perf_counter() - merge_start
    missing = missing_after_the_end(results)
    results.counts.samples = results.total - missing - results.counts.bad_samples  # on disk
    log.info("rank 0's time on the other replicas: %.3f s reading their progress (about once "
             "a second), %.3f s merging %d line(s) of part files at the end",
             replicas.progress_seconds, merge_seconds, merged)
    causes = [f"replica {r} was lost" for r in lost] + [
        f"replica {r} stopped ({end.stopped})" for r, end in ends.items() if end.stopped]
    waiting = sum(not end.stopped for end in ends.values())  # a stopped replica does not wait
    results.give_verdict(Verdict(missing, missing_message(missing, causes)), readers=waiting)
    report(results, stop, None, missing, causes)


def end_rank0_stopped(results: Results, stop: StopRequested, stopped: str) -> None:
    """Rank 0 of a stopped run: the others are told to stop; what remains is counted from the
    store's counters, and the parts are left for the next start to merge (other replicas may
    still be appending to them)."""
    replicas = results.replicas
    replicas.stop_run(why_the_run_stops(0, stopped))  # unless another did first
    deadline = time.monotonic() + STOP_WAIT_SECONDS
    ends, _ = replicas.wait_for_others(results.settings.replica_timeout,
                                       lambda: time.monotonic() > deadline, results.writer.show)
    for end in ends.values():
        results.counts.add(end.counts)
    samples, tokens, bad_samples = replicas.counters()
    left = max(0, results.total - samples - bad_samples)
    results.counts.samples, results.counts.tokens = samples, tokens
    results.give_verdict(Verdict(left, f"the run was stopped ({stopped})"))
    report(results, stop, stopped, left, [])


def end_replica(results: Results, stop: StopRequested, stopped: str | None) -> None:
    """Several replicas, any rank but 0: a stop ends it at once; otherwise it waits for rank
    0's verdict, so that it exits 0 only from a run that is complete (torchrun waits at its exit
    barrier only for nodes whose workers all exit 0)."""
    replica, replicas = results.dist.data_parallel_rank, results.replicas
    if stopped == "--strict" and results.writer is not None:
        replicas.stop_run(why_the_run_stops(replica, stopped))
    if stopped is not None and stop.signal is None:
        raise Incomplete("")  # its leader's last line said why
    verdict = None
    if stop.signal is None:
        verdict = replicas.wait_for_verdict(results.settings.replica_timeout, lambda: bool(stop))
    if stop.signal is not None:  # before or while it waited: its own work is written
        raise Interrupted(stop.signal)
    if verdict is not None and not verdict.missing:
        return
    if results.writer is not None:
        log.warning("replica %d: %s", replica,
                    "rank 0 was lost before it could say whether the run is complete; run the "
                    "same command again" if verdict is None
                    else f"the run is incomplete: {verdict.message}")
    raise Incomplete("")


def missing_after_the_end(results: Results) -> int:
    """Samples the start announced that are neither in the output nor in a bad line, counted
    from the output as it is now."""
    left = count_pending(results.task, recover_output(results.settings.out_path))
    return max(0, left - results.counts.bad_samples)


def missing_message(missing: int, causes: list[str]) -> str:
    why = "; ".join(causes) if causes else (
        "the output holds fewer lines than were written (were files beside it changed during "
        "the run?)")
    return f"{missing} sample(s) missing: {why}; run the same command again to make them"


def report(results: Results, stop: StopRequested, stopped: str | None, left: int,
           causes: list[str]) -> None:
    """Rank 0: the summary, then what the exit status says: --strict's bad line, a stop, a run
    that misses samples, or a run in which every line was bad."""
    settings, counts = results.settings, results.counts
    results.writer.finish(counts, left, stopped is not None)
    if settings.strict and (bad := results.first_bad_line):
        raise UserError(f"{settings.prompt_path}: line {bad.line}: {bad.reason} "
                        f"(--strict; see {settings.errors_path})")
    if stopped is not None and stop.signal is not None:
        raise Interrupted(stop.signal, left)
    if stopped is not None:
        raise Incomplete(f"the run was stopped ({stopped}): {left} sample(s) remain; run "
                         "the same command again to make them")
    if left:
        raise Incomplete(missing_message(left, causes))
    if counts.bad_lines and not (counts.samples or results.resumed):
        raise UserError(f"every line of {settings.prompt_path} is bad: the reasons are in "
                        f"{settings.errors_path}")
