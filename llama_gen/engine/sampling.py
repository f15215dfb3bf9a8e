"""Choosing the next token: pure functions of logits, settings and counter-based randomness.

Each sequence draws its random numbers from (seed, counter) alone, where the counter is the index
of the token being chosen. So a sequence's tokens do not depend on its batch neighbours, on the
number of processes or on a resume, and every model-parallel rank draws the same number without
communicating.

The controls apply in one order, Hugging Face's: penalties on the logits (`apply_penalties`;
greedy rows too), then the temperature, then top-k, top-p on the top-k's renormalised
distribution, and min-p (`Filters`, `sample`; sampled rows only). vLLM's V1 sampler applies
min-p before top-k and top-p, so a row with both min-p and top-p < 1 may keep fewer tokens there.

Each filter keeps the tokens at or above a probability threshold, so a tie group at a boundary
is kept whole, and the kept set is drawn from by inverting its CDF in token-id order. `sample`
finds the thresholds by radix selects and sums masses in whole units: no sort, no host read, a
fixed number of passes over the logits, no atomic adds piled on one bucket, and a draw that
depends only on its own row, on any device.
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
    for every row. Each keeps the tokens at or above a probability threshold, so a tie group
    at a boundary is kept or dropped whole (top-k keeps more than k tokens where the k-th is
    tied, as Hugging Face's TopKLogitsWarper does); tokens of probability 0 are never kept."""
    top_p: torch.Tensor
    top_k: torch.Tensor | None = None
    min_p: torch.Tensor | None = None


def _limits_top_k(top_k: torch.Tensor, vocab: int) -> torch.Tensor:
    return (top_k > 0) & (top_k < vocab)


def _tempered(logits: torch.Tensor, temperature: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax at each row's temperature (float32), and a float32 buffer of its shape free
    for the caller (the scaled logits): big temporaries cost page faults on the CPU."""
    scaled = logits.float() / temperature.clamp_min(1e-5).unsqueeze(-1)
    return torch.softmax(scaled, dim=-1), scaled


# Masses are counted in whole units of 2**-MASS_BITS (int32; each probability rounded), so
# every sum (the histograms, the kept mass, the CDF) is exact and the same in any order: on any
# device, with or without atomics, for any batch. A row's units add up to at most 2**30 (plus
# rounding), within int32. A token less likely than 2**-(MASS_BITS + 1) is never drawn.
MASS_BITS = 30


def _masses(probs: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    return torch.mul(probs, 2.0**MASS_BITS, out=scratch).add_(0.5).int()  # rounded


# Probabilities are >= 0, so their float32 bit patterns, read as int32, are ordered as their
# values, and all of them (<= 1.0, bits 0x3F800000) lie below 2**30: three digits of
# RADIX_BITS, the most significant first.
RADIX_BITS = 10
_DIGITS = (2 * RADIX_BITS, RADIX_BITS, 0)


def _largest_reaching(bits: torch.Tensor, weights: torch.Tensor | None, target: torch.Tensor,
                      index: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """The largest bit pattern t (int32, (B,)) whose entries' weight, sum(weights[bits >= t])
    (int32; None: each entry weighs 1), reaches `target` (float64, (B,)); 0 where no t does.

    A radix select, a digit per pass. The first pass histograms every entry, with a bucket
    below the first digit and one above the last for the entries outside [0, 2**30) (NaN's,
    negatives). After it nearly every entry lies outside the digits chosen so far (the row's
    prefix), so the weight below the prefix is carried from the pass before (the sum below
    its chosen digit), and the histogram takes only the entries inside the prefix: the others
    add 0 to their own digit's bucket. A GPU's atomic adds are then spread over the buckets,
    not piled on a bucket for below and one for above. The sums are exact integers over the
    same groups as such a bucket would hold: the same t, on any device. No sort, no host
    reads; `index` and `inside` are int32 buffers of bits' shape."""
    rows, size = len(bits), 1 << RADIX_BITS
    torch.bitwise_right_shift(bits, _DIGITS[0], out=index).clamp_(-1, size).add_(1)
    ones = torch.ones(1, 1, dtype=torch.int32, device=bits.device).expand_as(bits)
    histogram = bits.new_zeros(rows, size + 2).scatter_add_(
        1, _scatter_index(index), ones if weights is None else weights)
    spare = histogram.sum(dim=-1, keepdim=True) - target.unsqueeze(-1)
    chosen, below_prefix = _choose(histogram[:, 1:-1], histogram[:, :1], spare)
    prefix = chosen
    torch.eq(index, chosen + 1, out=inside)  # the first pass's buckets are 1 + digit
    if weights is not None:
        inside.mul_(weights)
    for shift in _DIGITS[1:]:
        if shift != _DIGITS[1]:  # index holds the previous digits
            inside.mul_(torch.eq(index, chosen, out=index))
        if shift:
            torch.bitwise_right_shift(bits, shift, out=index).bitwise_and_(size - 1)
        else:
            torch.bitwise_and(bits, size - 1, out=index)
        counts = bits.new_zeros(rows, size).scatter_add_(1, _scatter_index(index), inside)
        chosen, below_prefix = _choose(counts, below_prefix, spare)
        prefix = (prefix << RADIX_BITS) | chosen
    return prefix.squeeze(-1)


# torch 2.8 and later take int32 indices in scatter_add_, which saves a copy in int64
_INT32_INDEX = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 8)


