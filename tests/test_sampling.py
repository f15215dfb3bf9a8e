"""Sampling: counter-based uniforms, greedy and top-p selection, top-k, min-p (against Hugging
Face's warpers and a sorted reference), draws in token-id order, their frequencies, batch
independence, no host reads, penalties, log-probs and seed derivation."""
from __future__ import annotations

import pytest
import torch
from engine_runs import HostReads
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from llama_gen.engine.sampling import (ARGMAX_BLOCK, CPU_SAMPLE_CHUNK, _largest_reaching,
                                       apply_penalties, argmax, counter_uniform, derive_seed,
                                       filtered_probs, sample, token_logprobs, top_logprobs)

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
    n = 30_000
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
    torch.testing.assert_close(got.float(), want, rtol=0, atol=1e-6)
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


def token_order_inverse_cdf(logits, temperature, top_p, top_k, min_p, uniform, margin=1e-8):
    """Tokens drawn from `filtered_probs` by inverting its CDF in token-id order at `uniform`
    (float64), and which draws lie more than `margin` from every step of that CDF (so the
    sampler's whole units of mass cannot move them)."""
    probs = filtered_probs(logits, temperature, top_p, top_k, min_p)
    cdf = probs.cumsum(dim=-1)
    u = uniform.double().unsqueeze(-1)
    ids = torch.arange(1, probs.shape[-1] + 1)
    pick = torch.minimum((cdf <= u).sum(dim=-1), ((probs > 0) * ids).amax(dim=-1) - 1)
    return pick, (cdf - u).abs().amin(dim=-1) > margin


def sorted_kept(logits, temperature, top_p, top_k, min_p):
    """The kept set (B, V) by a stable sort of each row, in float64 over the float32
    probabilities, and each row's distance from its top-p boundary (relative to the top-k
    mass), where the two ways of summing may round differently."""
    probs = torch.softmax(logits / temperature.clamp_min(1e-5).unsqueeze(-1), dim=-1).double()
    descending = probs.sort(dim=-1, descending=True).values
    vocab = probs.shape[-1]
    kth = descending.gather(-1, (top_k.clamp(1, vocab) - 1).unsqueeze(-1))
    kth = torch.where(((top_k > 0) & (top_k < vocab)).unsqueeze(-1), kth, 0.0)
    within = descending.masked_fill(descending < kth, 0.0)
    target = (top_p.double() * within.sum(dim=-1)).unsqueeze(-1)
    cumulative = within.cumsum(dim=-1)
    reaching = (cumulative < target).sum(dim=-1, keepdim=True).clamp_max(vocab - 1)
    nucleus = torch.where((top_p < 1).unsqueeze(-1), descending.gather(-1, reaching), kth)
    threshold = torch.maximum(torch.maximum(nucleus, kth), min_p.unsqueeze(-1) * descending[:, :1])
    distance = ((cumulative - target).abs() / within.sum(dim=-1, keepdim=True)).amin(dim=-1)
    return (probs >= threshold) & (probs > 0), distance


