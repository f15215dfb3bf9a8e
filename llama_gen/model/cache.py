"""The KV cache and what one forward pass reads and writes of it.

A pass is a `Step`: segments of rows, each with its positions, rotations and cache slots (or
block table), so one forward takes prefill chunks and decode rows together. The cache is blocks
of positions laid end to end; with one block of max_seq_len per slot it is a plain slot cache.
"""
from __future__ import annotations

import itertools
import math
import mmap
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask


@dataclass
class KVCache:
    """Keys and values in blocks of `block_size` positions laid end to end: position p of block b
    is index b * block_size + p of the sequence dimension. The layout is flex attention's
    (batch 1, heads, positions, head_dim), so a paged decode reads it in place. With one block of
    max_seq_len per slot (`Transformer.setup_cache`'s default), slot i is block i and its
    positions are a plain view (`slots`)."""

    k: torch.Tensor  # (1, n_local_kv_heads, n_blocks * block_size, head_dim)
    v: torch.Tensor
    block_size: int

    @classmethod
    def empty(cls, n_blocks: int, kv_heads: int, block_size: int, head_dim: int,
              device: torch.device, dtype: torch.dtype) -> KVCache:
        shape = (1, kv_heads, n_blocks * block_size, head_dim)
        return cls(zeros(shape, device, dtype), zeros(shape, device, dtype), block_size)

    @property
    def n_blocks(self) -> int:
        return self.k.shape[2] // self.block_size

    def slots(self, t: torch.Tensor) -> torch.Tensor:
        """`k` or `v` seen as (n_blocks, kv_heads, block_size, head_dim): a view, not a copy."""
        return t[0].unflatten(1, (self.n_blocks, self.block_size)).transpose(0, 1)


def zeros(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Zeros that cost nothing until written. On the CPU they are pages of an anonymous memory
    map, which the OS hands out zeroed at their first touch: a cache of the model's whole context
    for every row (the CPU's default) then takes time and memory only for the positions its
    sequences reach, where `torch.zeros` writes every page before the first step (1.7 GiB for 32
    rows of 4096 positions at stories15M's shape). Zeros, not `torch.empty`: a masked key's
    weight is 0, and 0 times a NaN left in reused memory would still be NaN."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes == 0:
        return torch.zeros(shape, device=device, dtype=dtype)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # a huge page would zero 2 MiB at a row's first write
        pages.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(pages, dtype=dtype).view(shape)  # the tensor keeps the map alive


@dataclass
class BlockTable:
    """Where a paged cache keeps a segment's rows: row i's position p is in block
    blocks[i, p // block_size]. Entries past a row's own blocks name a sink block that no row
    reads, so a padded token's write lands there. `place[b]` is block b's index in its row's
    list (-1 for a block no row holds): flex attention's mask reads it to tell a row's own
    blocks from the rest of the pool."""

    blocks: torch.Tensor  # (B, max_blocks) int64
    place: torch.Tensor  # (n_blocks,) int64


@dataclass
class Segment:
    """A rectangle of tokens in a forward pass: row i of its (B, T) tokens is cache slot
    `rows.start + i`, and its token t attends to cache positions 0..positions[i, t]. `kv_len`
    bounds every position + 1. A `fresh` segment holds positions 0..T-1 in every row (prompts
    from the start of their slots): it attends causally among its own tokens, with no mask to
    build and no cache to read.

    Its keys and values are written at `write_index` of the cache's positions. Reads take one of
    three paths: a slot's own positions as a view (no `table`: slot i is block i), a paged read
    through `table` with flex attention (`block_mask`, on GPUs), or a paged read that gathers
    each row's blocks (on the CPU).
    """

    positions: torch.Tensor  # (B, T) int64
    rows: slice
    kv_len: int
    fresh: bool
    mask: torch.Tensor | None  # (B, 1, T, kv_len) additive: 0 where a query may attend, else -inf
    write_index: torch.Tensor  # (B * T,) int64: where each token's key and value go
    table: BlockTable | None = None
    block_mask: BlockMask | None = None
    # Row ranges attended separately, each over keys up to its own longest context: (start,
    # stop, kv_len). A chunk of short contexts then reads less of the cache.
    chunks: tuple[tuple[int, int, int], ...] | None = None

    @property
    def n_tokens(self) -> int:
        return self.positions.numel()


@dataclass
class Step:
    """Where one forward pass reads and writes: its segments' tokens laid end to end (N tokens,
    segment by segment, row by row), their rotations, and which of them leave the pass."""

    segments: tuple[Segment, ...]
    rotation: torch.Tensor  # (N, 1, head_dim / 2, 2): cos and sin of each token's angles
    outputs: torch.Tensor  # (n_out,) indices of the tokens whose final hidden states leave

    @property
    def n_tokens(self) -> int:
        return sum(seg.n_tokens for seg in self.segments)

    @classmethod
    def join(cls, steps: list[Step]) -> Step:
        """One pass doing the work of `steps`: their segments side by side, so the layers'
        weights are read once (a prompt's prefill rides along with a decode step)."""
        if len(steps) == 1:
            return steps[0]
        offsets = itertools.accumulate((step.n_tokens for step in steps), initial=0)
        return cls(segments=tuple(seg for step in steps for seg in step.segments),
                   rotation=torch.cat([step.rotation for step in steps]),
                   outputs=torch.cat([step.outputs + offset
                                      for step, offset in zip(steps, offsets)]))
