"""Sampling: counter-based uniforms, greedy and top-p selection, top-k, min-p, penalties,
log-probs and seed derivation."""
from __future__ import annotations

import pytest
import torch
from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from llama_gen.sampling import (ARGMAX_BLOCK, NUCLEUS_CANDIDATES, WIDE_NUCLEUS_CANDIDATES,
                                apply_penalties, argmax, counter_uniform, derive_seed,
                                filtered_probs, nucleus_may_fit, sample, token_logprobs,
                                top_logprobs)

NEG_INF = float("-inf")
U_MIN = 0.5 / 2**32  # the extremes counter_uniform can return
U_MAX = 1 - 0.5 / 2**32
SEEDS = [0, 1, 2, -1, -2, 2**32, 2**32 + 1, 2**33, 2**63 - 1, 2**63 - 2, -(2**63), 12345]


def uniforms(seeds, counters) -> torch.Tensor:
    return counter_uniform(torch.as_tensor(seeds, dtype=torch.int64),
                           torch.as_tensor(counters, dtype=torch.int64))


def draw(logits: list[float], temperature: float, top_p: float, n: int) -> torch.Tensor:
    """n tokens from one row of logits, one per (seed, counter), as the engine draws them."""
    seeds = torch.arange(n) // 1000 * 7919 + (torch.arange(n) // 1000 << 32)
    u = counter_uniform(seeds, torch.arange(n) % 1000)
    return sample(torch.tensor([logits]).expand(n, -1), torch.full((n,), temperature),
                  torch.full((n,), top_p), u)


def one(logits: list[float], temperature: float, top_p: float, u: float) -> int:
    return sample(torch.tensor([logits]), torch.tensor([temperature]), torch.tensor([top_p]),
                  torch.tensor([u], dtype=torch.float64)).item()


def test_counter_uniform_is_deterministic_and_strictly_inside_the_unit_interval():
    seeds = torch.tensor(SEEDS).repeat_interleave(1000)
    counters = torch.arange(1000).repeat(len(SEEDS))
    u = counter_uniform(seeds, counters)
    assert u.dtype == torch.float64 and u.shape == (len(SEEDS) * 1000,)
    assert torch.equal(u, counter_uniform(seeds.clone(), counters.clone()))
    assert (u > 0).all() and (u < 1).all()
    assert 0 < uniforms([0], [0]).item() < 1e-9  # the hash maps (0, 0) to 0: still not 0.0
    assert 0 < U_MIN and U_MAX < 1


def test_counter_uniform_differs_for_neighbouring_counters_and_seeds():
    u = torch.stack([uniforms([s] * 1000, range(1000)) for s in SEEDS])  # (seeds, counters)
    for row in u:
        assert row.unique().numel() == 1000
    for column in u.T:
        assert column.unique().numel() == len(SEEDS)
    # seeds equal in the low 32 bits, differing only in the high ones (the sign bit included)
    for a, b in [(0, 2**32), (1, 2**32 + 1), (-1, 2**63 - 1), (0, -(2**63)), (5, 5 - 2**40)]:
        assert (uniforms([a] * 100, range(100)) != uniforms([b] * 100, range(100))).all()


@pytest.mark.parametrize("seeds", [torch.arange(100), torch.arange(100) << 32,
                                   -torch.arange(1, 101), 2**63 - 1 - torch.arange(100)],
                         ids=["small", "high-bits", "negative", "max"])
def test_counter_uniform_is_statistically_uniform(seeds):
    n_seeds, n_counters = 100, 1000
    u = counter_uniform(seeds.repeat_interleave(n_counters), torch.arange(n_counters).repeat(n_seeds))
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 5 * (1 / 12 / n) ** 0.5
    assert abs(u.var().item() - 1 / 12) < 5 * (1 / 180 / n) ** 0.5
    counts = torch.histc(u, bins=100, min=0, max=1)
    chi2 = ((counts - n / 100) ** 2 / (n / 100)).sum().item()
    assert chi2 < 99 + 8 * (2 * 99) ** 0.5  # df 99: mean 99, sd 14
    grid = u.view(n_seeds, n_counters) - 0.5
    along_counters = (grid[:, 1:] * grid[:, :-1]).mean().item() * 12
    along_seeds = (grid[1:] * grid[:-1]).mean().item() * 12
    assert abs(along_counters) < 0.02 and abs(along_seeds) < 0.02  # sd about 0.003


