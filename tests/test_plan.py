"""`llama-gen plan`: weights counted from params.json match real shards, published Llama shapes
give the known sizes and verdicts, and the command's output and errors."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_gen.cli.plan import RUN_MEMORY_SETTINGS, PlanSettings, make_plan, parse_memory
from llama_gen.engine.memory import (AUTO_MAX_BATCH, AUTO_TOKENS_PER_SEQUENCE, GIB, KV_BLOCK_TOKENS,
                                     kv_bytes_per_token, weight_bytes)
from llama_gen.errors import UserError
from llama_gen.model.args import ModelArgs
from llama_gen.settings import Settings, rules

LLAMA_GEN = str(Path(sys.executable).parent / "llama-gen")
# Published params.json files (vocab_size written out where Meta's file has -1).
LLAMA_2_7B = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
              "vocab_size": 32000}
LLAMA_2_13B = {"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05,
               "vocab_size": 32000}
LLAMA_3_70B = {"dim": 8192, "ffn_dim_multiplier": 1.3, "multiple_of": 4096, "n_heads": 64,
               "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-05, "rope_theta": 500000.0,
               "vocab_size": 128256}


def params_dir(tmp_path: Path, params: dict) -> Path:
    """A checkpoint directory holding only params.json."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "params.json").write_text(json.dumps(params))
    return ckpt


def planned(ckpt: Path, **flags):
    return make_plan(PlanSettings(ckpt_dir=ckpt, **flags))


def run_plan(*words: str) -> subprocess.CompletedProcess:
    return subprocess.run([LLAMA_GEN, "plan", *words], capture_output=True, text=True,
                          timeout=120)


def test_memory_sizes_are_read_as_gpu_makers_write_them():
    assert parse_memory("24GB") == parse_memory("24GiB") == parse_memory("24G") == 24 * GIB
    assert parse_memory("80gb") == 80 * GIB and parse_memory("1.5 GB") == 3 * GIB // 2
    assert parse_memory("512MB") == 512 * 2**20 and parse_memory("1000") == 1000
    for bad in ("lots", "24XB", "-5GB", "GB", "24iB", "0"):
        with pytest.raises(UserError, match="--gpu_memory"):
            parse_memory(bad)


def shard_tensor_bytes(ckpt: Path) -> list[int]:
    """Each shard's weight bytes as stored, without the rope.freqs buffer."""
    shards = [torch.load(p, weights_only=True) for p in sorted(ckpt.glob("consolidated.*.pth"))]
    return [sum(t.nbytes for key, t in s.items() if key != "rope.freqs") for s in shards]


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_weights_per_rank_are_the_shards_tensor_bytes(tiny_checkpoints, family):
    one, two = shard_tensor_bytes(tiny_checkpoints[(family, 1)]), shard_tensor_bytes(
        tiny_checkpoints[(family, 2)])
    for mp, ckpt, want in ((1, tiny_checkpoints[(family, 1)], one[0]),
                           (2, tiny_checkpoints[(family, 2)], two[0]),
                           (2, tiny_checkpoints[(family, 1)], two[0])):
        plan = planned(ckpt, nproc=mp, model_parallel_size=mp, dtype="fp32", gpu_memory="1GB")
        assert plan.memory["weights"] == pytest.approx(want, rel=1e-3)
        assert plan.checkpoint["shards"] in (1, 2)
        assert "as expected" in plan.notes[0]  # the file sizes agree with params.json
    assert two[0] == two[1] and one[0] / 2 < two[0] < one[0] * 0.51  # norms are replicated


def test_shards_that_disagree_with_params_json_are_noted(checkpoint_copy):
    ckpt = checkpoint_copy("llama3", 1)
    params = json.loads((ckpt / "params.json").read_text())
    (ckpt / "params.json").write_text(json.dumps({**params, "n_layers": 4}))
    plan = planned(ckpt, gpu_memory="1GB")
    assert "does params.json belong to this checkpoint?" in plan.notes[0]


