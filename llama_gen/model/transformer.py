"""The Llama transformer (Llama 1, 2, 3, 3.1 and 3.2): norms, rotary embeddings, attention and
feed-forward blocks over the KV cache of `cache.py`.

Pure math: the model-parallel layers come from a `ParallelLayers` handed in, so this file never
touches process groups. Module names are Meta's checkpoint keys, so loading is a strict
`load_state_dict`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .attention import attention, paged_attention, paged_block_mask
from .cache import BlockTable, KVCache, Segment, Step
from .layers import FusedColumns, ParallelLayers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,), with Llama 3.1's long-context scaling if enabled."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    factor, _ = args.rope_scaling()
    if factor is None:
        return freqs
    low, high = args.rope_low_freq_factor, args.rope_high_freq_factor
    context = args.rope_original_context
    wavelen = 2 * math.pi / freqs
    smooth = (context / wavelen - low) / (high - low)
    between = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > context / low, freqs / factor, between)
    return torch.where(wavelen < context / high, freqs, scaled)


def rope_rotations(args: ModelArgs, positions: int) -> torch.Tensor:
    """(cos, sin) of each position's angle at each frequency: (positions, head_dim / 2, 2), in
    float32 as Meta's reference computes them."""
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), rope_frequencies(args))
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) as Meta's reference does: each pair is a
    complex number multiplied by the unit `rotation` (cos, sin) of its position and frequency.

    x: (N, heads, head_dim); rotation: (N, 1, head_dim / 2, 2)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (N, H, hd/2, 2)
    if torch.compiler.is_compiling():
        # The same product written out in real numbers: inductor generates no code for complex
        # numbers, and written out, the rotation fuses into the kernels around it.
        a, b = pairs.unbind(-1)
        cos, sin = rotation.unbind(-1)
        rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    else:  # eagerly one complex multiply is one kernel, where the written-out form takes six
        rotated = torch.view_as_real(torch.view_as_complex(pairs.contiguous())
                                     * torch.view_as_complex(rotation))
    return rotated.flatten(-2).type_as(x)