def all_kinds_of_rows():
    """Logits (20, 3000) and settings (20,): peaked and flat rows under each filter, ties at
    every threshold (bf16 logits, a tie group on the top-k-th place), top_k past the
    vocabulary, top_p 1, min-p cutting, an all-equal row, -inf logits and a greedy row."""
    rows = [  # (logit scale, temperature, top_k, top_p, min_p)
        (1.0, 1.0, 5, 0.9, 0.0), (0.3, 0.8, 40, 1.0, 0.0), (1.0, 1.0, 300, 0.99, 0.0),
        (0.3, 1.0, 2000, 1.0, 0.0), (0.3, 1.0, 2500, 0.95, 0.0), (0.2, 1.0, 5000, 0.9, 0.0),
        (5.0, 0.8, 0, 1.0, 0.05), (0.5, 1.0, 0, 1.0, 0.3), (0.3, 1.0, 0, 1.0, 0.5),
        (0.3, 1.0, 2000, 0.9, 0.6), (1.0, 1.0, 0, 1.0, 0.0), (3.0, 0.7, 10, 0.8, 0.1),
        (1.0, 0.0, 5, 0.9, 0.1), (2.0, 1.0, 0, 0.9, 0.0), (0.5, 1.0, 3000, 0.5, 0.0),
        (4.0, 1.0, 1000, 1.0, 0.02), (0.0, 1.0, 0, 0.5, 0.0), (3.0, 1.0, 0, 0.9, 0.0),
        (1.0, 1.0, 210, 1.0, 0.0), (1.0, 1.0, 5, 0.95, 0.0),
    ]
    scale, temperature, top_k, top_p, min_p = (torch.tensor(c) for c in zip(*rows))
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(len(rows), 3000, generator=gen) * scale.unsqueeze(-1)
    logits[13:16] = (logits[13:16] * 4 + 12).bfloat16().float()  # ties everywhere
    logits[17, 1000:] = NEG_INF
    ids = torch.randperm(3000, generator=gen)
    logits[18, ids[:200]] = torch.linspace(5, 4, 200)
    logits[18, ids[200:600]] = 3.5  # the 210th place is tied with 399 others
    logits[19, :3] = torch.tensor([2.0, 2.0, 2.0])
    logits[19, 3:] = NEG_INF  # top_k 5 past the 3 tokens with a probability
    return logits, temperature, top_p, top_k, min_p


def test_sample_inverts_the_token_order_cdf_of_filtered_probs_on_all_kinds_of_rows():
    logits, temperature, top_p, top_k, min_p = all_kinds_of_rows()
    kept = filtered_probs(logits, temperature, top_p, top_k, min_p) > 0
    sampled = temperature > 0
    assert kept[18].sum() == 600 and kept[16].all() and kept[19].sum() == 3
    checked = 0
    for counter in range(200):
        uniform = counter_uniform(torch.arange(20), torch.full((20,), counter))
        got = sample(logits, temperature, top_p, uniform, top_k, min_p)
        want, clear = token_order_inverse_cdf(logits, temperature, top_p, top_k, min_p, uniform)
        assert torch.equal(got[~sampled], logits[~sampled].argmax(-1))
        assert torch.equal(got[sampled & clear], want[sampled & clear]), counter
        checked += (sampled & clear).sum().item()
    assert checked >= 0.99 * 200 * sampled.sum().item()
    for u in (U_MIN, U_MAX):  # the first and the last kept token
        uniform = torch.full((20,), u, dtype=torch.float64)
        got = sample(logits, temperature, top_p, uniform, top_k, min_p)
        want, _ = token_order_inverse_cdf(logits, temperature, top_p, top_k, min_p, uniform)
        assert torch.equal(got[sampled], want[sampled])


@pytest.mark.parametrize("vocab", [32000, 128256])
def test_the_kept_set_is_what_a_sort_keeps_on_wide_and_narrow_rows(vocab):
    """Flat rows whose nucleus holds most of the vocabulary and peaked ones holding a few
    tokens, each filter alone and together, against a stable sort summed in float64; rows
    within 1e-6 of their top-p boundary, where the two sums may round apart, are left out."""
    gen = torch.Generator().manual_seed(vocab)
    scales = torch.tensor([0.1, 0.3, 1.0, 3.0, 8.0]).repeat(4)
    logits = torch.randn(20, vocab, generator=gen) * scales.unsqueeze(-1)
    temperature = torch.rand(20, generator=gen) + 0.5
    top_p = torch.rand(20, generator=gen).clamp(0.05, 1.0)
    top_k = torch.randint(0, vocab + 10, (20,), generator=gen) * (torch.arange(20) % 3 > 0)
    min_p = torch.rand(20, generator=gen) * 0.2 * (torch.arange(20) % 2)
    got = filtered_probs(logits, temperature, top_p, top_k, min_p) > 0
    want, distance = sorted_kept(logits, temperature, top_p, top_k, min_p)
    clear = distance > 1e-6
    assert clear.sum() >= 18 and torch.equal(got[clear], want[clear])
    assert got.sum(dim=-1).min() < 100 and got.sum(dim=-1).max() > vocab // 2


