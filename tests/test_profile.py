"""The profiling step of auto sizing: what it runs (its peak is measured on GPUs only, in
tests/test_cuda.py), and how the measurement sizes the cache."""
from __future__ import annotations

import pytest
import torch

from llama_gen.engine import limits
from llama_gen.engine.memory import GIB, Shape, graph_pool_per_slot, profiled_room, run_sizing
from llama_gen.engine.profile import WORST_CASE_PARAMS, run_worst_case
from llama_gen.job.build import load_model
from llama_gen.model.args import ModelArgs
from llama_gen.text.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def model(single_process, tiny_checkpoints):
    ckpt = tiny_checkpoints[("llama3", 1)]
    return load_model(ckpt, load_tokenizer(ckpt / "tokenizer.model"), single_process,
                      torch.float32)


def test_the_worst_case_step_decodes_every_row_beside_a_full_prefill(model, monkeypatch):
    monkeypatch.setattr(limits, "PREFILL_TOKENS", 512)  # the tiny model's context is short
    passes = []
    hook = model.register_forward_pre_hook(lambda _, args: passes.append(args[0].numel()))
    try:
        stats = run_worst_case(model, batch=6, max_seq_len=2048, block_size=16)
    finally:
        hook.remove()
    assert stats.peak_running == 6 and stats.prefills == 6
    # one pass decodes the 5 short sequences and prefills the long prompt's 512 tokens
    assert max(passes) == 5 + 512
    assert stats.decode_steps >= WORST_CASE_PARAMS.max_gen_len
    assert all(layer.attention.cache is None for layer in model.layers)  # freed for the run


def test_the_worst_case_fits_a_short_context(model):
    stats = run_worst_case(model, batch=3, max_seq_len=64, block_size=16)
    assert stats.peak_running == 3 and stats.prefills == 3


LLAMA_3_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                  ffn_dim_multiplier=1.3, multiple_of=1024, norm_eps=1e-5, rope_theta=500000.0,
                  use_scaled_rope=True)


@pytest.mark.parametrize("graphs", [False, True])
def test_a_measured_working_memory_takes_the_estimates_place(graphs):
    shape = Shape(ModelArgs.from_params(LLAMA_3_8B), 1, 2, 8192, overhead=0, block_size=16,
                  decode_graphs=graphs)
    budget, batch = 40 * GIB, 128
    per_token = shape.kv_bytes_per_token
    for measured in (2 * GIB, 6 * GIB):
        sizing = run_sizing(shape, profiled_room(shape, budget, batch, measured), batch)
        left = budget - measured - batch * graph_pool_per_slot(shape)
        assert sizing.max_batch_size == batch
        assert 0 <= left - sizing.kv_cache_tokens * per_token < 16 * per_token
    # the graphs' pool holds at least each row's float32 logits, and only with graphs
    assert (graph_pool_per_slot(shape) >= 128256 * 4) == graphs
    assert (graph_pool_per_slot(shape) == 0) == (not graphs)
