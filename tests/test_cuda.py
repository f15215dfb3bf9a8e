"""The engine on a CUDA GPU, eager and compiled (CUDA graphs). Skipped where there is none: CI and
the development machines have no GPU, so these run on a lent GPU machine (`python -m pytest -q
tests/test_cuda.py`)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from llama_gen.baseline import StaticEngine
from llama_gen.build import load_model
from llama_gen.engine import DECODE_KV_BUCKET, Engine, Request, SamplingParams
from llama_gen.tokenizer import load_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MAX_SEQ_LEN = DECODE_KV_BUCKET + 40
SLOTS = 5


@pytest.fixture(scope="module")
def models(single_process, tiny_checkpoints):
    """The llama3 tiny checkpoint in float32 on the CPU and on the GPU."""
    ckpt = tiny_checkpoints[("llama3", 1)]
    tokenizer = load_tokenizer(ckpt / "tokenizer.model")
    on_gpu = dataclasses.replace(single_process, device=torch.device("cuda"))
    return {"cpu": load_model(ckpt, tokenizer, single_process, torch.float32),
            "cuda": load_model(ckpt, tokenizer, on_gpu, torch.float32)}


def requests(vocab_size: int) -> list[Request]:
    """Greedy and sampled requests of mixed lengths; one prompt crosses the first cache bucket,
    and 12 requests on 5 slots leave a short last batch."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 20), (17, 3), (1, 15), (9, 1), (25, 8), (2, 25), (12, 5), (6, 30), (30, 2),
              (4, 12), (250, 20), (7, 9)]
    return [Request(torch.randint(vocab_size, (n,), generator=gen).tolist(),
                    SamplingParams(temperature=1.0 if i % 3 == 0 else 0.0, top_p=0.9, max_gen_len=m,
                                   seed=i, logprobs=True), tag=i)
            for i, (n, m) in enumerate(shapes)]


def run(engine: Engine, reqs: list[Request]) -> dict:
    return {c.request.tag: c for c in engine.generate(reqs)}


def assert_same(got: dict, want: dict, atol: float) -> None:
    assert got.keys() == want.keys()
    for tag, w in want.items():
        assert (got[tag].tokens, got[tag].finish_reason) == (w.tokens, w.finish_reason), tag
        torch.testing.assert_close(torch.tensor(got[tag].logprobs), torch.tensor(w.logprobs),
                                   atol=atol, rtol=0)


@pytest.mark.parametrize("engine_type", [Engine, StaticEngine])
def test_gpu_engine_matches_the_cpu(models, engine_type):
    reqs = requests(models["cpu"].args.vocab_size)
    want = run(engine_type(models["cpu"], (), SLOTS, MAX_SEQ_LEN), reqs)
    got = run(engine_type(models["cuda"], (), SLOTS, MAX_SEQ_LEN), reqs)
    assert_same(got, want, atol=1e-4)


def test_cuda_graphs_decode_matches_eager(models, monkeypatch):
    """--compile on CUDA: mode reduce-overhead records CUDA graphs, and no step falls back."""
    model = models["cuda"]
    reqs = requests(model.args.vocab_size)
    eager = run(Engine(model, (), SLOTS, MAX_SEQ_LEN), reqs)
    captures, capture_begin = [], torch.cuda.CUDAGraph.capture_begin
    def counting_capture_begin(graph, *args, **kwargs):
        captures.append(graph)
        return capture_begin(graph, *args, **kwargs)
    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", counting_capture_begin)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = run(Engine(model, (), SLOTS, MAX_SEQ_LEN, compile=True), reqs)
    assert_same(compiled, eager, atol=1e-4)
    assert counters["stats"]["unique_graphs"] >= 1
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert captures  # CUDA graphs were recorded


