"""The engine on a CUDA GPU, eager and compiled (CUDA graphs). Skipped where there is none: CI and
the development machines have no GPU, so these run on a lent GPU machine (`python -m pytest -q
tests/test_cuda.py`).

Runs on different devices, dtypes or batch shapes round differently, so their completions are
compared as `near_ties` says (the same tokens, or different only from a proven near-tie on),
never for exact equality. Half precision rounds far more than float32: there a flip is allowed
only where float32 puts the choice within the dtype's own error of flipping (`why_differ`)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from near_ties import NEAR_TIE, assert_same_but_near_ties

from llama_gen.engine import limits
from llama_gen.engine.baseline import StaticEngine
from llama_gen.engine.blocks import BlockAllocator
from llama_gen.engine.engine import Engine
from llama_gen.engine.passes import DECODE_KV_BUCKET
from llama_gen.engine.requests import Completion, Request, SamplingParams
from llama_gen.engine.sampling import apply_penalties, counter_uniform, filtered_probs
from llama_gen.job.build import load_model
from llama_gen.text.tokenizer import load_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MAX_SEQ_LEN = DECODE_KV_BUCKET + 40
SLOTS = 5
LOGPROB_ATOL = 1e-4  # float32 on two devices: rounding (~1e-6), a hundred times over


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


def long_requests(vocab_size: int) -> list[Request]:
    """Prompts of 3-250 tokens growing by 3-120, so sequences cross blocks of 16 and of 128
    while others hold theirs: with a cache of one full-length sequence and one block more,
    sequences are preempted at either block size (the schedule depends on lengths alone:
    these requests have no stop, and it was checked on the CPU's paged cache)."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(100, 60), (3, 20), (120, 40), (250, 30), (90, 70), (17, 3), (30, 120), (60, 80)]
    return [Request(torch.randint(vocab_size, (n,), generator=gen).tolist(),
                    SamplingParams(temperature=1.0 if i % 2 else 0.0, top_p=0.9, max_gen_len=m,
                                   seed=100 + i, logprobs=True), tag=f"long {i}")
            for i, (n, m) in enumerate(shapes)]


def run(engine: Engine, reqs: list[Request]) -> dict:
    done = list(engine.generate(reqs))
    by_tag = {c.request.tag: c for c in done}
    assert len(done) == len(by_tag) == len(reqs)  # each exactly once
    return by_tag


def generated(c: Completion) -> list[int]:
    """The completion's generated tokens (without the prompt an echo puts first)."""
    return c.tokens[c.prompt_tokens:] if c.request.params.echo else c.tokens


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def assert_close_up_to_a_flip(got: Completion, want: Completion, atol: float) -> None:
    """The logprobs agree (within atol) up to the first generated token that differs; the same
    tokens end the same way."""
    a, b = generated(got), generated(want)
    j = first_difference(a, b)
    n = len(got.tokens) - len(a)  # the prompt's logprobs, where echoed
    for x in (got, want):  # no NaN where compared
        assert all(v == v for v in x.logprobs[n:n + j]), x.request.tag
    torch.testing.assert_close(torch.tensor(got.logprobs[n:n + j]),
                               torch.tensor(want.logprobs[n:n + j]), atol=atol, rtol=0)
    if a == b:
        assert got.finish_reason == want.finish_reason, got.request.tag


def assert_same_but_near_ties_on(model, got: dict, want: dict, reqs: list[Request],
                                 stops=(), atol: float = LOGPROB_ATOL, most: int = 2) -> None:
    """Completions of float32 runs that batch, split or place rows differently: logprobs
    within atol up to any difference, and a difference only at a proven near-tie under
    `model` (near_ties.py; requests without penalties)."""
    assert got.keys() == want.keys() == {r.tag for r in reqs}
    for tag in want:
        assert_close_up_to_a_flip(got[tag], want[tag], atol)
    assert_same_but_near_ties(model, ((r, generated(got[r.tag]), generated(want[r.tag]))
                                      for r in reqs), stops, most)


# --- choices re-derived in float32, penalties included, with a given bound ----------------

def next_logits(model, request: Request, prefix: list[int], stops) -> torch.Tensor:
    """The float32 logits (on the CPU) `request` draws its token len(prefix) from after
    `prefix`: the model's raw logits from one batch-1 pass, then, as the engine applies them,
    the request's penalties (over its prompt and `prefix`) and its stop tokens held back until
    min_tokens."""
    engine = Engine(model, (), max_batch_size=1,
                    max_seq_len=len(request.prompt_tokens) + len(prefix) + 1)
    seen, draw = [], engine.runner.rows.draw
    def spy(logits, held, forced=None):  # the step's logits, before the draw applies anything
        seen.append(logits[0].float().cpu())
        return draw(logits, held, forced)
    engine.runner.rows.draw = spy
    probe = Request(request.prompt_tokens + prefix, SamplingParams(max_gen_len=1))
    list(engine.generate([probe]))
    logits, p = seen[0], request.params
    if p.penalised:
        vocab = logits.shape[-1]
        in_prompt = torch.zeros(1, vocab, dtype=torch.bool)
        in_prompt[0, torch.tensor(request.prompt_tokens)] = True
        counts = torch.bincount(torch.tensor(prefix, dtype=torch.long), minlength=vocab)[None]
        logits = apply_penalties(logits[None], in_prompt, counts.int(),
                                 torch.tensor([p.repetition_penalty]),
                                 torch.tensor([p.presence_penalty]),
                                 torch.tensor([p.frequency_penalty]))[0]
    if len(prefix) < p.min_tokens and not p.ignore_eos and stops:
        logits[torch.tensor(sorted(stops))] = float("-inf")
    return logits


def why_differ(model, request: Request, a: list[int], b: list[int], stops, bound: float
               ) -> str | None:
    """Why completions a and b of `request` may differ: at their first differing token j (where
    one ended, by one of `stops`), the choice under `model` is within `bound` of flipping.
    Greedy: the two tokens are the two most likely, less than `bound` apart in log-probability.
    Sampled: the request's uniform lies within `bound` of a step of the CDF between the two
    tokens, and the tokens between them hold less than `bound`. None: a real difference. As
    `near_ties.near_tie` with the bound given and penalties and min_tokens re-derived."""
    j = first_difference(a, b)
    if len(b) <= j:
        a, b = b, a
    candidates = a[j:j + 1] or sorted(stops)
    logits = next_logits(model, request, a[:j], stops)
    p = request.params
    if p.temperature == 0:
        top2 = set(logits.topk(2).indices.tolist())
        for other in candidates:
            gap = abs(logits[other].item() - logits[b[j]].item())
            if {other, b[j]} == top2 and gap < bound:
                return f"token {j}: greedy {other} or {b[j]}, {gap:.2e} apart"
        return None
    cdf = filtered_probs(logits[None], torch.tensor([p.temperature]), torch.tensor([p.top_p]),
                         torch.tensor([p.top_k]), torch.tensor([p.min_p]))[0].cumsum(dim=-1)
    u = counter_uniform(torch.tensor([p.seed]), torch.tensor([j])).item()
    drawn = (cdf <= u).sum().item()
    for other in candidates:
        lo, hi = sorted((other, b[j]))
        if (drawn in (lo, hi) and abs(cdf[lo].item() - u) < bound
                and cdf[hi - 1].item() - cdf[lo].item() < bound):
            return f"token {j}: {other} or {b[j]}, u={u:.6f}, CDF step at {cdf[lo].item():.6f}"
    return None


def assert_same_but_flips_within(model, got: dict, want: dict, stops, atol: float,
                                 bound: float, most: int) -> list[str]:
    """Logprobs within atol up to any difference; a difference only where `why_differ` proves
    the choice within `bound` of flipping; at most `most` of them."""
    assert got.keys() == want.keys()
    flips = []
    for tag, w in want.items():
        assert_close_up_to_a_flip(got[tag], w, atol)
        a, b = generated(got[tag]), generated(w)
        if a != b:
            why = why_differ(model, w.request, a, b, stops, bound)
            assert why, f"{tag}: a real difference, not a near-tie: {a} vs {b}"
            flips.append(why)
    assert len(flips) <= most, flips
    return flips


# --- the GPU against the CPU ---------------------------------------------------------------

@pytest.mark.parametrize("engine_type", [Engine, StaticEngine])
def test_gpu_engine_matches_the_cpu(models, engine_type):
    reqs = requests(models["cpu"].args.vocab_size)
    want = run(engine_type(models["cpu"], (), SLOTS, MAX_SEQ_LEN), reqs)
    got = run(engine_type(models["cuda"], (), SLOTS, MAX_SEQ_LEN), reqs)
    assert_same_but_near_ties_on(models["cpu"], got, want, reqs)


def test_cuda_graphs_decode_matches_eager(models, monkeypatch):
    """--compile on CUDA: mode reduce-overhead records CUDA graphs, and no step falls back. The
    compiled step computes every row (padding included) in fused kernels: other rounding."""
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
    assert_same_but_near_ties_on(models["cpu"], compiled, eager, reqs)
    assert counters["stats"]["unique_graphs"] >= 1
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert captures  # CUDA graphs were recorded


def test_sampling_controls_on_the_gpu_match_the_cpu(models):
    """Penalties (their per-slot token counts on the device), top-k, min-p, min_tokens and top
    logprobs give the CPU's tokens, or differ from a near-tie on (re-derived with the
    penalties: `why_differ`)."""
    controls = [dict(top_k=5), dict(min_p=0.1), dict(repetition_penalty=1.3, frequency_penalty=0.5),
                dict(presence_penalty=-1.0, top_k=40, min_tokens=3)]
    reqs = [dataclasses.replace(r, params=dataclasses.replace(r.params, top_logprobs=3,
                                                              **controls[i % 4]))
            for i, r in enumerate(requests(models["cpu"].args.vocab_size))]
    stop = {int(models["cpu"].args.vocab_size // 3)}
    want = run(Engine(models["cpu"], stop, SLOTS, MAX_SEQ_LEN), reqs)
    got = run(Engine(models["cuda"], stop, SLOTS, MAX_SEQ_LEN), reqs)
    assert_same_but_flips_within(models["cpu"], got, want, stop, LOGPROB_ATOL, NEAR_TIE, most=2)
    for tag, w in want.items():
        j = first_difference(got[tag].tokens, w.tokens)
        for g_top, w_top in zip(got[tag].top_logprobs[:j], w.top_logprobs[:j]):
            torch.testing.assert_close(torch.tensor([lp for _, lp in g_top]),
                                       torch.tensor([lp for _, lp in w_top]),
                                       atol=LOGPROB_ATOL, rtol=0)
            w_lps = [lp for _, lp in w_top]
            for i, ((g_id, _), (w_id, w_lp)) in enumerate(zip(g_top, w_top)):
                # the same alternative, unless two are within rounding of each other
                near = [abs(w_lp - x) < LOGPROB_ATOL for k, x in enumerate(w_lps) if k != i]
                assert g_id == w_id or any(near) or i == len(w_top) - 1, (tag, g_top, w_top)


def test_scoring_on_the_gpu_matches_the_cpu(models):
    from llama_gen.engine.scoring import Scorer, ScoreRequest
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
    """Flex attention over the paged pool, compiled; a budget of one full sequence and one block
    more, so sequences are preempted and generated again: the CPU's unpaged completions, near
    ties excepted."""
    vocab = models["cpu"].args.vocab_size
    reqs = requests(vocab) + long_requests(vocab)
    want = run(Engine(models["cpu"], (), SLOTS, MAX_SEQ_LEN), reqs)
    budget = -(-MAX_SEQ_LEN // block_size) * block_size + block_size
    engine = Engine(models["cuda"], (), 8, MAX_SEQ_LEN, kv_block_size=block_size,
                    kv_cache_tokens=budget)
    assert engine.model.paged_reads == "flex"
    assert engine.blocks.block_size == block_size
    got = run(engine, reqs)
    assert engine.stats.preempted > 0  # at every block size
    assert engine.blocks.free_blocks == engine.blocks.n_blocks
    assert_same_but_near_ties_on(models["cpu"], got, want, reqs)


# Half precision against float32, on the same weights. A logprob's error is about its logits'
# rounding: bf16 keeps 8 significant bits (unit roundoff u = 2**-9, 2e-3), fp16 11 (u = 2**-12,
# 2.4e-4), and the tiny random model's logits are O(10) (logprobs -10 to -2), so one rounding
# of a logit alone moves it by ~10u. Measured on the CPU with these requests (the same weights
# cast, teacher-forced prompt logprobs and generated ones before any flip): at most 0.035 in
# bf16 (18u) and 0.0034 in fp16 (14u). The bound is 50u: 0.098 and 0.012, about three times
# what was measured, for the GPU's other kernels (flash and flex attention, cuBLAS).
HALF_ATOL = {torch.bfloat16: 50 * 2.0**-9, torch.float16: 50 * 2.0**-12}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_decodes_as_float32_within_its_rounding(single_process, tiny_checkpoints,
                                                               models, dtype):
    """bf16 and fp16 on the GPU (flash attention with grouped heads for the prefill, flex for
    decode) against float32 on the GPU, the same requests in the same batches: prompt (echo)
    and generated logprobs within HALF_ATOL, and the same tokens but where float32 puts the
    choice within the dtype's error of flipping. A greedy flip needs the two most likely
    tokens' float32 log-probabilities less than 2 x HALF_ATOL apart (each may err by
    HALF_ATOL); a sampled one, the uniform that close to a CDF step between them (a step moves
    by less than the log-probabilities do)."""
    ckpt = tiny_checkpoints[("llama3", 1)]
    on_gpu = dataclasses.replace(single_process, device=torch.device("cuda"))
    model = load_model(ckpt, load_tokenizer(ckpt / "tokenizer.model"), on_gpu, dtype)
    reqs = [dataclasses.replace(r, params=dataclasses.replace(r.params, echo=True))
            for r in requests(model.args.vocab_size)]
    want = run(Engine(models["cuda"], (), SLOTS, MAX_SEQ_LEN), reqs)
    got = run(Engine(model, (), SLOTS, MAX_SEQ_LEN), reqs)
    atol = HALF_ATOL[dtype]
    for tag, w in want.items():
        n = w.prompt_tokens
        assert got[tag].tokens[:n] == w.tokens[:n] and got[tag].logprobs[0] is None
        torch.testing.assert_close(torch.tensor(got[tag].logprobs[1:n]),
                                   torch.tensor(w.logprobs[1:n]), atol=atol, rtol=0)
        assert all(x == x for x in got[tag].logprobs[1:])  # no NaN in what was generated
    greedy = [r.tag for r in reqs if r.params.temperature == 0]
    assert len(greedy) == 8
    flips = assert_same_but_flips_within(models["cpu"], got, want, (), atol, 2 * atol, most=4)
    assert sum(generated(got[t]) == generated(want[t]) for t in greedy) >= 6, flips


def test_no_math_attention_on_the_gpu(models):
    """The GPU's attention runs only fused kernels (`model.GPU_SDPA_BACKENDS`): grouped heads
    with and without a mask, float32 and bf16, give the CPU's result."""
    from llama_gen.model.transformer import attention
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


def strict_syncs(method, calls: list[str]):
    """`method` run under torch.cuda.set_sync_debug_mode("error"): any wait for the device
    fails it (nested calls stay strict)."""
    def wrapped(*args, **kwargs):
        calls.append(method.__name__)
        outer = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return method(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(outer)
    return wrapped


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_whole_step_makes_no_unexpected_syncs(models, monkeypatch, compile):
    """With torch.cuda.set_sync_debug_mode("error") around everything a step does on the
    device before its one copy of tokens to the host (`RowState.records`, after the draw):
    rows moved and loaded, the block table's write (pinned, non_blocking), the prefill step (a
    long prompt's chunks too, with a small prefill budget), the decode rows padded to their
    bucket, eager or compiled, the forward pass and the draw, nothing waits for the device."""
    monkeypatch.setattr(limits, "PREFILL_TOKENS", 64)
    engine = Engine(models["cuda"], (), SLOTS, MAX_SEQ_LEN, compile=compile)
    assert isinstance(engine.blocks, BlockAllocator)  # blocks of 128: a block table to write
    engine.runner.warm_up()
    reqs = requests(models["cuda"].args.vocab_size)
    run(engine, reqs)  # compiles flex attention first: compiling may wait for the device
    calls: list[str] = []
    engine.runner._prepare = strict_syncs(engine.runner._prepare, calls)
    engine.runner._forward = strict_syncs(engine.runner._forward, calls)
    engine.runner.rows.draw = strict_syncs(engine.runner.rows.draw, calls)
    got = run(engine, reqs)
    assert {"_prepare", "_forward", "draw"} <= set(calls)
    want = run(Engine(models["cpu"], (), SLOTS, MAX_SEQ_LEN), reqs)
    assert_same_but_near_ties_on(models["cpu"], got, want, reqs)


# --- issue 24: compiled decode by default, buckets, the decode kernel ---------------------------

FRESH_PROCESS_COMPILE = """
import dataclasses, sys, torch
from pathlib import Path
from llama_gen.engine.engine import Engine
from llama_gen.engine.requests import Request, SamplingParams
from llama_gen.job.build import load_model
from llama_gen.runtime import distributed
from llama_gen.text.tokenizer import load_tokenizer
ckpt = Path(sys.argv[1])
dist = dataclasses.replace(distributed.init_distributed(1, device="cpu"),
                           device=torch.device("cuda"))
model = load_model(ckpt, load_tokenizer(ckpt / "tokenizer.model"), dist, torch.float32)
engine = Engine(model, (), 4, 200, compile=True)  # paged: flex attention inside the graph
engine.runner.warm_up()
gen = torch.Generator().manual_seed(0)
reqs = [Request(torch.randint(model.args.vocab_size, (5 + 7 * i,), generator=gen).tolist(),
                SamplingParams(temperature=0.0, max_gen_len=6 + 3 * i), tag=i) for i in range(6)]
for c in engine.generate(reqs):
    print(c.request.tag, *c.tokens)
"""


def test_compiled_decode_runs_in_a_fresh_process(tiny_checkpoints, tmp_path):
    """A process whose first flex attention call is inside the compiled decode step (no eager
    engine ran first to create a compiled flex wrapper): it compiles whole, and gives the CPU's
    greedy tokens (near ties aside: compared by count)."""
    import subprocess
    import sys
    ckpt = tiny_checkpoints[("llama3", 1)]
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_PROCESS_COMPILE)
    done = subprocess.run([sys.executable, str(script), str(ckpt)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.splitlines()) == 6, done.stdout


def test_decode_takes_flex_attention_s_decode_kernel(models):
    """The compiled flex wrapper for decode rows generates the decode template's kernel (where
    torch lets the backend be chosen, a fallback would fail instead)."""
    from torch._inductor.utils import run_and_get_code

    from llama_gen.model.attention import compiled_flex
    engine = Engine(models["cuda"], (), SLOTS, MAX_SEQ_LEN)
    torch._dynamo.reset()
    compiled_flex.cache_clear()
    reqs = requests(models["cuda"].args.vocab_size)[:3]
    _, code = run_and_get_code(lambda: run(engine, reqs))
    assert any("flex_decoding" in c for c in code), [c[:200] for c in code]


def test_compilations_are_bounded_as_the_rows_change(models, record_property):
    """A compiled run whose running rows shrink and grow through every size: the decode step
    compiles once per batch bucket (flex attention's decode kernel needs a static batch) and
    no more, and the eager prefill's flex wrapper a bounded few times."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    engine = Engine(models["cuda"], (), SLOTS, MAX_SEQ_LEN, compile=True)
    record_property("warm_up_seconds", round(engine.runner.warm_up(), 1))
    after_warm_up = counters["stats"]["unique_graphs"]
    record_property("graphs_at_warm_up", after_warm_up)
    assert after_warm_up >= len(engine.runner.decoder.buckets)
    reqs = requests(models["cuda"].args.vocab_size) + long_requests(models["cuda"].args.vocab_size)
    run(engine, reqs)
    record_property("graphs_after_run", counters["stats"]["unique_graphs"])
    # decode: one per bucket, all at warm-up; prefill's flex wrapper: symbolic shapes, <= 3
    assert counters["stats"]["unique_graphs"] <= after_warm_up + 3, dict(counters["stats"])


def test_compiled_decode_with_chunked_prefill_matches_eager(models, monkeypatch):
    """--compile with prompts prefilled in chunks (a small prefill budget): padding rows of the
    compiled step write only into the sink, so a long prompt keeps its first chunk."""
    monkeypatch.setattr(limits, "PREFILL_TOKENS", 32)
    reqs = requests(models["cuda"].args.vocab_size) + long_requests(models["cuda"].args.vocab_size)
    eager = run(Engine(models["cuda"], (), SLOTS, MAX_SEQ_LEN), reqs)
    compiled = run(Engine(models["cuda"], (), SLOTS, MAX_SEQ_LEN, compile=True), reqs)
    assert_same_but_near_ties_on(models["cpu"], compiled, eager, reqs)


# --- memory and teardown -------------------------------------------------------------------------

def test_the_samplers_cuda_peak_per_logit_is_within_the_memory_model():
    """SAMPLER_BYTES_PER_LOGIT was measured on the CPU (scripts/sampler_memory.py); on CUDA the
    caching allocator rounds each block up, so hold the draw's and the records' peaks to it
    there too: every control on, 64 rows of a Llama 3 vocabulary."""
    from llama_gen.engine.memory import SAMPLER_BYTES_PER_LOGIT
    from llama_gen.engine.rows import RowState
    device, rows, vocab = torch.device("cuda"), 64, 128256
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.05,
                            repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5,
                            logprobs=True, top_logprobs=20, seed=1)
    state = RowState(rows, vocab, frozenset({1, 2}), device)
    for row in range(rows):
        state.load(row, Request(list(range(100)), params))
    logits = torch.randn(rows, vocab, device=device)
    tokens = state.draw(logits, held=[0, 1], forced={2: 5})  # the counts made, kernels warm
    for name, step in (("draw", lambda: state.draw(logits, held=[0, 1], forced={2: 5})),
                       ("records", lambda: state.records(logits, tokens, {}))):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        per_logit = (torch.cuda.max_memory_allocated(device) - before) / (rows * vocab)
        assert per_logit <= SAMPLER_BYTES_PER_LOGIT, (name, per_logit)


PEER_LOST = """
import os, signal, sys, time
import torch, torch.distributed as dist
from llama_gen.runtime import distributed
joined = distributed.init_distributed(1, sys.argv[1])
dist.all_reduce(torch.ones(1, device=joined.device))  # the communicators exist and work
if joined.rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)  # a lost node
time.sleep(2)
start = time.monotonic()
distributed.abort(seconds=30)
print(f"abort returned in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
distributed.exit_now(3)
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per process: two")
def test_a_rank_whose_nccl_peer_died_aborts_and_exits_with_its_status():
    """After a peer died, NCCL's abort (not its graceful destroy, which can wait forever:
    pytorch #141510, #180611) returns, and the hard exit keeps the status."""
    import os
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(
        [sys.executable, "-c", PEER_LOST, "cuda"], stderr=subprocess.PIPE, text=True,
        env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
             "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": str(port)})
        for rank in (0, 1)]
    _, err = procs[0].communicate(timeout=120)
    procs[1].wait(timeout=10)
    assert procs[0].returncode == 3, err
    assert "abort returned in" in err, err


def test_the_samplers_thresholds_on_the_gpu_are_the_cpus():
    """The sampler's radix selects sum whole units, so whatever order the GPU's atomic adds run
    in, the same probabilities give the same top-k and top-p thresholds as on the CPU, exactly:
    64 rows of a Llama 3 vocabulary, peaked to nearly uniform (and this torch takes the select's
    scatter index)."""
    from llama_gen.engine.sampling import _largest_reaching
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(-2, 1, 64).unsqueeze(-1)
    probs = torch.softmax(torch.randn(64, 128256, generator=gen) * scales, dim=-1)
    bits, masses = probs.view(torch.int32), (probs * 2.0**30 + 0.5).int()
    top_p = torch.rand(64, generator=gen, dtype=torch.float64)
    top_k = torch.randint(1, 5000, (64,), generator=gen).double()
    for weights, target in ((masses, top_p * masses.sum(dim=-1)), (None, top_k)):
        want = _largest_reaching(bits, weights, target, torch.empty_like(bits),
                                 torch.empty_like(bits))
        on_gpu = [None if x is None else x.cuda() for x in (bits, weights, target)]
        got = _largest_reaching(*on_gpu, torch.empty_like(on_gpu[0]),
                                torch.empty_like(on_gpu[0]))
        assert torch.equal(got.cpu(), want)


def test_fused_projections_on_the_gpu_give_the_separate_logits_and_no_second_copy(
        single_process, tiny_checkpoints):
    """On CUDA (cuBLAS, F.linear) the fused products give the separate ones' logits to float32
    rounding, and fusing after the load allocates at most one block's fused weights beyond the
    loaded model, which holds no more memory after than before."""
    from llama_gen.job.build import read_model_args
    from llama_gen.model.checkpoint import Checkpoint
    from llama_gen.model.layers import ParallelLayers
    from llama_gen.model.transformer import Transformer
    ckpt = tiny_checkpoints[("llama3", 1)]
    tokenizer = load_tokenizer(ckpt / "tokenizer.model")
    args = read_model_args(ckpt, tokenizer)
    checkpoint = Checkpoint.open(ckpt, args, vocab_parallel_if_unsplit=True)
    device = torch.device("cuda")

    def loaded() -> Transformer:
        model = Transformer(args, ParallelLayers(checkpoint.embedding_split_dim == 0))
        model.load_state_dict(checkpoint.state_dict_for(0, 1, device, torch.float32),
                              strict=True, assign=True)
        return model.requires_grad_(False).eval()

    separate, fused = loaded(), loaded()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fused.fuse()
    largest = max(p.nbytes for block in fused.layers
                  for p in (block.attention.fused, block.feed_forward.fused))
    assert torch.cuda.memory_allocated() <= before
    assert torch.cuda.max_memory_allocated() - before <= largest
    tokens = torch.arange(3, 40, device=device)
    logits = []
    for model in (fused, separate):
        model.setup_cache(1, len(tokens))
        step = model.make_step(torch.arange(len(tokens), device=device)[None], slice(0, 1),
                               len(tokens), fresh=True, every_token=True)
        with torch.inference_mode():
            logits.append(model(tokens[None], step))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=0)


AUTO_SIZED_RUN = """
import sys, torch
from llama_gen.cli.main import main
try:
    main(sys.argv[1:])
finally:
    free, total = torch.cuda.mem_get_info()
    print("peak", torch.cuda.max_memory_reserved(), "total", total, file=sys.stderr, flush=True)
"""


def test_peak_memory_after_auto_sizing_stays_within_the_utilization(tiny_checkpoints, tmp_path,
                                                                     record_property):
    """A whole run on the GPU with --max_batch_size auto, --compile auto (CUDA graphs) and every
    sampler control: torch's peak reserved memory stays within --gpu_memory_utilization of the
    GPU (less what the CUDA context and other processes hold, which the plan also leaves out)."""
    import json
    import subprocess
    import sys
    ckpt = tiny_checkpoints[("llama3", 1)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": "word " * (3 + 17 * i)}) + "\n"
                               for i in range(40)))
    script = tmp_path / "run.py"
    script.write_text(AUTO_SIZED_RUN)
    utilization = 0.3
    done = subprocess.run(
        [sys.executable, str(script), "--ckpt_dir", str(ckpt), "--prompt_path", str(prompts),
         "--out_path", str(tmp_path / "out.jsonl"), "--device", "cuda", "--max_gen_len", "40",
         "--gpu_memory_utilization", str(utilization), "--temperature", "0.8", "--top_k", "40",
         "--repetition_penalty", "1.2", "--logprobs", "--top_logprobs", "5"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stderr.splitlines() if x.startswith("peak ")][-1].split()
    peak, total = int(line[1]), int(line[3])
    profiled = [x for x in done.stderr.splitlines() if "profiling step:" in x]
    assert profiled, "the cache was sized without a profiling step"
    record_property("profiling_step", profiled[0].split("profiling step: ")[1])
    record_property("peak_over_total", round(peak / total, 4))
    assert peak <= utilization * total, (peak / 2**30, total / 2**30)


# --- a Hugging Face folder on the GPU ------------------------------------------------------

def test_a_hugging_face_folder_loads_on_the_gpu_as_on_the_cpu(single_process, tmp_path):
    """A Llama 3.2-style folder (one bf16 model.safetensors, GQA, scaled RoPE, tied head)
    loaded straight onto the GPU: every weight the CPU's, bit for bit (slices are read on the
    CPU and moved; the tied head is the embedding's vocabulary rows), and the GPU's completions
    the CPU's, near-ties aside."""
    pytest.importorskip("transformers")  # writes the folder; not needed by a run
    from hf_folders import LLAMA32_ROPE, hf_llama, save_folder

    from llama_gen.model.args import ModelArgs
    from llama_gen.testing.tiny_tokenizers import build_tiktoken_model

    tiktoken_file = build_tiktoken_model(tmp_path / "tokenizer.model")
    tokenizer = load_tokenizer(tiktoken_file)
    args = ModelArgs.from_params({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                  "multiple_of": 32, "norm_eps": 1e-5, "rope_theta": 500000.0,
                                  "vocab_size": tokenizer.n_words})
    reference = hf_llama(args, tiktoken_file, LLAMA32_ROPE, tied=True).to(torch.bfloat16)
    folder = save_folder(reference, tmp_path / "hf", tiktoken_file, "original/tokenizer.model")
    on_gpu = dataclasses.replace(single_process, device=torch.device("cuda"))
    cpu = load_model(folder, tokenizer, single_process, torch.float32)
    gpu = load_model(folder, tokenizer, on_gpu, torch.float32)
    cpu_state, gpu_state = cpu.state_dict(), gpu.state_dict()
    assert cpu_state.keys() == gpu_state.keys()
    for key, weight in cpu_state.items():
        assert gpu_state[key].device.type == "cuda", key
        assert torch.equal(gpu_state[key].cpu(), weight), key
    reqs = requests(args.vocab_size)
    want = run(Engine(cpu, (), SLOTS, MAX_SEQ_LEN), reqs)
    got = run(Engine(gpu, (), SLOTS, MAX_SEQ_LEN), reqs)
    assert_same_but_near_ties_on(cpu, got, want, reqs)


# --- --quantize int8 on the GPU ------------------------------------------------------------

def test_int8_product_on_cuda_bf16_is_the_dequantized_product_without_a_weight_copy():
    """`int8_linear` in bf16 on the GPU, eager (torch's int8 kernel for a few rows where this
    torch has one, dequantized row blocks beyond) and compiled (the pattern inductor fuses or
    lowers to the int8 kernel), equals x @ dequantized.T to bf16's rounding, and allocates
    less than a quarter of the weight's bf16 bytes beside its output: no full-precision copy
    of the weight per call."""
    from llama_gen.model.kernels import int8_linear
    from llama_gen.model.quantize import dequantize, quantize_rows
    device = torch.device("cuda")
    gen = torch.Generator(device).manual_seed(0)
    weight = torch.randn(8192, 4096, generator=gen, device=device) / 64
    q, scales = quantize_rows(weight, weight.abs().amax(dim=1), torch.bfloat16)
    dequantized = dequantize(q, scales)  # float32, exact
    del weight
    compiled = torch.compile(int8_linear, dynamic=False)
    for rows in (1, 4, 64):
        x = torch.randn(rows, 4096, generator=gen, device=device).to(torch.bfloat16)
        want = x.float() @ dequantized.T
        for name, product in (("eager", int8_linear), ("compiled", compiled)):
            product(x, q, scales)  # kernels chosen, code compiled
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            got = product(x, q, scales)
            torch.cuda.synchronize()
            extra = (torch.cuda.max_memory_allocated() - before
                     - got.numel() * got.element_size())
            assert got.dtype == x.dtype, (name, rows, got.dtype)  # some torch return float32
            torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=2e-2,
                                       msg=lambda m: f"{name}, {rows} rows: {m}")
            assert extra < q.numel() * 2 // 4, (name, rows, extra)


def test_int8_model_on_the_gpu_matches_the_cpu(single_process, tiny_checkpoints):
    """--quantize int8 on the GPU quantizes to the CPU's numbers (float32 arithmetic on each
    slice), and its engine, eager and compiled (CUDA graphs), gives the CPU's completions:
    logprobs within LOGPROB_ATOL, tokens the same but at near-ties."""
    ckpt = tiny_checkpoints[("llama3", 1)]
    tokenizer = load_tokenizer(ckpt / "tokenizer.model")
    on_gpu = dataclasses.replace(single_process, device=torch.device("cuda"))
    cpu = load_model(ckpt, tokenizer, single_process, torch.float32, quantize="int8")
    gpu = load_model(ckpt, tokenizer, on_gpu, torch.float32, quantize="int8")
    on_cpu = cpu.state_dict()
    for key, value in gpu.state_dict().items():
        assert torch.equal(value.cpu(), on_cpu[key]), key
    reqs = requests(cpu.args.vocab_size)
    want = run(Engine(cpu, (), SLOTS, MAX_SEQ_LEN), reqs)
    for compile in (False, True):
        torch._dynamo.reset()
        got = run(Engine(gpu, (), SLOTS, MAX_SEQ_LEN, compile=compile), reqs)
        assert_same_but_near_ties_on(cpu, got, want, reqs)
