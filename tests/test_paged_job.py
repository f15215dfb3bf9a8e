"""The paged KV cache through the whole job: `llama-gen` with --kv_cache_tokens and
--kv_block_size, as one process and at model parallel 2 under torchrun, against the default
cache (on the CPU one block of --max_seq_len per sequence: unpaged).

The paged runs batch sequences differently from the unpaged one (sequences wait for blocks, and
are preempted and generated again), so a completion may differ only at a proven near-tie
(`near_ties`). Every sample runs to --max_gen_len (--ignore_eos), so the schedule, preemptions
included, depends on the prompts' lengths alone: the same in every paged run, whatever tokens
it draws. The job logs the preemption count; the test also counts them on the engine `build`
makes from the same flags, in this process, and checks that this engine is the paged
one-process run's: the same batch shapes give the same bytes."""
from __future__ import annotations

import pytest
import torch
from near_ties import assert_same_but_near_ties
from runs import job_args, launch, read_output, write_prompts

from llama_gen.cli.flags import parse
from llama_gen.engine.blocks import BlockAllocator
from llama_gen.job import build, sizing
from llama_gen.job.feed import pending_records
from llama_gen.job.tasks import Generation, Prompting
from llama_gen.settings import Settings
from llama_gen.text.tokenizer import load_tokenizer

MAX_SEQ_LEN = 64
# Prompts of 3-48 tokens and completions of 4-30: some fill one block of 8, most several;
# "long" runs into the end of the context. Greedy and sampled records side by side; one record
# has two samples. Sequences finish out of order, so a preempted one is not always in the last
# row (the rows behind it move up).
PROMPTS = [
    {"id": "short", "prompt": "Hi", "max_gen_len": 12},
    {"id": "story", "prompt": "Once upon a time, in a land far away, there lived", "top_p": 1.0,
     "max_gen_len": 20},
    {"id": "greedy", "prompt": "The quick brown fox jumps over the lazy dog.",
     "temperature": 0},
    {"id": "two", "prompt": "Grüße aus 東京", "num_samples": 2},
    {"id": "mixed", "prompt": "नमस्ते दुनिया, こんにちは世界, hello world", "temperature": 0},
    {"id": "long", "prompt": " ".join(f"word{i}" for i in range(14)), "max_gen_len": 30},
    {"id": "list", "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,", "temperature": 0.8,
     "max_gen_len": 4},
]
# 4 rows over 9 blocks of 8 positions: one sequence of --max_seq_len fits (and one block
# more), two grown ones do not, so the newest are preempted and generated again.
PAGED = ["--kv_cache_tokens", "72", "--kv_block_size", "8"]
FLAGS = ["--max_seq_len", str(MAX_SEQ_LEN), "--max_batch_size", "4", "--max_gen_len", "24",
         "--ignore_eos", "--logprobs", "--temperature", "1", "--top_p", "0.9", "--seed", "5"]


@pytest.fixture(scope="module")
def runs(tiny_checkpoints, tmp_path_factory):
    """The output lines of the three runs, launched together: unpaged and paged as one
    process, and paged at model parallel 2 under torchrun."""
    tmp = tmp_path_factory.mktemp("paged")
    ckpt = tiny_checkpoints[("llama3", 2)]
    prompts = write_prompts(tmp / "prompts.jsonl", PROMPTS)
    kinds = {"unpaged": ([], None), "paged": (PAGED, None), "paged-mp2": (PAGED, 2)}
    procs = {kind: launch([*job_args(ckpt, prompts, tmp / f"{kind}.jsonl"), *FLAGS, *extra],
                          nproc) for kind, (extra, nproc) in kinds.items()}
    lines = {}
    for kind, proc in procs.items():
        _, err = proc.communicate()
        assert proc.returncode == 0, f"{kind}: {err}"
        lines[kind] = read_output(tmp / f"{kind}.jsonl")
        lines[kind + " log"] = err
    return ckpt, prompts, lines