def test_llama_2_7b_in_bf16_does_not_fit_a_12gb_card_and_two_would(tmp_path):
    plan = planned(params_dir(tmp_path, LLAMA_2_7B), gpu_memory="12GB")
    assert plan.parameters == pytest.approx(6.74e9, rel=2e-3)
    assert plan.memory["weights"] == pytest.approx(6.74e9 * 2, rel=2e-3)  # ~12.6 GiB
    assert plan.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2
    assert not plan.fits and plan.full_length_sequences == 0 and plan.kv_cache_tokens is None
    assert "weights alone" in plan.verdict
    assert any("--model_parallel_size 2" in line for line in plan.advice)
    assert not any(line.startswith("--max_seq_len") for line in plan.advice)
    assert planned(tmp_path / "ckpt", gpu_memory="12GB", nproc=2).fits


def test_llama_2_13b_fits_on_two_24gb_cards(tmp_path):
    plan = planned(params_dir(tmp_path, LLAMA_2_13B), gpu_memory="24GB", nproc=2)
    assert plan.model_parallel_size == 2 and plan.fits and plan.max_seq_len == 4096
    assert plan.auto_batch and plan.max_batch_size >= 16  # --max_batch_size auto
    assert plan.parameters == pytest.approx(13.0e9, rel=5e-3)
    assert plan.advice == [] and plan.needed <= plan.usable
    assert planned(tmp_path / "ckpt", gpu_memory="24GB", nproc=2, max_seq_len=1024,
                   max_batch_size=8).full_length_sequences >= 8
    assert not planned(tmp_path / "ckpt", gpu_memory="24GB").fits  # one card is too small


def test_llama_3_70b_on_eight_80gb_cards_at_8192_tokens(tmp_path):
    ckpt = params_dir(tmp_path, LLAMA_3_70B)
    plan = planned(ckpt, gpu_memory="80GB", nproc=8, max_seq_len=8192)
    args = ModelArgs.from_params(LLAMA_3_70B)
    assert plan.model_parallel_size == 8 and plan.fits
    assert plan.parameters == pytest.approx(70.6e9, rel=2e-3)
    assert plan.kv_bytes_per_token == kv_bytes_per_token(args, 8, 2) == 2 * 80 * 1 * 128 * 2
    most = plan.full_length_sequences
    assert 100 < most < (plan.usable - plan.memory["weights"]) // (8192 * 40960)
    assert plan.max_batch_size == 256  # auto: at most 256, the cache holds more at 512 tokens
    # an explicit batch caps the sequences: 256 of them fit too, in a cache of the same size
    given = planned(ckpt, gpu_memory="80GB", nproc=8, max_seq_len=8192, max_batch_size=256)
    assert given.fits and given.kv_cache_tokens == plan.kv_cache_tokens


def test_advice_names_a_16_bit_dtype_and_a_shorter_max_seq_len(tmp_path):
    ckpt = params_dir(tmp_path, LLAMA_2_7B)
    fp32 = planned(ckpt, gpu_memory="32GB", dtype="fp32", max_batch_size=32, max_seq_len=4096)
    assert not fp32.fits and fp32.memory["weights"] == 2 * weight_bytes(
        ModelArgs.from_params(LLAMA_2_7B), 1, 2)
    assert "--dtype bf16 (fp16 on GPUs without bf16) halves the weights and the cache: it " \
           "fits" in fp32.advice
    shorter = [line for line in fp32.advice if line.startswith("--max_seq_len")]
    assert shorter
    seq_len = int(shorter[0].split()[1].rstrip(":"))
    assert seq_len < 4096 and planned(ckpt, gpu_memory="32GB", dtype="fp32", max_batch_size=32,
                                      max_seq_len=seq_len).fits