def test_counter_uniform_does_not_depend_on_batch_composition():
    seeds, counters = torch.tensor(SEEDS), torch.arange(len(SEEDS)) * 17
    batch = counter_uniform(seeds, counters)
    alone = torch.cat([counter_uniform(seeds[i:i + 1], counters[i:i + 1]) for i in range(len(SEEDS))])
    perm = torch.randperm(len(SEEDS), generator=torch.Generator().manual_seed(0))
    assert torch.equal(batch, alone)
    assert torch.equal(counter_uniform(seeds[perm], counters[perm]), batch[perm])


def test_temperature_zero_is_argmax_whatever_the_uniform_and_top_p():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    for u in (U_MIN, 0.5, U_MAX):
        for top_p in (1e-6, 0.5, 1.0):
            tokens = sample(logits, torch.zeros(6), torch.full((6,), top_p),
                            torch.full((6,), u, dtype=torch.float64))
            assert torch.equal(tokens, logits.argmax(-1))


def test_mixed_batch_greedy_and_sampled_rows_match_each_row_alone():
    logits = torch.randn(6, 20, generator=torch.Generator().manual_seed(1))
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.7, 1.3, 0.0])
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.9, 0.95, 1.0])
    u = torch.tensor([U_MAX, U_MAX, 0.3, U_MAX, 0.999, 0.7], dtype=torch.float64)
    tokens = sample(logits, temperature, top_p, u)
    alone = [sample(logits[i:i + 1], temperature[i:i + 1], top_p[i:i + 1], u[i:i + 1]).item()
             for i in range(6)]
    assert tokens.tolist() == alone
    argmax = logits.argmax(-1)
    assert (tokens == argmax)[temperature == 0].all()
    assert (tokens != argmax)[1].item() and (tokens != argmax)[3].item()  # u near 1: not the top


def test_tiny_top_p_keeps_only_the_most_likely_token():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(2))
    for u in (U_MIN, 0.5, U_MAX):
        tokens = sample(logits, torch.full((8,), 1.5), torch.full((8,), 1e-6),
                        torch.full((8,), u, dtype=torch.float64))
        assert torch.equal(tokens, logits.argmax(-1))


def test_top_p_one_can_pick_every_token():
    assert draw([0.0, 1.0, 2.0, 3.0], 1.0, 1.0, 4000).bincount(minlength=4).min() > 50
    # geometric tail: token 10 has p ~ 1.8e-9 > 1 - U_MAX, so the largest uniform reaches it
    assert one([-2.0 * i for i in range(11)], 1.0, 1.0, U_MAX) == 10


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8), (1.5, 0.5), (1.0, 0.9)])
def test_frequencies_match_the_renormalised_nucleus(temperature, top_p):
    logits = [2.0, 1.5, 1.2, 0.4, 0.0, -0.5, -1.0, -3.0]
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64) / temperature, -1)
    before = probs.cumsum(-1) - probs  # logits are sorted, so this is the mass ahead of each token
    nucleus = before < top_p
    assert ((before - top_p).abs() > 1e-3).all()  # no token sits on the float32 boundary
    expected = torch.where(nucleus, probs, 0.0) / probs[nucleus].sum()
    n = 100_000
    counts = draw(logits, temperature, top_p, n).bincount(minlength=len(logits)).double()
    assert (counts[~nucleus] == 0).all()
    chi2 = ((counts - n * expected)[nucleus] ** 2 / (n * expected[nucleus])).sum().item()
    assert chi2 < 40  # df <= 7: p below 1e-5
    assert ((counts / n - expected).abs() <= 5 * (expected * (1 - expected) / n).sqrt() + 1e-9).all()


def test_ties_pick_the_first_greedily_and_masked_tokens_are_never_sampled():
    logits = [NEG_INF, 3.0, 3.0, NEG_INF, 1.0, NEG_INF]
    assert one(logits, 0.0, 1.0, 0.5) == 1
    counts = draw(logits, 1.0, 1.0, 20_000).bincount(minlength=6)
    assert counts[[0, 3, 5]].sum() == 0
    assert abs(counts[1] - counts[2]) < 5 * (20_000 * 0.45) ** 0.5 and counts[4] > 0