def test_a_rows_token_does_not_depend_on_its_batch_neighbours():
    logits, temperature, top_p, top_k, min_p = all_kinds_of_rows()
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    for counter in range(5):
        uniform = counter_uniform(torch.arange(20), torch.full((20,), counter))
        batch = sample(logits, temperature, top_p, uniform, top_k, min_p)
        shuffled = sample(logits[perm], temperature[perm], top_p[perm], uniform[perm],
                          top_k[perm], min_p[perm])
        assert torch.equal(shuffled, batch[perm])
        repeated = [x.repeat(6, *[1] * (x.dim() - 1))
                    for x in (logits, temperature, top_p, uniform, top_k, min_p)]
        assert repeated[0].numel() > CPU_SAMPLE_CHUNK  # taken in chunks of rows
        assert torch.equal(sample(*repeated), batch.repeat(6))
        for i in range(20):
            row = slice(i, i + 1)
            alone = sample(logits[row], temperature[row], top_p[row], uniform[row], top_k[row],
                           min_p[row])
            assert alone.item() == batch[i].item(), (counter, i)


@pytest.mark.parametrize("scale", [2.0, 3.0])
def test_tied_bf16_logits_at_the_top_p_threshold_match_the_reference(scale):
    """bf16 logits tie often, and the top-p threshold then falls inside a tie group, which is
    kept whole."""
    gen = torch.Generator().manual_seed(int(scale))
    logits = (torch.randn(32, 32000, generator=gen) * scale + 12).bfloat16().float()
    temperature, top_p = torch.full((32,), 0.8), torch.full((32,), 0.9)
    probs = torch.softmax(logits / 0.8, dim=-1)
    kept = filtered_probs(logits, temperature, top_p, None, None) > 0
    least_kept = probs.masked_fill(~kept, 2.0).amin(dim=-1, keepdim=True)
    assert ((probs == least_kept).sum(dim=-1) > 1).all()  # each boundary is on a tie group
    assert torch.equal(kept, probs >= least_kept)
    for counter in range(5):
        uniform = counter_uniform(torch.arange(32), torch.full((32,), counter))
        want, clear = token_order_inverse_cdf(logits, temperature, top_p, None, None, uniform)
        got = sample(logits, temperature, top_p, uniform)
        assert clear.sum() >= 30 and torch.equal(got[clear], want[clear]), counter


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_draw_what_their_float32_values_draw(dtype):
    logits, temperature, top_p, top_k, min_p = all_kinds_of_rows()
    logits = logits.clamp_min(-60000).to(dtype)  # fp16 holds no -inf-free rows otherwise
    logits[17, 1000:] = NEG_INF
    for counter in range(5):
        uniform = counter_uniform(torch.arange(20), torch.full((20,), counter))
        got = sample(logits, temperature, top_p, uniform, top_k, min_p)
        assert torch.equal(got, sample(logits.float(), temperature, top_p, uniform, top_k, min_p))


def test_neutral_top_k_and_min_p_leave_the_tokens_as_top_p_alone_gives():
    gen = torch.Generator().manual_seed(9)
    scales = torch.tensor([0.3, 1.0, 3.0, 6.0]).repeat(8)
    logits = torch.randn(32, 5000, generator=gen) * scales[:, None]
    temperature = torch.full((32,), 0.8)
    top_p = torch.rand(32, generator=gen).clamp(0.05, 1.0)
    top_p[::5] = 1.0
    for counter in range(10):
        uniform = counter_uniform(torch.arange(32), torch.full((32,), counter))
        alone = sample(logits, temperature, top_p, uniform)
        for top_k in (torch.zeros(32, dtype=torch.long), torch.full((32,), 5000)):
            neutral = sample(logits, temperature, top_p, uniform, top_k, torch.zeros(32))
            assert torch.equal(neutral, alone), counter


