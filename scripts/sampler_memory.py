"""The sampler's working memory per logit: what a decode step's draw allocates beyond its
(batch, vocab) float32 logits, with every control on. `engine.memory`'s
SAMPLER_BYTES_PER_LOGIT is set from it.

    python scripts/sampler_memory.py [--rows 64] [--vocab 128256]

Measured on the CPU with torch's profiler (profile_memory): the peak of the live bytes that
the allocations and frees of one call add up to, over the logits' rows and vocabulary. The
whole batch is drawn at once, as on a GPU (on the CPU `sample` takes it in chunks). Each row
wants penalties (repetition, presence, frequency), temperature with top-k, top-p and min-p,
stop tokens held back, a forced token, its logprob and 20 top logprobs. It prints one JSON
object: bytes per logit for `RowState.draw`, for `RowState.records` and for `sample` alone.
"""
from __future__ import annotations

import json
from collections.abc import Callable

import fire
import torch
from torch.profiler import ProfilerActivity, profile

from llama_gen.engine import sampling
from llama_gen.engine.requests import Request, SamplingParams
from llama_gen.engine.rows import RowState

EVERY_CONTROL = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.05,
                               repetition_penalty=1.2, presence_penalty=0.5,
                               frequency_penalty=0.5, logprobs=True, top_logprobs=20, seed=1)


def peak_bytes(call: Callable[[], object]) -> int:
    """The most bytes `call` held at once on the CPU, beyond what was live before it."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def measure(rows: int = 64, vocab: int = 128256) -> dict[str, float]:
    sampling.CPU_SAMPLE_CHUNK = 1 << 62  # the whole batch at once, as on a GPU
    state = RowState(rows, vocab, frozenset({1, 2}), torch.device("cpu"))
    for row in range(rows):
        state.load(row, Request(list(range(100)), EVERY_CONTROL))
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
    tokens = state.draw(logits, held=[0, 1], forced={2: 5})  # counts made, warm
    uniform = torch.rand(rows, dtype=torch.float64)
    logit_count = rows * vocab
    return {
        "draw": peak_bytes(lambda: state.draw(logits, held=[0, 1], forced={2: 5})) / logit_count,
        "records": peak_bytes(lambda: state.records(logits, tokens, {})) / logit_count,
        "sample": peak_bytes(lambda: sampling.sample(logits, state.temperature, state.top_p,
                                                     uniform, state.top_k, state.min_p))
        / logit_count,
    }


def main(rows: int = 64, vocab: int = 128256) -> None:
    print(json.dumps({"rows": rows, "vocab": vocab, "bytes_per_logit": {
        name: round(value, 2) for name, value in measure(rows, vocab).items()}}))


if __name__ == "__main__":
    fire.Fire(main)