def test_sampling_controls_on_the_gpu_match_the_cpu(models):
    """Penalties (their per-slot token counts on the device), top-k, min-p, min_tokens and top
    logprobs give the CPU's tokens."""
    controls = [dict(top_k=5), dict(min_p=0.1), dict(repetition_penalty=1.3, frequency_penalty=0.5),
                dict(presence_penalty=-1.0, top_k=40, min_tokens=3)]
    reqs = [dataclasses.replace(r, params=dataclasses.replace(r.params, top_logprobs=3,
                                                              **controls[i % 4]))
            for i, r in enumerate(requests(models["cpu"].args.vocab_size))]
    stop = {int(models["cpu"].args.vocab_size // 3)}
    want = run(Engine(models["cpu"], stop, SLOTS, MAX_SEQ_LEN), reqs)
    got = run(Engine(models["cuda"], stop, SLOTS, MAX_SEQ_LEN), reqs)
    assert_same(got, want, atol=1e-4)
    for tag, w in want.items():
        assert [[t for t, _ in top] for top in got[tag].top_logprobs] == \
            [[t for t, _ in top] for top in w.top_logprobs]


def test_scoring_on_the_gpu_matches_the_cpu(models):
    from llama_gen.scoring import Scorer, ScoreRequest
    gen = torch.Generator().manual_seed(1)
    vocab = models["cpu"].args.vocab_size
    reqs = [ScoreRequest(torch.randint(vocab, (n,), generator=gen).tolist(), first, tag=i)
            for i, (n, first) in enumerate([(5, 1), (40, 10), (250, 1), (2, 1), (31, 30)])]
    scores = {device: {s.request.tag: s.logprobs
                       for s in Scorer(models[device], SLOTS, MAX_SEQ_LEN).score(reqs)}
              for device in ("cpu", "cuda")}
    for tag, want in scores["cpu"].items():
        torch.testing.assert_close(torch.tensor(scores["cuda"][tag]), torch.tensor(want),
                                   atol=1e-4, rtol=0)


# --- the paged cache, precision, syncs (issue 14) ----------------------------------------------

@pytest.mark.parametrize("block_size", [16, 128])
def test_paged_cache_with_preemption_matches_the_cpu(models, block_size):
    """Flex attention over the paged pool, compiled; a budget just over one full sequence, so
    sequences are preempted and generated again: the CPU's unpaged completions all the same."""
    reqs = requests(models["cpu"].args.vocab_size)
    want = run(Engine(models["cpu"], (), SLOTS, MAX_SEQ_LEN), reqs)
    engine = Engine(models["cuda"], (), 8, MAX_SEQ_LEN, kv_block_size=block_size,
                    kv_cache_tokens=MAX_SEQ_LEN + 2 * block_size)
    assert engine.model.paged_reads == "flex"
    got = run(engine, reqs)
    assert_same(got, want, atol=1e-4)
    if block_size == 16:
        assert engine.stats.preempted > 0


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 0.25), (torch.float16, 0.05)])
def test_half_precision_logprobs_stay_near_float32(single_process, tiny_checkpoints, models,
                                                   dtype, atol):
    """bf16 and fp16 on the GPU (flash attention with grouped heads for the prefill, flex for
    decode): teacher-forced prompt logprobs within rounding of the CPU's float32 ones."""
    ckpt = tiny_checkpoints[("llama3", 1)]
    on_gpu = dataclasses.replace(single_process, device=torch.device("cuda"))
    model = load_model(ckpt, load_tokenizer(ckpt / "tokenizer.model"), on_gpu, dtype)
    reqs = [dataclasses.replace(r, params=dataclasses.replace(r.params, echo=True))
            for r in requests(model.args.vocab_size)]
    want = run(Engine(models["cpu"], (), SLOTS, MAX_SEQ_LEN), reqs)
    got = run(Engine(model, (), SLOTS, MAX_SEQ_LEN), reqs)
    for tag, w in want.items():
        n = w.prompt_tokens
        diff = (torch.tensor(got[tag].logprobs[1:n]) - torch.tensor(w.logprobs[1:n])).abs()
        assert diff.max() < atol, (tag, diff.max())
        assert all(x == x for x in got[tag].logprobs[1:])  # no NaN in what was generated


def test_no_math_attention_on_the_gpu(models):
    """The GPU's attention runs only fused kernels (`model.GPU_SDPA_BACKENDS`): grouped heads
    with and without a mask, float32 and bf16, give the CPU's result."""
    from llama_gen.model import attention
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 7, 64, generator=gen) for n in (8, 2, 2))
    mask = torch.zeros(2, 1, 7, 7).masked_fill(torch.rand(2, 1, 7, 7, generator=gen) < 0.3,
                                               float("-inf"))
    mask[..., 0] = 0  # every query sees a key
    for dtype in (torch.float32, torch.bfloat16):
        for m, causal in ((None, True), (mask, False)):
            want = attention(q.to(dtype), k.to(dtype), v.to(dtype), m if m is None else
                             m.to(dtype), causal).float()
            got = attention(*(t.cuda().to(dtype) for t in (q, k, v)),
                            None if m is None else m.cuda().to(dtype), causal).float().cpu()
            torch.testing.assert_close(got, want, atol=2e-2 if dtype != torch.float32 else 1e-5,
                                       rtol=0)


def test_decode_steps_make_no_unexpected_syncs(models):
    """With torch.cuda.set_sync_debug_mode("error") around each step's passes and draws (the
    step's one copy of its tokens to the host comes after), nothing waits for the device:
    not the block table, not the block mask, not the sampler."""
    engine = Engine(models["cuda"], (), SLOTS, MAX_SEQ_LEN)
    reqs = requests(models["cuda"].args.vocab_size)
    run(engine, reqs)  # compiles flex attention first: compiling may wait for the device
    def strict(method):
        def wrapped(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return method(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return wrapped
    engine._forward, engine._draw = strict(engine._forward), strict(engine._draw)
    assert_same(run(engine, reqs), run(Engine(models["cpu"], (), SLOTS, MAX_SEQ_LEN), reqs),
                atol=1e-4)
