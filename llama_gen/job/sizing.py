"""How much a run holds at once, from the memory it has: --max_seq_len's default, the KV cache's
blocks and tokens, and the sequences decoding at once. On a GPU the budget is measured (after
the weights and NCCL's communicators) and the working memory too, by a profiling step
(`engine.profile`); `llama-gen plan` sizes a run by the same functions of `engine.memory`."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

import torch

from ..engine import limits
from ..engine.blocks import default_block_size
from ..engine.memory import (CPU_AUTO_BATCH, GIB, GPU_AUTO_CONTEXT_SEQUENCES, KV_BLOCK_TOKENS,
                             UNKNOWN_CONTEXT, Shape, Sizing, context_slots, context_table_bytes,
                             default_seq_len, fixed_working_bytes, gib, graph_pool_per_slot,
                             profiled_room, run_sizing, slot_working_bytes, whole_blocks)
from ..engine.profile import measure_working_memory
from ..errors import UserError
from ..model.args import ModelArgs
from ..model.transformer import Transformer
from ..runtime import distributed
from ..runtime.distributed import Dist
from ..settings import JobSettings

log = logging.getLogger(__name__)


def available_ram() -> int:
    """This machine's memory available to new allocations (/proc/meminfo's MemAvailable), or,
    where there is no /proc, its free memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget(device: torch.device, utilization: float) -> int:
    """Bytes this process may still allocate: on a GPU, its share (`utilization`) of the GPU's
    memory less what is in use there (the CUDA context, the weights once loaded, other
    processes), as vLLM counts it; on the CPU, the available memory shared by this machine's
    processes."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what loading freed is not in use
        free, total = torch.cuda.mem_get_info(device)
        return int(total * utilization) - (total - free)
    return available_ram() // distributed.launch_env().local_world_size


def run_shape(args: ModelArgs, dist: Dist, dtype: torch.dtype, max_seq_len: int,
              block_size: int = KV_BLOCK_TOKENS) -> Shape:
    """The shape of this rank's memory (`memory.Shape`); no device overhead: it is measured."""
    return Shape(args, dist.model_parallel_size, dtype.itemsize, max_seq_len, overhead=0,
                 block_size=block_size)


# On GPUs a paged cache is read by flex attention, whose kernels tile a KV block by at least
# 16 positions: vLLM's flex attention backend refuses other block sizes, which fail in Triton's
# code generation.
GPU_BLOCK_MULTIPLE = 16


def kv_block_size(settings: JobSettings, device: torch.device) -> int:
    """Positions per KV block: --kv_block_size, or the engine's default for the device
    (`engine.default_block_size`); checked, with --kv_cache_tokens, against --max_seq_len.
    Scoring's cache is unpaged: a block of --max_seq_len per text."""
    if settings.full_length_slots:
        return settings.max_seq_len
    given = settings.kv_block_size
    if given is not None and device.type == "cuda" and given % GPU_BLOCK_MULTIPLE:
        raise UserError(f"--kv_block_size {given}: on GPUs flex attention reads the paged KV "
                        f"cache, and its kernels take a multiple of {GPU_BLOCK_MULTIPLE} "
                        "(16, 32, 64, 128...)")
    block = given or min(default_block_size(device, settings.max_seq_len), settings.max_seq_len)
    settings.check_kv_cache(block)
    return block


def resolve_max_seq_len(settings: JobSettings, args: ModelArgs, dist: Dist,
                        dtype: torch.dtype) -> int:
    """--max_seq_len as given (no longer than the model's context), or by default the model's
    context, shortened to what fits in global rank 0's memory (the plan's estimate before the
    weights load, `memory.context_slots`: on a GPU two full-length sequences beside
    --max_batch_size slots, a full length for each where slots are full-length: the CPU's
    (eight for auto) and scoring's) and shared with every rank: their prompt checks must
    agree."""
    if settings.max_seq_len is not None:
        check_seq_len(args, settings.max_seq_len)
        return settings.max_seq_len
    on_gpu = dist.device.type == "cuda"
    slots, sequences = context_slots(
        settings.max_batch_size, GPU_AUTO_CONTEXT_SEQUENCES if on_gpu else CPU_AUTO_BATCH,
        paged=on_gpu and not settings.full_length_slots)
    budget = memory_budget(dist.device, settings.gpu_memory_utilization)
    length, why = distributed.broadcast_from_rank0(
        context_default(replace(run_shape(args, dist, dtype, 1), quantize=settings.quantize,
                                quantize_head=settings.quantize_head), budget, slots, sequences))
    if length is None:
        raise UserError(f"{why} (`llama-gen plan` shows the memory per GPU): pass a "
                        "--max_seq_len that fits, use more GPUs or a 16-bit --dtype")
    if dist.rank == 0:
        log.info("--max_seq_len %s", why)
    return length


