"""A paged KV cache: blocks held by what each sequence uses, admission by free blocks, and the
newest sequence preempted and generated again when blocks run out. Every completion equals the
unpaged engine's, whichever read path (gathered blocks on the CPU, flex attention on GPUs, run
here eagerly) and however the blocks were shuffled."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from llama_gen.baseline import StaticEngine
from llama_gen.build import load_model
from llama_gen import engine as engine_module
from llama_gen.engine import Completion, Engine, Request, SamplingParams
from llama_gen.model import Transformer
from llama_gen.paging import BlockAllocator, OneBlockPerRow
from llama_gen.tokenizer import load_tokenizer

LOGPROB_ATOL = 1e-5
MAX_SEQ_LEN = 64
GREEDY = SamplingParams(logprobs=True)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, logprobs=True)


@pytest.fixture(scope="module", params=["llama2", "llama3"])
def model(request, single_process, tiny_checkpoints) -> Transformer:
    ckpt = tiny_checkpoints[(request.param, 1)]
    return load_model(ckpt, load_tokenizer(ckpt / "tokenizer.model"), single_process,
                      torch.float32)


def requests(model: Transformer, base: SamplingParams, n: int = 12) -> list[Request]:
    """Prompts of 1-40 tokens and generations of 1-30, so sequences cross block boundaries,
    finish out of order and leave their blocks to others."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = int(torch.randint(1, 41, (), generator=gen))
        prompt = torch.randint(model.args.vocab_size, (length,), generator=gen).tolist()
        gen_len = int(torch.randint(1, 31, (), generator=gen))
        out.append(Request(prompt, dataclasses.replace(base, max_gen_len=gen_len, seed=i),
                           tag=i))
    return out


def run(engine, reqs: list[Request]) -> dict:
    done = list(engine.generate(reqs))
    by_tag = {c.request.tag: c for c in done}
    assert len(done) == len(reqs) == len(by_tag)  # each exactly once
    return by_tag


def assert_same(got: Completion, want: Completion) -> None:
    assert got.tokens == want.tokens
    assert got.finish_reason == want.finish_reason
    assert [x is None for x in got.logprobs] == [x is None for x in want.logprobs]
    torch.testing.assert_close(torch.tensor([x for x in got.logprobs if x is not None]),
                               torch.tensor([x for x in want.logprobs if x is not None]),
                               atol=LOGPROB_ATOL, rtol=0)


def unpaged(model: Transformer, reqs: list[Request]) -> dict:
    engine = Engine(model, (), max_batch_size=4, max_seq_len=MAX_SEQ_LEN)
    assert isinstance(engine.blocks, OneBlockPerRow)
    return run(engine, reqs)


# --- the allocator -----------------------------------------------------------------------------

def test_allocator_holds_what_a_row_uses_and_names_the_sink_elsewhere():
    blocks = BlockAllocator(n_blocks=6, block_size=4, rows=3, max_seq_len=16,
                            device=torch.device("cpu"))
    assert blocks.extend(0, 5) and blocks.extend(1, 4)  # 2 blocks, then 1
    assert (blocks.free_blocks, blocks.held(0), blocks.held(1)) == (3, 2, 1)
    assert not blocks.extend(2, 16)  # needs 4 of the 3 free: takes nothing
    assert blocks.free_blocks == 3 and blocks.held(2) == 0
    table = blocks.rows(0, 3)
    rows = table.blocks.tolist()
    assert rows[2] == [blocks.sink] * 4
    assert rows[0][2:] == [blocks.sink] * 2 and rows[1][1:] == [blocks.sink] * 3
    owned = rows[0][:2] + rows[1][:1]
    assert len(set(owned)) == 3 and blocks.sink not in owned
    assert [table.place[b].item() for b in owned] == [0, 1, 0]
    blocks.release(0)
    blocks.move(1, 0)
    assert blocks.held(0) == 1 and blocks.held(1) == 0 and blocks.free_blocks == 5
    rows = blocks.rows(0, 3).blocks.tolist()
    assert rows[0] == [owned[2]] + [blocks.sink] * 3 and rows[1] == [blocks.sink] * 4


