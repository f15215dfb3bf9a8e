"""The model-parallel layers handed to the model: Meta's (and fairscale's) layers, with their
weight layout, built for inference.

fairscale's constructors make every weight in float32 on every rank to scatter it, before a byte
of the checkpoint is read (`docs/benchmarks.md` has what that cost). These allocate nothing:
their weights sit on the meta device until the checkpoint's tensors take their place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from torch import nn

from ..runtime.distributed import all_gather_last_dim, all_reduce, all_reduce_max
from .kernels import PackedWeight, int8_linear, linear


def unfilled_weight(*shape: int) -> nn.Parameter:
    """A weight for the checkpoint to fill (`load_state_dict(assign=True)` puts the loaded
    tensor in its place). On the meta device it costs no memory and no time until then."""
    return nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)


def part_size(size: int, parts: int) -> int:
    assert size % parts == 0, f"{size} does not split into {parts} equal parts"  # checked earlier
    return size // parts


class ParallelLinear(nn.Module):
    """A linear layer's weight (rows, cols) on this rank, in the model's dtype or, with `int8`,
    in int8 with a scale per row (`quantize.py`; the scales load under the key
    `<layer>.scales`)."""

    def __init__(self, rows: int, cols: int, int8: bool = False):
        super().__init__()
        self.weight = unfilled_weight(rows, cols)
        self.register_buffer("scales", None)
        if int8:
            self.weight = nn.Parameter(self.weight.to(torch.int8), requires_grad=False)
            self.scales = torch.empty(rows, device="meta")

    def product(self, x: torch.Tensor) -> torch.Tensor:
        if self.scales is not None:
            return int8_linear(x, self.weight, self.scales)
        return linear(x, self.weight)

    def row_absmax(self, weight: torch.Tensor) -> torch.Tensor:
        """Each row's max|w| of this rank's slice `weight`, over the whole row: this rank's
        rows are whole unless a subclass splits them."""
        return weight.abs().amax(dim=1)


class ColumnParallelLinear(ParallelLinear):
    """x @ W.T with W (out, in) split along its outputs: rank r of `parts` holds rows
    r * out / parts onwards. With `gather_output` every rank gets the whole output; with
    `packed`, the product uses a `PackedWeight` (float32 only)."""

    def __init__(self, in_features: int, out_features: int, parts: int,
                 gather_output: bool = False, packed: bool = False, int8: bool = False):
        super().__init__(part_size(out_features, parts), in_features, int8)
        self.parts, self.gather_output = parts, gather_output
        self.packed = PackedWeight() if packed and not int8 else None

    def product(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and self.packed.usable(x, self.weight):
            return self.packed.linear(x, self.weight)
        return super().product(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.product(x)
        if self.gather_output and self.parts > 1:
            return all_gather_last_dim(out, self.parts)
        return out


class FusedColumns(nn.Module):
    """A block whose column-parallel layers `COLUMNS` (attention's wq, wk, wv; the FFN's w1, w3)
    load apart, by Meta's key names, and after `fuse` multiply as one weight: one product
    instead of several, and the activations read once (gpt-fast fuses wqkv likewise).

    `fuse` stacks this rank's shards by rows into `fused` and makes each layer's weight a view
    of its rows, so the separate weights are freed, `state_dict()` keeps Meta's keys and the
    parameters count each byte once. Casting or moving the model (`.to`) keeps the views;
    loading into a fused block stacks again. Both groups fuse on the CPU too: at stories15M's
    shapes no run was slower, and greedy decoding gained about 10% (docs/benchmarks.md)."""

    COLUMNS: tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self.register_buffer("fused", None, persistent=False)
        self.register_buffer("fused_scales", None, persistent=False)
        self.fused_sizes: tuple[int, ...] = ()
        self.register_load_state_dict_post_hook(_fuse_again)

    def fuse(self) -> None:
        columns = [getattr(self, name) for name in self.COLUMNS]
        assert not any(column.gather_output for column in columns), "outputs stay split"
        self.fused = self.fused_scales = None  # a stale copy (loading again) is freed first
        self.fused = torch.cat([column.weight for column in columns])  # (sum of outs, in)
        if columns[0].scales is not None:  # int8: each row keeps its own scale
            self.fused_scales = torch.cat([column.scales for column in columns])
        self.fused_sizes = tuple(column.weight.shape[0] for column in columns)
        self._share()

    def _share(self) -> None:
        """Point each column layer's weight (and scales) at its rows of `fused`."""
        start = 0
        for name, rows in zip(self.COLUMNS, self.fused_sizes):
            column, stop = getattr(self, name), start + rows
            column.weight = nn.Parameter(self.fused[start:stop], requires_grad=False)
            if self.fused_scales is not None:
                column.scales = self.fused_scales[start:stop]
            start = stop

    def products(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each column layer's output for x, in `COLUMNS` order (views of one product once
        fused). Column layers here never gather their output."""
        if self.fused is None:
            return tuple([getattr(self, name)(x) for name in self.COLUMNS])
        if self.fused_scales is not None:
            return int8_linear(x, self.fused, self.fused_scales).split(self.fused_sizes, dim=-1)
        return linear(x, self.fused).split(self.fused_sizes, dim=-1)

    def _apply(self, fn, recurse=True):
        # fn converted the views and `fused` apart: the views become views again, layer by
        # layer, so a cast holds no second copy beyond one block's.
        out = super()._apply(fn, recurse)
        if self.fused is not None:
            self._share()
        return out


def _fuse_again(block: FusedColumns, _incompatible_keys) -> None:
    """Loading into a fused block replaced or wrote its separate weights: stack them again."""
    if block.fused is not None:
        block.fuse()


class RowParallelLinear(ParallelLinear):
    """x @ W.T with W (out, in) split along its inputs; `x` comes split the same way (a column
    layer's output), and the group sums the partial products. In int8 every rank scales its
    partial product by the same whole-row scales before the sum."""

    def __init__(self, in_features: int, out_features: int, parts: int, int8: bool = False):
        super().__init__(out_features, part_size(in_features, parts), int8)
        self.parts = parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.product(x)
        return all_reduce(out) if self.parts > 1 else out

    def row_absmax(self, weight: torch.Tensor) -> torch.Tensor:
        """Each row's max|w| over the whole row, whose columns the group's ranks share out."""
        most = super().row_absmax(weight)
        return all_reduce_max(most) if self.parts > 1 else most


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
    the embedding over the vocabulary, Llama 1/2 over the embedding dimension). `int8`: the
    blocks' linear layers hold int8 weights (`quantize.py`), and with `int8_head` the output
    head too; the embedding never does."""

    vocab_parallel_embedding: bool = False
    int8: bool = False
    int8_head: bool = False

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
                                    gather_output=gather_output, packed=packed, int8=self.int8)

    def row(self, in_features: int, out_features: int) -> nn.Module:
        return RowParallelLinear(in_features, out_features, self.world_size, int8=self.int8)

    def head(self, dim: int, vocab_size: int) -> nn.Module:
        """The output head: column-parallel, its logits gathered on every rank."""
        return ColumnParallelLinear(dim, vocab_size, self.world_size, gather_output=True,
                                    packed=True, int8=self.int8_head)
