"""The profiling step of auto sizing on a GPU: before the KV cache is sized, the engine runs its
worst-case step once over a small cache and the allocator's peak is taken, as vLLM's profile run
does. The cache then gets what the measurement leaves, not what estimates leave.

The worst case: every row decoding, with every sampler control and top logprobs (the draw over
the whole batch's logits is the largest transient of a decode step), while a prompt of a full
prefill budget is prefilled beside them with its own logprobs (the largest of a prefill).
"""
from __future__ import annotations

import gc
from dataclasses import replace

import torch

from ..model.transformer import Transformer
from . import limits
from .engine import Engine
from .requests import EngineStats, Request, SamplingParams

# Every control on, each at a value that does work: penalties over prompt and generated tokens,
# a truncated and filtered distribution, and the most top logprobs a request may ask for.
WORST_CASE_PARAMS = SamplingParams(
    temperature=1.0, top_p=0.9, top_k=50, min_p=0.01, repetition_penalty=1.1,
    presence_penalty=0.5, frequency_penalty=0.5, logprobs=True, top_logprobs=20,
    ignore_eos=True, max_gen_len=4)
PROFILE_TOKEN = 1  # any id the vocabulary has


def profile_seq_len(max_seq_len: int, block_size: int) -> int:
    """The context of the profile's engine: a full prefill budget and its few tokens, not the
    run's whole context, whose cache it would have to hold. What grows with the context beyond
    it (the rotary and block tables) is counted apart (`memory.context_table_bytes`)."""
    need = limits.PREFILL_TOKENS + WORST_CASE_PARAMS.max_gen_len + 1
    return min(max_seq_len, -(-need // block_size) * block_size)


def worst_case_requests(batch: int, seq_len: int) -> list[Request]:
    """batch - 1 one-token prompts that decode side by side, and one prompt of a full prefill
    budget (as long as `seq_len` allows), echoed with its logprobs, admitted after them
    (shortest first) while they decode."""
    short = Request([PROFILE_TOKEN], WORST_CASE_PARAMS)
    longest = max(1, min(limits.PREFILL_TOKENS, seq_len - WORST_CASE_PARAMS.max_gen_len - 1))
    long = Request([PROFILE_TOKEN] * longest, replace(WORST_CASE_PARAMS, echo=True))
    return [short] * (batch - 1) + [long]


def profile_cache_tokens(batch: int, seq_len: int, block_size: int) -> int:
    """A cache that holds the worst-case requests at once, with the scheduler's reserve (1%)
    to spare, and little more."""
    short_blocks = -(-(WORST_CASE_PARAMS.max_gen_len + 1) // block_size)
    blocks = (batch - 1) * short_blocks + -(-seq_len // block_size)
    return (blocks + blocks // 50 + 2) * block_size


def run_worst_case(model: Transformer, batch: int, max_seq_len: int,
                   block_size: int) -> EngineStats:
    """The worst-case step, eager, over a cache of `profile_cache_tokens` at a context of
    `profile_seq_len`; what the engine counted. The model's cache is freed afterwards, for the
    run's engine to allocate its own. Every model-parallel rank must run it: the steps are
    collective."""
    seq_len = profile_seq_len(max_seq_len, block_size)
    engine = Engine(model, (), batch, seq_len,
                    kv_cache_tokens=profile_cache_tokens(batch, seq_len, block_size),
                    kv_block_size=block_size)
    for _ in engine.generate(worst_case_requests(batch, seq_len)):
        pass
    stats = engine.stats
    del engine
    free_cache(model)
    return stats


def cache_bytes(model: Transformer) -> int:
    return sum(layer.attention.cache.k.nbytes + layer.attention.cache.v.nbytes
               for layer in model.layers if layer.attention.cache is not None)


def free_cache(model: Transformer) -> None:
    for layer in model.layers:
        layer.attention.cache = None


def measure_working_memory(model: Transformer, batch: int, max_seq_len: int,
                           block_size: int) -> int:
    """Bytes a run of `batch` rows allocates beside its weights and KV cache, on a GPU: what
    its engine keeps (row state, penalty counts, tables, rotary table) and the peak of its
    worst-case step (`run_worst_case`), measured by the CUDA allocator."""
    device = model.output.weight.device
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    cache = []

    def note_cache(*_):  # the profile cache's bytes, read while it exists
        if not cache:
            cache.append(cache_bytes(model))
    engine_steps = model.register_forward_pre_hook(note_cache)
    try:
        run_worst_case(model, batch, max_seq_len, block_size)
    finally:
        engine_steps.remove()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    gc.collect()
    torch.cuda.empty_cache()
    return peak - before - (cache[0] if cache else 0)