# --- completions -------------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("base", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_paged_completions_equal_unpaged(model, block_size, base):
    reqs = requests(model, base)
    engine = Engine(model, (), max_batch_size=4, max_seq_len=MAX_SEQ_LEN,
                    kv_block_size=block_size, kv_cache_tokens=4 * MAX_SEQ_LEN)
    assert isinstance(engine.blocks, BlockAllocator)
    paged, want = run(engine, reqs), unpaged(model, reqs)
    for r in reqs:
        assert_same(paged[r.tag], want[r.tag])
    assert engine.stats.preempted == 0
    assert engine.blocks.free_blocks == engine.blocks.n_blocks  # every block came back


def test_paged_echo_logprobs_penalties_and_context_limit(model):
    """Prompt logprobs use the row's blocks as scratch; penalties and a sequence that runs to
    the end of the context work as unpaged."""
    base = dataclasses.replace(SAMPLED, echo=True, repetition_penalty=1.3,
                               frequency_penalty=0.5)
    reqs = requests(model, base, n=8)
    reqs.append(Request(reqs[0].prompt_tokens, dataclasses.replace(GREEDY), tag="to the end"))
    engine = Engine(model, (), max_batch_size=4, max_seq_len=MAX_SEQ_LEN, kv_block_size=8,
                    kv_cache_tokens=3 * MAX_SEQ_LEN)
    paged, want = run(engine, reqs), unpaged(model, reqs)
    for r in reqs:
        assert_same(paged[r.tag], want[r.tag])
    assert paged["to the end"].context_limit


def test_out_of_blocks_the_newest_is_preempted_and_regenerated_alike(model):
    """A cache of just over one full sequence for 6 rows: sequences outgrow the blocks, the
    newest are preempted and run again, and every completion is still the unpaged one."""
    reqs = requests(model, SAMPLED, n=16)
    engine = Engine(model, (), max_batch_size=6, max_seq_len=MAX_SEQ_LEN, kv_block_size=4,
                    kv_cache_tokens=MAX_SEQ_LEN + 16)
    paged, want = run(engine, reqs), unpaged(model, reqs)
    for r in reqs:
        assert_same(paged[r.tag], want[r.tag])
    assert engine.stats.preempted > 0
    assert engine.stats.peak_kv_tokens <= MAX_SEQ_LEN + 16
    assert engine.blocks.free_blocks == engine.blocks.n_blocks