def size_cache(settings: JobSettings, model: Transformer, dist: Dist) -> Sizing:
    """Sequences decoding at once and the KV cache's tokens, after the weights are loaded. On a
    GPU the cache takes what the measured memory budget leaves beside the working memory of
    at most --max_batch_size sequences (`gpu_sizing`; scoring keeps full-length slots), the
    least of its model-parallel group's ranks; on the CPU a full
    --max_seq_len per sequence (in whole blocks of --kv_block_size), 8 of them for auto.
    --kv_cache_tokens, where given, is the cache's size."""
    block = kv_block_size(settings, dist.device)
    if dist.device.type != "cuda":
        batch = settings.max_batch_size or CPU_AUTO_BATCH
        tokens = settings.kv_cache_tokens
        if tokens is None and settings.kv_block_size is not None:
            tokens = batch * whole_blocks(settings.max_seq_len, block)
        sizing = Sizing(batch, tokens)
        log_sizing(settings, model, dist, sizing, None, block)
        return sizing
    shape = replace(run_shape(model.args, dist, model.tok_embeddings.weight.dtype,
                              settings.max_seq_len, block),
                    decode_graphs=compiles_decode(settings, dist.device),
                    quantize=settings.quantize, quantize_head=settings.quantize_head)
    distributed.open_communicators(dist.device)  # their memory is in use before it is measured
    budget = memory_budget(dist.device, settings.gpu_memory_utilization)
    room = budget - sum(fixed_working_bytes(shape).values())
    sizing = group_least(gpu_sizing(settings, shape, room), dist)
    if sizing is not None and runs_continuous(settings):
        sizing = profiled_sizing(settings, model, dist, shape, budget, sizing.max_batch_size)
    if sizing is None and settings.kv_cache_tokens is not None:
        raise UserError(f"--kv_cache_tokens {settings.kv_cache_tokens} "
                        f"({settings.kv_cache_tokens * shape.kv_bytes_per_token / GIB:.2f} GiB) "
                        f"and the working memory of --max_batch_size "
                        f"{settings.max_batch_size or 'auto (one sequence)'} do not fit in the "
                        f"{budget / GIB:.2f} GiB left of --gpu_memory_utilization "
                        f"{settings.gpu_memory_utilization} of this GPU beside the model: lower "
                        "--kv_cache_tokens or --max_batch_size, or leave --kv_cache_tokens out "
                        "(auto: what fits)")
    if sizing is None:
        raise UserError(f"no room for one sequence of --max_seq_len {settings.max_seq_len} "
                        f"beside the model: {budget / GIB:.2f} GiB left of "
                        f"--gpu_memory_utilization {settings.gpu_memory_utilization} "
                        f"of this GPU (`llama-gen plan` shows the memory per GPU): lower "
                        "--max_seq_len or --max_batch_size, raise --gpu_memory_utilization, "
                        "or use more GPUs")
    log_sizing(settings, model, dist, sizing, budget, block)
    return sizing


def profiled_sizing(settings: JobSettings, model: Transformer, dist: Dist, shape: Shape,
                    budget: int, batch: int) -> Sizing | None:
    """The continuous engine's sizing from a profiling step (`engine.profile`): `batch`
    sequences at once, as the estimates chose them, and a KV cache of what `budget` leaves
    beside the working memory its worst-case step measured, the tables of the whole context and
    the CUDA graphs' pool (`memory.profiled_room`); the least of the group's ranks."""
    start = time.perf_counter()
    measured = (measure_working_memory(model, batch, settings.max_seq_len, shape.block_size)
                + context_table_bytes(shape, batch))
    room = profiled_room(shape, budget, batch, measured)
    sizing = group_least(run_sizing(shape, room, batch, settings.kv_cache_tokens), dist)
    if dist.rank == 0:
        log.info("profiling step: %d sequences with every sampler control beside a %d-token "
                 "prefill take %.2f GiB of working memory (the estimate: %.2f) in %.1f s",
                 batch, min(limits.PREFILL_TOKENS, settings.max_seq_len), measured / GIB,
                 (sum(fixed_working_bytes(shape).values())
                  + batch * (slot_working_bytes(shape) - graph_pool_per_slot(shape))) / GIB,
                 time.perf_counter() - start)
    return sizing


def runs_continuous(settings: JobSettings) -> bool:
    """Whether the run's engine is the continuous one (not the static baseline, not
    scoring's), which the profiling step measures."""
    return not settings.full_length_slots and getattr(settings, "scheduler", None) == "continuous"