class Attention(FusedColumns):
    COLUMNS = ("wq", "wk", "wv")

    def __init__(self, args: ModelArgs, layers: ParallelLayers):
        super().__init__()
        if args.n_heads % layers.world_size or args.kv_heads % layers.world_size:
            raise ValueError("heads must divide the model-parallel size")  # checked earlier
        self.n_local_heads = args.n_heads // layers.world_size
        self.n_local_kv_heads = args.kv_heads // layers.world_size
        self.head_dim = args.head_dim
        self.wq = layers.column(args.dim, args.n_heads * args.head_dim)
        self.wk = layers.column(args.dim, args.kv_heads * args.head_dim)
        self.wv = layers.column(args.dim, args.kv_heads * args.head_dim)
        self.wo = layers.row(args.n_heads * args.head_dim, args.dim)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        n = x.shape[0]  # x: (N, dim), the step's tokens end to end
        q, k, v = self.products(x)
        q = apply_rope(q.view(n, self.n_local_heads, self.head_dim), step.rotation)
        k = apply_rope(k.view(n, self.n_local_kv_heads, self.head_dim), step.rotation)
        v = v.view(n, self.n_local_kv_heads, self.head_dim)
        out, start = [], 0
        for seg in step.segments:
            stop = start + seg.n_tokens
            out.append(self.attend(q[start:stop], k[start:stop], v[start:stop], seg))
            start = stop
        return self.wo(out[0] if len(out) == 1 else torch.cat(out))  # (N, dim)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               seg: Segment) -> torch.Tensor:
        """Write one segment's keys and values into the cache and attend: (B * T, heads * hd)."""
        B, T = seg.positions.shape
        self.cache.k[0][:, seg.write_index] = k.transpose(0, 1)  # (kv, N, hd)
        self.cache.v[0][:, seg.write_index] = v.transpose(0, 1)
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if seg.fresh:  # (B, heads, T, hd)
            out = attention(q, k, v, None, causal=True)
        elif seg.block_mask is not None:
            out = paged_attention(q, self.cache, seg.block_mask)
        else:
            out = torch.cat([attention(q[a:b], *self.cached(seg, a, b, n), seg.mask[a:b, ..., :n])
                             for a, b, n in seg.chunks or ((0, B, seg.kv_len),)])
        return out.transpose(1, 2).reshape(B * T, -1)

    def cached(self, seg: Segment, a: int, b: int, length: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (b - a, kv_heads, length, hd) of the segment's rows a..b-1: a view of
        their slots, or their blocks gathered in position order."""
        cache = self.cache
        if seg.table is None:
            rows = slice(seg.rows.start + a, seg.rows.start + b)
            return cache.slots(cache.k)[rows, :, :length], cache.slots(cache.v)[rows, :, :length]
        size = cache.block_size
        blocks = seg.table.blocks[a:b, :-(-length // size)]
        index = (blocks[:, :, None] * size + torch.arange(size, device=blocks.device))
        index = index.flatten(1)[:, :length]  # (b - a, length)
        return (cache.k[0][:, index].transpose(0, 1), cache.v[0][:, index].transpose(0, 1))


class FeedForward(FusedColumns):
    COLUMNS = ("w1", "w3")

    def __init__(self, args: ModelArgs, layers: ParallelLayers):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = layers.column(args.dim, hidden)
        self.w2 = layers.row(hidden, args.dim)
        self.w3 = layers.column(args.dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.products(x)  # silu and product in place: no FFN-wide temporaries
        return self.w2(F.silu(gate, inplace=True).mul_(up))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layers: ParallelLayers):
        super().__init__()
        self.attention = Attention(args, layers)
        self.feed_forward = FeedForward(args, layers)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), step)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, layers: ParallelLayers):
        super().__init__()
        self.args = args
        self.tok_embeddings = layers.embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, layers) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = layers.head(args.dim, args.vocab_size)

    def tie_head(self) -> None:
        """A tied head (`tie_word_embeddings`: Llama 3.2 1B and 3B) holds the embedding's own
        tensor, not a copy of it, where this rank's slices of both are the same rows: a
        vocabulary-split embedding, or one rank (525 MB saved on Llama 3.2 1B in bf16). An int8
        head keeps its own weights."""
        embedding, head = self.tok_embeddings.weight, self.output.weight
        if (self.args.tie_word_embeddings and head.shape == embedding.shape
                and head.dtype == embedding.dtype and torch.equal(head, embedding)):
            self.output.weight = embedding

    def fuse(self) -> None:
        """Stack each block's q, k, v and its FFN's w1, w3 weights into one per block
        (`FusedColumns`), after a strict load by Meta's key names; each rank stacks its own
        shards. Block by block: the separate weights are freed as each fused one is made,
        provided the loader holds no other reference to them."""
        for block in self.layers:
            block.attention.fuse()
            block.feed_forward.fuse()

    def setup_cache(self, slots: int, max_seq_len: int, *, blocks: int | None = None,
                    block_size: int | None = None) -> None:
        """Allocate the KV cache and rotary tables on the model's device and dtype: `slots`
        blocks of max_seq_len positions, slot i being block i; or, for a paged cache, `blocks`
        blocks of `block_size`. A cache of the same shape is kept, not reallocated: it holds
        nothing that outlives a sequence (every position is written before it is read), and CUDA
        graphs of a compiled decode step, recorded with its address, need not be recorded
        again. Paged reads take flex attention on GPUs and gather blocks on the CPU
        (`paged_reads`)."""
        weight = self.tok_embeddings.weight  # in the model's dtype, whatever --quantize does
        blocks, block_size = (slots, max_seq_len) if blocks is None else (blocks, block_size)
        for layer in self.layers:
            attn = layer.attention
            shape = (1, attn.n_local_kv_heads, blocks * block_size, attn.head_dim)
            cache = attn.cache
            if not (cache and cache.k.shape == shape and cache.block_size == block_size
                    and cache.k.dtype == weight.dtype and cache.k.device == weight.device):
                attn.cache = None  # freed before its successor is allocated
                attn.cache = KVCache.empty(blocks, attn.n_local_kv_heads, block_size,
                                           attn.head_dim, weight.device, weight.dtype)
        self.paged_reads = "flex" if weight.device.type == "cuda" else "gather"
        self.register_buffer("rope_rotation", rope_rotations(self.args, max_seq_len)
                             .to(weight.device), persistent=False)

    def make_step(self, positions: torch.Tensor, rows: slice, kv_len: int, fresh: bool = False,
                  chunks: tuple[tuple[int, int, int], ...] | None = None,
                  last: torch.Tensor | None = None, every_token: bool = False,
                  table: BlockTable | None = None) -> Step:
        """A one-segment step (see `Segment`) whose outputs are each row's last token: position
        `last[i]` of row i (right-padded rows), or the final one; or, with `every_token`, all
        of its tokens. Without a `table`, row i is cache slot rows.start + i. `Step.join`
        combines steps."""
        assert not (fresh and chunks), "a fresh segment attends causally in one pass"
        device = positions.device
        B, T = positions.shape
        cache = self.layers[0].attention.cache
        size = cache.block_size
        if table is None:
            slots = torch.arange(rows.start, rows.start + B, device=device)[:, None]
            write_index = slots * size + positions
        else:
            write_index = table.blocks.gather(1, positions // size) * size + positions % size
        mask = block_mask = None
        if fresh:
            pass
        elif table is not None and self.paged_reads == "flex":
            block_mask = paged_block_mask(table, positions, size, cache.n_blocks)
        else:
            key_positions = torch.arange(kv_len, device=device)
            mask = torch.zeros(positions.shape + (kv_len,), device=device,
                               dtype=self.tok_embeddings.weight.dtype)  # (B, T, L)
            mask.masked_fill_(key_positions > positions[:, :, None], float("-inf"))
            mask = mask.unsqueeze(1)
        if every_token:
            outputs = torch.arange(B * T, device=device)
        else:
            outputs = torch.arange(B, device=device) * T + (T - 1 if last is None else last)
        segment = Segment(positions=positions, rows=rows, kv_len=kv_len, fresh=fresh, mask=mask,
                          write_index=write_index.reshape(-1), table=table,
                          block_mask=block_mask, chunks=chunks)
        return Step(segments=(segment,),
                    rotation=self.rope_rotation[positions.reshape(-1)].unsqueeze(1),
                    outputs=outputs)

    def forward(self, tokens: torch.Tensor, step: Step) -> torch.Tensor:
        """Float32 logits (n_out, vocab) for the step's outputs."""
        return self.logits(self.final_hidden(tokens, step))

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int,
               blocks: torch.Tensor | None = None,
               place: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits (B, vocab) for one decode step over rows 0..B-1: row i's token
        `tokens[i]` goes to `positions[i]`, and attention reads the first `kv_len` positions of
        slot i, or of the blocks `blocks[i]` lists (a paged cache; `place` as in `BlockTable`).
        Everything it needs is built inside, so a compiled copy takes just these inputs."""
        table = None if blocks is None else BlockTable(blocks, place)
        step = self.make_step(positions[:, None], slice(0, len(tokens)), kv_len, table=table)
        return self(tokens[:, None], step)

    def final_hidden(self, tokens: torch.Tensor, step: Step) -> torch.Tensor:
        """The normalised hidden states (n_out, dim) of the step's outputs, which `logits` maps to
        the vocabulary; `tokens` is any shape holding the step's N tokens in order."""
        h = self.tok_embeddings(tokens.reshape(-1))  # (N, dim)
        for block in self.layers:
            h = block(h, step)
        return self.norm(h[step.outputs])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits for hidden states from `final_hidden` (any leading shape), laid out
        row by row whatever layout the output head's product has, as sampling reads rows."""
        return self.output(hidden).contiguous().float()