def test_json_round_trips_and_the_table_shows_the_verdict(tmp_path):
    ckpt = params_dir(tmp_path, LLAMA_2_13B)
    words = ["--ckpt_dir", str(ckpt), "--gpu_memory", "24GB", "--nproc", "2"]
    result = run_plan(*words, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == planned(ckpt, gpu_memory="24GB", nproc=2).as_dict()
    text = run_plan(*words).stdout
    assert "weights" in text and "KV cache" in text and text.count("\nfits: ") == 1


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("llama-gen: error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr


def test_errors_are_one_line(tmp_path):
    ckpt = params_dir(tmp_path, LLAMA_2_7B)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_plan("--ckpt_dir", str(empty), "--gpu_memory", "24GB"),
                          "params.json: not found")
    assert_one_line_error(run_plan("--ckpt_dir", str(ckpt), "--gpu_memory", "lots"),
                          "--gpu_memory 'lots' is not a memory size")
    assert_one_line_error(run_plan("--ckpt_dir", str(ckpt), "--gpu_memory", "24GB",
                                   "--model_parallel_size", "3"), "use one of 1, 2, 4, 8")
    assert_one_line_error(run_plan("--ckpt_dir", str(ckpt), "--gpu_memory", "24GB", "--nproc",
                                   "3", "--model_parallel_size", "2"), "not a multiple")
    assert_one_line_error(run_plan("--gpu_memory", "24GB"), "--ckpt_dir missing")
    if not torch.cuda.is_available():
        assert_one_line_error(run_plan("--ckpt_dir", str(ckpt)), "--gpu_memory missing")


def test_help_lists_plan_and_its_flags():
    main = subprocess.run([LLAMA_GEN, "--help"], capture_output=True, text=True).stdout
    assert "plan" in main.split("commands:")[1]
    text = run_plan("--help").stdout
    assert "--gpu_memory STR" in text and "--nproc INT" in text and "--prompt_path" not in text
    assert all(re.search(rf"--{name}\b(?!_)", text) for name in RUN_MEMORY_SETTINGS)


def test_plan_takes_the_runs_memory_settings_as_the_run_defines_them():
    """Type, default, bounds and help: each defined once, in the run's settings."""
    plan_fields = {f.name: f for f in dataclasses.fields(PlanSettings)}
    run_fields = {f.name: f for f in dataclasses.fields(Settings)}
    for name in RUN_MEMORY_SETTINGS:
        assert rules(PlanSettings)[name] == rules(Settings)[name]
        assert plan_fields[name].default == run_fields[name].default
        assert plan_fields[name].metadata == run_fields[name].metadata
    with pytest.raises(UserError, match="--max_seq_len must be an integer >= 1"):
        PlanSettings(ckpt_dir="x", max_seq_len=0)
    assert PlanSettings(ckpt_dir="x", max_batch_size="auto").max_batch_size is None


def test_a_runs_command_line_is_planned_as_it_is(tmp_path):
    ckpt = params_dir(tmp_path, LLAMA_2_13B)
    run_words = ["--ckpt_dir", str(ckpt), "--prompt_path", "p.jsonl", "--out_path", "o.jsonl",
                 "--logprobs", "--temperature", "0.8", "--chat", "false", "--echo=true",
                 "--stop", "[INST]", "--max_seq_len", "2048", "--nproc", "2", "--gpu_memory",
                 "24GB", "--json"]
    result = run_plan(*run_words)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got == planned(ckpt, max_seq_len=2048, nproc=2, gpu_memory="24GB").as_dict()
    assert_one_line_error(run_plan(*run_words, "--tempreature", "1"), "--tempreature")


LLAMA_1_7B = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06,
              "vocab_size": 32000}
LLAMA_3_1_8B = {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32,
                "n_kv_heads": 8, "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0,
                "use_scaled_rope": True, "vocab_size": 128256}


@pytest.mark.parametrize("params, family, context", [
    (LLAMA_1_7B, "Llama 1", 2048), (LLAMA_2_7B, "Llama 2", 4096),
    ({**LLAMA_3_1_8B, "use_scaled_rope": False}, "Llama 3", 8192),
    (LLAMA_3_1_8B, "Llama 3.1", 131072)])
def test_max_seq_len_defaults_to_the_models_context_where_it_fits(tmp_path, params, family,
                                                                  context):
    plan = planned(params_dir(tmp_path, params), gpu_memory="80GB", nproc=8 if context > 8192
                   else 1, model_parallel_size=8 if context > 8192 else 1)
    assert plan.max_seq_len == context and plan.fits
    assert f"--max_seq_len not given: {context}, {family}'s context" in plan.notes


