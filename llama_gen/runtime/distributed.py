"""Processes and devices: torchrun's environment, the process groups, the collectives.

torchrun starts WORLD_SIZE processes. They form model-parallel groups of `model_parallel_size`
consecutive ranks (each group holds one copy of the model, split across its ranks) and
WORLD_SIZE / model_parallel_size data-parallel replicas. Without torchrun the same code runs as
a group of one process.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

from ..errors import UserError
from . import lifeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device
    backend: str
    model_parallel_size: int

    @property
    def model_parallel_rank(self) -> int:
        return self.rank % self.model_parallel_size

    @property
    def data_parallel_rank(self) -> int:
        return self.rank // self.model_parallel_size

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.model_parallel_size

    @property
    def is_model_parallel_leader(self) -> bool:
        """The group's first rank: it reads the prompts and hands them to its group."""
        return self.model_parallel_rank == 0

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Launch:
    """This process's place in the job, from torchrun's environment (one process without it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes on this machine


def launch_env() -> Launch:
    names = {"rank": "RANK", "world_size": "WORLD_SIZE", "local_rank": "LOCAL_RANK",
             "local_world_size": "LOCAL_WORLD_SIZE"}
    try:
        return Launch(**{field: int(os.environ[name]) for field, name in names.items()
                         if name in os.environ})
    except ValueError as e:
        raise UserError(f"{', '.join(names.values())} must be integers ({e})") from None


def stop_if_launcher_dies() -> None:
    """Under torchrun, never outlive torchrun (see lifeline.py). The `llama-gen` entry point arms
    this before torch is imported; here it does nothing then, and arms it late for a job started
    otherwise (`python -m llama_gen.cli`)."""
    lifeline.arm()


def pick_device(local_rank: int, local_world_size: int, gpus: int,
                device: str | None = None) -> torch.device:
    """This process's device: `device` (--device) if given, else a GPU if this machine has
    `gpus`, else the CPU. `cuda` without an index means this process's own GPU: its local
    rank, modulo the GPUs it sees (NCCL needs a GPU per process)."""
    try:
        dev = torch.device(device or ("cuda" if gpus else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return dev
    if not gpus:
        raise UserError(f"--device {device}: torch sees no CUDA GPU here (torch "
                        f"{torch.__version__}, CUDA {torch.version.cuda}); use --device cpu, or "
                        "install a CUDA build of torch")
    if dev.index is None:
        if local_world_size > gpus:  # fine only where each process sees GPUs of its own
            log.warning("%d processes on this machine see %d GPU(s): NCCL needs a GPU per "
                        "process, so start at most %d (--nproc_per_node) unless each process "
                        "has its own CUDA_VISIBLE_DEVICES", local_world_size, gpus, gpus)
        return torch.device("cuda", local_rank % gpus)
    if dev.index >= gpus:
        raise UserError(f"--device {device}: this machine has {gpus} GPU(s), cuda:0 to "
                        f"cuda:{gpus - 1}")
    if local_world_size > 1:
        raise UserError(f"--device {device} puts all {local_world_size} processes of this "
                        "machine on one GPU, and NCCL needs a GPU per process: use --device cuda")
    return dev


def init_distributed(model_parallel_size: int | None, device: str | None = None,
                     timeout_minutes: float = 30) -> Dist:
    """Join (or, as a single process, create) the process group and fairscale's groups.

    `model_parallel_size` None means the whole world is one model-parallel group.
    """
    launch = launch_env()
    rank, world_size = launch.rank, launch.world_size
    mp = world_size if model_parallel_size is None else model_parallel_size
    if mp <= 0 or world_size % mp:
        raise UserError(f"--model_parallel_size {mp} must divide the number of processes "
                        f"{world_size}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    dev = pick_device(launch.local_rank, launch.local_world_size, gpus, device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        # Without torchrun there is no rendezvous to join: an in-memory store serves one process.
        store = None if "WORLD_SIZE" in os.environ else dist.HashStore()
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=timeout_minutes),
                                device_id=dev if dev.type == "cuda" else None)
    if not fs_init.model_parallel_is_initialized():
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints its group sizes
            fs_init.initialize_model_parallel(mp)
    joined = Dist(rank, world_size, dev, backend, mp)
    if rank == 0:
        log.info("%d process(es) on %s with %s: model parallel %d x data parallel %d",
                 world_size, dev.type, backend, mp, joined.data_parallel_size)
    return joined


def shutdown() -> None:
    """The clean end, every rank done: the graceful teardown, which waits for every peer."""
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


ABORT_SECONDS = 10.0


def abort(seconds: float = ABORT_SECONDS) -> None:
    """The end after an error or a lost peer: drop the communicators without the graceful
    teardown. NCCL's graceful destroy waits for every peer, forever for one that is gone
    (pytorch #141510, #180611); its abort does not, though it too has hung (NCCL #1777), so it
    runs in a thread, given `seconds`. torch 2.7 and later abort every backend, 2.6 only NCCL's,
    2.5 none: what is not aborted is left to the process's hard exit (`exit_now`), which `main`
    makes once this rank's files are closed and its line is said."""
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if not dist.is_initialized():
        return
    if dist.get_world_size() == 1:  # no peer to wait for
        dist.destroy_process_group()
        return
    c10d, rank = dist.distributed_c10d, dist.get_rank()
    if not hasattr(c10d, "_abort_process_group") or not (
            hasattr(dist.ProcessGroup, "abort") or "nccl" in dist.get_backend()):
        log.info("process group left to the exit: torch %s cannot abort %s", torch.__version__,
                 dist.get_backend())
        return
    failed: list[BaseException] = []
    ended = threading.Event()

    def run() -> None:
        try:
            c10d._abort_process_group(dist.group.WORLD)  # every group (2.6 needs it named)
        except Exception as e:  # reported below; the exit follows either way
            failed.append(e)
        ended.set()

    threading.Thread(target=run, name="abort", daemon=True).start()
    if not ended.wait(seconds):
        log.warning("rank %d: aborting the process group took over %g s; exiting without it",
                    rank, seconds)
    elif failed:
        log.warning("rank %d: could not abort the process group (%s); exiting without it",
                    rank, failed[0])
    else:
        log.info("process group aborted, not destroyed: after an error a peer may be gone, "
                 "and the graceful teardown would wait for it")


def has_peers() -> bool:
    """Whether torchrun started this process among others (its WORLD_SIZE above 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def exit_now(code: int) -> NoReturn:
    """End this process with `code` at once: no interpreter teardown, whose destructors would
    finalise whatever communicator `abort` could not drop, and wait there for a lost peer. Only
    once the job's files are closed and its line is said: standard streams are flushed here,
    nothing else."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a pipe with no reader left, or closed
            stream.flush()
    os._exit(code)


def key_value_store(timeout: timedelta) -> dist.Store:
    """A client of torchrun's key-value store whose calls give up after `timeout`, its keys
    apart for each of torchrun's attempts; the process group's own store without torchrun."""
    if "MASTER_ADDR" not in os.environ:
        return dist.distributed_c10d._get_default_store()
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                           is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return TimedStore(dist.PrefixStore(f"attempt-{attempt}", client), timeout)


class StoreTimeout(dist.DistError):
    """The store did not answer in time."""


StoreError = dist.DistError  # what the store raises when its server (torchrun) is gone


class TimedStore:
    """A store whose every call gives up after `timeout`. TCPStore's own timeout covers
    connecting and waiting for a key, not a server that stopped answering: a call to a machine
    that vanished (or a stopped process) would block until TCP gives up, many minutes later.
    Each call runs in a daemon thread, so one that never returns holds nothing at exit. After
    one call went unanswered every call fails at once: the client is still busy with it."""

    def __init__(self, store: dist.Store, timeout: timedelta):
        self._store, self._seconds = store, timeout.total_seconds()
        self._unanswered: str | None = None

    def __getattr__(self, name: str):
        method = getattr(self._store, name)

        def call(*args):
            if self._unanswered is not None:
                raise StoreTimeout(self._unanswered)
            outcome: list = []
            answered = threading.Event()

            def run() -> None:
                try:
                    outcome.append((True, method(*args)))
                except BaseException as e:  # handed to the caller
                    outcome.append((False, e))
                answered.set()

            threading.Thread(target=run, name=f"store-{name}", daemon=True).start()
            if not answered.wait(self._seconds):
                self._unanswered = f"no answer to {name} in {self._seconds:g} s"
                raise StoreTimeout(self._unanswered)
            ok, value = outcome[0]
            if not ok:
                raise value
            return value
        return call


def model_parallel_group() -> dist.ProcessGroup:
    return fs_init.get_model_parallel_group()


def broadcast_from_model_parallel_leader(obj: object) -> object:
    """Send a picklable object of our own making from the group's first rank to the others."""
    if fs_init.get_model_parallel_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=fs_init.get_model_parallel_src_rank(),
                               group=model_parallel_group())
    return holder[0]


