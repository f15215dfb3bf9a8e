"""The scorer against the engine's own teacher-forced pass (`prompt_logprobs`) and against Hugging
Face's Llama on the same weights (tests/test_model.py's conversion); its batching, chunking,
bounded logits and stopping."""
from __future__ import annotations

import random

import pytest
import torch
from reference_models import (CONFIGS, PARITY_ATOL, SEQ_LEN, build, config, echo_logprobs,
                              hf_logits, random_tokens, teacher_forced)

from llama_gen.engine import limits, passes, scoring
from llama_gen.engine.scoring import (Scored, Scorer, ScoreRequest, has_scored_part, plan_passes,
                                      score_groups)

ENGINE_ATOL = 1e-5
# (length, first_scored): short and long texts, some scored after a prompt; with small passes
# (16 tokens) the texts over 17 tokens are cut along their length.
MIXED = [(2, 1), (3, 1), (7, 3), (16, 1), (17, 10), (18, 1), (40, 25), (33, 1), (5, 1), (6, 2),
         (12, 11), (9, 1)]


@pytest.fixture
def small_passes(monkeypatch):
    """Passes of at most 16 tokens and logits 5 rows at a time, for the scorer and the engine."""
    monkeypatch.setattr(limits, "PREFILL_TOKENS", 16)
    monkeypatch.setattr(limits, "LOGPROB_ROWS", 5)


def requests(vocab_size: int, specs: list[tuple[int, int]], seed: int = 0) -> list[ScoreRequest]:
    rng = random.Random(seed)
    return [ScoreRequest([rng.randrange(vocab_size) for _ in range(n)], first, tag=i)
            for i, (n, first) in enumerate(specs)]


def by_tag(results) -> dict[int, Scored]:
    results = list(results)
    tags = [r.request.tag for r in results]
    assert len(tags) == len(set(tags)), "a request came back twice"
    return {r.request.tag: r for r in results}


def engine_logprobs(model, request: ScoreRequest) -> list[float]:
    """The engine's teacher-forced logprobs (echo's), in slot 0, from first_scored on."""
    with torch.inference_mode():
        logprobs = passes.prompt_logprobs(model, request.tokens, slot=0)
    return logprobs[request.first_scored - 1:]


def assert_close(got: list[float], expected, atol: float) -> None:
    assert len(got) == len(expected)
    torch.testing.assert_close(torch.tensor(got), torch.as_tensor(expected), atol=atol, rtol=0)


# --- equal to the engine's echo logprobs, and to Hugging Face's ---------------------------------

@pytest.mark.parametrize("passes", ["default", "small"])
@pytest.mark.parametrize("name", ["llama2-mha", "llama3.1-scaled"])
def test_scores_equal_the_engines_prompt_logprobs(single_process, request, name, passes):
    if passes == "small":
        request.getfixturevalue("small_passes")
        assert max(n for n, _ in MIXED) - 1 > 2 * limits.PREFILL_TOKENS  # cut into 3 pieces
    args, vocab_parallel = config(name)
    model = build(args, vocab_parallel)
    work = requests(args.vocab_size, MIXED)
    scorer = Scorer(model, max_batch_size=4, max_seq_len=48)
    results = by_tag(scorer.score(work))

    assert set(results) == {r.tag for r in work}
    for r in work:
        scored = results[r.tag]
        assert scored.request is r
        assert_close(scored.logprobs, engine_logprobs(model, r), ENGINE_ATOL)
        assert scored.n_tokens == len(r.tokens) - r.first_scored
        assert scored.total == pytest.approx(sum(scored.logprobs))
        assert scored.mean == pytest.approx(scored.total / scored.n_tokens)
    assert scorer.stats.passes < len(work) or passes == "small"  # texts shared passes


def test_scores_equal_echo_logprobs_from_generate(single_process):
    """`Engine.generate` with echo and logprobs (max_gen_len 0) gives the same logprobs."""
    args, vocab_parallel = config("llama3.1-scaled")
    tokens = random_tokens(args.vocab_size, n=40, seed=6)
    [scored] = Scorer(build(args, vocab_parallel), 2, 40).score([ScoreRequest(tokens.tolist(), 1)])
    echoed = echo_logprobs(build(args, vocab_parallel), tokens)
    assert_close(scored.logprobs, echoed[1:], ENGINE_ATOL)


@pytest.mark.parametrize("name", CONFIGS)
def test_scores_match_hf(single_process, small_passes, name):
    """A SEQ_LEN text scored whole and from token 40 on, beside shorter texts, in passes of 16
    tokens: Hugging Face's teacher-forced logprobs on the same weights."""
    args, vocab_parallel = config(name)
    tokens = random_tokens(args.vocab_size, seed=2)
    expected = teacher_forced(hf_logits(args, tokens), tokens)
    work = [ScoreRequest(tokens.tolist(), 1, "whole"), ScoreRequest(tokens.tolist(), 40, "tail"),
            *requests(args.vocab_size, [(5, 1), (20, 3), (11, 1)])]
    results = by_tag(Scorer(build(args, vocab_parallel), 3, SEQ_LEN).score(work))

    assert_close(results["whole"].logprobs, expected, PARITY_ATOL)
    assert_close(results["tail"].logprobs, expected[39:], PARITY_ATOL)


# --- batching -------------------------------------------------------------------------------------

