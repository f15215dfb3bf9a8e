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
    counting as the maximum. On the CPU torch's argmax is a scalar loop; this takes the
    vectorised maximum of each block of ARGMAX_BLOCK entries, the first best block, and the
    first best entry within it (docs/benchmarks.md has both timed). Rows laid out one after
    the other are read in place; any other layout is copied first."""
    B, V = logits.shape
    if logits.device.type != "cpu" or V % ARGMAX_BLOCK:
        return logits.argmax(dim=-1)
    blocks = logits.reshape(B, V // ARGMAX_BLOCK, ARGMAX_BLOCK)
    best_block = blocks.amax(dim=-1).argmax(dim=-1)
    within = blocks[torch.arange(B, device=logits.device), best_block].argmax(dim=-1)
    return best_block * ARGMAX_BLOCK + within


# The nucleus is looked for among this many most likely tokens (a partial top-k), then, for rows
# whose nucleus may fit, among WIDE_NUCLEUS_CANDIDATES, before sorting the whole vocabulary: a
# partial top-k costs a fraction of a full sort, more so the larger the vocabulary
# (docs/benchmarks.md).
NUCLEUS_CANDIDATES = 256
WIDE_NUCLEUS_CANDIDATES = 4096


def _pick_in_nucleus(sorted_probs: torch.Tensor, order: torch.Tensor, top_p: torch.Tensor,
                     uniform: torch.Tensor) -> torch.Tensor:
    """Invert the nucleus's CDF at `uniform`, given probabilities in the canonical order
    (descending, ties by token id): all of the vocabulary, or a prefix holding the nucleus."""
    cumulative = sorted_probs.cumsum(dim=-1)
    before = torch.cat((torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]), dim=-1)
    # Outside the nucleus: the mass before it already reaches top_p (top_p 1 keeps the whole
    # float32 tail), or it cannot be drawn at all.
    outside = (before >= top_p.unsqueeze(-1)) & (top_p < 1).unsqueeze(-1)
    outside |= sorted_probs == 0
    kept = sorted_probs.masked_fill(outside, 0.0).cumsum(dim=-1)
    target = uniform.to(kept.dtype) * kept[:, -1]
    pick = (kept <= target.unsqueeze(-1)).sum(dim=-1, keepdim=True)
    pick = torch.minimum(pick, (~outside).sum(dim=-1, keepdim=True) - 1)
    return order.gather(-1, pick).squeeze(-1)


def _sample_among_top(probs: torch.Tensor, k: int, top_p: torch.Tensor,
                      uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens drawn from the nucleus found among each row's k most likely tokens, whether that
    nucleus is whole there (else the row must look further), and those k probabilities."""
    top_probs, top_ids = probs.topk(k, dim=-1)
    if (top_probs[:, 1:] == top_probs[:, :-1]).any():  # topk orders ties arbitrarily
        top_ids, by_id = top_ids.sort(dim=-1)
        top_probs, by_prob = top_probs.gather(-1, by_id).sort(dim=-1, descending=True,
                                                              stable=True)
        top_ids = top_ids.gather(-1, by_prob)
    # topk may hold any members of the last tie group, so the nucleus must end before it: the
    # mass before that group (summed as the full sort's cumsum sums it) reaches top_p.
    mass_before_last_group = top_probs.masked_fill(top_probs == top_probs[:, -1:], 0.0).cumsum(
        dim=-1)[:, -1]
    whole = (mass_before_last_group >= top_p) & (top_p < 1)
    return _pick_in_nucleus(top_probs, top_ids, top_p, uniform), whole, top_probs


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
           uniform: torch.Tensor) -> torch.Tensor:
    """Next tokens (B,) from float32 logits (B, V) with per-row settings (B,).

    Temperature 0 is greedy. Otherwise top-p (nucleus) sampling: the smallest set of most likely
    tokens whose mass reaches top_p, in the canonical order (probability descending, ties by
    token id), sampled by inverting its CDF at `uniform`. The nucleus is looked for among the
    NUCLEUS_CANDIDATES most likely tokens, then among WIDE_NUCLEUS_CANDIDATES (partial top-ks);
    only rows whose nucleus is wider still, or that keep everything (top_p 1), sort the
    vocabulary. Every path gives the tokens a stable full sort gives (on the CPU, where a
    cumsum's prefix rounds as the whole row's does; on CUDA a row within a few ulps of top_p
    may differ)."""
    greedy = argmax(logits)
    probs = torch.softmax(logits / temperature.clamp_min(1e-5).unsqueeze(-1), dim=-1)
    vocab = probs.shape[-1]
    sampled, whole, top_probs = _sample_among_top(probs, min(NUCLEUS_CANDIDATES, vocab), top_p,
                                                  uniform)
    whole |= temperature == 0  # greedy rows need no nucleus
    if not whole.all():
        rows = (~whole).nonzero().squeeze(-1)
        sampled[rows] = _sample_wide(probs[rows], top_probs[rows], top_p[rows], uniform[rows])
    return torch.where(temperature == 0, greedy, sampled)


def nucleus_may_fit(probs: torch.Tensor, top_probs: torch.Tensor, top_p: torch.Tensor,
                    k: int) -> torch.Tensor:
    """Whether each row's nucleus may hold at most k tokens, given its most likely
    probabilities `top_probs` (descending), so that looking among the k most likely is worth
    it. It only steers the search, never the result. False where (1) the nucleus provably
    holds more: every token past `top_probs` is at most as likely as the last of them, so the
    nucleus holds at least `least`; or (2) every 8th entry of the vocabulary suggests that the
    k most likely tokens hold well under top_p; or the row keeps everything (top_p 1)."""
    if k >= probs.shape[-1]:
        return torch.zeros_like(top_p, dtype=torch.bool)
    last = top_probs[:, -1]
    least = top_probs.shape[-1] + (top_p - top_probs.sum(dim=-1)) / last.clamp_min(
        torch.finfo(probs.dtype).tiny)
    # The k most likely tokens' mass: the top ones' exactly, the next ones' from a sample.
    every_8th = probs[:, ::8]
    tail_sample = every_8th.masked_fill(every_8th >= last.unsqueeze(-1), 0.0)
    n_next = min((k - top_probs.shape[-1]) // 8, tail_sample.shape[-1])
    mass_estimate = top_probs.sum(dim=-1) + 8 * tail_sample.topk(n_next, dim=-1).values.sum(dim=-1)
    return (least <= k) & (mass_estimate >= 0.9 * top_p) & (top_p < 1)


def _sample_wide(probs: torch.Tensor, top_probs: torch.Tensor, top_p: torch.Tensor,
                 uniform: torch.Tensor) -> torch.Tensor:
    """`sample` for rows whose nucleus is wider than their `top_probs`."""
    may_fit = nucleus_may_fit(probs, top_probs, top_p, WIDE_NUCLEUS_CANDIDATES)
    sampled = torch.empty(len(probs), dtype=torch.long, device=probs.device)
    if may_fit.any():
        rows = may_fit.nonzero().squeeze(-1)
        sampled[rows], whole, _ = _sample_among_top(probs[rows], WIDE_NUCLEUS_CANDIDATES,
                                                    top_p[rows], uniform[rows])
        may_fit[rows[~whole]] = False
    if not may_fit.all():
        rows = (~may_fit).nonzero().squeeze(-1)
        sorted_probs, order = probs[rows].sort(dim=-1, descending=True, stable=True)
        sampled[rows] = _pick_in_nucleus(sorted_probs, order, top_p[rows], uniform[rows])
    return sampled


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, e.g. (run seed, record id, sample index)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
