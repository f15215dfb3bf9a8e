"""The engine over the tiny checkpoints: a completion depends only on its own request, however the
batch slots around it are filled, refilled and compacted; stops, lengths, refused prompts, echo,
prompt logprobs and tags. The static baseline (`baseline.StaticEngine`) gives the same
completions."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from engine_runs import HostReads, alone, run
from near_ties import assert_alike, choice_logits, near_tie, redraw, teacher_forced_logits

from llama_gen.engine import limits
from llama_gen.engine.baseline import StaticEngine
from llama_gen.engine.engine import Engine
from llama_gen.engine.decode import decode_buckets
from llama_gen.engine.passes import (CPU_ATTENTION_CHUNK, DECODE_KV_BUCKET, attention_chunks,
                                     decode_kv_bucket, prompt_logprobs)
from llama_gen.engine.requests import Completion, Request, SamplingParams
from llama_gen.engine.sampling import token_logprobs
from llama_gen.engine.scheduler import StepPlan, shortest_first_in_windows, take_prefill_groups
from llama_gen.job.build import load_model
from llama_gen.model.transformer import Transformer
from llama_gen.text.tokenizer import load_tokenizer


@pytest.fixture(scope="module", params=["llama2", "llama3"])
def model(request, single_process, tiny_checkpoints) -> Transformer:
    ckpt = tiny_checkpoints[(request.param, 1)]
    return load_model(ckpt, load_tokenizer(ckpt / "tokenizer.model"), single_process,
                      torch.float32)


GREEDY = SamplingParams(temperature=0.0, logprobs=True)
LOGPROB_ATOL = 1e-5


def prompt(model: Transformer, n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(model.args.vocab_size, (n,), generator=gen).tolist()


def params(base: SamplingParams = GREEDY, **changes) -> SamplingParams:
    return dataclasses.replace(base, **changes)


def assert_same(got: Completion, want: Completion) -> None:
    assert got.tokens == want.tokens
    assert got.finish_reason == want.finish_reason
    if want.logprobs is None:
        assert got.logprobs is None
    else:
        assert [x is None for x in got.logprobs] == [x is None for x in want.logprobs]
        torch.testing.assert_close(torch.tensor([x for x in got.logprobs if x is not None]),
                                   torch.tensor([x for x in want.logprobs if x is not None]),
                                   atol=LOGPROB_ATOL, rtol=0)


def spy_plans(engine: Engine) -> list[StepPlan]:
    """Record the plan of each step the engine's runner runs."""
    plans, run_plan = [], engine.runner.run
    def spy(plan):
        plans.append(plan)
        return run_plan(plan)
    engine.runner.run = spy
    return plans


def moves_in(plans: list[StepPlan]) -> list[tuple[int, int, int]]:
    """The row compactions (src, dst, length) the plans made."""
    return [(m.src, m.dst, m.length) for plan in plans for m in plan.moves]


# --- a completion depends only on its request --------------------------------------------------

# (prompt length, max_gen_len): long and short prompts, long and short generations, so slots
# finish out of order, are refilled with new prompts and compacted.
CROWD = [(3, 20), (17, 3), (1, 15), (9, 1), (25, 8), (2, 25), (12, 5), (6, None), (30, 2), (4, 12)]


def crowd(model: Transformer, base: SamplingParams) -> list[Request]:
    return [Request(prompt(model, n, seed=i), params(base, max_gen_len=m, seed=100 + i), tag=i)
            for i, (n, m) in enumerate(CROWD)]


def test_greedy_alone_equals_crowded_batch(model):
    requests = crowd(model, GREEDY)
    engine = Engine(model, (), max_batch_size=3, max_seq_len=48)
    plans = spy_plans(engine)
    first = run(engine, requests)
    assert any(src != dst for src, dst, _ in moves_in(plans))  # compaction really happened
    again = run(engine, requests[::-1])  # the same engine, its cache full of the first run
    alones = {r.tag: alone(model, r, max_seq_len=48) for r in requests}
    assert_alike(model, [(r, done[r.tag], alones[r.tag]) for r in requests
                         for done in (first, again)])
    assert len(first[7].tokens) == 48 - 6  # max_gen_len None: until the context is full