def test_top_k_keeps_the_whole_tie_group_at_its_threshold_as_hugging_face_does():
    """400 equally likely tokens follow the 200 most likely, and top-k ends among them: all
    600 are kept, as TopKLogitsWarper keeps them, and every one of them can be drawn."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.full((4, 5000), -30.0)
    for row in logits:
        ids = torch.randperm(5000, generator=gen)
        row[ids[:200]] = torch.linspace(5, 4, 200)
        row[ids[200:600]] = 3.5
    top_k, top_p = torch.tensor([230, 599, 230, 600]), torch.tensor([1.0, 1.0, 0.99995, 1.0])
    kept = filtered_probs(logits, torch.ones(4), top_p, top_k, None) > 0
    hf = torch.stack([hugging_face_probs(logits[i], 1.0, int(top_k[i]), float(top_p[i]), 0.0)
                      for i in range(4)]) > 0
    assert torch.equal(kept, hf) and kept.sum(dim=-1).tolist() == [600] * 4
    drawn = torch.zeros_like(kept)
    for counter in range(3000):
        uniform = counter_uniform(torch.arange(4), torch.full((4,), counter))
        drawn[torch.arange(4), sample(logits, torch.ones(4), top_p, uniform, top_k, None)] = True
    assert not (drawn & ~kept).any() and drawn.sum(dim=-1).min() >= 500


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


def chi_square(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's statistic over the tokens expected to be drawn; none drawn outside them."""
    n = counts.sum()
    assert (counts[expected == 0] == 0).all()
    inside = expected > 0
    return ((counts[inside] - n * expected[inside]) ** 2 / (n * expected[inside])).sum().item()


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 3, 1.0, 0.0), (0.7, 0, 1.0, 0.2), (1.2, 5, 0.7, 0.0), (1.0, 6, 0.9, 0.1)])
def test_frequencies_under_each_filter_match_hugging_faces_distribution(temperature, top_k,
                                                                        top_p, min_p):
    logits = torch.tensor([0.3, 2.0, -1.0, 1.5, 1.2, 0.4, -0.5, 0.0])  # unsorted ids
    expected = hugging_face_probs(logits, temperature, top_k, top_p, min_p).double()
    n = 20_000
    seeds = torch.arange(n) // 1000 * 7919
    u = counter_uniform(seeds, torch.arange(n) % 1000)
    row = lambda x: torch.full((n,), x)  # noqa: E731
    tokens = sample(logits.expand(n, -1), row(temperature), row(top_p), u,
                    row(top_k).long(), row(min_p))
    counts = tokens.bincount(minlength=8).double()
    assert 2 <= (expected > 0).sum() < 8
    assert chi_square(counts, expected) < 40  # df <= 6: p below 1e-6


def test_a_tiny_temperature_is_greedy_and_a_huge_one_is_uniform():
    logits = torch.tensor([[0.5, 3.0, -2.0, 2.999, 1.0, 3.0 - 1e-3]])
    n = 6000
    u = counter_uniform(torch.zeros(n, dtype=torch.long), torch.arange(n))
    tiny = sample(logits.expand(n, -1), torch.full((n,), 1e-6), torch.ones(n), u)
    assert (tiny == 1).all()
    tied = torch.tensor([[0.5, 3.0, -2.0, 3.0, 1.0]])  # tied maxima split the draws
    split = sample(tied.expand(n, -1), torch.full((n,), 1e-6), torch.ones(n), u)
    assert set(split.tolist()) == {1, 3} and abs((split == 1).sum().item() - n / 2) < 5 * 39
    huge = sample(logits.expand(n, -1), torch.full((n,), 1e6), torch.full((n,), 0.99), u)
    assert chi_square(huge.bincount(minlength=6).double(), torch.full((6,), 1 / 6).double()) < 30


def test_a_row_with_one_finite_logit_draws_it_and_a_row_with_none_still_draws_a_token():
    logits = torch.full((4, 1000), NEG_INF)
    logits[0, 997], logits[1, 3], logits[2, 500] = -50.0, 80.0, 0.0
    temperature = torch.tensor([1.0, 0.3, 2.0, 1.0])
    top_p, top_k, min_p = torch.tensor([0.1, 1.0, 0.9, 0.5]), torch.tensor([0, 7, 1, 3]), \
        torch.tensor([0.0, 0.5, 0.0, 0.1])
    for u in (U_MIN, 0.5, U_MAX):
        uniform = torch.full((4,), u, dtype=torch.float64)
        for filters in ((None, None), (top_k, min_p)):
            tokens = sample(logits, temperature, top_p, uniform, *filters)
            assert tokens[:3].tolist() == [997, 3, 500] and 0 <= tokens[3] < 1000


