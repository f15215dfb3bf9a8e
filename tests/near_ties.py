"""When two runs that batch or split a request differently may give it different completions:
only at a proven near-tie. The logits of a sequence depend on its batch neighbours and on the
model-parallel split in their last bits (about 1e-6 in float32), so

- a sampled token may flip where the request's own uniform lies that close to a step of the
  CDF between two tokens;
- a greedy token may flip where the two most likely tokens are that close in log-probability.

`near_tie` re-derives the choice at the first differing token from one batch-1 forward pass and
says why the difference is allowed, or None where it is a real one. Only runs of the same batch
shape may be compared exactly (a later deterministic mode will make every comparison exact).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from llama_gen.engine import Engine, Request, SamplingParams
from llama_gen.sampling import counter_uniform, filtered_probs

NEAR_TIE = 1e-4  # a hundred times the rounding: how close a choice may be and still flip


def next_logprobs(model, request: Request, prefix: list[int]) -> torch.Tensor:
    """The model's log-probabilities (temperature 1) of the token after `prefix`, from one
    batch-1 forward pass."""
    vocab = model.args.vocab_size
    engine = Engine(model, (), max_batch_size=1,
                    max_seq_len=len(request.prompt_tokens) + len(prefix) + 1)
    probe = Request(request.prompt_tokens + prefix,
                    SamplingParams(max_gen_len=1, top_logprobs=vocab))
    [done] = engine.generate([probe])
    logprobs = torch.full((vocab,), float("-inf"))
    for token, logprob in done.top_logprobs[0]:
        logprobs[token] = logprob
    return logprobs


def redraw(model, request: Request, prefix: list[int]) -> tuple[torch.Tensor, float]:
    """The CDF (in token-id order, as `sample` draws) of the distribution `request` draws its
    token len(prefix) from after `prefix`, and its uniform."""
    p = request.params
    probs = filtered_probs(next_logprobs(model, request, prefix)[None],
                           torch.tensor([p.temperature]), torch.tensor([p.top_p]),
                           torch.tensor([p.top_k]), torch.tensor([p.min_p]))[0]
    return probs.cumsum(dim=-1), counter_uniform(torch.tensor([p.seed]),
                                                 torch.tensor([len(prefix)])).item()


def near_tie(model, request: Request, a: list[int], b: list[int], stops: Iterable[int]
             ) -> str | None:
    """Why two different completions of `request` (token ids, stop tokens left out) may differ:
    at their first differing token j (where one completion ended at j, its token was one of
    `stops`), a proven near-tie; None where there is none: a real difference. Penalties are not
    re-derived: use it for requests without them."""
    j = next(i for i in range(max(len(a), len(b))) if a[i:i + 1] != b[i:i + 1])
    if len(b) <= j:
        a, b = b, a
    candidates = a[j:j + 1] or sorted(stops)
    if request.params.temperature == 0:
        logprobs = next_logprobs(model, request, a[:j])
        top2 = set(logprobs.topk(2).indices.tolist())
        for other in candidates:
            gap = abs(logprobs[other].item() - logprobs[b[j]].item())
            if {other, b[j]} == top2 and gap < NEAR_TIE:
                return f"token {j}: greedy {other} or {b[j]}, log-probabilities {gap:.2e} apart"
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