def _scatter_index(index: torch.Tensor) -> torch.Tensor:
    return index if _INT32_INDEX else index.long()


def _choose(counts: torch.Tensor, below_prefix: torch.Tensor, spare: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest digit (int32, (B, 1); 0 where none) whose entries and those above it still
    reach the target, from the weight of each digit within the prefix (`counts`, (B, size))
    and the weight below the prefix; and the weight below the chosen digit."""
    # below[:, d]: the weight under digit d (the entries below the prefix included), so
    # digit d and those above it reach the target where below[:, d] <= total - target
    below = counts.cumsum(dim=-1).sub_(counts).add_(below_prefix)
    chosen = ((below <= spare).sum(dim=-1, keepdim=True) - 1).clamp_min_(0)
    return chosen.int(), below.gather(1, chosen)


def _thresholds(probs: torch.Tensor, masses: torch.Tensor, f: Filters, scratch: torch.Tensor
                ) -> torch.Tensor:
    """Each row's kept-set threshold as float32 bits (int32, (B,)): kept = {bits >= threshold},
    never a token of probability 0. Top-k's is the k-th largest probability; top-p's the
    largest t whose mass reaches top_p times the top-k set's mass; min-p's min_p times the
    largest probability. The row's threshold is the largest of the three. `scratch`: an int32
    buffer of the probabilities' shape."""
    bits = probs.view(torch.int32)
    threshold = torch.ones(len(probs), dtype=torch.int32, device=probs.device)
    top_k_mass = masses.sum(dim=-1)
    inside = torch.empty_like(scratch)
    if f.top_k is not None:
        kth = _largest_reaching(bits, None, f.top_k.double(), scratch, inside)
        threshold = torch.where(_limits_top_k(f.top_k, probs.shape[-1]), kth, threshold)
        kept = torch.ge(bits, threshold.unsqueeze(-1), out=scratch)
        top_k_mass = kept.mul_(masses).sum(dim=-1)
    nucleus = _largest_reaching(bits, masses, f.top_p.double() * top_k_mass, scratch, inside)
    threshold = torch.where(f.top_p < 1, torch.maximum(nucleus, threshold), threshold)
    if f.min_p is not None:
        least = (f.min_p.float() * probs.amax(dim=-1)).view(torch.int32)
        threshold = torch.maximum(threshold, least)
    return threshold.clamp_min(1)


def _kept_masses(probs: torch.Tensor, f: Filters, scratch: torch.Tensor) -> torch.Tensor:
    """Each token's mass in whole units where the filters keep it, else 0 (int32, (B, V)).
    `scratch`: a float32 buffer of the probabilities' shape, overwritten."""
    masses = _masses(probs, scratch)
    bits, scratch = probs.view(torch.int32), scratch.view(torch.int32)
    threshold = _thresholds(probs, masses, f, scratch)
    return masses.mul_(torch.ge(bits, threshold.unsqueeze(-1), out=scratch))


CDF_BLOCK = 128  # tokens per block in `_invert_cdf`


def _invert_cdf(masses: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The token t (B,) with C(t - 1) <= floor(uniform x C(V - 1)) < C(t), where C is the
    cumulative sum of `masses` (int32) in token-id order: a token of nonzero mass. Two levels,
    so that only one block of CDF_BLOCK tokens per row is summed in order: the block sums'
    cumulative sum picks the block, then the block's own."""
    rows, vocab = masses.shape
    if vocab % CDF_BLOCK:
        masses = torch.nn.functional.pad(masses, (0, -vocab % CDF_BLOCK))
    blocks = masses.view(rows, -1, CDF_BLOCK)
    ends = blocks.sum(dim=-1).cumsum(dim=-1)  # (B, blocks)
    total = ends[:, -1]
    target = torch.minimum((uniform.double() * total).long(), total - 1).unsqueeze(-1)
    block = (ends <= target).sum(dim=-1, keepdim=True).clamp_max(ends.shape[-1] - 1)
    start = torch.where(block > 0, ends.gather(-1, (block - 1).clamp_min(0)), 0)
    within = blocks.gather(1, block.unsqueeze(-1).expand(-1, 1, CDF_BLOCK)).squeeze(1)
    offset = ((start + within.cumsum(dim=-1)) <= target).sum(dim=-1, keepdim=True)
    return (block * CDF_BLOCK + offset.clamp_max(CDF_BLOCK - 1)).squeeze(-1).clamp_max(vocab - 1)


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                   top_k: torch.Tensor | None, min_p: torch.Tensor | None) -> torch.Tensor:
    """The distribution (B, V) a non-greedy row draws from (float64): softmax at the row's
    temperature, the `Filters` applied as `sample` applies them, renormalised (greedy rows'
    entries mean nothing). `sample` draws from it in whole units of mass."""
    probs, scratch = _tempered(logits, temperature)
    masses = _masses(probs, scratch)
    threshold = _thresholds(probs, masses, Filters(top_p, top_k, min_p),
                            scratch.view(torch.int32))
    kept = probs.double() * (probs.view(torch.int32) >= threshold.unsqueeze(-1))
    return kept / kept.sum(dim=-1, keepdim=True)


# On the CPU, `sample` takes the rows in chunks of about this many logits, so that its
# temporaries stay in cache (and below the allocator's page-faulting sizes): twice as fast at
# 32 x 32000 and 32 x 128256 than the whole batch at once.
CPU_SAMPLE_CHUNK = 1 << 18


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
           uniform: torch.Tensor, top_k: torch.Tensor | None = None,
           min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V) (float32, or bf16/fp16, computed in float32) with
    per-row settings (B,).

    Temperature 0 is greedy (the filters do not apply). Otherwise the softmax at the row's
    temperature, then the `Filters` (top_k, top_p, min_p) as one probability threshold per row
    (radix selects on the probabilities' bits), then the kept set's CDF, in token-id order,
    inverted at `uniform` (`_invert_cdf`). Penalties (`apply_penalties`) come before, on the
    logits. A fixed number of O(B x V) passes: no sort, no host read, nothing that depends on
    other rows. top_k None (off for every row) skips its passes."""
    rows, vocab = logits.shape
    if logits.device.type != "cpu" or rows * vocab <= CPU_SAMPLE_CHUNK:
        return _sample_rows(logits, temperature, top_p, uniform, top_k, min_p)
    step = max(1, CPU_SAMPLE_CHUNK // vocab)
    return torch.cat([_sample_rows(*(None if x is None else x[i:i + step] for x in
                                     (logits, temperature, top_p, uniform, top_k, min_p)))
                      for i in range(0, rows, step)])


def _sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                 uniform: torch.Tensor, top_k: torch.Tensor | None,
                 min_p: torch.Tensor | None) -> torch.Tensor:
    probs, scratch = _tempered(logits, temperature)
    sampled = _invert_cdf(_kept_masses(probs, Filters(top_p, top_k, min_p), scratch), uniform)
    return torch.where(temperature == 0, argmax(logits), sampled)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, e.g. (run seed, record id, sample index)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
