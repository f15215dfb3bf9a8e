"""Choosing the next token: pure functions of logits, settings and counter-based randomness.

Each sequence draws its random numbers from (seed, counter) alone, where the counter is the index
of the token being chosen. So a sequence's tokens do not depend on its batch neighbours, on the
number of processes or on a resume, and every model-parallel rank draws the same number without
communicating.
"""
from __future__ import annotations

import hashlib

import torch

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Thomas Mueller's) on int64 tensors holding values below 2**32.
    Every product stays below 2**59, so nothing overflows."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def counter_uniform(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One uniform number in (0, 1) per row, a pure function of (seed, counter); float64."""
    h = _mix32(counters & _MASK32)
    h = _mix32(h ^ ((seeds >> 32) & _MASK32))
    h = _mix32(h ^ (seeds & _MASK32))
    return (h.double() + 0.5) / 2.0**32


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under the model's own distribution (temperature 1, no top-p)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


ARGMAX_BLOCK = 128  # vocabulary entries per block in `argmax`


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)` for (B, V) logits: the first index of each row's maximum, a NaN
    counting as the maximum. On the CPU torch's argmax is a scalar loop (1.3 ms at 32 x 32000
    here); this takes the vectorised maximum of each block of ARGMAX_BLOCK entries, the first
    best block, and the first best entry within it (0.15 ms)."""
    B, V = logits.shape
    if logits.device.type != "cpu" or V % ARGMAX_BLOCK:
        return logits.argmax(dim=-1)
    rows = torch.arange(B, device=logits.device)
    if logits.stride(0) == 1 and B > 1:  # a transposed (V, B) product: reduce across blocks
        blocks = logits.T.view(V // ARGMAX_BLOCK, ARGMAX_BLOCK, B)
        best_block = blocks.amax(dim=1).argmax(dim=0)  # (B,)
        within = blocks[best_block, :, rows].argmax(dim=-1)
    else:
        blocks = logits.view(B, V // ARGMAX_BLOCK, ARGMAX_BLOCK)
        best_block = blocks.amax(dim=-1).argmax(dim=-1)
        within = blocks[rows, best_block].argmax(dim=-1)
    return best_block * ARGMAX_BLOCK + within


NUCLEUS_CANDIDATES = 256  # most likely tokens looked at before falling back to a full sort


def _pick_in_nucleus(sorted_probs: torch.Tensor, order: torch.Tensor, top_p: torch.Tensor,
                     uniform: torch.Tensor) -> torch.Tensor:
    """Invert the nucleus's CDF at `uniform`, given probabilities sorted in descending order
    (all of the vocabulary, or a prefix known to hold the whole nucleus)."""
    cumulative = sorted_probs.cumsum(dim=-1)
    # Outside the nucleus: the mass before it already reaches top_p (top_p 1 keeps the whole
    # float32 tail), or it cannot be drawn at all.
    outside = (cumulative - sorted_probs >= top_p.unsqueeze(-1)) & (top_p < 1).unsqueeze(-1)
    outside |= sorted_probs == 0
    kept = sorted_probs.masked_fill(outside, 0.0).cumsum(dim=-1)
    target = uniform.to(kept.dtype) * kept[:, -1]
    pick = (kept <= target.unsqueeze(-1)).sum(dim=-1, keepdim=True)
    pick = torch.minimum(pick, (~outside).sum(dim=-1, keepdim=True) - 1)
    return order.gather(-1, pick).squeeze(-1)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
           uniform: torch.Tensor) -> torch.Tensor:
    """Next tokens (B,) from float32 logits (B, V) with per-row settings (B,).

    Temperature 0 is greedy. Otherwise top-p (nucleus) sampling: the smallest set of most likely
    tokens whose mass reaches top_p, sampled by inverting its CDF at `uniform`. The nucleus is
    looked for among the NUCLEUS_CANDIDATES most likely tokens (a partial top-k, no full sort);
    only rows whose nucleus is larger, or that keep everything (top_p 1), sort the vocabulary.
    """
    greedy = argmax(logits)
    probs = torch.softmax(logits / temperature.clamp_min(1e-5).unsqueeze(-1), dim=-1)
    top_probs, top_order = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
    sampled = _pick_in_nucleus(top_probs, top_order, top_p, uniform)
    too_wide = (top_probs.sum(dim=-1) < top_p) | (top_p >= 1)
    if too_wide.any():
        rows = too_wide.nonzero().squeeze(-1)
        sorted_probs, order = probs[rows].sort(dim=-1, descending=True)
        sampled[rows] = _pick_in_nucleus(sorted_probs, order, top_p[rows], uniform[rows])
    return torch.where(temperature == 0, greedy, sampled)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, e.g. (run seed, record id, sample index)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