def test_sample_reads_nothing_to_the_host():
    logits, temperature, top_p, top_k, min_p = all_kinds_of_rows()
    uniform = counter_uniform(torch.arange(20), torch.zeros(20, dtype=torch.long))
    with HostReads() as mode:
        sample(logits, temperature, top_p, uniform, top_k, min_p)
        sample(logits, temperature, top_p, uniform)
        sample(logits.repeat(6, 1), *(x.repeat(6) for x in (temperature, top_p, uniform)))
        filtered_probs(logits, temperature, top_p, top_k, min_p)
    assert mode.reads == []
    with HostReads() as mode:  # the counter sees a host read
        logits.nonzero()
        logits[0, 0].item()
    assert len(mode.reads) == 2


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


def radix_select_with_outside_buckets(bits, weights, target):
    """`_largest_reaching` as it was before issue 24, the reference: per digit, one histogram of
    every entry, with a bucket for those below the row's prefix and one for those above."""
    rows, size = len(bits), 1024
    prefix = torch.zeros(rows, 1, dtype=torch.int32)
    for shift in (20, 10, 0):
        bucket = ((bits >> shift) - ((prefix << 10) - 1)).clamp(0, size + 1).long()
        histogram = torch.zeros(rows, size + 2, dtype=weights.dtype)
        below = histogram.scatter_add_(1, bucket, weights.expand_as(bits)).cumsum(dim=-1)
        spare = below[:, -1:] - target.unsqueeze(-1)
        chosen = (below[:, :size] <= spare).sum(dim=-1, keepdim=True) - 1
        prefix = (prefix << 10) | chosen.clamp_min(0).int()
    return prefix.squeeze(-1)


def largest_reaching_by_sort(bits, weights, target):
    """The definition, for weights >= 0: the largest t in [0, 2**30) with
    sum(weights[bits >= t]) >= target, or 0 where none; by a sort of each row."""
    found = []
    for row_bits, row_weights, row_target in zip(bits, weights.expand_as(bits), target.tolist()):
        values, order = row_bits.sort(descending=True, stable=True)
        groups, sizes = values.unique_consecutive(return_counts=True)
        reach = row_weights[order].long().cumsum(dim=0)[sizes.cumsum(dim=0) - 1]
        reaching = groups[reach.double() >= row_target]
        found.append(2**30 - 1 if row_target <= 0 else
                     min(max(reaching.max().item(), 0), 2**30 - 1) if len(reaching) else 0)
    return torch.tensor(found, dtype=torch.int32)