def test_extreme_uniforms_pick_the_first_and_last_kept_tokens():
    for top_p in (1.0, 0.999, 0.9):
        assert one([3.0, 1.0, 0.0, NEG_INF], 1.0, top_p, U_MIN) == 0
    assert one([3.0, 1.0, 0.0, NEG_INF], 1.0, 0.9, U_MAX) == 1  # nucleus {0, 1}
    assert one([3.0, 1.0, 0.0, NEG_INF], 1.0, 0.999, U_MAX) == 2
    assert one([3.0, 1.0, 0.0, NEG_INF], 1.0, 1.0, U_MAX) == 2  # never the masked token 3
    # the same through counter_uniform: (seed 0, counter 12770032) rounds to 1.0 in float32
    u = uniforms([0], [12770032])
    assert u.float().item() == 1.0
    assert sample(torch.tensor([[3.0, 1.0, 0.0, NEG_INF]]), torch.ones(1), torch.ones(1), u).item() == 2


def test_llama3_vocab_size_runs_and_respects_the_mask():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 128256, generator=gen) * 4
    logits[:, 128000:] = NEG_INF
    temperature, top_p = torch.tensor([0.0, 0.6, 1.0, 1.0]), torch.tensor([0.9, 0.9, 1.0, 0.5])
    for u in (U_MIN, 0.5, U_MAX):
        tokens = sample(logits, temperature, top_p, torch.full((4,), u, dtype=torch.float64))
        assert tokens.shape == (4,) and tokens.dtype == torch.int64
        assert (tokens < 128000).all() and tokens[0] == logits[0].argmax()


def test_token_logprobs_is_log_softmax_gathered():
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(4)) * 3
    logits[0, 7] = NEG_INF
    tokens = torch.tensor([3, 0, 29, 12, 12])
    got = token_logprobs(logits, tokens)
    want = torch.tensor([torch.log_softmax(logits[i].double(), -1)[t].item()
                         for i, t in enumerate(tokens.tolist())], dtype=torch.float64)
    assert got.shape == (5,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert token_logprobs(logits, torch.tensor([7, 0, 0, 0, 0]))[0].item() == NEG_INF


def test_derive_seed_is_deterministic_63_bit_and_sensitive_to_every_part():
    parts = [(0, "rec-1", 0), (0, "rec-1", 1), (0, "rec-2", 0), (1, "rec-1", 0), (0, "rec-10", 0),
             ("rec-1", 0, 0), (0, 1, 0), (0, "1", 0), ()]
    seeds = [derive_seed(*p) for p in parts]
    assert seeds == [derive_seed(*p) for p in parts]
    assert len(set(seeds)) == len(parts)
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds)
    assert torch.tensor(seeds, dtype=torch.int64).tolist() == seeds


def full_sort_reference(logits, temperature, top_p, uniform):
    """The nucleus by a stable sort of the whole vocabulary (what `sample` avoids where it can):
    tokens in descending probability, ties by token id; a token is in the nucleus while the
    mass before it is below top_p (top_p 1: all with a nonzero probability)."""
    probs = torch.softmax(logits / temperature.unsqueeze(-1), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    before = torch.cat((torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]), dim=-1)
    outside = (before >= top_p.unsqueeze(-1)) & (top_p < 1).unsqueeze(-1) | (sorted_probs == 0)
    kept = sorted_probs.masked_fill(outside, 0.0).cumsum(dim=-1)
    pick = (kept <= (uniform * kept[:, -1]).unsqueeze(-1)).sum(dim=-1, keepdim=True)
    pick = torch.minimum(pick, (~outside).sum(dim=-1, keepdim=True) - 1)
    return order.gather(-1, pick).squeeze(-1)


@pytest.mark.parametrize("scale", [2.0, 6.0])
def test_partial_top_k_matches_a_full_sort(scale):
    """Peaked rows (nucleus within the candidates) and flat rows (full-sort fallback) in one
    batch give the tokens a full sort of the vocabulary gives."""
    gen = torch.Generator().manual_seed(int(scale))
    logits = torch.randn(64, 5000, generator=gen) * scale
    logits[::2] *= 0.1  # flat rows: their nucleus needs most of the vocabulary
    temperature = torch.full((64,), 0.8)
    top_p = torch.rand(64, generator=gen).clamp(0.05, 0.99)
    for counter in range(20):
        uniform = counter_uniform(torch.arange(64), torch.full((64,), counter))
        got = sample(logits, temperature, top_p, uniform)
        want = full_sort_reference(logits, temperature, top_p, uniform.float())
        assert torch.equal(got, want), counter


