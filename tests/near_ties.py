"""When two runs that batch or split a request differently may give it different completions:
only at a proven near-tie. The logits of a sequence depend on its batch neighbours and on the
model-parallel split in their last bits (about 1e-6 in float32), so

- a sampled token may flip where the request's own uniform lies that close to a step of the
  CDF between two tokens;
- a greedy token may flip where the two most likely tokens are that close in log-probability.

`near_tie` re-derives the choice at the first differing token from one uncached forward pass
(penalties applied) and says why the difference is allowed, or None where it is a real one.
`assert_alike` compares whole completions so. Only runs of the same batch shape may be compared
exactly (a later deterministic mode will make every comparison exact).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from llama_gen.engine.requests import Request
from llama_gen.engine.sampling import apply_penalties, counter_uniform, filtered_probs

NEAR_TIE = 1e-4  # a hundred times the rounding: how close a choice may be and still flip
ALIKE_ATOL = 1e-4  # log-probabilities of runs batched differently, up to the first difference


def first_difference(a: list, b: list) -> int:
    """The first index where a and b differ, or the shorter one's length."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def teacher_forced_logits(model, tokens: list[int]) -> torch.Tensor:
    """Logits (len(tokens), vocab) from one uncached pass (it sets up the model's cache)."""
    model.setup_cache(1, len(tokens))
    step = model.make_step(torch.arange(len(tokens))[None], slice(0, 1), kv_len=len(tokens),
                           every_token=True)
    with torch.inference_mode():
        return model(torch.tensor([tokens]), step)


def choice_logits(model, request: Request, prefix: list[int]) -> torch.Tensor:
    """The logits (vocab,) `request` chooses its token len(prefix) from after `prefix`: one
    uncached pass, then its penalties over its prompt and `prefix` (none: the logits as
    they are, bit for bit)."""
    logits = teacher_forced_logits(model, request.prompt_tokens + prefix)[-1]
    seen = torch.zeros(logits.numel(), dtype=torch.bool)
    seen[request.prompt_tokens] = True
    counts = torch.bincount(torch.tensor(prefix, dtype=torch.long), minlength=logits.numel())
    p = request.params
    return apply_penalties(logits[None], seen[None], counts[None],
                           torch.tensor([p.repetition_penalty]),
                           torch.tensor([p.presence_penalty]),
                           torch.tensor([p.frequency_penalty]))[0]


def next_logprobs(model, request: Request, prefix: list[int]) -> torch.Tensor:
    """The log-probabilities (temperature 1, penalties applied) of the token after `prefix`."""
    return torch.log_softmax(choice_logits(model, request, prefix).float(), dim=-1)


def redraw(model, request: Request, prefix: list[int]) -> tuple[torch.Tensor, float]:
    """The CDF (in token-id order, as `sample` draws) of the distribution `request` draws its
    token len(prefix) from after `prefix`, and its uniform."""
    p = request.params
    probs = filtered_probs(choice_logits(model, request, prefix)[None],
                           torch.tensor([p.temperature]), torch.tensor([p.top_p]),
                           torch.tensor([p.top_k]), torch.tensor([p.min_p]))[0]
    return probs.cumsum(dim=-1), counter_uniform(torch.tensor([p.seed]),
                                                 torch.tensor([len(prefix)])).item()