def test_a_texts_logprobs_do_not_depend_on_its_neighbours(single_process, monkeypatch):
    """Scored alone, and in crowded passes (several groups side by side, 6 slots), a text's
    logprobs are the same: neighbours' padding and slots do not leak into its rows."""
    monkeypatch.setattr(limits, "PREFILL_TOKENS", 64)
    args, vocab_parallel = config("llama3.1-scaled")
    model = build(args, vocab_parallel)
    crowd = requests(args.vocab_size, [(n, 1 + n % 3) for n in range(3, 60, 4)], seed=5)
    for target in crowd[::4]:
        [alone] = Scorer(model, 1, 64).score([target])
        scorer = Scorer(model, 6, 64)
        crowded = by_tag(scorer.score(crowd))
        assert_close(crowded[target.tag].logprobs, alone.logprobs, ENGINE_ATOL)
    assert scorer.stats.passes < len(crowd)  # texts shared passes


def test_logits_only_for_scored_positions_and_bounded_rows(single_process, small_passes):
    """The output head sees each scored position once, at most LOGPROB_ROWS rows at a time, and
    no prompt or padding position."""
    args, vocab_parallel = config("llama2-mha")
    model = build(args, vocab_parallel)
    head_rows: list[int] = []
    logits = model.logits

    def counting_logits(hidden: torch.Tensor) -> torch.Tensor:
        head_rows.append(len(hidden))
        return logits(hidden)

    model.logits = counting_logits
    work = requests(args.vocab_size, MIXED)
    list(Scorer(model, 4, 48).score(work))
    assert sum(head_rows) == sum(len(r.tokens) - r.first_scored for r in work)
    assert max(head_rows) == limits.LOGPROB_ROWS


def test_every_request_comes_back_once_across_windows(single_process, monkeypatch):
    monkeypatch.setattr(scoring, "SCORE_WINDOW_BATCHES", 1)
    args, vocab_parallel = config("llama2-mha")
    same = [ScoreRequest([1, 5, 9, 2], 1, tag=tag) for tag in "abc"]  # equal texts, three tags
    work = same + requests(args.vocab_size, [(n, 1) for n in (9, 3, 14, 6, 4, 8)])
    results = by_tag(Scorer(build(args, vocab_parallel), 2, 16).score(iter(work)))
    assert set(results) == {r.tag for r in work}
    for tag in "bc":
        assert_close(results[tag].logprobs, results["a"].logprobs, ENGINE_ATOL)


def test_should_stop_is_asked_before_each_pass(single_process, small_passes):
    args, vocab_parallel = config("llama2-mha")
    model = build(args, vocab_parallel)
    work = requests(args.vocab_size, MIXED)
    asked = []

    def after_two_passes() -> bool:
        asked.append(True)
        return len(asked) > 2

    scorer = Scorer(model, 4, 48)
    results = by_tag(scorer.score(work, should_stop=after_two_passes))
    assert len(asked) == 3 and scorer.stats.passes == 2
    assert 0 < len(results) < len(work)
    for scored in results.values():  # what came back is whole
        assert_close(scored.logprobs, engine_logprobs(model, scored.request), ENGINE_ATOL)
    assert list(Scorer(model, 4, 48).score(work, should_stop=lambda: True)) == []


# --- requests that cannot be scored -------------------------------------------------------------

def test_a_text_needs_a_part_to_score():
    assert has_scored_part(8) and has_scored_part(8, first_scored=7)
    assert not has_scored_part(1) and not has_scored_part(5, first_scored=5)
    with pytest.raises(ValueError, match="first_scored"):
        ScoreRequest([1, 2], 0)


def test_a_request_too_long_raises_when_reached(single_process):
    args, vocab_parallel = config("llama2-mha")
    scorer = Scorer(build(args, vocab_parallel), 2, 8)
    with pytest.raises(ValueError, match="a text of 9 tokens does not fit a context of 8"):
        list(scorer.score([ScoreRequest([1] * 9, 1)]))
    with pytest.raises(ValueError, match="nothing to score"):
        list(scorer.score([ScoreRequest([1, 2], 2)]))


# --- the schedule -------------------------------------------------------------------------------

def test_passes_stay_within_rows_and_tokens_and_run_each_group_in_order():
    rng = random.Random(3)
    lengths = [rng.choice([2, 3, 5, 9, 30, 64, 65, 200]) + rng.randrange(4) for _ in range(80)]
    work = [ScoreRequest([0] * n, 1, tag=i) for i, n in enumerate(lengths)]
    max_rows, max_tokens = 5, 64
    groups = score_groups(work, max_rows, max_tokens)
    passes = plan_passes(groups, max_rows, max_tokens)

    assert sorted(r.tag for g in groups for r in g.requests) == list(range(len(work)))
    covered: dict[int, list[tuple[int, int, int]]] = {}
    for index, pieces in enumerate(passes):
        assert sum(p.n_tokens for p in pieces) <= max_tokens
        slots = [p.slot + i for p in pieces for i in range(len(p.group.requests))]
        assert sorted(slots) == list(range(len(slots))) and len(slots) <= max_rows
        for p in pieces:
            covered.setdefault(id(p.group), []).append((index, p.start, p.stop))
    for group in groups:
        spans = covered[id(group)]
        assert [s[1] for s in spans] == [0] + [s[2] for s in spans[:-1]]  # in order, no gap
        assert spans[-1][2] == group.length
        assert [s[0] for s in spans] == list(range(spans[0][0], spans[0][0] + len(spans)))
        if len(group.requests) > 1:
            real = sum(r.input_length for r in group.requests)
            assert group.length * len(group.requests) <= scoring.SCORE_PADDING * real
    assert any(len(covered[id(g)]) > 1 for g in groups)  # long texts were cut
