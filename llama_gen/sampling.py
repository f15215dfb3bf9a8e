"""Choosing the next token: pure functions of logits, settings and counter-based randomness.

Each sequence draws its random numbers from (seed, counter) alone, where the counter is the index
of the token being chosen. So a sequence's tokens do not depend on its batch neighbours, on the
number of processes or on a resume, and every model-parallel rank draws the same number without
communicating.

The controls apply in one order, Hugging Face's: penalties on the logits (`apply_penalties`;
greedy rows too), then the temperature, then top-k, top-p on the top-k's renormalised
distribution, and min-p (`Filters`, `sample`; sampled rows only). vLLM's V1 sampler applies
min-p before top-k and top-p, so a row with both min-p and top-p < 1 may keep fewer tokens there.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

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


def apply_penalties(logits: torch.Tensor, prompt_seen: torch.Tensor, output_counts: torch.Tensor,
                    repetition: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor) -> torch.Tensor:
    """New logits (B, V) with each row's penalties (B,) applied; the input is left as it is.

    First the repetition penalty, as Hugging Face's RepetitionPenaltyLogitsProcessor and vLLM
    define it: a token seen in the prompt (`prompt_seen`, bool) or generated (`output_counts`
    > 0) has its logit divided by `repetition` where positive, multiplied where negative. Then,
    as OpenAI and vLLM define them, over generated tokens only: minus `frequency` times the
    count, minus `presence` once if the count is nonzero. Neutral values (1, 0, 0) return the
    logits unchanged, bit for bit. No host reads."""
    generated = output_counts > 0
    r = repetition.unsqueeze(-1)
    penalised = torch.where(prompt_seen | generated,
                            torch.where(logits < 0, logits * r, logits / r), logits)
    penalised -= frequency.unsqueeze(-1) * output_counts
    penalised -= presence.unsqueeze(-1) * generated
    return penalised


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens (B, k) under the model's own distribution (log_softmax of the
    raw logits, temperature 1) and their float32 logprobs: most likely first, ties by lower id.
    topk orders ties arbitrarily, so it ranks one int64 key per token: the logprob's bits
    mapped to an integer of the same order, then the token id reversed."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    vocab = logprobs.shape[-1]
    bits = logprobs.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # float order, as integers
    reversed_ids = torch.arange(vocab - 1, -1, -1, device=logits.device)
    best = ((ordered << 32) | reversed_ids).topk(k, dim=-1).values
    ids = vocab - 1 - (best & _MASK32)
    return logprobs.gather(-1, ids), ids


@dataclass(frozen=True)
class Filters:
    """Which tokens a non-greedy row may draw, per row (B,), applied in this order after the
    temperature: top-k (int64, 0 or >= V: no limit), then top-p on the top-k's renormalised
    distribution (1: off), then min-p relative to the most likely token (0: off). None is off
    for every row. In the canonical order (probability descending, ties by token id) each keeps
    a prefix, so the kept set is a prefix too; tokens of probability 0 are never kept."""
    top_p: torch.Tensor
    top_k: torch.Tensor | None = None
    min_p: torch.Tensor | None = None

    def __getitem__(self, rows: torch.Tensor) -> Filters:
        return Filters(self.top_p[rows], None if self.top_k is None else self.top_k[rows],
                       None if self.min_p is None else self.min_p[rows])


def _limits_top_k(top_k: torch.Tensor, vocab: int) -> torch.Tensor:
    return (top_k > 0) & (top_k < vocab)


def _dropped(probs: torch.Tensor, ahead: torch.Tensor, rank: torch.Tensor,
             most_likely: torch.Tensor, top_k_mass: torch.Tensor | None, f: Filters,
             vocab: int) -> torch.Tensor:
    """Whether each row's filters drop the tokens of canonical rank `rank` with probabilities
    `probs` and the mass `ahead` of them (all broadcast to (B, n)). Top-p drops a token once the
    mass ahead of it reaches top_p of the top-k's mass (top_k_mass (B, 1); None or 1 where top-k
    is off, so the threshold is top_p itself)."""
    top_p = f.top_p.unsqueeze(-1)
    dropped = (ahead >= (top_p if top_k_mass is None else top_p * top_k_mass)) & (top_p < 1)
    dropped |= probs == 0
    if f.top_k is not None:
        dropped |= (rank >= f.top_k.unsqueeze(-1)) & _limits_top_k(f.top_k, vocab).unsqueeze(-1)
    if f.min_p is not None:
        dropped |= probs < f.min_p.unsqueeze(-1) * most_likely
    return dropped


def _filter_prefix(sorted_probs: torch.Tensor, f: Filters, vocab: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For probabilities (B, n) in the canonical order, all of the vocabulary or a prefix of
    it: the tokens each row's filters drop, the mass ahead of each token (summed as a full
    sort's cumsum sums it), and the top-k mass (valid where top_k <= n)."""
    cumulative = sorted_probs.cumsum(dim=-1)
    ahead = torch.cat((torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]), dim=-1)
    top_k_mass = None
    if f.top_k is not None:
        last_kept = (f.top_k - 1).clamp(0, sorted_probs.shape[-1] - 1).unsqueeze(-1)
        top_k_mass = torch.where(_limits_top_k(f.top_k, vocab).unsqueeze(-1),
                                 cumulative.gather(-1, last_kept), 1.0)
    rank = torch.arange(sorted_probs.shape[-1], device=sorted_probs.device)
    dropped = _dropped(sorted_probs, ahead, rank, sorted_probs[:, :1], top_k_mass, f, vocab)
    return dropped, ahead, top_k_mass


