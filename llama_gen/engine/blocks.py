"""Which KV-cache blocks each decoding row holds: the scheduler's bookkeeping of the cache, on the
host.

The cache (`model.KVCache`) is a pool of blocks of `block_size` positions. A row holds the
blocks its tokens need, in position order. Free blocks are counted here, so admission and
preemption decide without reading the device. The rows whose blocks changed since the last step
are handed to the runner (`changes`), which writes them into the block table on the device in
one copy; every table entry past a row's own blocks names the sink, one extra block no row
holds: a padded token's write lands there, and so do the writes of rows a compiled step computes
beyond the active ones.
"""
from __future__ import annotations

from typing import Any

from . import limits


def blocks_for(n_tokens: int, block_size: int) -> int:
    return -(-n_tokens // block_size)


def default_block_size(device: Any, max_seq_len: int) -> int:
    """Positions per KV block on `device` (a torch.device: only its type is read): 128 on GPUs
    (flex attention's block), so a sequence holds only what it uses; on the CPU one block of
    max_seq_len per row, where reads are plain views and memory is rarely what limits the
    batch."""
    return limits.KV_BLOCK_TOKENS if device.type == "cuda" else max_seq_len


class BlockAllocator:
    """`n_blocks` blocks of `block_size` positions (the cache has one more, the sink) shared by
    `rows` rows of up to `max_seq_len` positions each (`width` blocks)."""

    moves_data = False  # a row's data stays in its blocks; only its table row moves

    def __init__(self, n_blocks: int, block_size: int, rows: int, max_seq_len: int):
        self.n_blocks = n_blocks
        self.block_size = block_size
        self.sink = n_blocks
        self.width = blocks_for(max_seq_len, block_size)
        self._free = list(range(n_blocks - 1, -1, -1))  # pop() takes the lowest first
        self._held: list[list[int]] = [[] for _ in range(rows)]
        self._changed: set[int] = set()  # rows whose blocks the device's table does not show

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def held_blocks(self) -> int:
        return self.n_blocks - len(self._free)

    def held(self, row: int) -> int:
        return len(self._held[row])

    def extend(self, row: int, n_tokens: int) -> bool:
        """Give the row blocks for its first n_tokens positions; False, taking nothing, if too
        few are free."""
        held = self._held[row]
        need = blocks_for(n_tokens, self.block_size) - len(held)
        if need > len(self._free):
            return False
        if need > 0:
            held += (self._free.pop() for _ in range(need))
            self._changed.add(row)
        return True

    def release(self, row: int) -> None:
        """Free the row's blocks; its table row names only the sink again."""
        self._free += reversed(self._held[row])
        self._held[row] = []
        self._changed.add(row)

    def move(self, src: int, dst: int) -> None:
        """Row src's blocks become row dst's (dst holds none); src is left empty."""
        assert not self._held[dst], "a row's blocks would be lost"
        self._held[dst], self._held[src] = self._held[src], []
        self._changed |= {src, dst}

    def changes(self) -> dict[int, list[int]]:
        """The rows whose blocks changed since the last call, with the blocks each holds now."""
        changed = {row: list(self._held[row]) for row in sorted(self._changed)}
        self._changed.clear()
        return changed


class OneBlockPerRow:
    """The unpaged layout (`BlockAllocator`'s interface): row i holds block i, of max_seq_len
    positions, whatever its length. Reads are plain views of a row's block, so a row's data
    moves with it (`moves_data`) and no table is kept."""

    moves_data = True

    def __init__(self, rows: int, max_seq_len: int):
        self.n_blocks = rows
        self.block_size = max_seq_len
        self._holding = [False] * rows

    @property
    def free_blocks(self) -> int:
        return self._holding.count(False)

    @property
    def held_blocks(self) -> int:
        return self.n_blocks - self.free_blocks

    def held(self, row: int) -> int:
        return int(self._holding[row])

    def extend(self, row: int, n_tokens: int) -> bool:
        assert n_tokens <= self.block_size, "a sequence is longer than max_seq_len"
        self._holding[row] = True
        return True

    def release(self, row: int) -> None:
        self._holding[row] = False

    def move(self, src: int, dst: int) -> None:
        self._holding[dst], self._holding[src] = self._holding[src], False

    def changes(self) -> dict[int, list[int]]:
        return {}


def cache_blocks(rows: int, max_seq_len: int, block_size: int,
                 kv_cache_tokens: int | None) -> BlockAllocator | OneBlockPerRow:
    """The blocks of a cache of `kv_cache_tokens` positions (default: max_seq_len for every
    row) in blocks of `block_size` (at most max_seq_len): one block of max_seq_len per row, an
    unpaged cache, where that is what they make; else a pool. ValueError if the cache cannot
    hold one sequence of max_seq_len."""
    size = min(block_size, max_seq_len)
    tokens = rows * max_seq_len if kv_cache_tokens is None else kv_cache_tokens
    n_blocks = tokens // size
    if n_blocks * size < max_seq_len:
        raise ValueError(f"a KV cache of {tokens} positions cannot hold one sequence of "
                         f"max_seq_len {max_seq_len}")
    if size == max_seq_len and n_blocks >= rows:
        return OneBlockPerRow(rows, max_seq_len)
    return BlockAllocator(n_blocks, size, rows, max_seq_len)