def test_a_context_too_long_for_the_gpu_is_shortened_to_what_fits(tmp_path):
    ckpt = params_dir(tmp_path, LLAMA_3_1_8B)
    plan = planned(ckpt, gpu_memory="24GB")
    assert 256 <= plan.max_seq_len < 131072 and plan.max_seq_len % 256 == 0 and plan.fits
    assert any("Llama 3.1's context of 131072 tokens shortened to what fits" in note
               for note in plan.notes)
    assert any("shortened to what fits, 2 sequences of it" in note for note in plan.notes)
    assert plan.max_batch_size >= 32  # one sequence of that length leaves room for others
    # --max_batch_size 16's default: two full-length sequences beside 16 sequences' working
    # memory, not 16 full-length ones
    given = planned(ckpt, gpu_memory="24GB", max_batch_size=16)
    assert given.max_seq_len > 8192 and given.full_length_sequences == 2
    longer = planned(ckpt, gpu_memory="24GB", max_batch_size=16,
                     max_seq_len=given.max_seq_len + 256)
    assert longer.fits and longer.full_length_sequences == 1


def test_a_max_seq_len_past_the_models_context_is_refused(tmp_path):
    ckpt = params_dir(tmp_path, LLAMA_2_7B)
    with pytest.raises(UserError, match="--max_seq_len 4097 is longer than the context Llama 2 "
                                        "was trained for .4096 tokens.: use at most 4096"):
        planned(ckpt, gpu_memory="80GB", max_seq_len=4097)
    assert planned(ckpt, gpu_memory="80GB", max_seq_len=4096).max_seq_len == 4096


def test_auto_batch_fills_the_memory_left_with_whole_kv_blocks(tmp_path):
    ckpt = params_dir(tmp_path, LLAMA_2_7B)
    plans = [planned(ckpt, gpu_memory=size) for size in ("16GB", "24GB", "40GB", "80GB")]
    for plan in plans:
        assert plan.fits and plan.auto_batch and plan.needed <= plan.usable
        assert plan.kv_cache_tokens % KV_BLOCK_TOKENS == 0
        assert plan.kv_cache_tokens >= plan.max_seq_len
        assert plan.memory["KV cache"] == plan.kv_cache_tokens * plan.kv_bytes_per_token
        average = min(plan.max_seq_len, AUTO_TOKENS_PER_SEQUENCE)  # less a block's rounding:
        assert plan.kv_cache_tokens + KV_BLOCK_TOKENS > plan.max_batch_size * average
        # nearly all of the memory is used: less than a block, and a slot's working memory, left
        assert plan.usable - plan.needed < (KV_BLOCK_TOKENS + 1) * plan.kv_bytes_per_token
    batches = [plan.max_batch_size for plan in plans]
    assert batches == sorted(batches) and batches[0] < batches[-1] <= AUTO_MAX_BATCH
    assert "auto picks" in plans[0].verdict and plans[0].advice == []


def test_auto_batch_stops_at_256_and_at_full_length_slots(tmp_path):
    ckpt = params_dir(tmp_path, LLAMA_2_7B)
    short = planned(ckpt, gpu_memory="80GB", max_seq_len=64)
    assert short.max_batch_size == AUTO_MAX_BATCH
    assert short.kv_cache_tokens == AUTO_MAX_BATCH * 128  # whole blocks of 64 tokens' slots


def test_plan_takes_max_batch_size_auto_as_a_run_does(tmp_path):
    ckpt = params_dir(tmp_path, LLAMA_2_7B)
    result = run_plan("--ckpt_dir", str(ckpt), "--gpu_memory", "24GB", "--max_batch_size",
                      "auto", "--json")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got == planned(ckpt, gpu_memory="24GB").as_dict()
    assert got["auto_batch"] and got["kv_cache_tokens"] >= 4096
    text = run_plan("--ckpt_dir", str(ckpt), "--gpu_memory", "24GB").stdout
    assert (f"--max_batch_size auto ({got['max_batch_size']}) x --max_seq_len 4096; KV cache "
            f"512.0 KiB per token per GPU, {got['kv_cache_tokens']} KV tokens") in text
    assert "fits: --max_batch_size auto picks" in text


