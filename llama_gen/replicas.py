"""What data-parallel replicas tell each other, through torchrun's key-value store: counters only,
never results (each replica writes its own part files, `parts.py`).

- Claims: a replica's leader takes the next chunk of the pending records with one atomic add, as
  its engine needs more work, so fast replicas take more and a straggler holds back only its
  last chunk.
- Progress: finished samples and tokens, added about once a second, which global rank 0 shows.
- Liveness: a heartbeat counter per replica, and a mark with its final counts when it is done.
  Rank 0 waits for every replica's mark, and declares lost a replica whose heartbeat stands
  still for the replica timeout, so a dead node never hangs the run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from . import distributed
from .distributed import Dist
from .records import BadLine

log = logging.getLogger(__name__)

KEY = "llama-gen"
BEAT_SECONDS = 2.0  # a leader bumps its heartbeat at most this often
REPORT_SECONDS = 1.0  # and adds its finished samples to the shared counters as often


@dataclass(frozen=True)
class Finished:
    """A finished sample's output line, and the prompt file line it answers."""

    output: dict[str, Any]
    source_line: int


Message = Finished | BadLine


class StoreLost(Exception):
    """torchrun's key-value store is gone (the node that hosts it died): what this replica wrote
    stays in its part files, and the next run merges it and makes the rest."""


@dataclass
class Counts:
    """What a replica wrote: samples, tokens, bad lines, completions cut by the context, and its
    first bad line (for --strict)."""

    samples: int = 0
    tokens: int = 0
    bad_lines: int = 0
    context_limited: int = 0
    first_bad_line: dict[str, Any] | None = field(default=None)

    def add(self, other: Counts) -> None:
        self.samples += other.samples
        self.tokens += other.tokens
        self.bad_lines += other.bad_lines
        self.context_limited += other.context_limited
        self.first_bad_line = self.first_bad_line or other.first_bad_line


class Replicas:
    """One replica leader's side of the counters (`dist.data_parallel_size` > 1)."""

    def __init__(self, dist: Dist, store: Any = None):
        self._store = store if store is not None else distributed.key_value_store()
        self.replica = dist.data_parallel_rank
        self.size = dist.data_parallel_size
        self._unreported = [0, 0]  # samples, tokens
        self._last_report = self._last_beat = 0.0
        self.progress_seconds = 0.0  # rank 0's time reading the others' progress

    def claim(self) -> int:
        """The next chunk no replica has taken: one round trip."""
        with _store_errors():
            return self._store.add(f"{KEY}/claims", 1) - 1

    def finished(self, samples: int, tokens: int) -> None:
        self._unreported[0] += samples
        self._unreported[1] += tokens
        if time.monotonic() - self._last_report >= REPORT_SECONDS:
            self.report()

    def report(self) -> None:
        """Add the samples and tokens finished since the last report to the shared counters."""
        samples, tokens = self._unreported
        with _store_errors():
            if samples:
                self._store.add(f"{KEY}/samples", samples)
            if tokens:
                self._store.add(f"{KEY}/tokens", tokens)
        self._unreported = [0, 0]
        self._last_report = time.monotonic()

    def progress(self) -> tuple[int, int]:
        """Every replica's reported samples and tokens so far (rank 0's progress)."""
        start = time.perf_counter()
        with _store_errors():
            counts = (self._store.add(f"{KEY}/samples", 0), self._store.add(f"{KEY}/tokens", 0))
        self.progress_seconds += time.perf_counter() - start
        return counts

    def beat(self) -> None:
        """Say this replica is alive (rate-limited: call it as often as convenient)."""
        if time.monotonic() - self._last_beat >= BEAT_SECONDS:
            with _store_errors():
                self._store.add(f"{KEY}/beat/{self.replica}", 1)
            self._last_beat = time.monotonic()

    def done(self, counts: Counts) -> None:
        """This replica has written all it will write; its counts go with the mark."""
        self.report()
        with _store_errors():
            self._store.set(f"{KEY}/done/{self.replica}", json.dumps(asdict(counts)))

    def wait_for_others(self, timeout: float, should_stop: Callable[[], bool],
                        tick: Callable[[], None] = lambda: None) -> tuple[Counts, list[int]]:
        """Rank 0: wait until every other replica is done or lost (its heartbeat unchanged for
        `timeout` seconds), or until asked to stop; calls `tick` about twice a second. Returns
        the done replicas' counts together and the replicas not done."""
        others = range(1, self.size)
        seen = {r: (-1, time.monotonic()) for r in others}  # heartbeat count, when it changed
        waiting = set(others)
        while waiting and not should_stop():
            tick()
            self.beat()
            now = time.monotonic()
            with _store_errors():
                for r in sorted(waiting):
                    if self._store.check([f"{KEY}/done/{r}"]):
                        waiting.discard(r)
                        continue
                    beats = self._store.add(f"{KEY}/beat/{r}", 0)
                    if beats != seen[r][0]:
                        seen[r] = (beats, now)
                    elif now - seen[r][1] > timeout:
                        log.warning("replica %d lost: no sign of life for %.0f s", r, timeout)
                        waiting.discard(r)
            if waiting:
                time.sleep(0.5)
        total, missing = Counts(), []
        with _store_errors():
            for r in others:
                if self._store.check([f"{KEY}/done/{r}"]):
                    total.add(Counts(**json.loads(self._store.get(f"{KEY}/done/{r}"))))
                else:
                    missing.append(r)
        return total, missing


@contextlib.contextmanager
def _store_errors():
    try:
        yield
    except distributed.StoreError as e:
        raise StoreLost(f"torchrun's key-value store is gone ({e}): torchrun or its node died"
                        ) from None
