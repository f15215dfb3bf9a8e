"""A paged KV cache: blocks held by what each sequence uses, admission by free blocks, and the
newest sequence preempted and generated again when blocks run out. Every completion equals the
unpaged engine's, whichever read path (gathered blocks on the CPU, flex attention on GPUs, run
here eagerly) and however the blocks were shuffled: the same tokens, or tokens that part only
at a proven near-tie (test_engine's `assert_alike`), since the runs batch and read differently."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from near_ties import assert_alike

from llama_gen.engine import limits
from llama_gen.engine.baseline import StaticEngine
from llama_gen.engine.blocks import BlockAllocator, OneBlockPerRow
from llama_gen.engine.engine import Engine
from llama_gen.engine.decode import decode_buckets
from llama_gen.engine.passes import write_table
from llama_gen.engine.requests import Request, SamplingParams
from llama_gen.job.build import load_model
from llama_gen.model import transformer as transformer_module
from llama_gen.model.transformer import BlockTable, Transformer
from llama_gen.text.tokenizer import load_tokenizer

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


def unpaged(model: Transformer, reqs: list[Request]) -> dict:
    engine = Engine(model, (), max_batch_size=4, max_seq_len=MAX_SEQ_LEN)
    assert isinstance(engine.blocks, OneBlockPerRow)
    return run(engine, reqs)


# --- the allocator -----------------------------------------------------------------------------

def test_allocator_holds_what_a_row_uses_and_names_the_sink_elsewhere():
    """The host's count of each row's blocks, and the device's table the runner writes from
    its changes (one copy a step)."""
    blocks = BlockAllocator(n_blocks=6, block_size=4, rows=3, max_seq_len=16)
    table = BlockTable(blocks=torch.full((3, blocks.width), blocks.sink),
                       place=torch.full((blocks.n_blocks + 1,), -1))
    assert blocks.extend(0, 5) and blocks.extend(1, 4)  # 2 blocks, then 1
    assert (blocks.free_blocks, blocks.held(0), blocks.held(1)) == (3, 2, 1)
    assert not blocks.extend(2, 16)  # needs 4 of the 3 free: takes nothing
    assert blocks.free_blocks == 3 and blocks.held(2) == 0
    write_table(table, blocks.changes(), blocks.sink)
    rows = table.blocks.tolist()
    assert rows[2] == [blocks.sink] * 4
    assert rows[0][2:] == [blocks.sink] * 2 and rows[1][1:] == [blocks.sink] * 3
    owned = rows[0][:2] + rows[1][:1]
    assert len(set(owned)) == 3 and blocks.sink not in owned
    assert [table.place[b].item() for b in owned] == [0, 1, 0]
    assert table.place[blocks.sink].item() == -1
    blocks.release(0)
    blocks.move(1, 0)
    assert blocks.held(0) == 1 and blocks.held(1) == 0 and blocks.free_blocks == 5
    write_table(table, blocks.changes(), blocks.sink)
    rows = table.blocks.tolist()
    assert rows[0] == [owned[2]] + [blocks.sink] * 3 and rows[1] == [blocks.sink] * 4
    assert blocks.changes() == {}  # nothing more to write


# --- completions -------------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("base", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_paged_completions_equal_unpaged(model, block_size, base):
    reqs = requests(model, base)
    engine = Engine(model, (), max_batch_size=4, max_seq_len=MAX_SEQ_LEN,
                    kv_block_size=block_size, kv_cache_tokens=4 * MAX_SEQ_LEN)
    assert isinstance(engine.blocks, BlockAllocator)
    paged, want = run(engine, reqs), unpaged(model, reqs)
    assert_alike(model, [(r, paged[r.tag], want[r.tag]) for r in reqs])
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
    assert_alike(model, [(r, paged[r.tag], want[r.tag]) for r in reqs])
    assert paged["to the end"].context_limit


def test_out_of_blocks_the_newest_is_preempted_and_regenerated_alike(model):
    """A cache of just over one full sequence for 6 rows: sequences outgrow the blocks, the
    newest are preempted and run again, and every completion is still the unpaged one."""
    reqs = requests(model, SAMPLED, n=16)
    engine = Engine(model, (), max_batch_size=6, max_seq_len=MAX_SEQ_LEN, kv_block_size=4,
                    kv_cache_tokens=MAX_SEQ_LEN + 16)
    paged, want = run(engine, reqs), unpaged(model, reqs)
    assert_alike(model, [(r, paged[r.tag], want[r.tag]) for r in reqs])
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
    assert_alike(model, [(r, got[r.tag], want[r.tag]) for r in reqs])
    assert slotted.stats.peak_running == 2
    assert paged.stats.peak_running == min(8, len(reqs))
    assert paged.stats.peak_kv_tokens <= budget


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_reads_equal_gathered_reads(model, monkeypatch):
    """The GPU's read path (flex attention over the whole pool with a block mask), run eagerly
    on the CPU, gives the CPU's gathered reads. Its decode rows come padded to a batch bucket
    (flex attention's decode kernel needs a static batch; each size compiles once on a GPU),
    as rows finish and the batch shrinks through sizes that are not buckets; the padding rows'
    writes land in the sink."""
    reqs = requests(model, GREEDY, n=7)
    engine = Engine(model, (), max_batch_size=5, max_seq_len=MAX_SEQ_LEN, kv_block_size=8,
                    kv_cache_tokens=5 * MAX_SEQ_LEN)
    gathered = run(engine, reqs)
    decode_batches, paged_attention = [], transformer_module.paged_attention
    def spy(q, cache, block_mask):
        if q.shape[2] == 1:
            decode_batches.append(q.shape[0])
        return paged_attention(q, cache, block_mask)
    monkeypatch.setattr(transformer_module, "paged_attention", spy)
    model.paged_reads = "flex"
    try:
        flex = run(engine, reqs)
    finally:
        model.paged_reads = "gather"
    assert_alike(model, [(r, flex[r.tag], gathered[r.tag]) for r in reqs])
    assert set(decode_batches) <= set(decode_buckets(5)) == {1, 2, 3, 5}
    assert engine.stats.wasted_slot_steps > 0  # 4 rows ran as 5
    assert engine.blocks.free_blocks == engine.blocks.n_blocks


def test_compiled_decode_over_flex_attention_gives_the_gathered_completions(model):
    """The GPU's default decode path, run on the CPU: the compiled step with flex attention
    inside its graph (no compiled flex wrapper is made or called while tracing), at a static
    batch per bucket, in inference mode as the engine runs it, so warming up compiles each
    bucket once and the run adds none. Blocks of 16: torch 2.13's CPU flex kernel computes
    wrong values at blocks of 8 and fails to build at 128 (its GPU kernels are other code)."""
    reqs = requests(model, GREEDY, n=5)
    gathered = run(Engine(model, (), max_batch_size=2, max_seq_len=MAX_SEQ_LEN,
                          kv_block_size=16, kv_cache_tokens=2 * MAX_SEQ_LEN), reqs)
    engine = Engine(model, (), max_batch_size=2, max_seq_len=MAX_SEQ_LEN, kv_block_size=16,
                    kv_cache_tokens=2 * MAX_SEQ_LEN, compile=True)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model.paged_reads = "flex"
    try:
        engine.runner.warm_up()
        warm = counters["stats"]["unique_graphs"]
        flex = run(engine, reqs)
    finally:
        model.paged_reads = "gather"
    assert_alike(model, [(r, flex[r.tag], gathered[r.tag]) for r in reqs])
    assert warm == len(engine.runner.decoder.buckets) == 2
    assert counters["stats"]["unique_graphs"] == warm


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
    monkeypatch.setattr(limits, "PREFILL_TOKENS", 12)
    monkeypatch.setattr(limits, "PREFILL_MASK_ELEMENTS", mask_elements)
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
    monkeypatch.undo()  # the proof of a near-tie takes the model's own passes
    assert_alike(model, [(r, got[r.tag], want[r.tag]) for r in reqs])
    assert max(len(r.prompt_tokens) for r in reqs) > 2 * 12  # some prompts take 3 chunks
    assert any(width > 1 and not fresh for width, _, fresh in chunks)  # later chunks
    assert max(width for width, _, _ in chunks) <= 12
    if mask_elements == 200:
        assert max(width * kv_len for width, kv_len, _ in chunks) <= 200


def test_compiled_decode_over_a_paged_cache_gives_the_eager_completions(single_process,
                                                                       tiny_checkpoints):
    """--compile with a paged cache: the compiled step takes the block table as inputs and
    gives the unpaged eager completions. Its rows are padded up to a batch bucket (5 rows: 1,
    2, 3 and 5, so 4 running rows take 5); a padding row (token 0 at position 0, its table row
    all sink) writes the sink's first position and nowhere else; a decoding row writes its next
    position and nothing else of its blocks."""
    ckpt = tiny_checkpoints[("llama3", 1)]
    model = load_model(ckpt, load_tokenizer(ckpt / "tokenizer.model"), single_process,
                       torch.float32)
    reqs = requests(model, GREEDY, n=8)
    want = unpaged(model, reqs)
    torch._dynamo.reset()
    engine = Engine(model, (), max_batch_size=5, max_seq_len=MAX_SEQ_LEN, compile=True,
                    kv_block_size=8, kv_cache_tokens=3 * MAX_SEQ_LEN)
    steps = spy_compiled_writes(engine)
    got = run(engine, reqs)
    assert_alike(model, [(r, got[r.tag], want[r.tag]) for r in reqs])
    assert engine.stats.wasted_slot_steps > 0
    size, sink = engine.blocks.block_size, engine.blocks.sink
    # Layer 0's key and value of token 0 at position 0 (no rotation there).
    attention = model.layers[0].attention
    with torch.inference_mode():
        x = model.layers[0].attention_norm(model.tok_embeddings(torch.tensor([0])))
        k0, v0 = (w(x).view(attention.n_local_kv_heads, attention.head_dim)
                  for w in (attention.wk, attention.wv))
    padded = False
    for n, b, held, table, positions, written, (k, v) in steps:
        wanted = {table[i][p // size] * size + p % size for i, p in enumerate(positions)}
        for row, blocks in zip(table, held):  # past its own blocks, a row names the sink
            assert row[blocks:] == [sink] * (len(row) - blocks), (table, held)
        if b > n:
            padded = True
            wanted.add(sink * size)
            torch.testing.assert_close(k, k0, atol=1e-5, rtol=0)
            torch.testing.assert_close(v, v0, atol=1e-5, rtol=0)
        assert written <= wanted, (written - wanted, n, table, positions)
    assert padded


def spy_compiled_writes(engine: Engine) -> list:
    """For each compiled decode step: (decoding rows n, its bucket b, the blocks each row holds
    by the host's count, the block table's rows, the positions rows 0..n-1 write, the cache
    positions (block * size + offset) whose key or value any layer changed, and layer 0's key
    and value at the sink's first position after the step)."""
    steps, decoder = [], engine.runner.decoder
    decode = decoder.compiled_logits
    layers = [layer.attention.cache for layer in engine.model.layers]
    def spy(n, kv_len, b=None):
        before = [(c.k.clone(), c.v.clone()) for c in layers]
        table = engine.runner.table.blocks.tolist()
        held = [engine.blocks.held(i) for i in range(engine.max_batch_size)]
        positions = engine.runner.rows.position[:n].tolist()
        out = decode(n, kv_len, b)
        written = set()
        for c, (k, v) in zip(layers, before):
            changed = (c.k[0] != k[0]).any(-1).any(0) | (c.v[0] != v[0]).any(-1).any(0)
            written |= set(changed.nonzero().flatten().tolist())
        at_sink = engine.blocks.sink * engine.blocks.block_size
        steps.append((n, decoder.bucket(n), held, table, positions, written,
                      (layers[0].k[0, :, at_sink].clone(), layers[0].v[0, :, at_sink].clone())))
        return out
    decoder.compiled_logits = spy
    return steps
