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
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

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
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


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
