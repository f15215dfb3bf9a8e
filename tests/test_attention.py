"""The attention kernels' choices, on the CPU where their math can run: masked grouped-query
attention with the groups folded into the queries, and flex attention's kernel options."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llama_gen.model.attention import (decode_kernel_takes, flex_kernel_options,
                                       folded_groups)


@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (6, 2), (4, 4)])
def test_folded_groups_attend_as_repeated_keys_and_values(T, heads, kv_heads):
    """Query heads of a key head folded into its queries, under the mask repeated per group,
    give what attention over keys and values repeated per query head gives (Meta's repeat_kv:
    query head h reads key head h // groups), with a mask that differs per row and query."""
    gen = torch.Generator().manual_seed(T * heads)
    B, L, hd = 3, 11, 16
    q = torch.randn(B, heads, T, hd, generator=gen)
    k, v = (torch.randn(B, kv_heads, L, hd, generator=gen) for _ in range(2))
    mask = torch.zeros(B, 1, T, L).masked_fill(torch.rand(B, 1, T, L, generator=gen) < 0.4,
                                               float("-inf"))
    mask[..., 0] = 0  # every query sees a key
    groups = heads // kv_heads
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, dim=1),
                                          v.repeat_interleave(groups, dim=1), attn_mask=mask)
    torch.testing.assert_close(folded_groups(q, k, v, mask), want, atol=1e-6, rtol=0)


def test_flex_kernel_options_fit_the_kv_block_and_the_heads():
    """Decode rows take the decode kernel where the query heads per key head are a power of
    two (Llama 3 8B: 4; Llama 3.2 3B: 3 is not); the general kernel's key tile divides the KV
    block, so blocks of 16 are taken."""
    assert decode_kernel_takes(4) and decode_kernel_takes(1) and not decode_kernel_takes(3)
    assert flex_kernel_options(True, torch.bfloat16, 128, 4).get("BACKEND", "TRITON_DECODE") \
        == "TRITON_DECODE"
    for block in (16, 48, 128, 256):
        for dtype in (torch.bfloat16, torch.float32):
            options = flex_kernel_options(False, dtype, block, 4)
            assert block % options["BLOCK_N"] == 0 and options["BLOCK_N"] >= 16
            assert 128 % options["BLOCK_M"] == 0  # the block mask's query block
            assert options.get("BACKEND", "TRITON") == "TRITON"
    assert flex_kernel_options(True, torch.bfloat16, 16, 3)["BLOCK_N"] == 16  # general: 3B