def _pick(sorted_probs: torch.Tensor, order: torch.Tensor, dropped: torch.Tensor,
          uniform: torch.Tensor) -> torch.Tensor:
    """Invert the kept set's CDF at `uniform`, given probabilities in the canonical order (all
    of the vocabulary, or a prefix holding the kept set) and the tokens dropped."""
    kept = sorted_probs.masked_fill(dropped, 0.0).cumsum(dim=-1)
    target = uniform.to(kept.dtype) * kept[:, -1]
    pick = (kept <= target.unsqueeze(-1)).sum(dim=-1, keepdim=True)
    pick = torch.minimum(pick, (~dropped).sum(dim=-1, keepdim=True) - 1)
    return order.gather(-1, pick).squeeze(-1)


def _tempered(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits / temperature.clamp_min(1e-5).unsqueeze(-1), dim=-1)


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                   top_k: torch.Tensor | None, min_p: torch.Tensor | None) -> torch.Tensor:
    """The distribution (B, V) a non-greedy row draws from: softmax at the row's temperature,
    the `Filters` applied, renormalised. A plain stable sort of the vocabulary: the reference
    for `sample`'s faster paths (greedy rows' entries mean nothing)."""
    probs = _tempered(logits, temperature)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    dropped, _, _ = _filter_prefix(sorted_probs, Filters(top_p, top_k, min_p), probs.shape[-1])
    kept = sorted_probs.masked_fill(dropped, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, kept / kept.sum(dim=-1, keepdim=True))


# The kept set is looked for among this many most likely tokens (a partial top-k), then, for
# rows whose kept set may fit, among WIDE_NUCLEUS_CANDIDATES, before sorting the whole
# vocabulary: a partial top-k costs a fraction of a full sort, more so the larger the
# vocabulary (docs/benchmarks.md).
NUCLEUS_CANDIDATES = 256
WIDE_NUCLEUS_CANDIDATES = 4096