def near_tie(model, request: Request, a: list[int], b: list[int], stops: Iterable[int] = ()
             ) -> str | None:
    """Why two different completions of `request` (token ids, stop tokens left out) may differ:
    at their first differing token j (where one completion ended at j, its token was one of
    `stops`), a proven near-tie, its penalties re-derived; None where there is none: a real
    difference. (Stop tokens held back by min_tokens are not re-derived.)"""
    j = first_difference(a, b)
    if len(b) <= j:
        a, b = b, a
    candidates = a[j:j + 1] or sorted(stops)
    if request.params.temperature == 0:
        logits = choice_logits(model, request, a[:j])
        top2 = set(logits.topk(2).indices.tolist())
        for other in candidates:
            gap = abs(logits[other].item() - logits[b[j]].item())  # a log-probability gap too
            if {other, b[j]} == top2 and gap < NEAR_TIE:
                return f"token {j}: greedy {other} or {b[j]}, {gap:.2e} apart"
        return None
    cdf, u = redraw(model, request, a[:j])
    drawn = (cdf <= u).sum().item()
    for other in candidates:
        lo, hi = sorted((other, b[j]))
        if (drawn in (lo, hi) and abs(cdf[lo].item() - u) < NEAR_TIE
                and cdf[hi - 1].item() - cdf[lo].item() < NEAR_TIE):
            return f"token {j}: {other} or {b[j]}, u={u:.9f}, CDF step at {cdf[lo].item():.9f}"
    return None


def assert_same_but_near_ties(model, pairs: Iterable[tuple[Request, list[int], list[int]]],
                              stops: Iterable[int], most: int) -> list[str]:
    """Each (request, a, b) the same completion, or different only at a proven near-tie, and
    at most `most` such ties (rounding moves few choices across a boundary). Returns them."""
    ties = []
    for request, a, b in pairs:
        if list(a) != list(b):
            why = near_tie(model, request, list(a), list(b), stops)
            assert why, f"a real difference, not a near-tie: {a} vs {b}"
            ties.append(why)
    assert len(ties) <= most, ties
    return ties


def assert_alike(model, pairs, stops=(), most: int = 2) -> list[str]:
    """Each (request, got, want) Completion from runs batched (or paged, chunked, compiled)
    differently: the same tokens, or tokens that differ only from a proven near-tie on; an
    echoed prompt the same; logprobs and top alternatives within ALIKE_ATOL up to the first
    differing token; the same ending where the tokens agree. At most `most` near-ties."""
    ties = []
    for request, got, want in pairs:
        n = len(request.prompt_tokens) if request.params.echo else 0
        assert got.tokens[:n] == want.tokens[:n] == request.prompt_tokens[:n], request.tag
        a, b = got.tokens[n:], want.tokens[n:]
        j = first_difference(a, b)
        if a != b:
            why = near_tie(model, request, a, b, stops)
            assert why, f"{request.tag}: a real difference, not a near-tie: {a} vs {b}"
            ties.append(why)
        else:
            ending = got.finish_reason, got.stop_reason
            assert ending == (want.finish_reason, want.stop_reason), request.tag
        assert (got.logprobs is None) == (want.logprobs is None), request.tag
        if want.logprobs is not None:
            g, w = got.logprobs[:n + j], want.logprobs[:n + j]
            assert [x is None for x in g] == [x is None for x in w], request.tag
            torch.testing.assert_close(torch.tensor([x for x in g if x is not None]),
                                       torch.tensor([x for x in w if x is not None]),
                                       atol=ALIKE_ATOL, rtol=0,
                                       msg=lambda m: f"{request.tag}: {m}")
        assert (got.top_logprobs is None) == (want.top_logprobs is None), request.tag
        for g, w in zip((got.top_logprobs or [])[:j], (want.top_logprobs or [])[:j]):
            assert_tops_alike(g, w)
    assert len(ties) <= most, ties
    return ties


def assert_tops_alike(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    """One token's top alternatives from runs batched differently: the same logprobs rank by
    rank; the same tokens, but for alternatives within NEAR_TIE of each other (their order) or
    of the last one shown (which of them is in)."""
    assert len(got) == len(want)
    torch.testing.assert_close(torch.tensor([v for _, v in got]),
                               torch.tensor([v for _, v in want]), atol=ALIKE_ATOL, rtol=0)
    g, w = dict(got), dict(want)
    for t in g.keys() & w.keys():
        assert abs(g[t] - w[t]) < ALIKE_ATOL, (got, want)
    for t, v, other in [(t, v, w) for t, v in got if t not in w] + \
            [(t, v, g) for t, v in want if t not in g]:
        assert abs(v - min(other.values())) < NEAR_TIE, (got, want)
