"""Processes, devices and the model-parallel layers: the one place that knows about them.

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
import signal
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from torch import nn

from .errors import UserError
from .kernels import PackedWeight, linear

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


def stop_if_launcher_dies(poll_seconds: float = 1.0) -> None:
    """Under torchrun, send this process SIGTERM (a clean stop) if torchrun itself dies without
    stopping it (kill -9, the OOM killer): workers run in sessions of their own and would go on
    working, holding the output's lock, while the user starts the job again. (With several
    data-parallel replicas, whose mail goes through torchrun's store, the job may instead stop
    on `StoreLost`; the next run resumes all the same.)"""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_seconds)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


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
    info = Dist(rank, world_size, dev, backend, mp)
    if rank == 0:
        log.info("%d process(es) on %s with %s: model parallel %d x data parallel %d",
                 world_size, dev.type, backend, mp, info.data_parallel_size)
    return info


def shutdown() -> None:
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


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


# The model only runs forward (under inference mode), so the layers below call the collectives
# directly rather than through fairscale's autograd functions: no autograd dispatch per call, and
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


def unfilled_weight(*shape: int) -> nn.Parameter:
    """A weight for the checkpoint to fill (`load_state_dict(assign=True)` puts the loaded
    tensor in its place). On the meta device it costs no memory and no time until then."""
    return nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)


def part_size(size: int, parts: int) -> int:
    assert size % parts == 0, f"{size} does not split into {parts} equal parts"  # checked earlier
    return size // parts


# The model-parallel layers below are Meta's (and fairscale's) layers, with their weight layout,
# built for inference. fairscale's constructors make every weight in float32 on every rank to
# scatter it: at model-parallel size 2 that took 9-10 s and 1.8 GiB per rank for a 0.95B model
# before a byte of the checkpoint was read (4 bytes per parameter / size: 26 GB per rank for a
# 13B).
# These allocate nothing; the checkpoint's tensors become their weights.

class ColumnParallelLinear(nn.Module):
    """x @ W.T with W (out, in) split along its outputs: rank r of `parts` holds rows
    r * out / parts onwards. With `gather_output` every rank gets the whole output; with
    `packed`, the product uses a `PackedWeight`."""

    def __init__(self, in_features: int, out_features: int, parts: int,
                 gather_output: bool = False, packed: bool = False):
        super().__init__()
        self.parts, self.gather_output = parts, gather_output
        self.weight = unfilled_weight(part_size(out_features, parts), in_features)
        self.packed = PackedWeight() if packed else None

    def product(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and self.packed.usable(x, self.weight):
            return self.packed.linear(x, self.weight)
        return linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.product(x)
        if self.gather_output and self.parts > 1:
            return all_gather_last_dim(out, self.parts)
        return out


class RowParallelLinear(nn.Module):
    """x @ W.T with W (out, in) split along its inputs; `x` comes split the same way (a column
    layer's output), and the group sums the partial products."""

    def __init__(self, in_features: int, out_features: int, parts: int):
        super().__init__()
        self.parts = parts
        self.weight = unfilled_weight(out_features, part_size(in_features, parts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight)
        return all_reduce(out) if self.parts > 1 else out


class ParallelEmbedding(nn.Module):
    """An embedding split along the embedding dimension (Llama 1/2)."""

    def __init__(self, vocab_size: int, dim: int, parts: int):
        super().__init__()
        self.parts = parts
        self.weight = unfilled_weight(vocab_size, part_size(dim, parts))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = F.embedding(tokens, self.weight)
        return all_gather_last_dim(out, self.parts) if self.parts > 1 else out


class VocabParallelEmbedding(nn.Module):
    """An embedding split along the vocabulary (Llama 3): each rank looks up the tokens in its
    range, zeros for the others, and the group sums."""

    def __init__(self, vocab_size: int, dim: int, parts: int, rank: int):
        super().__init__()
        self.parts = parts
        rows = part_size(vocab_size, parts)
        self.vocab_start_index, self.vocab_end_index = rank * rows, (rank + 1) * rows
        self.weight = unfilled_weight(rows, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.parts == 1:
            return F.embedding(tokens, self.weight)
        elsewhere = (tokens < self.vocab_start_index) | (tokens >= self.vocab_end_index)
        local = (tokens - self.vocab_start_index).masked_fill(elsewhere, 0)
        out = F.embedding(local, self.weight).masked_fill_(elsewhere[..., None], 0.0)
        return all_reduce(out)


@dataclass(frozen=True)
class ParallelLayers:
    """Builds the model-parallel layers for this rank of fairscale's model-parallel group, with
    their weights unfilled; `vocab_parallel_embedding` follows Meta's layout (Llama 3 splits
    the embedding over the vocabulary, Llama 1/2 over the embedding dimension)."""

    vocab_parallel_embedding: bool = False

    @property
    def world_size(self) -> int:
        return fs_init.get_model_parallel_world_size()

    def embedding(self, vocab_size: int, dim: int) -> nn.Module:
        if self.vocab_parallel_embedding:
            return VocabParallelEmbedding(vocab_size, dim, self.world_size,
                                          fs_init.get_model_parallel_rank())
        return ParallelEmbedding(vocab_size, dim, self.world_size)

    def column(self, in_features: int, out_features: int, gather_output: bool = False,
               packed: bool = False) -> nn.Module:
        return ColumnParallelLinear(in_features, out_features, self.world_size,
                                    gather_output=gather_output, packed=packed)

    def row(self, in_features: int, out_features: int) -> nn.Module:
        return RowParallelLinear(in_features, out_features, self.world_size)


def broadcast_from_rank0(obj: object) -> object:
    """Send a picklable object of our own making from global rank 0 to every rank."""
    if dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def leader_flag(flag: bool, device: torch.device) -> bool:
    """The model-parallel group's first rank's `flag`, on every rank of the group."""
    if fs_init.get_model_parallel_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, src=fs_init.get_model_parallel_src_rank(), group=model_parallel_group())
    return bool(value.item())


class StoreLost(Exception):
    """The key-value store carrying the replicas' results is gone (torchrun, which holds it,
    died): results not yet received are not written, and the next run makes them again."""


class Mailbox:
    """JSON messages from data-parallel replica leaders to global rank 0, through the process
    group's key-value store, so replicas never wait for each other."""

    def __init__(self, info: Dist):
        self._store = dist.distributed_c10d._get_default_store()
        self._replica = info.data_parallel_rank
        self._replicas = info.data_parallel_size
        self._sent = 0
        self._received = [0] * self._replicas
        self._closed = [False] * self._replicas

    def send(self, message: dict) -> None:
        with _store_errors():
            self._store.set(f"mail/{self._replica}/{self._sent}", json.dumps(message))
            self._sent += 1
            self._store.set(f"mail/{self._replica}/count", str(self._sent))

    def close(self) -> None:
        with _store_errors():
            self._store.set(f"mail/{self._replica}/closed", str(self._sent))

    def receive(self) -> list[dict]:
        """Messages that arrived since the last call (rank 0 only; never blocks)."""
        messages = []
        with _store_errors():
            for r in range(1, self._replicas):
                if not self._store.check([f"mail/{r}/count"]):
                    continue
                count = int(self._store.get(f"mail/{r}/count"))
                for i in range(self._received[r], count):
                    key = f"mail/{r}/{i}"
                    messages.append(json.loads(self._store.get(key)))
                    self._store.delete_key(key)
                self._received[r] = count
                if not self._closed[r] and self._store.check([f"mail/{r}/closed"]):
                    self._closed[r] = int(self._store.get(f"mail/{r}/closed")) == count
        return messages

    def all_closed(self) -> bool:
        return all(self._closed[1:])


@contextlib.contextmanager
def _store_errors():
    try:
        yield
    except dist.DistError as e:
        raise StoreLost(f"the replicas' results could not go through torchrun's store ({e})"
                        ) from None


def record_errors(fn):
    """Under torchrun, write a crashing rank's traceback where torchrun reports it."""
    from torch.distributed.elastic.multiprocessing.errors import record
    return record(fn)