def test_sampling_alone_equals_batched_and_follows_the_seed(model):
    sampled = SamplingParams(temperature=1.0, top_p=0.9, logprobs=True)
    requests = crowd(model, sampled)
    base = prompt(model, 7, seed=99)
    probes = [Request(base, params(sampled, max_gen_len=12, seed=s), tag=f"seed{s}")
              for s in (5, 6)]
    batched = run(Engine(model, (), max_batch_size=3, max_seq_len=48),
                  requests[:4] + [probes[0]] + requests[4:] + [probes[1]])
    assert_alike(model, [(r, batched[r.tag], alone(model, r, max_seq_len=48))
                         for r in requests + probes])
    assert batched["seed5"].tokens != batched["seed6"].tokens
    # Sampling, not greedy decoding: the same prompt decoded greedily gives other tokens.
    assert batched["seed5"].tokens != alone(model, Request(base, params(max_gen_len=12))).tokens


# --- how a sequence ends ---------------------------------------------------------------------------

@pytest.mark.parametrize("at", [0, 2])
def test_stop_token_ends_the_sequence_and_is_dropped(model, at):
    request = Request(prompt(model, 5, seed=3), params(max_gen_len=10))
    free = alone(model, request).tokens
    assert len(free) == 10 and free.index(free[at]) == at  # precondition: first occurrence
    stop = free[at]
    other = Request(prompt(model, 8, seed=4), params(max_gen_len=6), tag="other")
    done = run(Engine(model, {stop}, max_batch_size=2, max_seq_len=64),
               [Request(request.prompt_tokens, request.params, tag="stopped"), other])
    assert done["stopped"].finish_reason == "stop"
    assert done["stopped"].tokens == free[:at]
    assert len(done["stopped"].logprobs) == at
    assert_alike(model, [(other, done["other"], alone(model, other, stop_ids={stop}))], {stop})


@pytest.mark.parametrize("max_gen_len", [0, 1, 5])
def test_max_gen_len_gives_exactly_that_many_tokens(model, max_gen_len):
    request = Request(prompt(model, 4, seed=5), params(max_gen_len=max_gen_len))
    done = alone(model, request)
    assert done.finish_reason == "length"
    assert len(done.tokens) == done.completion_tokens == max_gen_len
    assert done.prompt_tokens == 4
    assert not done.context_limit


def test_generation_stops_at_the_end_of_the_cache(model):
    """prompt + completion fill max_seq_len exactly, and the last tokens are the ones a larger
    cache would give (nothing is read or written past the end)."""
    max_seq_len = 24
    requests = [Request(prompt(model, n, seed=n), params(max_gen_len=None), tag=n)
                for n in (23, 10, 1)]
    done = run(Engine(model, (), max_batch_size=2, max_seq_len=max_seq_len), requests)
    for r in requests:
        n = len(r.prompt_tokens)
        assert done[n].finish_reason == "length"
        assert done[n].context_limit
        assert len(done[n].tokens) == max_seq_len - n
        roomy = alone(model, Request(r.prompt_tokens, params(max_gen_len=max_seq_len - n)))
        assert_alike(model, [(r, done[n], roomy)])
        assert not roomy.context_limit  # it got the tokens it asked for
        cut = alone(model, Request(r.prompt_tokens, params(max_gen_len=max_seq_len)),
                    max_seq_len=max_seq_len)
        assert cut.context_limit and cut.tokens == done[n].tokens


def test_a_prompt_that_cannot_run_is_refused_and_the_rest_complete(model):
    """The job leaves such prompts out (`requests.fits`); the engine refuses one it is given."""
    max_seq_len = 24
    good = [Request(prompt(model, n, seed=20 + n), params(max_gen_len=6), tag=f"ok{n}")
            for n in (5, 23, 3)]  # 23 = max_seq_len - 1, the longest that fits
    bad = {n: Request(prompt(model, n, seed=n), params(max_gen_len=6), tag=f"bad{n}")
           for n in (max_seq_len, max_seq_len + 6, 0)}
    for engine_type in (Engine, StaticEngine):
        for n, r in bad.items():
            engine = engine_type(model, (), max_batch_size=2, max_seq_len=max_seq_len)
            with pytest.raises(ValueError) as refused:
                list(engine.generate([good[0], r]))
            if n:  # names the prompt's length and the limit
                assert {str(n), str(max_seq_len)} <= set(re.findall(r"\d+", str(refused.value)))
            else:
                assert "no tokens" in str(refused.value)
        done = run(engine_type(model, (), max_batch_size=2, max_seq_len=max_seq_len), good)
        assert_alike(model, [(r, done[r.tag], alone(model, r, max_seq_len=max_seq_len))
                             for r in good])