def test_model_parallel_size_alone_plans_one_model_copy_on_that_many_gpus(tmp_path):
    ckpt = params_dir(tmp_path, LLAMA_2_13B)
    plan = planned(ckpt, gpu_memory="24GB", model_parallel_size=2)
    assert (plan.nproc, plan.model_parallel_size) == (2, 2) and plan.fits
    assert plan.as_dict() == planned(ckpt, gpu_memory="24GB", nproc=2,
                                     model_parallel_size=2).as_dict()
    result = run_plan("--ckpt_dir", str(ckpt), "--gpu_memory", "24GB", "--model_parallel_size",
                      "2", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["nproc"] == 2


def test_an_explicit_batch_caps_the_sequences_of_a_cache_sized_from_memory(tmp_path):
    """vLLM's max_num_seqs: --max_batch_size 16 at 2048 tokens fits where 16 full-length slots
    (30 GiB) would not, with the cache --max_batch_size auto would have, and the run sizes it
    alike."""
    ckpt = params_dir(tmp_path, LLAMA_2_7B)
    auto = planned(ckpt, gpu_memory="24GB", max_seq_len=2048)
    given = planned(ckpt, gpu_memory="24GB", max_seq_len=2048, max_batch_size=16)
    assert given.fits and not given.auto_batch and given.max_batch_size == 16
    assert given.needed <= given.usable and given.advice == []
    assert 2048 < given.kv_cache_tokens < 16 * 2048 and given.kv_cache_tokens % KV_BLOCK_TOKENS == 0
    assert given.memory["KV cache"] == given.kv_cache_tokens * given.kv_bytes_per_token
    # the room the 13 fewer slots' working memory leaves, in whole blocks
    assert 0 <= given.kv_cache_tokens - auto.kv_cache_tokens < 2 * KV_BLOCK_TOKENS
    assert given.full_length_sequences == given.kv_cache_tokens // 2048
    assert "fits: --max_batch_size 16" in given.verdict


def test_the_plan_and_the_run_size_the_cache_with_one_function(tmp_path):
    from llama_gen.cli.flags import parse
    from llama_gen.engine.memory import Shape, cache_room
    from llama_gen.job import sizing
    from llama_gen.settings import Settings
    ckpt = params_dir(tmp_path, LLAMA_2_7B)
    shape = Shape(ModelArgs.from_params(LLAMA_2_7B), 1, 2, 2048, decode_graphs=True)
    room = cache_room(shape, int(24 * GIB * 0.9))
    for words in ((), ("--max_batch_size", "16"), ("--max_batch_size", "200"),
                  ("--kv_cache_tokens", "8192")):
        plan = make_plan(PlanSettings(ckpt_dir=ckpt, gpu_memory="24GB", max_seq_len=2048,
                                      **{w[2:]: int(v) for w, v in zip(words[::2],
                                                                       words[1::2])}))
        run = sizing.gpu_sizing(parse(Settings, ["--ckpt_dir", str(ckpt), "--prompt_path", "p",
                                                "--out_path", "o", "--max_seq_len", "2048",
                                                *words], "llama-gen"), shape, room)
        assert (plan.max_batch_size, plan.kv_cache_tokens) == (run.max_batch_size,
                                                               run.kv_cache_tokens), words


def test_an_explicit_batch_is_refused_only_where_one_full_length_sequence_does_not_fit(
        tmp_path):
    ckpt = params_dir(tmp_path, LLAMA_2_7B)
    tight = planned(ckpt, gpu_memory="16GB", max_seq_len=4096, max_batch_size=16)
    assert not tight.fits and tight.kv_cache_tokens is None and tight.full_length_sequences == 0
    assert "no room for one sequence of --max_seq_len 4096" in tight.verdict
    shorter = [line for line in tight.advice if line.startswith("--max_seq_len")]
    seq_len = int(shorter[0].split()[1].rstrip(":"))
    assert planned(ckpt, gpu_memory="16GB", max_seq_len=seq_len, max_batch_size=16).fits
    assert not planned(ckpt, gpu_memory="16GB", max_seq_len=seq_len + 256,
                       max_batch_size=16).fits
    assert any("--model_parallel_size 2" in line for line in tight.advice)


# Published config.json files (huggingface.co/<repo>/blob/main/config.json), the keys read.
LLAMA_2_7B_HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                 "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 11008,
                 "max_position_embeddings": 4096, "num_attention_heads": 32,
                 "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05,
                 "rope_scaling": None, "tie_word_embeddings": False, "vocab_size": 32000}