def test_wide_nucleus_candidates_match_a_full_sort():
    """Rows whose nucleus fits the first candidates, fits the wide ones, does not fit them
    (tried first, or skipped because it provably cannot fit), and top_p 1, in one batch."""
    gen = torch.Generator().manual_seed(3)
    scales = torch.tensor([6.0, 2.0, 1.0, 0.6, 0.3, 0.1, 1.0, 0.3]).repeat(8)
    logits = torch.randn(64, 5000, generator=gen) * scales[:, None]
    temperature = torch.full((64,), 0.8)
    top_p = torch.full((64,), 0.9)
    top_p[6::8] = 1.0
    sorted_probs = torch.softmax(logits / 0.8, dim=-1).sort(dim=-1, descending=True).values
    sizes = ((sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p[:, None]).sum(dim=-1)
    assert (sizes <= NUCLEUS_CANDIDATES).any()  # the paths the batch must take
    assert ((sizes > NUCLEUS_CANDIDATES) & (sizes <= WIDE_NUCLEUS_CANDIDATES)).sum() >= 16
    assert (sizes[top_p < 1] > WIDE_NUCLEUS_CANDIDATES).sum() >= 8
    for counter in range(20):
        uniform = counter_uniform(torch.arange(64), torch.full((64,), counter))
        got = sample(logits, temperature, top_p, uniform)
        want = full_sort_reference(logits, temperature, top_p, uniform.float())
        assert torch.equal(got, want), counter


@pytest.mark.parametrize("scale", [2.0, 3.0])
def test_tied_probabilities_are_taken_in_token_order(scale):
    """bf16 logits tie often. Whatever order topk gives ties in, every path takes them as a
    stable sort does (by token id), so a draw depends only on its row."""
    gen = torch.Generator().manual_seed(int(scale))
    logits = (torch.randn(32, 32000, generator=gen) * scale + 12).bfloat16().float()
    temperature, top_p = torch.full((32,), 0.8), torch.full((32,), 0.9)
    probs = torch.softmax(logits / 0.8, dim=-1)
    assert (probs.topk(NUCLEUS_CANDIDATES).values.diff() == 0).any()  # ties among candidates
    for counter in range(10):
        uniform = counter_uniform(torch.arange(32), torch.full((32,), counter))
        want = full_sort_reference(logits, temperature, top_p, uniform.float())
        assert torch.equal(sample(logits, temperature, top_p, uniform), want), counter
        for row in (0, 17):  # alone, the same draw
            alone = sample(logits[row:row + 1], temperature[:1], top_p[:1], uniform[row:row + 1])
            assert alone.item() == want[row].item()


def test_a_tie_group_across_the_candidates_edge_is_taken_in_token_order():
    """400 equally likely tokens straddle the 256th place, and the nucleus ends among them
    before it: topk holds an arbitrary 56 of them, so those rows must look further."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.full((32, 5000), -30.0)
    for row in logits:
        ids = torch.randperm(5000, generator=gen)
        row[ids[:200]] = torch.linspace(5, 4, 200)
        row[ids[200:600]] = 1.7  # the nucleus reaches about 17 of them
    temperature, top_p = torch.ones(32), torch.full((32,), 0.9)
    for counter in range(20):
        uniform = counter_uniform(torch.arange(32), torch.full((32,), counter))
        want = full_sort_reference(logits, temperature, top_p, uniform.float())
        assert torch.equal(sample(logits, temperature, top_p, uniform), want), counter


def test_wide_candidates_are_tried_where_the_nucleus_fits_and_skipped_where_it_is_far_wider():
    """`nucleus_may_fit` only steers the search (every path is exact), so it is judged on what
    it lets through: most nuclei within the wide candidates, and none of the very wide ones."""
    gen = torch.Generator().manual_seed(5)
    scales = torch.tensor([0.3, 1.0, 2.0, 2.5, 3.0]).repeat_interleave(8)
    probs = torch.softmax(torch.randn(40, 32000, generator=gen) * scales[:, None], dim=-1)
    top_p = torch.full((40,), 0.9)
    sorted_probs = probs.sort(dim=-1, descending=True).values
    sizes = ((sorted_probs.cumsum(dim=-1) - sorted_probs) < 0.9).sum(dim=-1)
    k = WIDE_NUCLEUS_CANDIDATES
    may_fit = nucleus_may_fit(probs, sorted_probs[:, :NUCLEUS_CANDIDATES], top_p, k)
    assert may_fit[sizes <= k].float().mean() >= 0.75
    assert not may_fit[sizes > 2 * k].any()
    assert not nucleus_may_fit(probs, sorted_probs[:, :256], torch.ones(40), k).any()


@pytest.mark.parametrize("vocab", [32000, 128256, 1000])
@pytest.mark.parametrize("transposed", [False, True])
def test_blocked_argmax_equals_torch_argmax_with_ties_and_nans(vocab, transposed):
    torch.manual_seed(vocab)
    rows = 9
    # Any layout gives the same result, e.g. a transposed view: (V, B) storage read as (B, V).
    logits = torch.randn(vocab, rows).T if transposed else torch.randn(rows, vocab)
    logits[1] = 0.0  # all tied: the first index
    logits[2, [5, vocab - 1]] = 50.0  # tied maxima in different blocks
    logits[3, [ARGMAX_BLOCK + 3, ARGMAX_BLOCK + 7]] = 50.0  # tied within one block
    logits[4, vocab - 2] = float("nan")  # a NaN counts as the maximum, as in torch
    logits[5, [7, 300]] = float("nan")
    logits[6, 0] = float("inf")
    logits[7] = float("-inf")
    assert torch.equal(argmax(logits), logits.argmax(-1))
    assert torch.equal(argmax(logits[:1]), logits[:1].argmax(-1))


# Rows of (temperature, top_k, top_p, min_p), each filter binding alone and together.
MIXED_SETTINGS = [
    (1.0, 0, 0.9, 0.0),  # top-p alone
    (0.7, 7, 1.0, 0.0),  # top-k alone
    (1.3, 0, 1.0, 0.1),  # min-p alone
    (0.8, 50, 0.8, 0.0),  # top-p over the top-k's renormalised mass
    (1.0, 300, 0.95, 0.05),  # all three
    (0.5, 999, 0.5, 0.02),
    (1.2, 1000, 1.0, 0.0),  # top_k = V: no limit
    (1.0, 1, 0.9, 0.5),
]


def settings(rows: list[tuple[float, int, float, float]]) -> tuple[torch.Tensor, ...]:
    """(temperature, top_p, top_k, min_p) tensors, in `sample`'s argument order."""
    temperature, top_k, top_p, min_p = zip(*rows)
    return (torch.tensor(temperature), torch.tensor(top_p), torch.tensor(top_k),
            torch.tensor(min_p))


def hugging_face_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                       min_p: float) -> torch.Tensor:
    """One row through HF's warpers in generate's order, each only where it is on."""
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k > 0 else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    warpers += [MinPLogitsWarper(min_p)] if min_p > 0 else []
    scores = logits.unsqueeze(0).clone()
    for warper in warpers:
        scores = warper(torch.zeros(1, 0, dtype=torch.long), scores)
    return torch.softmax(scores, dim=-1).squeeze(0)