# --- what a completion carries -----------------------------------------------------------------

def test_echo_returns_the_prompt_first(model):
    p = prompt(model, 9, seed=8)
    plain = alone(model, Request(p, params(max_gen_len=5, logprobs=False)))
    echoed = alone(model, Request(p, params(max_gen_len=5, logprobs=False, echo=True)))
    assert echoed.tokens == p + plain.tokens
    assert echoed.logprobs is None and plain.logprobs is None
    assert (echoed.prompt_tokens, echoed.completion_tokens) == (9, 5)


@pytest.mark.parametrize("n", [1, 9])
def test_echo_logprobs_are_teacher_forced_for_the_prompt(model, n):
    p = prompt(model, n, seed=9)
    plain = alone(model, Request(p, params(max_gen_len=5)))
    engine = Engine(model, (), max_batch_size=2, max_seq_len=64)
    neighbour = Request(prompt(model, 14, seed=10), params(max_gen_len=3), tag="neighbour")
    request = Request(p, params(max_gen_len=5, echo=True), tag="echo")
    done = run(engine, [neighbour, request])
    echoed = done["echo"]

    echoed_alone = alone(model, request)  # the same batch shape as `plain`: exactly its tokens
    assert echoed_alone.tokens == p + plain.tokens
    assert_alike(model, [(request, echoed, echoed_alone)])
    assert len(echoed.logprobs) == n + 5 and echoed.logprobs[0] is None
    assert all(x is not None for x in echoed.logprobs[1:])
    # The prompt's part: log p(p[t] | p[:t]) from one full forward pass.
    model.setup_cache(1, n)
    step = model.make_step(torch.arange(n)[None], slice(0, 1), kv_len=n, every_token=True)
    with torch.inference_mode():
        logits = model(torch.tensor([p]), step)
    forced = token_logprobs(logits[:-1], torch.tensor(p[1:]))
    torch.testing.assert_close(torch.tensor(echoed.logprobs[1:n]), forced,
                               atol=LOGPROB_ATOL, rtol=0)
    # The completion's part: the same as without echo.
    torch.testing.assert_close(torch.tensor(echoed_alone.logprobs[n:]),
                               torch.tensor(plain.logprobs), atol=LOGPROB_ATOL, rtol=0)


def test_prompt_logprobs_in_chunks_equal_one_pass(model, monkeypatch):
    """The teacher-forced pass splits a long prompt into passes of PREFILL_TOKENS and its logits
    into LOGPROB_ROWS rows, and gives what one pass over the whole prompt gives; so does an
    echoed completion, in a slot that is not the first, beside a decoding neighbour."""
    p = prompt(model, 23, seed=12)
    model.setup_cache(1, len(p))
    step = model.make_step(torch.arange(len(p))[None], slice(0, 1), kv_len=len(p),
                           every_token=True)
    with torch.inference_mode():
        forced = token_logprobs(model(torch.tensor([p]), step)[:-1], torch.tensor(p[1:]))
    monkeypatch.setattr(limits, "PREFILL_TOKENS", 5)
    monkeypatch.setattr(limits, "LOGPROB_ROWS", 3)
    model.setup_cache(3, 32)
    with torch.inference_mode():
        chunked = prompt_logprobs(model, p, slot=2)
    assert len(chunked) == len(p) - 1
    torch.testing.assert_close(torch.tensor(chunked), forced, atol=LOGPROB_ATOL, rtol=0)
    neighbour = Request(prompt(model, 4, seed=13), params(max_gen_len=8), tag="neighbour")
    echo = Request(p, params(max_gen_len=3, echo=True), tag="echo")
    done = run(Engine(model, (), max_batch_size=3, max_seq_len=32), [neighbour, echo])
    torch.testing.assert_close(torch.tensor(done["echo"].logprobs[1:len(p)]), forced,
                               atol=LOGPROB_ATOL, rtol=0)
    assert_alike(model, [(neighbour, done["neighbour"], alone(model, neighbour))])


