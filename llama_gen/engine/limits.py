"""The engine's bounds on its memory: a KV block, and how much one forward pass may hold,
shared by the scheduler (which groups prompts into passes), the runner (which cuts a long prompt
into chunks) and the memory model (`memory.py`, which counts them). Read as `limits.NAME` at the
time of use, so a test may set smaller ones.
"""
from __future__ import annotations

# Positions per KV block on GPUs: flex attention's block, so a sequence holds only what it uses
# (on the CPU the engine keeps one block of max_seq_len per row).
KV_BLOCK_TOKENS = 128
PREFILL_PADDING = 1.25  # padded tokens / real tokens a batched prefill may reach
# Most prompt tokens (padding included) prefilled in one forward pass: a group of shorter
# prompts, or a chunk of a longer prompt. It bounds a pass's hidden states whatever the batch
# size and prompt length.
PREFILL_TOKENS = 4096
# Most elements of the attention mask a chunk of a long prompt may build where reads need one
# (an unpaged cache, or gathered blocks): queries x keys, 128 MiB of float32.
PREFILL_MASK_ELEMENTS = 2 ** 25
# A teacher-forced pass turns hidden states into logits this many rows at a time, so it never
# holds a whole prompt's length x vocabulary floats.
LOGPROB_ROWS = 512


def prefill_chunk(n_tokens: int, masked: bool) -> int:
    """Tokens per pass when a prompt of n_tokens is prefilled in chunks: PREFILL_TOKENS, or
    fewer where each chunk's mask (its tokens x up to n_tokens keys) would pass its bound."""
    if not masked:
        return PREFILL_TOKENS
    return max(1, min(PREFILL_TOKENS, PREFILL_MASK_ELEMENTS // n_tokens))
