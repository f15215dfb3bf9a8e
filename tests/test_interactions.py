"""Where the engine's features meet, on the CPU: preemption (a KV budget just over one sequence)
with penalties, echo with logprobs, a stop string and a prompt prefilled in chunks; the compiled
decode step with preemption, with echo, and with a prompt prefilled in chunks.

Each run is compared with the same requests on a cache that never preempts (eager, unpaged,
prompts in one pass), or with each request alone: the same completions, or completions that
part only at a proven near-tie (test_engine's `assert_alike`), since the runs batch each
sequence differently. A preempted sequence is generated again from its prompt, so it must come
out as if it never was.

Each test here was seen to fail against a deliberately broken engine: a preempted request
restarted without rebuilding its penalty counts, without its prompt's logprobs, without
watching its stop strings, or skipping its first chunk; a preempted row's table left naming
the blocks it gave back; a moved row's table left naming its old blocks; prompt logprobs
computed in another row's blocks."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_runs import alone, run
from near_ties import assert_alike

from llama_gen.engine import limits
from llama_gen.engine.blocks import BlockAllocator, OneBlockPerRow
from llama_gen.engine.engine import Engine
from llama_gen.engine.requests import Request, SamplingParams
from llama_gen.job.build import load_model
from llama_gen.model.transformer import Transformer
from llama_gen.text.tokenizer import load_tokenizer

MAX_SEQ_LEN = 64
ROWS = 4
TIGHT = dict(kv_block_size=4, kv_cache_tokens=MAX_SEQ_LEN + 16)  # just over one sequence
CHUNK = 12  # PREFILL_TOKENS in the chunked tests: prompts of 13-40 tokens take 2-4 passes
GREEDY = SamplingParams(logprobs=True)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, logprobs=True)


@pytest.fixture(scope="module")
def llama2(single_process, tiny_checkpoints) -> tuple[Transformer, object]:
    ckpt = tiny_checkpoints[("llama2", 1)]
    tokenizer = load_tokenizer(ckpt / "tokenizer.model")
    return load_model(ckpt, tokenizer, single_process, torch.float32), tokenizer


def requests(model: Transformer, bases: list[SamplingParams], n: int, seed: int = 0,
             lengths: tuple[int, int] = (1, 30)) -> list[Request]:
    """n requests, their params taken in turn from `bases`: prompts of lengths[0]..lengths[1]
    tokens, 16-30 generated, so sequences outgrow a tight cache at different times."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(lengths[0], lengths[1] + 1, (), generator=gen))
        prompt = torch.randint(3, model.args.vocab_size, (length,), generator=gen).tolist()
        gen_len = int(torch.randint(16, 31, (), generator=gen))
        out.append(Request(prompt, dataclasses.replace(bases[i % len(bases)], max_gen_len=gen_len,
                                                       seed=i), tag=i))
    return out


def roomy(model: Transformer, reqs: list[Request], **kwargs) -> dict:
    """The reference: a row of max_seq_len for every sequence, eager; nothing is preempted."""
    engine = Engine(model, (), ROWS, MAX_SEQ_LEN, **kwargs)
    assert isinstance(engine.blocks, OneBlockPerRow)
    done = run(engine, reqs)
    assert engine.stats.preempted == 0
    return done


def tight(model: Transformer, reqs: list[Request], **kwargs) -> tuple[dict, Engine, list]:
    """The requests on a cache just over one sequence: completions, the engine, and each
    preemption's (tag, tokens it had generated)."""
    engine = Engine(model, (), ROWS, MAX_SEQ_LEN, **TIGHT, **kwargs)
    assert isinstance(engine.blocks, BlockAllocator)
    preempted = spy_preemptions(engine)
    done = run(engine, reqs)
    assert engine.stats.preempted == len(preempted)
    assert engine.blocks.free_blocks == engine.blocks.n_blocks  # every block came back
    return done, engine, preempted


def spy_preemptions(engine: Engine) -> list[tuple[object, int]]:
    preempted, preempt = [], engine.scheduler._preempt
    def spy(seq):
        preempted.append((seq.request.tag, len(seq.generated)))
        return preempt(seq)
    engine.scheduler._preempt = spy
    return preempted


def mid_generation(preempted: list[tuple[object, int]], tags) -> set:
    """The tags among `tags` preempted after generating tokens (so what they had built up was
    thrown away and built again)."""
    return {tag for tag, generated in preempted if generated > 0 and tag in tags}


# --- preemption --------------------------------------------------------------------------------