def test_default_sampling_params_are_greedy_over_the_whole_context(model):
    """The engine's own defaults are neutral: greedy, the whole vocabulary, no length cap (the
    CLI's temperature and top-p defaults live in its settings)."""
    p = prompt(model, 6, seed=14)
    default = alone(model, Request(p), max_seq_len=20)
    assert default.tokens == alone(model, Request(p, params(logprobs=False)), max_seq_len=20).tokens
    assert len(default.tokens) == 20 - 6 and default.logprobs is None
    assert (SamplingParams().temperature, SamplingParams().top_p) == (0.0, 1.0)


def test_completions_carry_their_request_and_tag(model):
    tags = [("record", 7, 0), {"id": "x"}, None, "empty"]
    requests = [Request(prompt(model, 4, seed=1), params(max_gen_len=9), tag=tags[0]),
                Request(prompt(model, 6, seed=2), params(max_gen_len=2), tag=tags[1]),
                Request(prompt(model, 2, seed=3), params(max_gen_len=4), tag=tags[2]),
                Request(prompt(model, 1, seed=4), params(max_gen_len=0), tag=tags[3])]
    done = list(Engine(model, (), max_batch_size=2, max_seq_len=32).generate(requests))
    assert sorted(map(id, (c.request for c in done))) == sorted(map(id, requests))
    for c in done:
        assert c.request.tag is tags[requests.index(c.request)]
        assert len(c.tokens) == c.request.params.max_gen_len  # "empty": none


def mixed_requests(model: Transformer, n: int = 12) -> list[Request]:
    gen = torch.Generator().manual_seed(7)
    requests = []
    for i in range(n):
        length = int(torch.randint(1, 30, (1,), generator=gen))
        sampling = params(temperature=0.0 if i % 2 else 1.0, top_p=0.9, seed=i, echo=i % 3 == 0,
                          max_gen_len=int(torch.randint(1, 30, (1,), generator=gen)))
        requests.append(Request(prompt(model, length, seed=100 + i), sampling, tag=i))
    return requests


