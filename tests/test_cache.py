"""The KV cache on the CPU: a cache of the model's whole context costs memory only where its
sequences write, and a long context gives the tokens and logprobs of a tight one."""
from __future__ import annotations

import sys

import pytest
import torch

from llama_gen.engine.engine import Engine
from llama_gen.engine.requests import Request, SamplingParams
from llama_gen.job.build import load_model
from llama_gen.model.cache import KVCache
from llama_gen.text.tokenizer import load_tokenizer

MIB = 2**20


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / MIB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_a_cpu_cache_takes_memory_only_where_its_sequences_write():
    before = resident_mib()
    # 16 slots of 4096 positions: 2 x 64 MiB, of which the first 128 positions of each slot,
    # 4 MiB in all, are written
    cache = KVCache.empty(16, 4, 4096, 64, torch.device("cpu"), torch.float32)
    allocated = resident_mib()
    for t in (cache.k, cache.v):
        cache.slots(t)[:, :, :128] = 1.0
    written = resident_mib()
    assert allocated - before < 8, "allocating the cache wrote its pages"
    assert written - before < 16, "writing 4 MiB made more of the cache resident"
    assert torch.count_nonzero(cache.k) == 16 * 4 * 128 * 64  # the rest reads as zeros
    assert torch.count_nonzero(cache.slots(cache.v)[:, :, 128:]) == 0


@pytest.fixture(scope="module")
def model(single_process, tiny_checkpoints):
    ckpt = tiny_checkpoints[("llama2", 1)]
    return load_model(ckpt, load_tokenizer(ckpt / "tokenizer.model"), single_process,
                      torch.float32)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_long_context_gives_the_tokens_and_logprobs_of_a_tight_one(model, temperature):
    gen = torch.Generator().manual_seed(0)
    requests = [Request(torch.randint(3, model.args.vocab_size, (n,), generator=gen).tolist(),
                        SamplingParams(temperature=temperature, top_p=0.95, logprobs=True,
                                       max_gen_len=m, seed=i), tag=i)
                for i, (n, m) in enumerate([(3, 20), (17, 9), (30, 16), (8, 24), (12, 5),
                                            (25, 12), (5, 18)])]
    runs = []
    for max_seq_len in (48, 2048):
        engine = Engine(model, (), max_batch_size=4, max_seq_len=max_seq_len)
        runs.append({c.request.tag: (c.tokens, c.logprobs) for c in engine.generate(requests)})
    assert runs[0] == runs[1]  # exactly: the same values, read in the same order
