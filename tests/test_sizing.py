"""How a run sizes itself: the model family's context as --max_seq_len's default, shortened to
what fits; --max_batch_size auto and --gpu_memory_utilization as words; the memory model's
numbers are the engine's and the run's; the CPU's choices in a real process group. (The sizing
rules themselves, with no torch: test_memory.py.)"""
from __future__ import annotations

import dataclasses
import re
import typing

import pytest
import torch

from llama_gen.cli.flags import parse
from llama_gen.engine import blocks, limits, memory
from llama_gen.engine.memory import (CPU_AUTO_BATCH, Shape, Sizing, auto_sizing, full_slots,
                                     holds, slot_working_bytes)
from llama_gen.errors import UserError
from llama_gen.job import build, sizing
from llama_gen.model.args import ModelArgs
from llama_gen.settings import ScoreSettings, Settings
from llama_gen.testing.tiny import TINY_LLAMA2, TINY_LLAMA3
from llama_gen.text.tokenizer import load_tokenizer

LLAMA_2_7B = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
              "vocab_size": 32000}
CODE_LLAMA_7B = {**LLAMA_2_7B, "ffn_dim_multiplier": 1.0, "rope_theta": 1000000,
                 "vocab_size": 32016}


@pytest.mark.parametrize("params, family, context", [
    ({**LLAMA_2_7B, "norm_eps": 1e-06}, "Llama 1", 2048), (LLAMA_2_7B, "Llama 2", 4096),
    (CODE_LLAMA_7B, "Code Llama", 16384), (TINY_LLAMA2, "Llama 2", 4096),
    ({**TINY_LLAMA3, "use_scaled_rope": False}, "Llama 3", 8192),
    (TINY_LLAMA3, "Llama 3.1", 131072), ({**LLAMA_2_7B, "rope_theta": 250000.0}, None, None),
    ({**LLAMA_2_7B, "norm_eps": 1e-4}, None, None)])
def test_the_family_and_its_context_come_from_params_json(params, family, context):
    args = ModelArgs.from_params(params)
    assert (args.family, args.context_length) == (family, context)


def job(tmp_path, cls=Settings, *words: str):
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    return parse(cls, ["--ckpt_dir", str(tmp_path), "--prompt_path", str(tmp_path / "p.jsonl"),
                       "--out_path", str(tmp_path / "o.jsonl"), *words], "llama-gen")


def test_max_batch_size_auto_is_the_default_and_a_word(tmp_path):
    assert job(tmp_path).max_batch_size is None and job(tmp_path).max_seq_len is None
    assert job(tmp_path, Settings, "--max_batch_size", "auto").max_batch_size is None
    assert job(tmp_path, ScoreSettings, "--max_batch_size", "auto").max_batch_size is None
    assert job(tmp_path, Settings, "--max_batch_size", "12").max_batch_size == 12
    for bad in ("0", "lots", "Auto", "2.5"):
        with pytest.raises(UserError, match=re.escape("--max_batch_size must be an integer >= 1 "
                                                      "or auto, got")):
            job(tmp_path, Settings, "--max_batch_size", bad)


@pytest.mark.parametrize("value, ok", [("0.9", True), ("1", True), ("0.05", True), ("0", False),
                                       ("1.5", False), ("-0.5", False)])
def test_gpu_memory_utilization_is_a_share_in_0_1(tmp_path, value, ok):
    if ok:
        assert job(tmp_path, Settings, "--gpu_memory_utilization", value
                   ).gpu_memory_utilization == float(value)
    else:
        with pytest.raises(UserError, match=re.escape("--gpu_memory_utilization must be a "
                                                      "number in (0, 1]")):
            job(tmp_path, Settings, "--gpu_memory_utilization", value)


def shape_7b(max_seq_len: int) -> Shape:
    return Shape(ModelArgs.from_params(LLAMA_2_7B), 1, 2, max_seq_len)


