"""The Llama transformer (Llama 1, 2, 3 and 3.1) with a slot-indexed KV cache.

Pure math: the model-parallel layers come from a `ParallelLayers` handed in, so this file never
touches process groups. Module names are Meta's checkpoint keys, so loading is a strict
`load_state_dict`.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .args import (LLAMA_3_ROPE_HIGH_FREQ_FACTOR, LLAMA_3_ROPE_LOW_FREQ_FACTOR,
                   LLAMA_3_ROPE_ORIGINAL_CONTEXT, ModelArgs)
from .layers import ParallelLayers


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
    if not args.use_scaled_rope:
        return freqs
    factor = args.rope_scaling_factor
    low, high = LLAMA_3_ROPE_LOW_FREQ_FACTOR, LLAMA_3_ROPE_HIGH_FREQ_FACTOR
    context = LLAMA_3_ROPE_ORIGINAL_CONTEXT
    wavelen = 2 * math.pi / freqs
    smooth = (context / wavelen - low) / (high - low)
    between = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > context / low, freqs / factor, between)
    return torch.where(wavelen < context / high, freqs, scaled)


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


@dataclass
class KVCache:
    """Keys and values for `slots` sequences of up to `max_seq_len` tokens each."""

    k: torch.Tensor  # (slots, n_local_kv_heads, max_seq_len, head_dim)
    v: torch.Tensor

    @classmethod
    def empty(cls, slots: int, kv_heads: int, max_seq_len: int, head_dim: int,
              device: torch.device, dtype: torch.dtype) -> KVCache:
        shape = (slots, kv_heads, max_seq_len, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(shape, device=device, dtype=dtype))


@dataclass
class Segment:
    """A rectangle of tokens in a forward pass: row i of its (B, T) tokens is cache slot
    `rows.start + i`, and its token t attends to cache positions 0..positions[i, t]. `kv_len`
    bounds every position + 1. A `fresh` segment holds positions 0..T-1 in every row (prompts
    from the start of their slots): it writes the cache by slicing and attends causally, with no
    mask to build.
    """

    positions: torch.Tensor  # (B, T) int64
    rows: slice
    kv_len: int
    fresh: bool
    mask: torch.Tensor | None  # (B, 1, T, kv_len) additive: 0 where a query may attend, else -inf
    batch_index: torch.Tensor  # (B, 1)
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


class Attention(nn.Module):
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
        q = apply_rope(self.wq(x).view(n, self.n_local_heads, self.head_dim), step.rotation)
        k = apply_rope(self.wk(x).view(n, self.n_local_kv_heads, self.head_dim), step.rotation)
        v = self.wv(x).view(n, self.n_local_kv_heads, self.head_dim)
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
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))  # (B, T, heads, hd)
        cache_k, cache_v = self.cache.k[seg.rows], self.cache.v[seg.rows]
        if seg.fresh:
            cache_k[:, :, :T] = k.transpose(1, 2)
            cache_v[:, :, :T] = v.transpose(1, 2)
        else:
            cache_k[seg.batch_index, :, seg.positions] = k  # writes (B, T, kv, hd)
            cache_v[seg.batch_index, :, seg.positions] = v
        keys = cache_k[:, :, : seg.kv_len]  # (B, kv, L, hd)
        values = cache_v[:, :, : seg.kv_len]

        q = q.transpose(1, 2)  # (B, H, T, hd)
        if seg.chunks is None:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=seg.mask,
                                                 is_causal=seg.fresh, enable_gqa=True)
        else:
            out = torch.cat([F.scaled_dot_product_attention(
                q[a:b], keys[a:b, :, :n], values[a:b, :, :n], attn_mask=seg.mask[a:b, ..., :n],
                enable_gqa=True) for a, b, n in seg.chunks])
        return out.transpose(1, 2).reshape(B * T, -1)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, layers: ParallelLayers):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = layers.column(args.dim, hidden)
        self.w2 = layers.row(hidden, args.dim)
        self.w3 = layers.column(args.dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


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
        self.output = layers.column(args.dim, args.vocab_size, gather_output=True, packed=True)

    def setup_cache(self, slots: int, max_seq_len: int) -> None:
        """Allocate the KV cache and rotary tables on the model's device and dtype. A cache of
        the same shape is kept, not reallocated: it holds nothing that outlives a sequence
        (every position is written before it is read), and CUDA graphs of a compiled decode
        step, recorded with its address, need not be recorded again."""
        weight = self.output.weight
        for block in self.layers:
            attn = block.attention
            shape = (slots, attn.n_local_kv_heads, max_seq_len, attn.head_dim)
            cache = attn.cache
            if not (cache and cache.k.shape == shape and cache.k.dtype == weight.dtype
                    and cache.k.device == weight.device):
                attn.cache = None  # freed before its successor is allocated
                attn.cache = KVCache.empty(*shape, weight.device, weight.dtype)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32),
                             rope_frequencies(self.args))  # (S, hd/2)
        self.register_buffer("rope_rotation", torch.stack((angles.cos(), angles.sin()), dim=-1)
                             .to(weight.device), persistent=False)  # (S, hd/2, 2)

    def make_step(self, positions: torch.Tensor, rows: slice, kv_len: int, fresh: bool = False,
                  chunks: tuple[tuple[int, int, int], ...] | None = None,
                  last: torch.Tensor | None = None, every_token: bool = False) -> Step:
        """A one-segment step (see `Segment`) whose outputs are each row's last token: position
        `last[i]` of row i (right-padded rows), or the final one; or, with `every_token`, all
        of its tokens. `Step.join` combines steps."""
        assert not (fresh and chunks), "a fresh segment attends causally in one pass"
        device = positions.device
        mask = None
        if not fresh:
            key_positions = torch.arange(kv_len, device=device)
            mask = torch.zeros(positions.shape + (kv_len,), device=device,
                               dtype=self.output.weight.dtype)  # (B, T, L)
            mask.masked_fill_(key_positions > positions[:, :, None], float("-inf"))
            mask = mask.unsqueeze(1)
        B, T = positions.shape
        if every_token:
            outputs = torch.arange(B * T, device=device)
        else:
            outputs = torch.arange(B, device=device) * T + (T - 1 if last is None else last)
        segment = Segment(positions=positions, rows=rows, kv_len=kv_len, fresh=fresh, mask=mask,
                          batch_index=torch.arange(B, device=device)[:, None], chunks=chunks)
        return Step(segments=(segment,),
                    rotation=self.rope_rotation[positions.reshape(-1)].unsqueeze(1),
                    outputs=outputs)

    def forward(self, tokens: torch.Tensor, step: Step) -> torch.Tensor:
        """Float32 logits (n_out, vocab) for the step's outputs."""
        return self.logits(self.final_hidden(tokens, step))

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Float32 logits (B, vocab) for one decode step over cache slots 0..B-1: slot i's token
        `tokens[i]` goes to `positions[i]`, and attention reads the first `kv_len` positions.
        Everything it needs is built inside, so a compiled copy takes just these inputs."""
        step = self.make_step(positions[:, None], slice(0, len(tokens)), kv_len)
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
