"""Attention kernels: scaled dot-product attention (fused kernels only on GPUs, grouped-query
attention without repeating keys and values) and flex attention over a paged KV cache."""
from __future__ import annotations

import functools
import logging
import typing
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention import flex_attention as flex_module
from torch.nn.attention.flex_attention import BlockMask, flex_attention

log = logging.getLogger(__name__)

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
    takes no mask and no float32. A masked call (the scorer's and the static baseline's)
    attends with the query heads of each key head folded into its queries (`folded_groups`):
    the mask is repeated per group, not the keys and values. Only a causal float32 call (tests)
    repeats the keys and values per query head."""
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=True)
    groups = q.shape[1] // k.shape[1]
    grouped = mask is None and q.dtype in (torch.float16, torch.bfloat16)
    with sdpa_kernel(GPU_SDPA_BACKENDS):
        if groups > 1 and mask is not None:
            return folded_groups(q, k, v, mask)
        if groups > 1 and not grouped:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=grouped)


def folded_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """Masked attention of q (B, H, T, hd) over grouped k, v (B, kv_heads, L, hd) as plain
    multi-head attention: query head h reads key head h // groups (Meta's `repeat_kv`), so the
    groups of a key head become extra query rows, (B, kv_heads, groups * T, hd), each group
    under the same mask rows (B, 1, T, L). The mask's copy is groups x T x L per row where
    repeating keys and values copies 2 x (H - kv_heads) x L x hd: less for decode (T = 1) and
    for a scorer's chunks."""
    B, H, T, hd = q.shape
    kv_heads = k.shape[1]
    groups = H // kv_heads
    folded = q.reshape(B, kv_heads, groups * T, hd)
    masks = mask.expand(B, 1, T, mask.shape[-1]).repeat(1, 1, groups, 1)  # (B, 1, g * T, L)
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=masks)
    return out.view(B, H, T, hd)


def paged_attention(q: torch.Tensor, cache: KVCache, block_mask: BlockMask) -> torch.Tensor:
    """q (B, H, T, hd) over each row's own blocks of the whole cache, as `block_mask` lists
    them: flex attention, compiled on GPUs (eagerly it computes every score of the pool, which
    only tests on the CPU can afford). Inside a compiled model it is traced as it is: a compiled
    wrapper created or called while tracing would break the graph."""
    if q.device.type != "cuda":
        return flex_attention(q, cache.k, cache.v, block_mask=block_mask, enable_gqa=True)
    options = flex_kernel_options(q.shape[2] == 1, q.dtype, cache.block_size,
                                  q.shape[1] // cache.k.shape[1])
    if torch.compiler.is_compiling():
        return flex_attention(q, cache.k, cache.v, block_mask=block_mask, enable_gqa=True,
                              kernel_options=options)
    compiled = compiled_flex("decode" if q.shape[2] == 1 else "general")
    return compiled(q, cache.k, cache.v, block_mask=block_mask, enable_gqa=True,
                    kernel_options=options)


def _flex_decode(*args, **kwargs) -> torch.Tensor:
    return flex_attention(*args, **kwargs)


def _flex_general(*args, **kwargs) -> torch.Tensor:
    return flex_attention(*args, **kwargs)


@functools.cache
def compiled_flex(kind: str) -> Callable[..., torch.Tensor]:
    """Flex attention compiled for eager forward passes, created outside any trace: one wrapper
    for decode rows (one query each), whose decode kernel needs a static batch (the runner pads
    decode rows to a few batch sizes, each compiled once), and one for prefill chunks, with
    symbolic shapes. Each wraps its own function, so each has its own recompile count."""
    if kind == "decode":
        return torch.compile(_flex_decode, dynamic=False)
    return torch.compile(_flex_general, dynamic=True)


def decode_kernel_takes(groups: int) -> bool:
    """Whether flex attention's decode kernel takes `groups` query heads per key head: a power
    of two. Llama 3.2 3B's 24 / 8 = 3 is not, and decodes through the general kernel."""
    return groups > 0 and groups & (groups - 1) == 0


# The backends flex attention lets a caller choose (kernel_options["BACKEND"]); none before
# torch 2.9.
FLEX_BACKENDS: tuple[str, ...] = typing.get_args(getattr(flex_module, "_Backend", None)) or ()


def flex_kernel_options(decode: bool, dtype: torch.dtype, block_size: int,
                        groups: int) -> dict[str, typing.Any]:
    """Flex attention's kernel for a call on the GPU. Decode rows take the decode kernel, chosen
    explicitly where torch lets one choose, so an unexpected fallback fails instead of running
    slowly (it adapts its tile to the KV block). The general kernel (prefill chunks, and
    decode where the decode kernel cannot go) gets tiles that divide the KV block, as vLLM's
    flex backend chooses them: it rejects a KV block smaller than its default tile (64). Plain
    Python on static values, so a compiled model traces it."""
    if decode and decode_kernel_takes(groups):
        return {"BACKEND": "TRITON_DECODE"} if "TRITON_DECODE" in FLEX_BACKENDS else {}
    preferred = 32 if dtype == torch.float32 else 64  # float32 tiles take twice the memory
    tile = block_size & -block_size  # the largest power of two dividing the block
    options: dict[str, typing.Any] = {"BLOCK_M": preferred, "BLOCK_N": max(min(preferred, tile), 16)}
    if "TRITON" in FLEX_BACKENDS:
        options["BACKEND"] = "TRITON"
    return options


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
