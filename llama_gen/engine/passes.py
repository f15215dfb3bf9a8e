"""The runner's passes on the device, as functions of the model: a prompt's teacher-forced
logprobs, the compiled decode step and the cache lengths it reads, the CPU's attention chunks,
writing the block table's changed rows, moving a row of an unpaged cache, and timing forward
passes.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from ..model.transformer import BlockTable, Transformer
from . import limits
from .sampling import token_logprobs
from .transfer import to_device

log = logging.getLogger(__name__)

# A compiled decode step reads an unpaged cache up to this many positions times a power of two:
# a few shapes to compile and capture (log2 of max_seq_len / 256 + 1 at most), at the cost of
# reading up to half of them masked.
DECODE_KV_BUCKET = 256
# Rows per decode attention call on the CPU. A call reads the cache up to the longest context
# in its rows, so smaller chunks read less but cost more calls (docs/benchmarks.md).
CPU_ATTENTION_CHUNK = 8


def prompt_logprobs(model: Transformer, tokens: list[int], slot: int,
                    table: BlockTable | None = None) -> list[float]:
    """log p(tokens[t] | tokens[:t]) for t = 1..n-1, teacher-forced. tokens[:-1] go through the
    model in passes of at most `prefill_chunk` tokens, written into cache slot `slot`, or the
    blocks of a paged cache's one-row `table` (scratch: the caller's next prefill overwrites
    it)."""
    device = model.output.weight.device
    ids = to_device(tokens, device)
    chunk = limits.prefill_chunk(len(tokens), masked=table is None or model.paged_reads != "flex")
    out = []
    for start in range(0, len(tokens) - 1, chunk):
        stop = min(start + chunk, len(tokens) - 1)
        step = model.make_step(torch.arange(start, stop, device=device)[None],
                               slice(slot, slot + 1), stop, fresh=start == 0, every_token=True,
                               table=table)
        hidden = model.final_hidden(ids[start:stop], step)  # (stop - start, dim)
        for row in range(0, stop - start, limits.LOGPROB_ROWS):
            logits = model.logits(hidden[row:row + limits.LOGPROB_ROWS])
            first = start + row + 1  # the token these logits predict
            out.append(token_logprobs(logits, ids[first:first + len(logits)]))
    return torch.cat(out).tolist() if out else []


def decode_kv_bucket(kv_len: int, max_seq_len: int) -> int:
    """The cache length a compiled decode step reads for contexts up to kv_len."""
    bucket = DECODE_KV_BUCKET
    while bucket < kv_len:
        bucket *= 2
    return min(bucket, max_seq_len)


def compile_decode(model: Transformer, static_batch: bool) -> Callable[..., torch.Tensor]:
    """`model.decode` compiled whole (`torch.compile`, no graph breaks allowed); on CUDA
    replayed as CUDA graphs, one launch per step instead of several per layer, one graph per
    batch size and cache length. With `static_batch` (flex attention's decode kernel needs one)
    each batch size compiles once. Otherwise the first call compiles for its shapes, and a
    second batch size or cache length recompiles with it symbolic; reading the whole cache may
    compile once more. The KV cache, a tensor attribute of the model's modules, is taken to
    keep its address, so its in-place writes do not stop CUDA graphs."""
    mode = "reduce-overhead" if model.output.weight.device.type == "cuda" else None
    return torch.compile(model.decode, mode=mode, fullgraph=True,
                         dynamic=False if static_batch else None)


class CompileFailed(RuntimeError):
    """torch.compile could not compile the decode step (e.g. no C++ compiler for inductor's CPU
    kernels); `reason` is the compiler's first line."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"torch.compile failed ({reason})")


def compile_failure(e: Exception) -> CompileFailed | None:
    """The CompileFailed an exception from a compiled call stands for, or None if it is not
    the compiler's."""
    from torch._dynamo.exc import TorchDynamoException  # loaded by compiling already
    if not isinstance(e, TorchDynamoException):
        return None
    cause = getattr(e, "inner_exception", None) or e
    log.debug("torch.compile failed", exc_info=True)
    return CompileFailed(next((line for line in str(cause).splitlines() if line.strip()),
                              type(cause).__name__))


def attention_chunks(kv_lens: list[int], rows: int) -> tuple[tuple[int, int, int], ...] | None:
    """(start, stop, kv_len) for consecutive runs of `rows` rows; None when one run covers all."""
    if len(kv_lens) <= rows:
        return None
    return tuple((a, min(a + rows, len(kv_lens)), max(kv_lens[a:a + rows]))
                 for a in range(0, len(kv_lens), rows))


def write_table(table: BlockTable, changes: dict[int, list[int]], sink: int) -> None:
    """Write the changed rows (row: its blocks, in position order) into the block table on the
    device, in one copy: past its blocks a row names the sink, and each block's `place` is its
    index in its row (the sink's stays -1)."""
    if not changes:
        return
    width = table.blocks.shape[1]
    rows = to_device([[row, *blocks] + [sink] * (width - len(blocks))
                      for row, blocks in changes.items()], table.blocks.device)
    blocks = rows[:, 1:]
    table.blocks[rows[:, 0]] = blocks
    table.place[blocks] = torch.arange(width, device=blocks.device).expand_as(blocks)
    table.place[sink] = -1


def move_cache_row(model: Transformer, src: int, dst: int, length: int) -> None:
    """In an unpaged cache, copy slot src's first `length` positions into slot dst."""
    for layer in model.layers:
        cache = layer.attention.cache
        for t in (cache.k, cache.v):
            slots = cache.slots(t)
            slots[dst, :, :length].copy_(slots[src, :, :length])


class ForwardTimer:
    """Time spent in forward passes, for benchmarks: on a GPU between CUDA events, read (one
    synchronisation) only when asked, so a decode step never waits for the device to time it;
    on the CPU by the clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = 0.0
        self._start: Any = None

    def __enter__(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start, end))
        else:
            self._seconds += time.perf_counter() - self._start

    def seconds(self) -> float:
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(a.elapsed_time(b) for a, b in self._events) / 1000
            self._events.clear()
        return self._seconds