def test_preempted_penalised_sequences_rebuild_their_token_counts(llama2):
    """Repetition, presence and frequency penalties read per-row counts of the prompt's and
    the generated tokens. A preempted sequence starts again in some row, whose counts must be
    its own prompt's and nothing generated: then it draws what it draws unpreempted. Strong
    penalties (below 1 and 0: the model repeats what it has seen) make every count matter.
    Near-ties are proven with the penalties re-derived (`near_tie`), greedy (the
    top 2 within 1e-4) and sampled alike."""
    model, _ = llama2
    bases = [dataclasses.replace(GREEDY, repetition_penalty=0.5, presence_penalty=-1.5,
                                 frequency_penalty=0.4),
             dataclasses.replace(SAMPLED, repetition_penalty=1.3, presence_penalty=0.5,
                                 frequency_penalty=0.5)]
    reqs = requests(model, bases, n=10)
    want = roomy(model, reqs)
    got, engine, preempted = tight(model, reqs)
    assert engine.stats.preempted >= 5
    assert len(mid_generation(preempted, {r.tag for r in reqs if r.params.temperature == 0})) >= 2
    assert len(mid_generation(preempted, {r.tag for r in reqs if r.params.temperature > 0})) >= 2
    assert_alike(model, [(r, got[r.tag], want[r.tag]) for r in reqs])


def test_preempted_echo_keeps_the_prompt_and_its_logprobs(llama2):
    """Echo with logprobs: the prompt's logprobs come from a teacher-forced pass at the start
    (the row's blocks its scratch); a preempted sequence's are computed again, and its
    completion is the prompt once, then the generated tokens, each with its logprob."""
    model, _ = llama2
    bases = [dataclasses.replace(GREEDY, echo=True, top_logprobs=2),
             dataclasses.replace(SAMPLED, echo=True)]
    reqs = requests(model, bases, n=10, seed=1)
    want = roomy(model, reqs)
    got, engine, preempted = tight(model, reqs)
    assert engine.stats.preempted >= 5
    assert len(mid_generation(preempted, {r.tag for r in reqs})) >= 3
    for r in reqs:
        assert got[r.tag].tokens[:len(r.prompt_tokens)] == r.prompt_tokens
        assert len(got[r.tag].logprobs) == len(got[r.tag].tokens)
    assert_alike(model, [(r, got[r.tag], want[r.tag]) for r in reqs])


def test_a_preempted_sequence_still_stops_at_its_stop_string(llama2):
    """Stop strings are watched from a sequence's start; one preempted before it reached its
    stop string must still stop there, keeping the token that completed it. Each request's
    stop string is two or three characters of its own unstopped text, first found as late as
    may be (its 10th token or later, before its last)."""
    model, tokenizer = llama2
    reqs = requests(model, [GREEDY, SAMPLED], n=10, seed=2)
    free = roomy(model, reqs)
    stopping = []
    for r in reqs:
        tokens = free[r.tag].tokens
        text = tokenizer.decode_continuation(r.prompt_tokens, tokens)
        ends = [len(tokenizer.decode_continuation(r.prompt_tokens, tokens[:n]))
                for n in range(len(tokens) + 1)]
        stop = next((s for n in range(len(tokens) - 1, 9, -1) for k in (2, 3)
                     if ends[n] > ends[n - 1] and (s := text[ends[n] - k:ends[n]]).strip()
                     and s.isprintable() and "\ufffd" not in s
                     and text.find(s) == ends[n] - k), None)
        if stop is not None:
            stopping.append(Request(r.prompt_tokens, dataclasses.replace(
                r.params, stop=("never there", stop)), tag=r.tag))
    assert len(stopping) >= 6
    want = roomy(model, stopping, tokenizer=tokenizer)
    assert sum(c.finish_reason == "stop" for c in want.values()) >= len(stopping) - 1
    got, engine, preempted = tight(model, stopping, tokenizer=tokenizer)
    # Preempted before they had generated their stop string's tokens, then stopped at it.
    stopped_later = {tag for tag, generated in preempted
                     if want[tag].finish_reason == "stop"
                     and 0 < generated < want[tag].completion_tokens}
    assert len(stopped_later) >= 3
    assert_alike(model, [(r, got[r.tag], want[r.tag]) for r in stopping])


def spy_chunked_prefills(engine: Engine) -> list[int]:
    """The length of each prompt the engine prefills in chunks, as it does."""
    prefills, chunked = [], engine.runner._chunked_prefill
    def spy(prompt, slot):
        prefills.append(len(prompt))
        return chunked(prompt, slot)
    engine.runner._chunked_prefill = spy
    return prefills