@pytest.mark.parametrize("seed", range(4))
def test_filtered_probs_equal_hugging_faces_warper_chain(seed):
    rows = MIXED_SETTINGS[seed:] + MIXED_SETTINGS[:seed]
    temperature, top_p, top_k, min_p = settings(rows)
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(seed)) * (1 + seed)
    got = filtered_probs(logits, temperature, top_p, top_k, min_p)
    want = torch.stack([hugging_face_probs(logits[i], *row) for i, row in enumerate(rows)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(got > 0, want > 0)
    # each filter changes some row's distribution
    assert not torch.equal(got, filtered_probs(logits, temperature, top_p, None, min_p))
    assert not torch.equal(got, filtered_probs(logits, temperature, top_p, top_k, None))
    assert not torch.equal(got, filtered_probs(logits, temperature, torch.ones(8), top_k, min_p))


def penalty_inputs(seed: int, rows: int = 6, vocab: int = 50):
    """Logits (some 0, some -inf), prompts and generated tokens drawn from a small vocabulary
    so that tokens repeat, and the prompt-seen mask and output counts made from them."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * 3
    logits[:, :3] = torch.tensor([0.0, NEG_INF, 2.0])
    prompts = [torch.randint(vocab, (int(n),), generator=gen)
               for n in torch.randint(1, 30, (rows,), generator=gen)]
    outputs = [torch.randint(vocab, (int(n),), generator=gen)
               for n in torch.randint(0, 30, (rows,), generator=gen)]
    seen = torch.stack([torch.zeros(vocab, dtype=torch.bool).index_fill(0, p, True)
                        for p in prompts])
    counts = torch.stack([o.bincount(minlength=vocab) for o in outputs]).int()
    return logits, prompts, outputs, seen, counts


@pytest.mark.parametrize("seed", range(3))
def test_repetition_penalty_equals_hugging_faces(seed):
    logits, prompts, outputs, seen, counts = penalty_inputs(seed)
    penalty = torch.tensor([1.0, 1.2, 0.8, 2.0, 1.5, 0.5])
    before = logits.clone()
    got = apply_penalties(logits, seen, counts, penalty, torch.zeros(6), torch.zeros(6))
    assert torch.equal(logits, before)  # the caller's logits are left alone
    for i in range(6):
        input_ids = torch.cat((prompts[i], outputs[i])).unsqueeze(0)
        processor = RepetitionPenaltyLogitsProcessor(penalty[i].item())
        want = processor(input_ids, logits[i:i + 1].clone()).squeeze(0)
        assert torch.equal(got[i], want), i
    assert not torch.equal(got[1:], logits[1:])


@pytest.mark.parametrize("seed", range(3))
def test_presence_and_frequency_penalties_follow_openais_formula(seed):
    """HF has no such processor. OpenAI's API reference (Parameter details) and vLLM's
    `apply_penalties` (vllm/model_executor/layers/utils.py): over the generated tokens only,
    logit[j] -= c[j] * frequency + (c[j] > 0) * presence, after the repetition penalty."""
    logits, prompts, outputs, seen, counts = penalty_inputs(seed)
    repetition = torch.tensor([1.0, 1.0, 1.3, 0.9, 1.0, 2.0])
    presence = torch.tensor([0.0, 0.5, -0.5, 1.0, 2.0, 0.3])
    frequency = torch.tensor([0.0, 0.25, 0.1, -0.2, 0.0, 1.5])
    got = apply_penalties(logits, seen, counts, repetition, presence, frequency)
    repeated = apply_penalties(logits, seen, counts, repetition, torch.zeros(6), torch.zeros(6))
    for i in range(6):
        generated = outputs[i].tolist()
        for j in range(logits.shape[-1]):
            c = generated.count(j)
            want = repeated[i, j].item() - c * frequency[i].item() - (c > 0) * presence[i].item()
            assert got[i, j].item() == pytest.approx(want, rel=1e-6, abs=1e-6), (i, j)
    in_prompt_only = seen & (counts == 0)
    assert torch.equal(got[in_prompt_only], repeated[in_prompt_only])


def test_neutral_penalties_return_the_logits_bit_for_bit():
    logits, _, _, seen, counts = penalty_inputs(0)
    got = apply_penalties(logits, seen, counts, torch.ones(6), torch.zeros(6), torch.zeros(6))
    assert torch.equal(got, logits)


def test_penalties_apply_under_greedy_decoding():
    logits, _, _, seen, counts = penalty_inputs(1)
    seen[:, logits.argmax(-1)] = True  # every row has seen its most likely token
    penalised = apply_penalties(logits, seen, counts, torch.full((6,), 1.5), torch.full((6,), 0.5),
                                torch.full((6,), 0.5))
    tokens = sample(penalised, torch.zeros(6), torch.ones(6), torch.full((6,), 0.5).double(),
                    torch.full((6,), 3), torch.full((6,), 0.5))
    assert torch.equal(tokens, penalised.argmax(-1))
    assert (tokens != logits.argmax(-1)).any()


def canonical_inverse_cdf(logits, temperature, top_p, top_k, min_p, uniform, margin):
    """Tokens drawn from `filtered_probs` by inverting its CDF (float64) in the canonical
    order at `uniform` (rounded to float32 as `sample` uses it), and which draws lie more than
    `margin` from every step of that CDF (so float32 rounding cannot move them)."""
    probs = filtered_probs(logits, temperature, top_p, top_k, min_p).double()
    order = torch.softmax(logits / temperature.unsqueeze(-1), dim=-1).sort(
        dim=-1, descending=True, stable=True).indices
    cdf = probs.gather(-1, order).cumsum(dim=-1)
    u = uniform.float().double().unsqueeze(-1)
    pick = torch.minimum((cdf <= u).sum(dim=-1), (probs > 0).sum(dim=-1) - 1)
    return order.gather(-1, pick.unsqueeze(-1)).squeeze(-1), (cdf - u).abs().amin(dim=-1) > margin


def path_logits_and_settings():
    """Rows whose kept set lies within the first candidates, within the wide ones, or neither,
    by each filter: top_k small, top_k past the first candidates, past the wide ones,
    min-p cutting inside or outside the candidates, top_p 1, and a greedy row."""
    rows = [  # (logit scale, temperature, top_k, top_p, min_p)
        (1.0, 1.0, 5, 0.9, 0.0), (0.3, 0.8, 40, 1.0, 0.0), (1.0, 1.0, 300, 0.99, 0.0),
        (0.3, 1.0, 3000, 1.0, 0.0), (0.3, 1.0, 4500, 0.95, 0.0), (0.2, 1.0, 4097, 1.0, 0.0),
        (5.0, 0.8, 0, 1.0, 0.05), (0.5, 1.0, 0, 1.0, 0.3), (0.3, 1.0, 0, 1.0, 0.5),
        (0.3, 1.0, 2000, 0.9, 0.6), (1.0, 1.0, 0, 1.0, 0.0), (3.0, 0.7, 10, 0.8, 0.1),
        (1.0, 0.0, 5, 0.9, 0.1), (2.0, 1.0, 0, 0.9, 0.0), (0.5, 1.0, 6000, 0.5, 0.0),
        (4.0, 1.0, 1000, 1.0, 0.02),
    ]
    scale, temperature, top_k, top_p, min_p = (torch.tensor(c) for c in zip(*rows))
    logits = torch.randn(len(rows), 5000, generator=torch.Generator().manual_seed(7))
    return logits * scale.unsqueeze(-1), temperature, top_p, top_k, min_p


def test_sample_inverts_the_cdf_of_filtered_probs_on_every_path():
    logits, temperature, top_p, top_k, min_p = path_logits_and_settings()
    kept = (filtered_probs(logits, temperature, top_p, top_k, min_p) > 0).sum(dim=-1)
    sampled = temperature > 0
    assert ((kept <= NUCLEUS_CANDIDATES) & sampled).sum() >= 4  # the paths the batch takes
    assert ((kept > NUCLEUS_CANDIDATES) & (kept <= WIDE_NUCLEUS_CANDIDATES)).sum() >= 4
    assert (kept > WIDE_NUCLEUS_CANDIDATES).sum() >= 3
    checked = 0
    for counter in range(100):
        uniform = counter_uniform(torch.arange(16), torch.full((16,), counter))
        got = sample(logits, temperature, top_p, uniform, top_k, min_p)
        want, clear = canonical_inverse_cdf(logits, temperature, top_p, top_k, min_p, uniform,
                                            margin=1e-5)
        assert torch.equal(got[~sampled], logits[~sampled].argmax(-1))
        assert torch.equal(got[sampled & clear], want[sampled & clear]), counter
        checked += (sampled & clear).sum().item()
    assert checked >= 0.95 * 100 * sampled.sum().item()


def test_a_rows_token_does_not_depend_on_its_batch_neighbours():
    logits, temperature, top_p, top_k, min_p = path_logits_and_settings()
    for counter in range(5):
        uniform = counter_uniform(torch.arange(16), torch.full((16,), counter))
        batch = sample(logits, temperature, top_p, uniform, top_k, min_p)
        for i in range(16):
            row = slice(i, i + 1)
            alone = sample(logits[row], temperature[row], top_p[row], uniform[row], top_k[row],
                           min_p[row])
            assert alone.item() == batch[i].item(), (counter, i)


def test_neutral_top_k_and_min_p_leave_the_tokens_as_top_p_alone_gives():
    gen = torch.Generator().manual_seed(9)
    scales = torch.tensor([0.3, 1.0, 3.0, 6.0]).repeat(8)
    logits = torch.randn(32, 5000, generator=gen) * scales[:, None]
    temperature = torch.full((32,), 0.8)
    top_p = torch.rand(32, generator=gen).clamp(0.05, 1.0)
    top_p[::5] = 1.0
    for counter in range(10):
        uniform = counter_uniform(torch.arange(32), torch.full((32,), counter))
        want = full_sort_reference(logits, temperature, top_p, uniform.float())
        assert torch.equal(sample(logits, temperature, top_p, uniform), want)
        neutral = sample(logits, temperature, top_p, uniform, torch.zeros(32, dtype=torch.long),
                         torch.zeros(32))
        assert torch.equal(neutral, want), counter


def test_top_k_keeps_the_lowest_ids_of_a_tie_group_across_the_candidates_edge():
    """400 equally likely tokens straddle the 256th place and top-k ends among them, before or
    after that place: the kept set is the 200 more likely tokens and the tied ones with the
    lowest ids (HF keeps the whole tie group; a prefix of the canonical order keeps exactly
    top_k). topk holds an arbitrary 56 of the tied tokens, so no row may stop there."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.full((8, 5000), -30.0)
    tied = []
    for row in logits:
        ids = torch.randperm(5000, generator=gen)
        row[ids[:200]] = torch.linspace(5, 4, 200)
        row[ids[200:600]] = 3.5
        tied.append(ids[200:600].sort().values)
    top_k, top_p = torch.tensor([230, 260] * 4), torch.tensor([1.0, 1.0, 0.99995, 0.99995] * 2)
    min_p = torch.tensor([0.0] * 4 + [0.01] * 4)  # neither cuts before the top_k-th
    kept = filtered_probs(logits, torch.ones(8), top_p, top_k, min_p) > 0
    drawn = torch.zeros_like(kept)
    for counter in range(300):
        uniform = counter_uniform(torch.arange(8), torch.full((8,), counter))
        tokens = sample(logits, torch.ones(8), top_p, uniform, top_k, min_p)
        drawn[torch.arange(8), tokens] = True
    assert torch.equal(kept.sum(dim=-1), top_k)
    for i, n_tied in enumerate((top_k - 200).tolist()):
        assert kept[i, tied[i][:n_tied]].all() and not kept[i, tied[i][n_tied:]].any()
    assert not (drawn & ~kept).any()
    assert all(drawn[i, tied[i]].any() for i in range(8))


def test_min_p_keeps_every_token_at_least_min_p_times_the_most_likely():
    logits = torch.tensor([[2.0, 1.0, 2.0, 0.0, 1.9]] * 2)
    min_p = torch.tensor([1.0, 0.5])  # ties with the most likely are kept; e**-0.9 > 0.5 > e**-1
    probs = filtered_probs(logits, torch.ones(2), torch.ones(2), None, min_p)
    assert (probs > 0).tolist() == [[True, False, True, False, False],
                                    [True, False, True, False, True]]
    for u in (U_MIN, 0.5, U_MAX):
        tokens = sample(logits, torch.ones(2), torch.ones(2), torch.full((2,), u).double(), None,
                        min_p)
        assert probs[torch.arange(2), tokens].all()
    assert sample(logits, torch.ones(2), torch.ones(2), torch.full((2,), U_MAX).double(), None,
                  min_p).tolist() == [2, 4]


def test_top_logprobs_are_the_most_likely_first_ties_by_lower_id():
    gen = torch.Generator().manual_seed(6)
    logits = (torch.randn(6, 32000, generator=gen) * 2).bfloat16().float()  # ties everywhere
    logits[0, :100] = NEG_INF
    logits[1] = 0.0  # all tied
    logits[2, 31999] = 50.0
    logprobs, ids = top_logprobs(logits, 20)
    want = torch.log_softmax(logits, dim=-1).sort(dim=-1, descending=True, stable=True)
    assert ids.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(ids, want.indices[:, :20]) and torch.equal(logprobs, want.values[:, :20])
    assert ids[1].tolist() == list(range(20)) and ids[2, 0] == 31999
    assert torch.equal(logprobs, torch.log_softmax(logits, dim=-1).gather(-1, ids))
    small = torch.tensor([[0.0, NEG_INF, -1.0]])
    assert top_logprobs(small, 3)[1].tolist() == [[0, 2, 1]]
    assert top_logprobs(small, 3)[0][0, 2] == NEG_INF