@pytest.fixture(scope="module")
def in_process(runs, single_process):
    """The model, the job's settings, requests and stop tokens, and the paged engine `build`
    makes from the paged run's flags, in this process."""
    ckpt, prompts, _ = runs
    tokenizer = load_tokenizer(ckpt / "tokenizer.model")
    model = build.load_model(ckpt, tokenizer, single_process, torch.float32)
    settings = parse(Settings, [*job_args(ckpt, prompts, prompts.with_name("x.jsonl")), *FLAGS,
                                *PAGED], "llama-gen")
    prompting = Prompting.for_run(settings, tokenizer, model.args)
    task = Generation(settings, prompting)
    requests = {(r.tag.record.id, r.tag.sample): r
                for work in pending_records(task, set()) for r in task.requests(work)}
    engine = build.make_engine(settings, model, tokenizer, single_process, prompting.stop_ids,
                               sizing.size_cache(settings, model, single_process))
    return model, requests, prompting.stop_ids, engine


def test_the_flags_reach_the_engine_and_the_paged_run_preempts(runs, in_process):
    """The paged runs log the cache the flags ask for, and their schedule preempts: counted
    on the engine `build` makes from the same flags, which gives the paged run's very lines."""
    _, _, lines = runs
    model, requests, _, engine = in_process
    assert isinstance(engine.blocks, BlockAllocator)
    assert (engine.blocks.n_blocks, engine.blocks.block_size) == (9, 8)
    preempted_rows = []  # (row, rows): where each preempted sequence was
    scheduler = engine.scheduler
    preempt = scheduler._preempt
    def spy(seq):
        preempted_rows.append((scheduler.running.index(seq), len(scheduler.running)))
        preempt(seq)
    scheduler._preempt = spy
    completions = {(c.request.tag.record.id, c.request.tag.sample): c
                   for c in engine.generate(list(requests.values()))}
    # The schedule every paged run here follows: preemptions, one of them of a sequence whose
    # row the last row's blocks and decoding state then move into.
    assert engine.stats.preempted == len(preempted_rows) > 0
    assert any(row < rows - 1 for row, rows in preempted_rows), preempted_rows
    assert engine.stats.peak_kv_tokens <= 72
    assert engine.blocks.free_blocks == engine.blocks.n_blocks  # every block came back
    # This engine is the paged one-process run: the same requests in the same batch shapes.
    paged = lines["paged"]
    assert {key: (c.tokens, c.logprobs) for key, c in completions.items()} == {
        key: (line["token_ids"], line["logprobs"]) for key, line in paged.items()}
    for kind in ("paged", "paged-mp2"):
        assert "a KV cache of 72 tokens in blocks of 8" in lines[kind + " log"], kind
        assert (f"the KV cache ran out of blocks: {engine.stats.preempted} sequence(s) "
                "preempted and generated again") in lines[kind + " log"], kind
    assert "preempted" not in lines["unpaged log"]
    assert "a KV cache of 256 tokens in blocks of 64" in lines["unpaged log"]  # 4 rows of 64


@pytest.mark.parametrize("kind", ["paged", "paged-mp2"])
def test_paged_completions_are_the_unpaged_ones_but_near_ties(runs, in_process, kind):
    """Every sample once, with the unpaged run's tokens and logprobs, or different only from a
    proven near-tie on (greedy: the top two log-probabilities within NEAR_TIE; sampled: the
    uniform within NEAR_TIE of a CDF step between the two tokens)."""
    _, _, lines = runs
    model, requests, stops, _ = in_process
    got, want = lines[kind], lines["unpaged"]
    assert got.keys() == want.keys() == requests.keys() and len(got) == 8
    for key, w in want.items():
        g = got[key]
        assert g["completion_tokens"] == w["completion_tokens"] == len(g["token_ids"]), key
        assert g["context_limit"] if key[0] == "long" else "context_limit" not in g, key
        same = next((i for i, (a, b) in enumerate(zip(g["token_ids"], w["token_ids"]))
                     if a != b), len(w["token_ids"]))
        torch.testing.assert_close(torch.tensor(g["logprobs"][:same]),
                                   torch.tensor(w["logprobs"][:same]), atol=1e-4, rtol=0)
    assert {r.params.temperature for r in requests.values()} == {0.0, 0.8, 1.0}
    assert_same_but_near_ties(model, ((requests[key], got[key]["token_ids"], w["token_ids"])
                                      for key, w in want.items()), stops, most=2)