def test_a_preempted_long_prompt_is_prefilled_in_chunks_again(llama2, monkeypatch):
    """A prompt longer than a pass allows (PREFILL_TOKENS, made small) is prefilled chunk by
    chunk, and again so when its sequence is preempted; the completions are those of prompts
    prefilled in one pass, never preempted."""
    model, _ = llama2
    reqs = requests(model, [SAMPLED, GREEDY], n=8, seed=3, lengths=(CHUNK + 1, 40))
    want = roomy(model, reqs)
    monkeypatch.setattr(limits, "PREFILL_TOKENS", CHUNK)
    engine = Engine(model, (), ROWS, MAX_SEQ_LEN, **TIGHT)
    prefills, preempted = spy_chunked_prefills(engine), spy_preemptions(engine)
    got = run(engine, reqs)
    monkeypatch.undo()  # the proof of a near-tie takes the model's own passes
    assert engine.stats.preempted == len(preempted) >= 4
    assert len(mid_generation(preempted, {r.tag for r in reqs})) >= 2
    assert len(prefills) == len(reqs) + len(preempted)  # every start, a chunked prefill
    assert_alike(model, [(r, got[r.tag], want[r.tag]) for r in reqs])


# --- the compiled decode step ------------------------------------------------------------------

def compiled(model: Transformer, reqs: list[Request], **kwargs) -> tuple[dict, Engine]:
    torch._dynamo.reset()  # this test's compilations alone, under the recompile limit
    engine = Engine(model, (), ROWS, MAX_SEQ_LEN, compile=True, **kwargs)
    return run(engine, reqs), engine


def test_compiled_decode_with_preemption(llama2):
    """The compiled step reads the block table as an input: rows preempted, moved and
    refilled between its steps, and the padding rows a preemption leaves (which must write to
    the sink, not to the blocks the preempted sequence gave back), give the eager unpreempted
    completions."""
    model, _ = llama2
    reqs = requests(model, [SAMPLED, GREEDY], n=8, seed=4)
    want = roomy(model, reqs)
    torch._dynamo.reset()
    engine = Engine(model, (), ROWS, MAX_SEQ_LEN, compile=True, **TIGHT)
    preempted = spy_preemptions(engine)
    got = run(engine, reqs)
    assert engine.stats.preempted == len(preempted) >= 4
    assert len(mid_generation(preempted, {r.tag for r in reqs})) >= 2
    assert engine.stats.wasted_slot_steps > 0  # padding rows ran
    assert_alike(model, [(r, got[r.tag], want[r.tag]) for r in reqs])


@pytest.mark.parametrize("kv_block_size", [None, 4], ids=["unpaged", "paged"])
def test_compiled_decode_with_echo(llama2, kv_block_size):
    """Echo with logprobs beside the compiled step: prompts admitted as rows free up (their
    teacher-forced pass and prefill eager, in the rows the compiled step pads) keep their
    tokens and logprobs, and so do their neighbours: each completion is the one its request
    gets alone, eagerly."""
    model, _ = llama2
    reqs = requests(model, [dataclasses.replace(SAMPLED, echo=True),
                            dataclasses.replace(GREEDY, echo=True, top_logprobs=2)], n=8, seed=5)
    want = {r.tag: alone(model, r, max_seq_len=MAX_SEQ_LEN) for r in reqs}
    got, engine = compiled(model, reqs, kv_block_size=kv_block_size,
                           kv_cache_tokens=None if kv_block_size is None else 3 * MAX_SEQ_LEN)
    assert engine.stats.refills >= 4 and engine.stats.wasted_slot_steps > 0
    assert_alike(model, [(r, got[r.tag], want[r.tag]) for r in reqs])


@pytest.mark.parametrize("kv_block_size", [None, 4], ids=["unpaged", "paged"])
def test_compiled_decode_with_a_prompt_prefilled_in_chunks(llama2, monkeypatch, kv_block_size):
    """A long prompt admitted beside decoding rows: its first chunks go into the cache before
    the step, and the compiled step, which computes every row, must not write into its row
    (its padding rows write at the last position, which no prompt reaches)."""
    model, _ = llama2
    reqs = requests(model, [GREEDY, SAMPLED], n=8, seed=6, lengths=(CHUNK + 1, 40))
    want = roomy(model, reqs)
    monkeypatch.setattr(limits, "PREFILL_TOKENS", CHUNK)
    got, engine = compiled(model, reqs, kv_block_size=kv_block_size,
                           kv_cache_tokens=None if kv_block_size is None else 3 * MAX_SEQ_LEN)
    monkeypatch.undo()
    assert engine.stats.refills >= 4
    assert_alike(model, [(r, got[r.tag], want[r.tag]) for r in reqs])
