"""What data-parallel replicas tell each other, through torchrun's key-value store: counters and
marks only, never results (each replica writes its own part files, `parts.py`).

- Claims: a replica's leader takes the next chunk of the pending records with one atomic add, as
  its engine needs more work, so fast replicas take more and a straggler holds back only its
  last chunk.
- Progress: finished samples, tokens and the samples of bad records, added about once a second;
  global rank 0 shows them, and after a stop counts what remains from them.
- Liveness: a heartbeat counter per replica, bumped by a thread of its leader's (so a long
  compile or load is not taken for a death), and a mark at its end: done (every sample it
  claimed is written or bad) or stopped, and why (its chunk is then unfinished). Rank 0 waits for
  every replica's mark, and declares lost a replica whose heartbeat stands still for the
  replica timeout, so a dead node never hangs the run.
- The run's stop and verdict: any leader may stop the whole run (rank 0 when it is stopped,
  --strict at a bad line); rank 0 says at the end whether the run is complete, and the other
  processes wait for that word, so that none exits 0 from a run that is not.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from ..runtime import distributed
from ..runtime.distributed import Dist

log = logging.getLogger(__name__)

KEY = "llama-gen"
BEAT_SECONDS = 2.0  # a leader's heartbeat thread beats, and reads the run's stop, this often
REPORT_SECONDS = 1.0  # and adds its finished samples to the shared counters as often
POLL_SECONDS = 0.5  # how often a waiting process reads the store
# How long rank 0 waits for the replicas still there to read its verdict: its exit ends node 0's
# torchrun, whose store goes with it, so a replica still waiting would never hear the verdict.
VERDICT_READ_SECONDS = 10.0
# A store call gives up after this long: a vanished machine would otherwise hold it for the
# process group's timeout (30 minutes).
STORE_TIMEOUT = timedelta(seconds=60)


class StoreLost(Exception):
    """torchrun's key-value store is gone (the node that hosts it died): what this replica wrote
    stays in its part files, and the next run merges it and makes the rest."""


@dataclass
class Counts:
    """What a replica wrote: samples, tokens, bad lines and the samples of bad records (a record
    found bad once read: too long, or a dialog its format cannot take), completions cut by the
    context, and its first bad line (for --strict)."""

    samples: int = 0
    tokens: int = 0
    bad_lines: int = 0
    bad_samples: int = 0
    context_limited: int = 0
    first_bad_line: dict[str, Any] | None = field(default=None)

    def add(self, other: Counts) -> None:
        self.samples += other.samples
        self.tokens += other.tokens
        self.bad_lines += other.bad_lines
        self.bad_samples += other.bad_samples
        self.context_limited += other.context_limited
        self.first_bad_line = self.first_bad_line or other.first_bad_line


@dataclass(frozen=True)
class End:
    """How a replica ended. `stopped` says why it stopped early (a signal's name, --strict, the
    run's stop, an error), None if it is done: every sample of the chunks it claimed is written
    or in a bad line."""

    counts: Counts
    claimed: int  # samples of the chunks it claimed
    chunks: int = 0
    seconds: float = 0.0
    stopped: str | None = None

    def describe(self, replica: int) -> str:
        """Its last line: done, or stopped with what it left unfinished."""
        if self.stopped is None:
            return (f"replica {replica} done: {self.chunks} chunk(s), {self.counts.samples} "
                    f"sample(s) in {self.seconds:.1f} s")
        made = self.counts.samples + self.counts.bad_samples
        return (f"replica {replica} stopped ({self.stopped}) after {made} of its {self.claimed} "
                f"claimed sample(s)")

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "counts": asdict(self.counts)})

    @classmethod
    def from_json(cls, text: str | bytes) -> End:
        fields = json.loads(text)
        return cls(**{**fields, "counts": Counts(**fields["counts"])})


@dataclass(frozen=True)
class Verdict:
    """Rank 0's word at the end: how many samples the run left unwritten, and why."""

    missing: int
    message: str = ""


class Replicas:
    """One process's side of the counters (`dist.data_parallel_size` > 1): a replica leader
    claims, reports, beats and marks its end; rank 0 also waits for the others and gives the
    verdict; every process reads the run's stop and verdict."""

    def __init__(self, dist: Dist, store: Any = None):
        self._store = store if store is not None else distributed.key_value_store(STORE_TIMEOUT)
        self.replica = dist.data_parallel_rank
        self.size = dist.data_parallel_size
        self._unreported = [0, 0, 0]  # samples, tokens, bad samples
        self._last_report = 0.0
        self.progress_seconds = 0.0  # rank 0's time reading the others' progress
        self.run_stop: str | None = None  # why the run was stopped, once a beat has read it
        self._heart: threading.Thread | None = None
        self._heart_stops = threading.Event()

    def claim(self) -> int:
        """The next chunk no replica has taken: one round trip."""
        with _store_errors():
            return self._store.add(f"{KEY}/claims", 1) - 1

    def finished(self, samples: int, tokens: int, bad_samples: int = 0) -> None:
        for i, n in enumerate((samples, tokens, bad_samples)):
            self._unreported[i] += n
        if time.monotonic() - self._last_report >= REPORT_SECONDS:
            self.report()

    def report(self) -> None:
        """Add what was finished since the last report to the shared counters."""
        with _store_errors():
            for name, n in zip(("samples", "tokens", "bad_samples"), self._unreported):
                if n:
                    self._store.add(f"{KEY}/{name}", n)
        self._unreported = [0, 0, 0]
        self._last_report = time.monotonic()

    def counters(self) -> tuple[int, int, int]:
        """Every replica's reported samples, tokens and bad samples so far."""
        start = time.perf_counter()
        with _store_errors():
            counts = tuple(self._store.add(f"{KEY}/{name}", 0)
                           for name in ("samples", "tokens", "bad_samples"))
        self.progress_seconds += time.perf_counter() - start
        return counts

    def beat(self) -> None:
        """Say this replica is alive, and read whether the run was stopped (`run_stop`)."""
        with _store_errors():
            self._store.add(f"{KEY}/beat/{self.replica}", 1)
            if self.run_stop is None and self._store.check([f"{KEY}/stop"]):
                self.run_stop = self._store.get(f"{KEY}/stop").decode()

    def start_heartbeat(self) -> None:
        """Beat every BEAT_SECONDS from a thread until `stop_heartbeat`: the replica is alive
        while its process and the store are, whatever its main thread does (a compile, a long
        load, rank 0's merge). The decode loop never calls the store for it."""
        def beat() -> None:
            while True:
                with contextlib.suppress(StoreLost):  # the main thread's next call says so
                    self.beat()
                if self._heart_stops.wait(BEAT_SECONDS):
                    return

        self._heart = threading.Thread(target=beat, name="heartbeat", daemon=True)
        self._heart.start()

    def stop_heartbeat(self) -> None:
        if self._heart is not None:
            self._heart_stops.set()
            self._heart.join(timeout=1.0)  # a daemon: one stuck in a store call is left behind
            self._heart = None

    def stop_run(self, reason: str) -> None:
        """Ask every replica to stop (they read it at their next beat)."""
        with _store_errors():
            if not self._store.check([f"{KEY}/stop"]):
                self._store.set(f"{KEY}/stop", reason)
            self.run_stop = self._store.get(f"{KEY}/stop").decode()  # the first one given

    def end(self, end: End) -> None:
        """Mark this replica's end: its counts, and whether it is done or stopped."""
        self.report()
        with _store_errors():
            self._store.set(f"{KEY}/end/{self.replica}", end.to_json())

    def wait_for_others(self, timeout: float, should_stop: Callable[[], bool],
                        tick: Callable[[], None] = lambda: None
                        ) -> tuple[dict[int, End], list[int]]:
        """Rank 0: wait until every other replica has marked its end or is lost (its heartbeat
        unchanged for `timeout` seconds), or until `should_stop`; calls `tick` about twice a
        second. Returns the ends marked, by replica, and the replicas with none."""
        others = range(1, self.size)
        seen = {r: (-1, time.monotonic()) for r in others}  # heartbeat count, when it changed
        waiting = set(others)
        while waiting and not should_stop():
            tick()
            now = time.monotonic()
            with _store_errors():
                for r in sorted(waiting):
                    if self._store.check([f"{KEY}/end/{r}"]):
                        waiting.discard(r)
                        continue
                    beats = self._store.add(f"{KEY}/beat/{r}", 0)
                    if beats != seen[r][0]:
                        seen[r] = (beats, now)
                    elif now - seen[r][1] > timeout:
                        log.warning("replica %d lost: no sign of life for %.0f s", r, timeout)
                        waiting.discard(r)
            if waiting:
                time.sleep(POLL_SECONDS)
        ends = {}
        with _store_errors():
            for r in others:
                if self._store.check([f"{KEY}/end/{r}"]):
                    ends[r] = End.from_json(self._store.get(f"{KEY}/end/{r}"))
        return ends, [r for r in others if r not in ends]

    def give_verdict(self, verdict: Verdict, readers: int = 0) -> None:
        """Say the verdict, then wait (at most VERDICT_READ_SECONDS) until `readers` replicas
        have read it."""
        deadline = time.monotonic() + VERDICT_READ_SECONDS
        with _store_errors():
            self._store.set(f"{KEY}/verdict", json.dumps(asdict(verdict)))
            while (self._store.add(f"{KEY}/verdict-read", 0) < readers
                   and time.monotonic() < deadline):
                time.sleep(POLL_SECONDS / 5)

    def wait_for_verdict(self, timeout: float, should_stop: Callable[[], bool]
                         ) -> Verdict | None:
        """Rank 0's verdict, once it gives it; None if rank 0's heartbeat stands still for
        `timeout` seconds first (rank 0 is lost: nobody can say the run is complete), or if
        `should_stop`."""
        seen = (-1, time.monotonic())
        while not should_stop():
            with _store_errors():
                if self._store.check([f"{KEY}/verdict"]):
                    verdict = Verdict(**json.loads(self._store.get(f"{KEY}/verdict")))
                    self._store.add(f"{KEY}/verdict-read", 1)
                    return verdict
                beats = self._store.add(f"{KEY}/beat/0", 0)
            now = time.monotonic()
            if beats != seen[0]:
                seen = (beats, now)
            elif now - seen[1] > timeout:
                return None
            time.sleep(POLL_SECONDS)
        return None


@contextlib.contextmanager
def _store_errors():
    try:
        yield
    except distributed.StoreError as e:
        raise StoreLost(f"torchrun's key-value store is gone ({e}): torchrun or its node died"
                        ) from None