def test_a_paged_budget_runs_more_sequences_at_once_than_slots_of_max_seq_len(model):
    """The same KV budget, 2 x max_seq_len: unpaged it is 2 rows; paged, the short sequences
    here decode 8 at a time."""
    budget = 2 * MAX_SEQ_LEN
    reqs = [dataclasses.replace(r, params=dataclasses.replace(r.params, max_gen_len=4))
            for r in requests(model, GREEDY, n=16) if len(r.prompt_tokens) <= 8]
    assert len(reqs) >= 4
    paged = Engine(model, (), max_batch_size=8, max_seq_len=MAX_SEQ_LEN, kv_block_size=4,
                   kv_cache_tokens=budget)
    got = run(paged, reqs)
    slotted = Engine(model, (), max_batch_size=budget // MAX_SEQ_LEN, max_seq_len=MAX_SEQ_LEN)
    want = run(slotted, reqs)  # (an engine sets up the model's cache: one engine at a time)
    for r in reqs:
        assert_same(got[r.tag], want[r.tag])
    assert slotted.stats.peak_running == 2
    assert paged.stats.peak_running == min(8, len(reqs))
    assert paged.stats.peak_kv_tokens <= budget


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_reads_equal_gathered_reads(model):
    """The GPU's read path (flex attention over the whole pool with a block mask), run eagerly
    on the CPU, gives the CPU's gathered reads."""
    reqs = requests(model, GREEDY, n=6)
    engine = Engine(model, (), max_batch_size=3, max_seq_len=MAX_SEQ_LEN, kv_block_size=8,
                    kv_cache_tokens=2 * MAX_SEQ_LEN)
    gathered = run(engine, reqs)
    model.paged_reads = "flex"
    try:
        flex = run(engine, reqs)
    finally:
        model.paged_reads = "gather"
    for r in reqs:
        assert_same(flex[r.tag], gathered[r.tag])


def test_a_budget_below_one_sequence_is_refused(model):
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        Engine(model, (), max_batch_size=2, max_seq_len=MAX_SEQ_LEN, kv_block_size=4,
               kv_cache_tokens=MAX_SEQ_LEN - 4)


def test_the_static_baseline_bounds_its_batch_by_the_budget(model):
    engine = StaticEngine(model, (), 8, MAX_SEQ_LEN, kv_cache_tokens=3 * MAX_SEQ_LEN + 5)
    assert engine.max_batch_size == 3


# --- chunked prefill ---------------------------------------------------------------------------

@pytest.mark.parametrize("kv_block_size", [None, 8], ids=["unpaged", "paged"])
@pytest.mark.parametrize("mask_elements", [2 ** 25, 200], ids=["token-bound", "mask-bound"])
def test_a_long_prompt_is_prefilled_in_chunks_with_the_same_completion(
        model, monkeypatch, kv_block_size, mask_elements):
    """Prompts longer than a pass allows go through the cache chunk by chunk (PREFILL_TOKENS
    tokens, or fewer where a chunk's mask would pass PREFILL_MASK_ELEMENTS); their completions,
    and their neighbours', are those of one pass."""
    reqs = requests(model, dataclasses.replace(SAMPLED, echo=True), n=8)
    want = unpaged(model, reqs)
    monkeypatch.setattr(engine_module, "PREFILL_TOKENS", 12)
    monkeypatch.setattr(engine_module, "PREFILL_MASK_ELEMENTS", mask_elements)
    chunks = []
    make_step = model.make_step
    def spy(positions, rows, kv_len, fresh=False, **kwargs):
        chunks.append((positions.shape[1], kv_len, fresh))
        return make_step(positions, rows, kv_len, fresh, **kwargs)
    monkeypatch.setattr(model, "make_step", spy)
    engine = Engine(model, (), max_batch_size=4, max_seq_len=MAX_SEQ_LEN,
                    kv_block_size=kv_block_size,
                    kv_cache_tokens=None if kv_block_size is None else 3 * MAX_SEQ_LEN)
    got = run(engine, reqs)
    for r in reqs:
        assert_same(got[r.tag], want[r.tag])
    assert max(len(r.prompt_tokens) for r in reqs) > 2 * 12  # some prompts take 3 chunks
    assert any(width > 1 and not fresh for width, _, fresh in chunks)  # later chunks
    assert max(width for width, _, _ in chunks) <= 12
    if mask_elements == 200:
        assert max(width * kv_len for width, kv_len, _ in chunks) <= 200


def test_compiled_decode_over_a_paged_cache_gives_the_eager_completions(single_process,
                                                                       tiny_checkpoints):
    """--compile with a paged cache: the compiled step takes the block table as inputs (its
    padding rows write to the sink) and gives the unpaged eager completions."""
    ckpt = tiny_checkpoints[("llama3", 1)]
    model = load_model(ckpt, load_tokenizer(ckpt / "tokenizer.model"), single_process,
                       torch.float32)
    reqs = requests(model, GREEDY, n=6)
    want = unpaged(model, reqs)
    torch._dynamo.reset()
    engine = Engine(model, (), max_batch_size=3, max_seq_len=MAX_SEQ_LEN, compile=True,
                    kv_block_size=8, kv_cache_tokens=2 * MAX_SEQ_LEN)
    got = run(engine, reqs)
    for r in reqs:
        assert_same(got[r.tag], want[r.tag])
    assert engine.stats.wasted_slot_steps > 0  # padding rows ran, writing to the sink