def test_static_scheduler_gives_the_same_completions_as_continuous(model):
    """Greedy and sampled tokens, finish reasons and logprobs (echo included) agree, but for
    proven near-ties: the two schedulers batch each request with other neighbours."""
    stop = {int(model.args.vocab_size // 3)}
    requests = mixed_requests(model)
    results = {}
    for scheduler, engine_type in (("continuous", Engine), ("static", StaticEngine)):
        engine = engine_type(model, stop, max_batch_size=4, max_seq_len=64)
        results[scheduler] = run(engine, requests)
    assert_alike(model, [(r, results["static"][r.tag], results["continuous"][r.tag])
                         for r in requests], stop)


def test_scheduler_counters(model):
    """Continuous batching refills finished slots and never steps a finished sequence; the
    static baseline keeps stepping rows that are done."""
    requests = mixed_requests(model)
    continuous = Engine(model, (), max_batch_size=4, max_seq_len=64)
    list(continuous.generate(requests))
    assert continuous.stats.prefills == len(requests)
    assert continuous.stats.refills == len(requests) - 4
    assert continuous.stats.wasted_slot_steps == 0
    generated = sum(r.params.max_gen_len for r in requests)  # no stop ids: every one runs out
    assert continuous.stats.slot_steps == generated - len(requests)  # prefill draws the first

    static = StaticEngine(model, (), max_batch_size=4, max_seq_len=64)
    list(static.generate(requests))
    assert static.stats.refills == 0
    assert static.stats.wasted_slot_steps > 0
    assert static.stats.slot_steps > continuous.stats.slot_steps


def test_attention_chunks_cover_the_rows_with_each_chunks_longest_context():
    assert attention_chunks([5, 9, 2], rows=4) is None
    assert attention_chunks([5, 9, 2, 4, 3], rows=2) == ((0, 2, 9), (2, 4, 4), (4, 5, 3))


def test_more_slots_than_an_attention_chunk(model):
    """On the CPU a decode step over more than CPU_ATTENTION_CHUNK slots attends in chunks;
    every completion is still the one its request gets alone."""
    requests = [Request(prompt(model, 3 + 5 * (i % 4), seed=i), params(max_gen_len=6), tag=i)
                for i in range(CPU_ATTENTION_CHUNK * 2 + 3)]
    done = run(Engine(model, (), max_batch_size=len(requests), max_seq_len=40), requests)
    assert_alike(model, [(r, done[r.tag], alone(model, r)) for r in requests[:6]])


def test_shortest_first_in_windows_sorts_each_window_and_keeps_every_request():
    requests = [Request([1] * n, tag=i) for i, n in enumerate([5, 2, 9, 1, 7, 3, 3])]
    order = [r.tag for r in shortest_first_in_windows(iter(requests), window=3)]
    assert order == [1, 0, 2, 3, 5, 4, 6]


def test_prompts_prefilled_inside_a_decode_step_match_alone(model):
    """A refill's prefill rides in the same forward pass as the decoding slots: its tokens and
    logprobs, a prompt's echoed logprobs included, are those it gets alone, and so are the
    decoding neighbour's."""
    long = Request(prompt(model, 6, seed=21), params(max_gen_len=9), tag="long")
    short = Request(prompt(model, 4, seed=22), params(max_gen_len=1), tag="short")
    echo = Request(prompt(model, 7, seed=23), params(max_gen_len=4, echo=True), tag="echo")
    later = Request(prompt(model, 5, seed=24), params(max_gen_len=3), tag="later")
    engine = Engine(model, (), max_batch_size=3, max_seq_len=64)
    steps = spy_steps(engine)
    done = run(engine, [long, short, later, echo])
    assert_alike(model, [(r, done[r.tag], alone(model, r)) for r in (long, short, later, echo)])
    # The short one left after its first step; a later pass decoded the slots still active and
    # prefilled a waiting prompt into the free one.
    assert any(decoding and prefilled for decoding, prefilled in steps[1:]), steps


def spy_steps(engine: Engine) -> list[tuple[int, int]]:
    """Record (decoding slots, prefilled prompts) for each of the engine's forward passes."""
    seen = []
    run_plan = engine.runner.run

    def spy(plan):
        seen.append((len(plan.decode), sum(len(p.prompts) for p in plan.prefills)))
        return run_plan(plan)
    engine.runner.run = spy
    return seen


def test_take_prefill_groups_keeps_a_pass_within_its_token_budget():
    groups = [[Request([1] * n)] * k for n, k in [(10, 3), (20, 1), (50, 2), (8, 1)]]
    queued = list(groups)
    assert take_prefill_groups(queued, budget=55) == groups[:2]  # 30 + 20; 100 more would pass
    assert take_prefill_groups(queued, budget=55) == groups[2:3]  # over budget alone: still taken
    assert take_prefill_groups(queued, budget=55) == groups[3:]
    assert queued == []
    queued = list(groups)
    assert take_prefill_groups(queued, budget=50) == groups[:2]  # exactly at the budget


# --- the compiled decode step (--compile) ------------------------------------------------------

def test_compiled_decode_reads_a_few_cache_lengths():
    """An unpaged compiled decode step reads the cache up to DECODE_KV_BUCKET times a power of
    two: at most log2(max_seq_len / DECODE_KV_BUCKET) + 1 shapes, each covering its context."""
    max_seq_len = 131072
    buckets = {decode_kv_bucket(n, max_seq_len) for n in range(1, max_seq_len + 1, 97)}
    assert len(buckets) <= 10 and max(buckets) == max_seq_len
    assert all(decode_kv_bucket(n, max_seq_len) >= n for n in (1, 256, 257, 5000, max_seq_len))
    assert decode_kv_bucket(300, 296) == 296


def spy_compiled_steps(engine: Engine) -> list[tuple[int, int]]:
    """Record each compiled decode call's (rows, cache positions read)."""
    calls, compiled = [], engine.runner.decoder.compiled
    def spy(tokens, positions, kv_len, *blocks):
        calls.append((len(tokens), kv_len))
        return compiled(tokens, positions, kv_len, *blocks)
    engine.runner.decoder.compiled = spy
    return calls


def test_compiled_decode_gives_the_eager_completions(model):
    """torch.compile's decode step (inductor on the CPU) at a few shapes: rows padded up to a
    batch bucket, cache reads rounded up to DECODE_KV_BUCKET. A prompt of 250 tokens crosses
    the first KV bucket; 12 requests on 5 slots leave slots empty as the last ones finish, so
    smaller batch buckets and padding rows are used. The compilations stay within a bound as
    the number of rows changes."""
    max_seq_len, slots = DECODE_KV_BUCKET + 40, 5
    requests = crowd(model, GREEDY) + [
        Request(prompt(model, 250, seed=50), params(max_gen_len=20), tag="long"),
        Request(prompt(model, 6, seed=51), params(SamplingParams(temperature=1.0, top_p=0.9, logprobs=True),
                                                  max_gen_len=9, seed=7), tag="sampled")]
    eager_engine = Engine(model, (), slots, max_seq_len)
    eager = run(eager_engine, requests)
    torch._dynamo.reset()  # this test's compilations alone, under the recompile limit
    torch._dynamo.utils.counters.clear()
    engine = Engine(model, (), slots, max_seq_len, compile=True)
    calls = spy_compiled_steps(engine)
    compiled = run(engine, requests)
    assert_alike(model, [(r, compiled[r.tag], eager[r.tag]) for r in requests])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # really compiled
    stats = engine.stats
    assert len(calls) == stats.decode_steps == eager_engine.stats.decode_steps
    buckets = decode_buckets(slots)
    assert buckets == (1, 2, 3, 5)
    assert {rows for rows, _ in calls} <= set(buckets) and len({rows for rows, _ in calls}) > 1
    assert {kv_len for _, kv_len in calls} == {DECODE_KV_BUCKET, max_seq_len}
    # Every step computes its bucket's rows; rows with no sequence count as wasted.
    assert stats.slot_steps == sum(rows for rows, _ in calls)
    assert stats.wasted_slot_steps > eager_engine.stats.wasted_slot_steps
    # A static shape first, a recompile for each of the rows and the cache length made
    # symbolic, and one for a read of the whole cache: 4 however many buckets there are.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4


@pytest.mark.parametrize("engine_type", [Engine, StaticEngine])
def test_forward_passes_run_under_inference_mode(model, engine_type):
    """The engine's generators enter inference mode at every resumption, not just when made."""
    modes, final_hidden = [], model.final_hidden
    def spy(*args, **kwargs):
        modes.append(torch.is_inference_mode_enabled())
        return final_hidden(*args, **kwargs)
    model.final_hidden = spy
    try:
        run(engine_type(model, (), 2, 32), crowd(model, GREEDY)[:3])
    finally:
        del model.final_hidden
    assert modes and all(modes)
    assert not torch.is_inference_mode_enabled()  # and left between completions


# --- sampling controls, token detail and stop strings ------------------------------------------

CONTROLS = [dict(top_k=5), dict(min_p=0.2), dict(repetition_penalty=1.3),
            dict(presence_penalty=1.5), dict(frequency_penalty=-0.7),
            dict(top_k=40, top_p=0.8, min_p=0.05, repetition_penalty=0.8, frequency_penalty=0.5)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_each_control_draws_the_same_tokens_alone_and_in_a_crowded_batch(model, temperature):
    """Every (request, control) in one crowd of mixed controls, refilled and compacted, draws
    what it draws alone, its top alternatives included; so does the static baseline. Near-ties
    excepted, proven with the penalties re-derived for the requests that have them."""
    sampled = SamplingParams(temperature=temperature, logprobs=True, top_logprobs=3)
    requests = [Request(prompt(model, 3 + 2 * i, seed=20 + i),
                        params(sampled, max_gen_len=6 + i % 5, seed=i, **CONTROLS[i % 6]), tag=i)
                for i in range(12)]
    batched = run(Engine(model, (), max_batch_size=3, max_seq_len=48), requests)
    static = run(StaticEngine(model, (), max_batch_size=4, max_seq_len=48), requests)
    alones = {r.tag: alone(model, r, max_seq_len=48) for r in requests}
    assert_alike(model, [(r, done[r.tag], alones[r.tag]) for r in requests
                         for done in (batched, static)], most=3)


def test_greedy_with_penalties_follows_hugging_faces_repetition_penalty(model):
    """Penalties apply under greedy decoding too: each token is the argmax of Hugging Face's
    repetition-penalised logits over prompt and completion, then OpenAI's presence and frequency
    penalties over the completion."""
    from transformers import RepetitionPenaltyLogitsProcessor
    p = prompt(model, 6, seed=30)
    # Penalties below 0 and 1 favour seen tokens: a random model then repeats itself.
    request = Request(p, params(max_gen_len=12, repetition_penalty=0.5, presence_penalty=-1.5,
                                frequency_penalty=0.4))
    done = alone(model, request)
    plain = alone(model, Request(p, params(max_gen_len=12)))
    assert done.tokens != plain.tokens  # the penalties changed something
    full = p + done.tokens
    logits = teacher_forced_logits(model, full)
    for t in range(len(p), len(full)):
        penalised = RepetitionPenaltyLogitsProcessor(0.5)(torch.tensor([full[:t]]),
                                                          logits[t - 1:t].clone())[0]
        counts = torch.bincount(torch.tensor(full[len(p):t], dtype=torch.long),
                                minlength=penalised.numel())
        penalised -= 0.4 * counts - 1.5 * (counts > 0)
        assert int(penalised.argmax()) == full[t], t


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_penalised_near_tie_re_derives_each_choice_and_rejects_others(model, temperature):
    """What `assert_alike` lets through for requests with penalties: each choice of a
    penalised completion is re-derived (or at a proven near-tie); a far token never passes; and
    without the penalties the choices are not re-derived."""
    request = Request(prompt(model, 6, seed=30), params(
        temperature=temperature, top_p=0.9, max_gen_len=12, seed=3, repetition_penalty=0.5,
        presence_penalty=-1.5, frequency_penalty=0.4))
    a, vocab = alone(model, request).tokens, model.args.vocab_size
    assert len(a) == 12
    for j in range(len(a)):
        if temperature == 0:
            chosen = int(choice_logits(model, request, a[:j]).argmax())
        else:
            cdf, u = redraw(model, request, a[:j])
            chosen = (cdf <= u).sum().item()
        assert chosen == a[j] or near_tie(model, request, a, a[:j] + [chosen]), j
        assert not near_tie(model, request, a, a[:j] + [(a[j] + 50) % vocab])
    plain = dataclasses.replace(request, params=dataclasses.replace(
        request.params, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0))
    unpenalised = []
    for j in range(len(a)):
        if temperature == 0:
            unpenalised.append(int(choice_logits(model, plain, a[:j]).argmax()))
        else:
            cdf, u = redraw(model, plain, a[:j])
            unpenalised.append((cdf <= u).sum().item())
    assert unpenalised != a


def test_top_logprobs_are_the_most_likely_tokens_under_the_model(model):
    p = prompt(model, 5, seed=31)
    done = alone(model, Request(p, params(max_gen_len=6, top_logprobs=4)))
    logprobs = torch.log_softmax(teacher_forced_logits(model, p + done.tokens), dim=-1)
    assert len(done.top_logprobs) == 6
    for t, top in enumerate(done.top_logprobs):
        row = logprobs[len(p) - 1 + t]
        want = row.topk(4)
        assert [i for i, _ in top] == want.indices.tolist()
        torch.testing.assert_close(torch.tensor([lp for _, lp in top]), want.values,
                                   atol=LOGPROB_ATOL, rtol=0)
        assert top[0][0] == done.tokens[t]  # greedy takes the most likely
        assert done.logprobs[t] == pytest.approx(top[0][1], abs=LOGPROB_ATOL)


def test_min_tokens_without_stop_tokens(model):
    p = prompt(model, 5, seed=3)
    assert alone(model, Request(p, params(max_gen_len=4, min_tokens=2))).tokens == \
        alone(model, Request(p, params(max_gen_len=4))).tokens


def test_min_tokens_holds_back_stop_tokens_and_ignore_eos_keeps_them(model):
    p = prompt(model, 5, seed=3)
    free = alone(model, Request(p, params(max_gen_len=10))).tokens
    stop = free[0]
    engine = Engine(model, {stop}, max_batch_size=2, max_seq_len=64)
    done = run(engine, [Request(p, params(max_gen_len=10), tag="stops"),
                        Request(p, params(max_gen_len=10, min_tokens=3), tag="min"),
                        Request(p, params(max_gen_len=10, ignore_eos=True), tag="ignore")])
    assert done["stops"].tokens == [] and done["stops"].stop_reason == stop
    assert len(done["min"].tokens) >= 3 and stop not in done["min"].tokens[:3]
    assert done["min"].tokens[0] != stop
    assert done["ignore"].tokens == free and done["ignore"].finish_reason == "length"
    assert done["ignore"].stop_reason is None


@pytest.fixture(scope="module")
def llama2(single_process, tiny_checkpoints):
    ckpt = tiny_checkpoints[("llama2", 1)]
    tokenizer = load_tokenizer(ckpt / "tokenizer.model")
    return load_model(ckpt, tokenizer, single_process, torch.float32), tokenizer


def test_a_stop_string_ends_the_sequence_at_the_token_that_completes_it(llama2):
    """The text is matched across tokens; the sequence stops at once (its slot takes the next
    request) and keeps the token that completed the match."""
    model, tokenizer = llama2
    p = tokenizer.encode("The quick brown fox", bos=True)
    free = alone(model, Request(p, params(max_gen_len=30))).tokens
    text = tokenizer.decode_continuation(p, free)
    ends = [len(tokenizer.decode_continuation(p, free[:n])) for n in range(len(free) + 1)]
    # A stop string that starts in one token and ends in a later one.
    n = next(n for n in range(2, len(free)) if ends[n - 1] - ends[n - 2] >= 1
             and ends[n] - ends[n - 1] >= 1 and text[ends[n - 2]:ends[n]].strip())
    stop = text[ends[n - 1] - 1:ends[n - 1] + 1]
    if text.find(stop) < ends[n - 1] - 1:
        pytest.skip("the string occurs earlier in this tiny model's text")
    engine = Engine(model, (), max_batch_size=1, max_seq_len=64, tokenizer=tokenizer)
    other = Request(p, params(max_gen_len=3), tag="next")
    done = run(engine, [Request(p, params(max_gen_len=30, stop=("never there", stop)),
                                tag="stopped"), other])
    assert done["stopped"].finish_reason == "stop" and done["stopped"].stop_reason == stop
    assert done["stopped"].tokens == free[:n]
    assert_same(done["next"], alone(model, other))


# --- host round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [
    dict(), dict(temperature=0.8, top_p=0.95), dict(temperature=1.0, top_k=20, min_p=0.05),
    dict(temperature=1.0, repetition_penalty=1.2, presence_penalty=0.5, min_tokens=3)])
@pytest.mark.parametrize("kv_block_size", [None, 8], ids=["unpaged", "paged"])
def test_no_host_reads_in_a_step(model, sampling, kv_block_size):
    """Forward pass and sampler together, in steps that decode, prefill or both, over an
    unpaged or a paged cache (its block table sent, never read back), greedy or sampled with
    every control: nothing is read back but the tokens (on a GPU, nothing waits for the
    device). The sampler is sort-free and branch-free on the device."""
    engine = Engine(model, (), max_batch_size=3, max_seq_len=48, kv_block_size=kv_block_size,
                    kv_cache_tokens=None if kv_block_size is None else 96)
    reads, run_plan = [], engine.runner.run
    def counted(plan):
        with HostReads() as mode:
            out = run_plan(plan)
        reads.append(mode.reads)
        return out
    engine.runner.run = counted
    requests = [Request(prompt(model, 4 + 3 * i, seed=i), params(max_gen_len=5 + i, seed=i,
                                                                  logprobs=False, **sampling),
                        tag=i)
                for i in range(5)]
    run(engine, requests)
    assert len(reads) > 5 and not any(reads), reads