def _canonical_top(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest probabilities and their ids, ties by token id (topk orders them
    arbitrarily, and may hold any members of the last tie group)."""
    top_probs, top_ids = probs.topk(k, dim=-1)
    if (top_probs[:, 1:] == top_probs[:, :-1]).any():
        top_ids, by_id = top_ids.sort(dim=-1)
        top_probs, by_prob = top_probs.gather(-1, by_id).sort(dim=-1, descending=True,
                                                              stable=True)
        top_ids = top_ids.gather(-1, by_prob)
    return top_probs, top_ids


def _sample_among_top(probs: torch.Tensor, k: int, f: Filters, uniform: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens drawn from the kept set found among each row's k most likely tokens, whether
    that kept set is whole there (else the row must look further), and those k probabilities.
    It is whole if the filters drop the first member of the candidates' last tie group (the
    candidates before it are the canonical order's), and the top-k mass, where top-p needs it,
    lies within the candidates."""
    vocab = probs.shape[-1]
    top_probs, top_ids = _canonical_top(probs, k)
    dropped, ahead, top_k_mass = _filter_prefix(top_probs, f, vocab)
    last_group = (top_probs > top_probs[:, -1:]).sum(dim=-1, keepdim=True)
    whole = _dropped(top_probs[:, -1:], ahead.gather(-1, last_group), last_group,
                     top_probs[:, :1], top_k_mass, f, vocab).squeeze(-1)
    if f.top_k is not None:
        whole &= (f.top_k <= k) | ~_limits_top_k(f.top_k, vocab) | (f.top_p >= 1)
    return _pick(top_probs, top_ids, dropped, uniform), whole, top_probs


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
           uniform: torch.Tensor, top_k: torch.Tensor | None = None,
           min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Next tokens (B,) from float32 logits (B, V) with per-row settings (B,).

    Temperature 0 is greedy (the filters do not apply). Otherwise the softmax at the row's
    temperature, then the `Filters` (top_k, top_p, min_p), sampled by inverting the kept set's
    CDF, in the canonical order (probability descending, ties by token id), at `uniform`.
    Penalties (`apply_penalties`) come before, on the logits. The kept set is looked for among
    the NUCLEUS_CANDIDATES most likely tokens, then among WIDE_NUCLEUS_CANDIDATES (partial
    top-ks); only rows whose kept set is wider still, or may be, sort the vocabulary. Every
    path gives the tokens a stable full sort gives (on the CPU, where a cumsum's prefix rounds
    as the whole row's does; on CUDA a row within a few ulps of a top-p boundary may differ).
    top_k and min_p None (off for every row) cost nothing."""
    greedy = argmax(logits)
    probs = _tempered(logits, temperature)
    filters = Filters(top_p, top_k, min_p)
    sampled, whole, top_probs = _sample_among_top(
        probs, min(NUCLEUS_CANDIDATES, probs.shape[-1]), filters, uniform)
    whole |= temperature == 0  # greedy rows need no kept set
    if not whole.all():
        rows = (~whole).nonzero().squeeze(-1)
        sampled[rows] = _sample_wide(probs[rows], top_probs[rows], filters[rows], uniform[rows])
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


def _sample_wide(probs: torch.Tensor, top_probs: torch.Tensor, f: Filters,
                 uniform: torch.Tensor) -> torch.Tensor:
    """`sample` for rows whose kept set is wider than their `top_probs`, or may be. The wide
    candidates are tried where the nucleus may fit them or top-k keeps no more than them
    (min-p alone does not steer the search)."""
    k, vocab = WIDE_NUCLEUS_CANDIDATES, probs.shape[-1]
    may_fit = nucleus_may_fit(probs, top_probs, f.top_p, k)
    if f.top_k is not None and k < vocab:
        may_fit |= _limits_top_k(f.top_k, vocab) & (f.top_k <= k)
    sampled = torch.empty(len(probs), dtype=torch.long, device=probs.device)
    if may_fit.any():
        rows = may_fit.nonzero().squeeze(-1)
        sampled[rows], whole, _ = _sample_among_top(probs[rows], k, f[rows], uniform[rows])
        may_fit[rows[~whole]] = False
    if not may_fit.all():
        rows = (~may_fit).nonzero().squeeze(-1)
        sorted_probs, order = probs[rows].sort(dim=-1, descending=True, stable=True)
        dropped, _, _ = _filter_prefix(sorted_probs, f[rows], vocab)
        sampled[rows] = _pick(sorted_probs, order, dropped, uniform[rows])
    return sampled


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, e.g. (run seed, record id, sample index)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
