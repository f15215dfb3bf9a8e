"""Which KV-cache blocks each decoding row holds: the engine's bookkeeping of a paged cache.

The cache (`model.KVCache`) is a pool of blocks of `block_size` positions. A row holds the
blocks its tokens need, listed in position order in a block table on the device
(`model.BlockTable`), which the engine's rows carry as they move. Free blocks are counted here,
on the host, so admission and preemption decide without reading the device. Every table entry
past a row's own blocks names the sink, one extra block no row holds: a padded token's write
lands there, and so do the writes of rows a compiled step computes beyond the active ones.
"""
from __future__ import annotations

import torch

from ..model.transformer import BlockTable


def blocks_for(n_tokens: int, block_size: int) -> int:
    return -(-n_tokens // block_size)


class BlockAllocator:
    """`n_blocks` blocks of `block_size` positions (the cache has one more, the sink) shared by
    `rows` rows of up to `max_seq_len` positions each. Table changes are queued on the host and
    sent to the device by `flush`, one copy per step."""

    moves_data = False  # a row's data stays in its blocks; only its table row moves

    def __init__(self, n_blocks: int, block_size: int, rows: int, max_seq_len: int,
                 device: torch.device):
        self.n_blocks = n_blocks
        self.block_size = block_size
        self.sink = n_blocks
        self._free = list(range(n_blocks - 1, -1, -1))  # pop() takes the lowest first
        self._held: list[list[int]] = [[] for _ in range(rows)]
        width = blocks_for(max_seq_len, block_size)
        self.table = BlockTable(
            blocks=torch.full((rows, width), self.sink, dtype=torch.long, device=device),
            place=torch.full((n_blocks + 1,), -1, dtype=torch.long, device=device))
        self._pending: list[tuple[int, int, int]] = []  # (row, index, block) not yet on device

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
        for _ in range(need):
            block = self._free.pop()
            self._pending.append((row, len(held), block))
            held.append(block)
        return True

    def release(self, row: int) -> None:
        """Free the row's blocks; its table row names only the sink again."""
        self._free += reversed(self._held[row])
        self._held[row] = []
        self._pending = [p for p in self._pending if p[0] != row]
        self.table.blocks[row] = self.sink

    def move(self, src: int, dst: int) -> None:
        """Row src's blocks become row dst's (dst holds none); src is left empty."""
        assert not self._held[dst], "a row's blocks would be lost"
        self.flush()
        self._held[dst], self._held[src] = self._held[src], []
        self.table.blocks[dst] = self.table.blocks[src]
        self.table.blocks[src] = self.sink

    def flush(self) -> None:
        """Copy the queued table entries to the device (one small copy)."""
        if not self._pending:
            return
        rows, index, blocks = torch.tensor(self._pending, dtype=torch.long).T.to(
            self.table.blocks.device)
        self.table.blocks[rows, index] = blocks
        self.table.place[blocks] = index
        self._pending.clear()

    def rows(self, start: int, stop: int) -> BlockTable:
        """The table of rows start..stop-1, up to date on the device."""
        self.flush()
        return BlockTable(self.table.blocks[start:stop], self.table.place)


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

    def flush(self) -> None:
        pass

    def rows(self, start: int, stop: int) -> None:
        return None