def compiles_decode(settings: JobSettings, device: torch.device) -> bool:
    """--compile, where auto: on for the continuous engine on CUDA."""
    if not runs_continuous(settings):
        return False
    compile = getattr(settings, "compile", None)
    return device.type == "cuda" if compile is None else compile


def gpu_sizing(settings: JobSettings, shape: Shape, room: int) -> Sizing | None:
    """The sequences at once and the cache in `room` bytes for KV and slots, as `llama-gen
    plan` sizes them (`memory.run_sizing`): --max_batch_size caps the sequences, the cache
    takes what is left; scoring keeps a full-length slot per text. None where not one
    full-length sequence fits."""
    return run_sizing(shape, room, settings.max_batch_size, settings.kv_cache_tokens,
                      settings.full_length_slots)


def group_least(sizing: Sizing | None, dist: Dist) -> Sizing | None:
    """The smallest of the model-parallel group's sizings (every rank runs the same schedule);
    None where one rank has no room."""
    if dist.model_parallel_size == 1:
        return sizing
    mine = (0, 0) if sizing is None else (sizing.max_batch_size, sizing.kv_cache_tokens or 0)
    every = distributed.all_gather_last_dim(torch.tensor(mine, device=dist.device),
                                            dist.model_parallel_size)
    batch, tokens = every.view(-1, 2).min(dim=0).values.tolist()
    return Sizing(batch, tokens or None) if batch else None


def log_sizing(settings: JobSettings, model: Transformer, dist: Dist, sizing: Sizing,
               budget: int | None, block: int) -> None:
    """One line: the batch, the KV cache's tokens, blocks and bytes, and where they come
    from."""
    if dist.rank != 0:
        return
    shape = run_shape(model.args, dist, model.tok_embeddings.weight.dtype, settings.max_seq_len)
    tokens = sizing.kv_cache_tokens or sizing.max_batch_size * settings.max_seq_len
    source = ("--kv_cache_tokens" if settings.kv_cache_tokens is not None else
              "a full --max_seq_len each" if budget is None else
              f"of {budget / GIB:.2f} GiB left to this run on the GPU "
              f"(--gpu_memory_utilization {settings.gpu_memory_utilization})")
    log.info("--max_batch_size %s: %d sequences decoding at once, a KV cache of %d tokens "
             "in blocks of %d (%.2f GiB), %s", settings.max_batch_size or "auto",
             sizing.max_batch_size, tokens, block, tokens * shape.kv_bytes_per_token / GIB,
             source)


def check_seq_len(args: ModelArgs, max_seq_len: int) -> None:
    """An explicit --max_seq_len may not pass the model's context (as vLLM refuses a longer
    max_model_len): its positions past it were never trained."""
    if args.context_length is not None and max_seq_len > args.context_length:
        who, source = ((args.family, "") if args.trained_context is None else
                       ("the model", ", config.json's max_position_embeddings"))
        raise UserError(f"--max_seq_len {max_seq_len} is longer than the context {who} was "
                        f"trained for ({args.context_length} tokens{source}): use at most "
                        f"{args.context_length}, or leave it out")


def context_default(shape: Shape, usable: int, slots: int,
                    sequences: int) -> tuple[int | None, str]:
    """--max_seq_len's default and why, in words: the model's context (`shape.args`), or the
    longest part of it at which `usable` bytes hold `slots` slots and `sequences` full-length
    sequences (`memory.context_slots`); None where not even a short one fits."""
    args = shape.args
    context = args.context_length
    if context is None:
        return UNKNOWN_CONTEXT, (f"{UNKNOWN_CONTEXT}, a guess: params.json is none of "
                                 "Meta's releases, whose contexts are known; pass --max_seq_len")
    fitting = default_seq_len(replace(shape, max_seq_len=context), usable, slots, sequences)
    if fitting == context:
        return context, f"{context}, {context_words(args)}"
    room = f"{sequences} sequences of it" if sequences > 1 else "one sequence of it"
    if fitting is None:
        return None, (f"{context_words(args)} of {context} tokens leaves no room for {room} "
                      f"beside the weights in {gib(usable)} GiB")
    return fitting, (f"{fitting}: {context_words(args)} of {context} tokens shortened to "
                     f"what fits, {room}, beside the weights in {gib(usable)} GiB")


def context_words(args: ModelArgs) -> str:
    """Whose context the model's is: the release's, or a config.json's."""
    if args.trained_context is None:
        return f"{args.family}'s context"
    return "the model's context (config.json's max_position_embeddings)"
