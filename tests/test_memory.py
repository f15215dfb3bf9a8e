"""The memory model (engine.memory) needs no torch: its sizing rules for a KV cache of tokens,
--max_seq_len's default for an unknown family, and the module itself imports no torch."""
from __future__ import annotations

import subprocess
import sys

from llama_gen.engine.memory import (AUTO_MAX_BATCH, KV_BLOCK_TOKENS, Shape, Sizing, auto_sizing,
                                     sized_slots, slot_working_bytes, whole_blocks)
from llama_gen.model.args import ModelArgs

LLAMA_2_7B = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
              "vocab_size": 32000}


def shape_7b(max_seq_len: int) -> Shape:
    return Shape(ModelArgs.from_params(LLAMA_2_7B), 1, 2, max_seq_len)


def test_a_given_batch_gets_what_the_room_holds_up_to_a_full_length_slot_each():
    shape = shape_7b(1000)
    per_token, slot = shape.kv_bytes_per_token, slot_working_bytes(shape)
    room = 4 * slot + 3000 * per_token
    assert sized_slots(shape, room, 4) == Sizing(4, 2944)  # whole blocks of 128
    assert sized_slots(shape, 10**15, 4) == Sizing(4, 4 * whole_blocks(1000))
    assert whole_blocks(1000) == 1024 and whole_blocks(1024) == 1024
    assert sized_slots(shape, 4 * slot + 1023 * per_token, 4) is None  # not one sequence fits
    assert sized_slots(shape, 4 * slot + 1024 * per_token, 4) == Sizing(4, 1024)


def test_auto_needs_room_for_one_full_length_sequence_and_stops_at_256():
    shape = shape_7b(4096)
    per_token, slot = shape.kv_bytes_per_token, slot_working_bytes(shape)
    assert auto_sizing(shape, 4096 * per_token + slot - 1) is None
    assert auto_sizing(shape, 4096 * per_token + slot) == Sizing(1, 4096)
    assert auto_sizing(shape, 10**15) == Sizing(AUTO_MAX_BATCH, AUTO_MAX_BATCH * 4096)
    middle = auto_sizing(shape, 40 * 2**30)
    assert 1 < middle.max_batch_size < AUTO_MAX_BATCH
    assert middle.kv_cache_tokens % KV_BLOCK_TOKENS == 0
    assert middle.max_batch_size * slot + middle.kv_cache_tokens * per_token <= 40 * 2**30


# Run where torch cannot be imported: the sizing rules, the KV cache per token, the working
# memory still work (the weights' bytes need the checkpoint's shape table, which imports torch).
NO_TORCH = """
import sys
import llama_gen.engine.memory as memory
assert "torch" not in sys.modules, "importing engine.memory imported torch"
sys.modules["torch"] = None  # any import of torch from here on fails
from llama_gen.model.args import ModelArgs
shape = memory.Shape(ModelArgs.from_params(%r), 1, 2, 4096)
assert memory.auto_sizing(shape, 10**15) == memory.Sizing(256, 256 * 4096)
assert memory.sized_slots(shape, 10**15, 4) == memory.Sizing(4, 4 * 4096)
assert memory.given_cache(shape, 10**15, None, 8192) == memory.Sizing(16, 8192)
assert memory.full_slots(shape, 10**15) == 256
assert shape.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2
assert memory.fixed_working_bytes(shape)["prefill attention mask"] == 2**27
print("ok")
""" % LLAMA_2_7B


def test_the_memory_model_needs_no_torch():
    result = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr


def test_the_job_builds_its_engine_without_the_command_line():
    """job.build sizes the run from engine.memory: it imports nothing of llama_gen.cli."""
    code = ("import sys, llama_gen.job.build; "
            "print(sorted(m for m in sys.modules if m.startswith('llama_gen.cli')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout == "[]\n", result.stderr


def test_the_sampler_allocates_no_more_than_the_memory_model_counts():
    """scripts/sampler_memory.py's measurement (every control on, the whole batch at once)
    stays within SAMPLER_BYTES_PER_LOGIT, the working memory a plan counts per logit."""
    import json
    from pathlib import Path

    from llama_gen.engine.memory import SAMPLER_BYTES_PER_LOGIT
    script = Path(__file__).parent.parent / "scripts" / "sampler_memory.py"
    result = subprocess.run([sys.executable, str(script), "--rows", "8", "--vocab", "32000"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.splitlines()[-1])["bytes_per_logit"]
    assert 20 <= measured["sample"] <= measured["draw"]  # a real measurement
    assert max(measured.values()) <= SAMPLER_BYTES_PER_LOGIT, measured