LLAMA_32_1B_HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "head_dim": 64,
                  "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 8192,
                  "max_position_embeddings": 131072, "num_attention_heads": 32,
                  "num_hidden_layers": 16, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
                  "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0,
                                   "low_freq_factor": 1.0,
                                   "original_max_position_embeddings": 8192,
                                   "rope_type": "llama3"},
                  "rope_theta": 500000.0, "tie_word_embeddings": True, "vocab_size": 128256}


def hf_dir(tmp_path: Path, config: dict, files: dict[str, int] | None = None) -> Path:
    """A Hugging Face folder holding config.json and weight files of the given sizes (sparse:
    only their sizes are read)."""
    ckpt = tmp_path / "hf"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps(config))
    for name, size in (files or {}).items():
        with open(ckpt / name, "wb") as f:
            f.truncate(size)
    if files and len(files) > 1:
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {f"tensor{i}": name for i, name in enumerate(files)}}))
    return ckpt


def test_a_hugging_face_config_plans_as_its_params_json(tmp_path):
    meta = planned(params_dir(tmp_path, LLAMA_2_7B), gpu_memory="24GB")
    hf = planned(hf_dir(tmp_path, LLAMA_2_7B_HF), gpu_memory="24GB")
    assert (hf.parameters, hf.memory, hf.max_seq_len, hf.verdict) == \
        (meta.parameters, meta.memory, meta.max_seq_len, meta.verdict)
    assert hf.notes[0] == "no weight files: weights counted from config.json alone"
    assert "4096, the model's context (config.json's max_position_embeddings)" in hf.notes[1]
    # A run of two processes on a Hugging Face folder runs two model copies by default.
    assert planned(tmp_path / "hf", gpu_memory="24GB", nproc=2).model_parallel_size == 1


def test_hugging_face_weight_files_are_checked_against_config_json(tmp_path):
    """Llama 3.2 1B stores its tied head once: 1.24B parameters in bf16; the run holds it once
    too (the head is the embedding's tensor)."""
    stored = 1_235_814_400 * 2
    one = planned(hf_dir(tmp_path / "1", LLAMA_32_1B_HF, {"model.safetensors": stored + 20_000}),
                  gpu_memory="24GB")
    assert one.checkpoint["shards"] == 1 and one.model_parallel_size == 1
    assert one.notes[0] == (f"1 weight file(s), {stored / GIB:.2f} GiB: config.json's "
                            "1,235,814,400 parameters in 16 bits, as expected")
    assert one.memory["weights"] == stored
    assert one.max_seq_len == 131072
    files = {"model-00001-of-00002.safetensors": stored * 2 // 3,
             "model-00002-of-00002.safetensors": stored // 3}
    two = planned(hf_dir(tmp_path / "2", LLAMA_32_1B_HF, files), gpu_memory="24GB", nproc=2)
    assert "2 weight file(s)" in two.notes[0] and "as expected" in two.notes[0]
    assert two.model_parallel_size == 1  # the files are no model-parallel split: two copies
    half = planned(hf_dir(tmp_path / "3", LLAMA_32_1B_HF, {"model.safetensors": stored // 2}),
                   gpu_memory="24GB")
    assert half.notes[0].endswith("parameters: does config.json belong to this checkpoint?")