def test_the_memory_models_bounds_are_the_engines():
    """What the engine allocates is what engine.memory counts: one number each."""
    assert limits.PREFILL_TOKENS == memory.PREFILL_TOKENS
    assert limits.PREFILL_MASK_ELEMENTS == memory.PREFILL_MASK_ELEMENTS
    assert limits.LOGPROB_ROWS == memory.LOGPROB_ROWS
    assert blocks.default_block_size(torch.device("cuda"), 4096) == memory.KV_BLOCK_TOKENS
    assert blocks.default_block_size(torch.device("cpu"), 4096) == 4096


def test_dtype_names_are_the_flags_choices_with_their_torch_dtypes():
    choices = typing.get_args(typing.get_args(typing.get_type_hints(Settings)["dtype"])[0])
    assert choices == tuple(memory.DTYPES)
    for name, (torch_name, size) in memory.DTYPES.items():
        assert build.DTYPES[name] is getattr(torch, torch_name)
        assert build.DTYPES[name].itemsize == size


MEMINFO = """MemTotal:       65536000 kB
MemFree:         1024000 kB
MemAvailable:   40960000 kB
Buffers:          204800 kB
Cached:         30720000 kB
"""


def test_available_ram_is_memavailable_shared_by_the_local_processes(monkeypatch, tmp_path):
    """/proc/meminfo's MemAvailable (not MemFree, which leaves out the page cache the kernel
    gives back), read from a meminfo whose fields all differ; without /proc, the free pages."""
    meminfo, opened = tmp_path / "meminfo", []
    meminfo.write_text(MEMINFO)

    def open_instead(path, *args, **kwargs):
        opened.append(path)
        return open(meminfo if path == "/proc/meminfo" else path, *args, **kwargs)

    monkeypatch.setattr(sizing, "open", open_instead, raising=False)
    assert sizing.available_ram() == 40960000 * 1024 and opened == ["/proc/meminfo"]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert sizing.memory_budget(torch.device("cpu"), 0.9) == 40960000 * 1024 // 4
    meminfo.unlink()  # no /proc
    pages = {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(sizing.os, "sysconf", pages.__getitem__)
    assert sizing.available_ram() == 1000 * 4096


def test_cpu_resolution_takes_the_context_then_8_full_length_slots(
        single_process, tiny_checkpoints, tmp_path, caplog):
    ckpt = tiny_checkpoints[("llama2", 1)]
    tokenizer = load_tokenizer(ckpt / "tokenizer.model")
    args = build.read_model_args(ckpt, tokenizer)
    s = job(tmp_path)
    with caplog.at_level("INFO", logger="llama_gen"):
        length = sizing.resolve_max_seq_len(s, args, single_process, torch.float32)
        assert length == 4096 and "--max_seq_len 4096, Llama 2's context" in caplog.text
        s = dataclasses.replace(s, max_seq_len=length)
        model = build.load_model(ckpt, tokenizer, single_process, torch.float32)
        assert sizing.size_cache(s, model, single_process) == Sizing(CPU_AUTO_BATCH)
    assert ("--max_batch_size auto: 8 sequences decoding at once, a KV cache of 32768 tokens"
            in caplog.text)
    given = dataclasses.replace(s, max_batch_size=3)
    assert sizing.size_cache(given, model, single_process) == Sizing(3)
    assert sizing.resolve_max_seq_len(dataclasses.replace(s, max_seq_len=77), args,
                                     single_process, torch.float32) == 77
    with pytest.raises(UserError, match="--max_seq_len 4097 is longer than the context Llama 2"):
        sizing.resolve_max_seq_len(dataclasses.replace(s, max_seq_len=4097), args,
                                  single_process, torch.float32)


def test_on_the_cpu_the_default_context_is_shortened_to_what_the_ram_holds(
        single_process, tiny_checkpoints, tmp_path, monkeypatch):
    ckpt = tiny_checkpoints[("llama3", 1)]
    args = build.read_model_args(ckpt, load_tokenizer(ckpt / "tokenizer.model"))
    shape = Shape(args, 1, 4, 8192, overhead=0)
    free = 2**28  # a machine with 256 MiB free
    monkeypatch.setattr(sizing, "available_ram", lambda: free)
    length = sizing.resolve_max_seq_len(job(tmp_path), args, single_process, torch.float32)
    assert 256 <= length < 131072 and length % 256 == 0
    assert holds(dataclasses.replace(shape, max_seq_len=length), free, 8, 8)
    assert not holds(dataclasses.replace(shape, max_seq_len=length + 256), free, 8, 8)
    monkeypatch.setattr(sizing, "available_ram", lambda: 2**20)  # 1 MiB: not even the weights
    with pytest.raises(UserError, match="leaves no room for 8 sequences of it"):
        sizing.resolve_max_seq_len(job(tmp_path), args, single_process, torch.float32)


def test_on_a_gpu_auto_a_given_batch_and_scoring_size_the_cache_from_the_room(tmp_path):
    shape = shape_7b(4096)
    per_token, slot = shape.kv_bytes_per_token, slot_working_bytes(shape)
    room = 20 * 2**30
    auto = sizing.gpu_sizing(job(tmp_path), shape, room)
    assert auto == auto_sizing(shape, room) and auto.max_batch_size > 8
    given = sizing.gpu_sizing(job(tmp_path, Settings, "--max_batch_size", "4"), shape, room)
    assert given == Sizing(4, 4 * 4096)  # the room holds more: a full-length slot each
    scoring = sizing.gpu_sizing(job(tmp_path, ScoreSettings), shape, room)
    assert scoring == Sizing(full_slots(shape, room)) and 1 < scoring.max_batch_size < 16
    assert full_slots(shape, room) == room // (4096 * per_token + slot)
    assert sizing.gpu_sizing(job(tmp_path, ScoreSettings, "--max_batch_size", "3"), shape,
                            room) == Sizing(3)
    # a batch larger than fits: generation pages the cache the room holds, scoring's
    # full-length slots are as many as fit (--max_batch_size caps them, as vLLM's max_num_seqs)
    left = (room - 200 * slot) // per_token // 128 * 128
    assert left > 4096 and sizing.gpu_sizing(job(tmp_path, Settings, "--max_batch_size", "200"),
                                            shape, room) == Sizing(200, left)
    assert sizing.gpu_sizing(job(tmp_path, ScoreSettings, "--max_batch_size", "200"), shape,
                            room) == scoring
    small = 4095 * per_token
    for words in ((), ("--max_batch_size", "4")):
        assert sizing.gpu_sizing(job(tmp_path, Settings, *words), shape, small) is None
        assert sizing.gpu_sizing(job(tmp_path, ScoreSettings, *words), shape, small) is None


@pytest.mark.parametrize("scheduler, rows", [("continuous", 3), ("static", 2)])
def test_the_engine_gets_the_sizings_batch_and_kv_cache(single_process, tiny_checkpoints,
                                                        tmp_path, scheduler, rows):
    """A KV cache of two full-length sequences for three rows: the continuous engine pages it
    (a row holds what it uses), the static one keeps full-length rows, so two of them."""
    ckpt = tiny_checkpoints[("llama2", 1)]
    tokenizer = load_tokenizer(ckpt / "tokenizer.model")
    model = build.load_model(ckpt, tokenizer, single_process, torch.float32)
    s = dataclasses.replace(job(tmp_path, Settings, "--scheduler", scheduler), max_seq_len=64)
    engine = build.make_engine(s, model, tokenizer, single_process, tokenizer.stop_ids,
                               Sizing(3, 128))
    assert engine.max_batch_size == rows and engine.max_seq_len == 64
    assert engine.blocks.n_blocks * engine.blocks.block_size == 128  # two sequences' worth


def test_an_unknown_family_defaults_to_a_guess_it_says_is_one():
    params = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
              "vocab_size": 32000, "rope_theta": 250000.0}
    shape = Shape(ModelArgs.from_params(params), 1, 2, 1)
    length, why = sizing.context_default(shape, 80 * 2**30, 1, 1)
    assert length == 4096 and "a guess" in why and "pass --max_seq_len" in why
