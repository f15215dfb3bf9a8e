"""Attention kernels: scaled dot-product attention (fused kernels only on GPUs, grouped-query
attention where the kernel takes it) and flex attention over a paged KV cache."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .cache import BlockTable, KVCache

# Attention kernels a GPU may use. The math backend is left out: it expands grouped keys and
# values per query head and upcasts them, many times the bytes of the fused kernels, so a call
# no fused kernel takes fails loudly instead of running slowly.
GPU_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                     SDPBackend.CUDNN_ATTENTION]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention of q (B, H, T, hd) over k, v (B, kv_heads, L, hd). On a GPU
    only fused kernels may run. Of those, flash attention alone takes grouped heads, and it
    takes no mask and no float32; otherwise the keys and values are repeated per query head
    first (a copy of what the prefill just computed, or of a scorer's chunk)."""
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=True)
    groups = q.shape[1] // k.shape[1]
    grouped = mask is None and q.dtype in (torch.float16, torch.bfloat16)
    if groups > 1 and not grouped:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    with sdpa_kernel(GPU_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=grouped)


_compiled_flex_attention: Callable[..., torch.Tensor] | None = None


def paged_attention(q: torch.Tensor, cache: KVCache, block_mask: BlockMask) -> torch.Tensor:
    """q (B, H, T, hd) over each row's own blocks of the whole cache, as `block_mask` lists
    them: flex attention, compiled on GPUs (eagerly it computes every score of the pool, which
    only tests on the CPU can afford)."""
    global _compiled_flex_attention
    if q.device.type != "cuda":
        return flex_attention(q, cache.k, cache.v, block_mask=block_mask, enable_gqa=True)
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention)
    return _compiled_flex_attention(q, cache.k, cache.v, block_mask=block_mask, enable_gqa=True)


def paged_block_mask(table: BlockTable, positions: torch.Tensor, block_size: int,
                     pool_blocks: int) -> BlockMask:
    """Flex attention's block mask for rows reading their own blocks of a pool of `pool_blocks`:
    row i visits its first positions[i].max() // block_size + 1 blocks, in table order, and the
    mask keeps keys at its own positions up to each query's. Built on the device: no host
    reads."""
    B, T = positions.shape
    q_blocks = -(-T // FLEX_QUERY_BLOCK)
    kv_count = (positions.max(dim=1).values // block_size + 1).to(torch.int32)
    indices = F.pad(table.blocks, (0, pool_blocks - table.blocks.shape[1]))
    blocks, place, widest = table.blocks, table.place, table.blocks.shape[1] - 1

    def own_earlier_positions(b, h, q_idx, kv_idx):
        block = kv_idx // block_size
        index = place[block]
        own = blocks[b, index.clamp(0, widest)] == block
        return own & (index >= 0) & (index * block_size + kv_idx % block_size
                                     <= positions[b, q_idx])

    return BlockMask.from_kv_blocks(
        kv_count[:, None, None].expand(B, 1, q_blocks).contiguous(),
        indices.to(torch.int32)[:, None, None].expand(B, 1, q_blocks, pool_blocks).contiguous(),
        BLOCK_SIZE=(FLEX_QUERY_BLOCK, block_size), mask_mod=own_earlier_positions,
        seq_lengths=(T, pool_blocks * block_size), compute_q_blocks=False)


FLEX_QUERY_BLOCK = 128  # queries per block of a flex attention block mask
