"""A step's decode rows on the device: one token per running row, at a few fixed batch sizes.

Where shapes must stay fixed (a compiled step, replayed as CUDA graphs; flex attention's decode
kernel, which needs a static batch) the n running rows are padded up to a bucket, the smallest
of `decode_buckets` that holds them, as vLLM pads to its CUDA-graph capture sizes. A run then
sees one shape per bucket, each compiled (and captured) once, at start-up on GPUs.

Padding rows compute a wasted token and write nowhere that is read: in a paged cache their block
table rows name only the sink block, and they sit at position 0 (so their reads are one block,
the sink's, all masked); in an unpaged cache they write at max_seq_len - 1 of their slots, which
no prompt reaches and a sequence writes before it reads.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import torch

from ..model.attention import decode_kernel_takes
from ..model.transformer import BlockTable, Step, Transformer
from .passes import compile_decode, compile_failure, decode_kv_bucket
from .requests import EngineStats
from .rows import RowState

log = logging.getLogger(__name__)

# At most this many decode batch sizes: each is compiled (and on CUDA captured) once at
# start-up, a whole model's compilation each where flex attention needs a static batch, so
# they bound the start-up. With 256 rows: 256, 128, 64, 32 and 16 (the run's last few steps pad
# up to 16).
MAX_DECODE_BUCKETS = 5


def decode_buckets(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes decode rows are padded to: max_batch_size, half of it, a quarter, ...,
    at most MAX_DECODE_BUCKETS of them down to 1. Padding at most doubles a step's rows, and
    only the run's last few steps fall below the smallest bucket."""
    sizes = [max_batch_size]
    while len(sizes) < MAX_DECODE_BUCKETS and sizes[-1] > 1:
        sizes.append(-(-sizes[-1] // 2))
    return tuple(sorted(set(sizes)))


def raise_recompile_limit(compilations: int) -> None:
    """Let torch compile a function at least `compilations` times before it gives up and runs it
    uncompiled (for flex attention, unfused: the whole score matrix). The limit is per
    function and process-wide; its name changed in torch 2.6."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), compilations))


class Decoder:
    """Decode rows 0..n-1 of `rows` over the model's cache (paged through `table`, whose padding
    entries name `sink`), eagerly as a segment of the step's forward pass, or through the
    compiled step. Padded to a bucket when compiled or when flex attention reads the cache."""

    def __init__(self, model: Transformer, rows: RowState, table: BlockTable | None, sink: int,
                 max_seq_len: int, stats: EngineStats, compile: bool):
        self.model, self.rows, self.table, self.sink, self.stats = model, rows, table, sink, stats
        self.max_seq_len, self.compile = max_seq_len, compile
        self.buckets = decode_buckets(rows.n_rows)
        device = rows.device
        # Persistent inputs: a compiled step's inputs keep their addresses from step to step.
        self.tokens = torch.zeros(rows.n_rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows.n_rows, dtype=torch.long, device=device)
        self.blocks = None if table is None else torch.full_like(table.blocks, sink)
        if self.flex:
            raise_recompile_limit(2 * len(self.buckets))  # decode's wrapper and the model's
            attention = model.layers[0].attention
            groups = attention.n_local_heads // attention.n_local_kv_heads
            if not decode_kernel_takes(groups):
                log.info("flex attention: %d query heads per key head is not a power of two, "
                         "which its decode kernel needs: decode takes its general kernel",
                         groups)
        self._compiled = None

    @property
    def compiled(self):
        """The compiled decode step (made on first use, for the read path then in place), or
        None without `compile`."""
        if self.compile and self._compiled is None:
            self._compiled = compile_decode(self.model, static_batch=self.flex)
        return self._compiled

    @compiled.setter
    def compiled(self, step) -> None:
        self._compiled = step

    @property
    def flex(self) -> bool:
        """Whether flex attention reads the cache (a paged cache on GPUs)."""
        return self.table is not None and self.model.paged_reads == "flex"

    @property
    def pads(self) -> bool:
        return self.compile or self.flex

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n) if self.pads else n

    def padded(self, n: int, b: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, BlockTable | None]:
        """Tokens, positions and block table of rows 0..n-1 and the padding up to their bucket
        (or up to b)."""
        b = self.bucket(n) if b is None else b
        self.stats.slot_steps += b
        self.stats.wasted_slot_steps += b - n
        if b == n and not self.compile:  # no padding, and no fixed addresses needed: views
            table = None if self.table is None else BlockTable(self.table.blocks[:n],
                                                               self.table.place)
            return self.rows.next_token[:n], self.rows.position[:n], table
        self.tokens[:n] = self.rows.next_token[:n]
        self.tokens[n:b] = 0
        self.positions[:n] = self.rows.position[:n]
        self.positions[n:b] = 0 if self.table is not None else self.max_seq_len - 1
        if self.table is None:
            return self.tokens[:b], self.positions[:b], None
        self.blocks[:n] = self.table.blocks[:n]
        self.blocks[n:b] = self.sink
        return self.tokens[:b], self.positions[:b], BlockTable(self.blocks[:b], self.table.place)

    def eager_step(self, n: int, kv_len: int, chunks: tuple | None) -> tuple[Step, torch.Tensor]:
        """The step segment and tokens of rows 0..n-1 (padded where shapes are fixed; only the
        first n rows leave the pass)."""
        tokens, positions, table = self.padded(n)
        step = self.model.make_step(positions[:, None], slice(0, len(tokens)), kv_len,
                                    chunks=chunks, table=table)
        if len(tokens) > n:
            step = dataclasses.replace(step, outputs=step.outputs[:n])
        return step, tokens

    def compiled_logits(self, n: int, kv_len: int, b: int | None = None) -> torch.Tensor:
        """Logits (n, vocab) of rows 0..n-1 through the compiled step at their bucket. Reads of
        an unpaged cache are rounded up to `decode_kv_bucket`: a few shapes serve the whole run;
        flex attention's block mask bounds each row's reads itself."""
        tokens, positions, table = self.padded(n, b)
        kv_len = self.max_seq_len if self.flex else decode_kv_bucket(kv_len, self.max_seq_len)
        blocks = () if table is None else (table.blocks, table.place)
        torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
        try:
            return self.compiled(tokens, positions, kv_len, *blocks)[:n]
        except Exception as e:
            if (failed := compile_failure(e)) is None:
                raise
            raise failed from None

    @torch.inference_mode()  # as the engine runs: a compilation's guards include the mode
    def warm_up(self) -> float:
        """Compile the step at every bucket, and on CUDA record its graphs (a graph is recorded
        on its second call), on padding rows alone; the seconds it took."""
        start = time.perf_counter()
        steps = self.stats.slot_steps, self.stats.wasted_slot_steps
        for b in self.buckets:
            for _ in range(2 if self.rows.device.type == "cuda" else 1):
                self.compiled_logits(0, 1, b)  # padding rows alone: nothing read is written
        self.stats.slot_steps, self.stats.wasted_slot_steps = steps
        if self.rows.device.type == "cuda":
            torch.cuda.synchronize(self.rows.device)
        return time.perf_counter() - start