def select_cases(vocab):
    """Probabilities' bits (24, vocab): peaked, flat and nearly uniform rows (whose entries
    share their first 20 bits, so every pass counts), bf16 ties, zeros; and for each row its
    masses, a count target (1 to past the vocabulary) and a mass target, some of them exactly
    the mass at or above a tie group, 0, negative or past the total."""
    gen = torch.Generator().manual_seed(vocab)
    scales = torch.tensor([1e-4, 0.01, 0.3, 1.0, 3.0, 8.0]).repeat(4).unsqueeze(-1)
    logits = torch.randn(24, vocab, generator=gen) * scales
    logits[6:12] = logits[6:12].bfloat16().float()
    logits[12, vocab // 2:] = NEG_INF
    probs = torch.softmax(logits, dim=-1)
    bits = probs.view(torch.int32)
    masses = (probs * 2.0**30 + 0.5).int()
    total = masses.sum(dim=-1).double()
    mass_target = torch.rand(24, generator=gen, dtype=torch.float64) * total
    ranked = masses.sort(dim=-1, descending=True).values.long().cumsum(dim=-1)
    place = torch.randint(0, vocab, (24,), generator=gen)
    mass_target[::3] = ranked.gather(1, place.unsqueeze(-1)).squeeze(-1)[::3].double()
    mass_target[1:5] = torch.tensor([0.0, -3.0, 1.0]).repeat(2)[:4]
    mass_target[5] = total[5] + 1
    count_target = torch.randint(1, vocab + 10, (24,), generator=gen).double()
    count_target[:6] = torch.tensor([1.0, 2.0, vocab, vocab + 1, 0.0, 40.0])
    return bits, masses, mass_target, count_target


@pytest.mark.parametrize("vocab", [3000, 128256])
def test_the_radix_select_finds_the_largest_threshold_reaching_its_target(vocab):
    """Exactly the threshold a sort finds, and the one that one histogram per pass found."""
    bits, masses, mass_target, count_target = select_cases(vocab)
    index, inside = torch.empty_like(bits), torch.empty_like(bits)
    ones = torch.ones(1, 1, dtype=torch.int32)
    for weights, target in ((masses, mass_target), (None, count_target)):
        got = _largest_reaching(bits, weights, target, index, inside)
        weights = ones if weights is None else weights
        assert torch.equal(got, largest_reaching_by_sort(bits, weights, target))
        assert torch.equal(got, radix_select_with_outside_buckets(bits, weights, target))


def test_the_radix_select_on_nan_rows_is_as_before_and_negatives_lie_below_it_all():
    """Rows of NaN probabilities, of either sign (the softmax of no finite logit, or of a NaN or
    +inf one), weighed by the masses the integer conversion makes of a NaN: the thresholds one
    histogram per pass gave, so the same tokens. Negative probabilities, which a softmax never
    makes, lie below every threshold (one histogram per pass overflowed int32 on -0.0's in its
    last pass and counted them above)."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(8, 3000, generator=gen) * 3
    logits[0] = NEG_INF
    logits[1, 7] = float("nan")
    logits[2, [3, 9, 11]] = float("inf")
    logits[3, 5] = float("inf")
    probs = torch.softmax(logits, dim=-1)
    probs[4] = float("nan")
    probs[5] = -probs[4]
    probs[6] = -probs[6]
    probs[7, ::2] = -0.0
    bits = probs.view(torch.int32)
    masses = (probs * 2.0**30 + 0.5).int()
    ones = torch.ones(1, 1, dtype=torch.int32)
    index, inside = torch.empty_like(bits), torch.empty_like(bits)
    for target in (torch.full((8,), 0.9), torch.full((8,), -1.0), torch.full((8,), 40.0),
                   masses.sum(dim=-1).double() * 0.9):
        target = target.double()
        for weights in (masses, None):
            got = _largest_reaching(bits, weights, target, index, inside)
            want = radix_select_with_outside_buckets(bits, ones if weights is None else weights,
                                                     target)
            assert torch.equal(got[:6], want[:6])
        got = _largest_reaching(bits, None, target, index, inside)
        assert torch.equal(got[6:], largest_reaching_by_sort(bits[6:], ones, target[6:]))


class Scatters(TorchDispatchMode):
    """For each scatter_add, the largest share of a row's entries sent to one bucket."""

    def __init__(self):
        super().__init__()
        self.shares: list[float] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.scatter_add_, torch.ops.aten.scatter_add):
            index = args[2]
            self.shares.append(max(row.bincount().max().item() / len(row) for row in index))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("vocab", [32000, 128256])
def test_no_radix_pass_piles_a_rows_entries_on_one_bucket(vocab):
    """A GPU's scatter_add_ adds each entry atomically, and adds to one address run one at a
    time. Only the first pass of a radix select takes every entry, spread by its leading bits;
    the later ones add the entries outside the row's prefix, nearly all of them, as zeros to
    their own digit's bucket, not to one bucket for below the prefix and one for above.
    Language-model-like rows (a few hundred tokens hold most of the mass): three passes per
    select, no bucket with more than 5% of a row."""
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(3)) * 3
    temperature, top_p, top_k = torch.full((2,), 0.8), torch.full((2,), 0.95), torch.full((2,), 40)
    uniform = counter_uniform(torch.arange(2), torch.zeros(2, dtype=torch.long))
    with Scatters() as mode:
        sample(logits, temperature, top_p, uniform, top_k)
    assert len(mode.shares) == 6 and max(mode.shares) < 0.05, mode.shares