# The model only runs forward (under inference mode), so the model-parallel layers call these
# collectives directly rather than through fairscale's autograd functions: no autograd dispatch per call, and
# torch.compile traces them (fairscale's `mark_dirty` stops its tracing).

def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over the model-parallel group, in place."""
    dist.all_reduce(x, group=model_parallel_group())
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of `x` over the model-parallel group, in place."""
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=model_parallel_group())
    return x


def open_communicators(device: torch.device) -> None:
    """Make the model-parallel group's communicators now, so that memory measured next counts
    them: NCCL creates a communicator (and its buffers, hundreds of MiB) at a group's first
    collective."""
    if dist.get_world_size(model_parallel_group()) > 1:
        all_reduce(torch.zeros(1, device=device))


def all_gather_last_dim(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """The group's `x`s side by side along the last dimension, in rank order."""
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous(), group=model_parallel_group())
    return torch.cat(parts, dim=-1)


def broadcast_from_rank0(obj: object) -> object:
    """Send a picklable object of our own making from global rank 0 to every rank."""
    if dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_flags(flag: bool) -> list[int]:
    """The global ranks whose `flag` is true, on every rank."""
    if dist.get_world_size() == 1:
        return [0] if flag else []
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, bool(flag))
    return [rank for rank, f in enumerate(flags) if f]


def leader_flag(flag: bool, device: torch.device) -> bool:
    """The model-parallel group's first rank's `flag`, on every rank of the group."""
    if fs_init.get_model_parallel_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, src=fs_init.get_model_parallel_src_rank(), group=model_parallel_group())
    return bool(value.item())


def record_errors(fn):
    """Under torchrun, say why a rank failed where torchrun's failure report shows it: a crash
    (a bug) as its traceback, which torch's `record` writes; a user's error as its one line,
    which `main` writes with `write_error_file` before it exits (`record` writes nothing for a
    SystemExit, and torchrun would show a link to its docs instead)."""
    from torch.distributed.elastic.multiprocessing.errors import record
    return record(fn)


def write_error_file(line: str) -> None:
    """Under torchrun, `line` as this rank's entry in torchrun's failure report (its "Root
    Cause" when this rank failed first): the file torchrun names in TORCHELASTIC_ERROR_FILE, in
    the shape torch's ErrorHandler writes, without a "py_callstack" (torchrun then shows the
    message). A report already there is kept: it is a crash's traceback."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    report = {"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}
    with contextlib.suppress(OSError):  # best effort: torchrun then shows its link, as before
        with open(path, "x", encoding="utf-8") as f:
            f.write(json.dumps(report))
