"""Settings: each setting defined once (type, default, bounds, role, help), checked on
construction; path checks before a run; what a record may override; what defines the output."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from llama_gen.cli.flags import parse
from llama_gen.errors import UserError
from llama_gen.job.records import check_overrides, parse_line
from llama_gen.settings import (DEFINES_OUTPUT, OUTPUT_DEFINING, PER_RECORD, REQUIRED, RULES,
                                RUNTIME, ScoreSettings, Settings, rules)
from llama_gen.values import BadValue


def settings(tmp_path: Path, **kwargs) -> Settings:
    prompt = tmp_path / "prompts.jsonl"
    if not prompt.exists():
        prompt.write_text('{"prompt": "hi"}\n')
    return Settings(ckpt_dir=tmp_path, prompt_path=prompt, out_path=tmp_path / "out.jsonl",
                    **kwargs)


# --- value checks (on construction) ------------------------------------------------------------

def test_job_settings_check_accepts_good_settings(tmp_path):
    settings(tmp_path).check_paths()


@pytest.mark.parametrize("change, message", [
    ({"top_p": 0.0}, "--top_p must be a number in (0, 1], got 0.0"),
    ({"top_p": 1.01}, "--top_p must be a number in (0, 1], got 1.01"),
    ({"temperature": -0.1}, "--temperature must be a number in [0, 10000], got -0.1"),
    ({"max_seq_len": 0}, "--max_seq_len must be an integer >= 1, got 0"),
    ({"max_batch_size": 0}, "--max_batch_size must be an integer >= 1 or auto, got 0"),
    ({"max_gen_len": 0}, "--max_gen_len must be an integer >= 1, got 0"),
    ({"num_samples": 0}, "--num_samples must be an integer in [1, 1024], got 0"),
])
def test_job_settings_check_flag_errors(tmp_path, change, message):
    with pytest.raises(UserError, match="^" + re.escape(message)):
        settings(tmp_path, **change)


def test_model_parallel_size_zero_is_an_error_not_the_default(tmp_path):
    with pytest.raises(UserError, match=re.escape("--model_parallel_size must be an integer >= 1, "
                                                  "got 0")):
        settings(tmp_path, model_parallel_size=0)
    assert settings(tmp_path).model_parallel_size is None
    assert settings(tmp_path, model_parallel_size=2).model_parallel_size == 2


@pytest.mark.parametrize("change, message", [
    ({"max_seq_len": 2.0}, "--max_seq_len must be an integer >= 1, got 2.0"),
    ({"logprobs": "false"}, '--logprobs must be true or false, got "false"'),
    ({"temperature": float("nan")}, "--temperature must be a number in [0, 10000], got NaN"),
    ({"scheduler": "dynamic"}, '--scheduler must be one of continuous, static, got "dynamic"'),
    ({"dtype": "int8"}, "--dtype must be one of "),
    ({"prompt_key": None}, "--prompt_key must be text, got null"),
])
def test_settings_are_exact_in_code(tmp_path, change, message):
    # Words from a command line are read by flags.parse; code passes real values.
    with pytest.raises(UserError, match="^" + re.escape(message)):
        settings(tmp_path, **change)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "bf16", "fp16", "fp32", None])
def test_dtype_accepts_torch_names_and_short_ones(tmp_path, dtype):
    assert settings(tmp_path, dtype=dtype).dtype == dtype


def test_settings_are_keyword_only_frozen_and_store_paths_as_paths(tmp_path):
    with pytest.raises(TypeError):
        Settings(tmp_path, tmp_path / "p.jsonl", tmp_path / "o.jsonl")
    s = Settings(ckpt_dir=str(tmp_path), prompt_path="p.jsonl", out_path="o.jsonl",
                 logging_path="x.log")
    assert s.ckpt_dir == tmp_path and isinstance(s.prompt_path, Path)
    assert isinstance(s.out_path, Path) and s.logging_path == Path("x.log")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.top_p = 0.5
    with pytest.raises(TypeError):
        Settings(prompt_path="p", out_path="o")  # ckpt_dir is required


def test_files_beside_the_output(tmp_path):
    s = settings(tmp_path)
    assert s.errors_path == tmp_path / "out.jsonl.errors.jsonl"
    assert s.settings_path == tmp_path / "out.jsonl.run.json"
    assert s.lock_path == tmp_path / "out.jsonl.lock"
    assert s.log_path == tmp_path / "out.jsonl.log"
    assert settings(tmp_path, logging_path=tmp_path / "l.log").log_path == tmp_path / "l.log"


# --- paths (before any model loads) ------------------------------------------------------------

def test_job_settings_check_path_errors(tmp_path):
    s = settings(tmp_path)

    def check(**kwargs):
        Settings(**{"ckpt_dir": tmp_path, "prompt_path": s.prompt_path,
                    "out_path": s.out_path, **kwargs}).check_paths()

    with pytest.raises(UserError, match="--prompt_path .*missing.jsonl: no such file"):
        check(prompt_path=tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="--prompt_path .*: a directory, not a file"):
        check(prompt_path=tmp_path)
    with pytest.raises(UserError, match="--ckpt_dir .*params.json: no such directory"):
        check(ckpt_dir=s.prompt_path.parent / "params.json")
    with pytest.raises(UserError, match=r"--out_path .*: directory .*nowhere does not exist"):
        check(out_path=tmp_path / "nowhere" / "out.jsonl")
    with pytest.raises(UserError, match=r"--logging_path .*: directory .*nolog does not exist"):
        settings(tmp_path, logging_path=tmp_path / "nolog" / "x.log").check_paths()
    with pytest.raises(UserError, match=r"--out_path .* is a directory: name a file in it"):
        check(out_path=tmp_path)
    with pytest.raises(UserError, match="--out_path must not be the prompt file"):
        check(out_path=s.prompt_path)
    for log, other in ((s.prompt_path, "the prompt file"), (s.out_path, "--out_path"),
                       (s.errors_path, "the errors file")):
        with pytest.raises(UserError, match="--logging_path must not be " + other):
            settings(tmp_path, logging_path=log).check_paths()
    s.errors_path.write_text(s.prompt_path.read_text())
    with pytest.raises(UserError, match="the errors file must not be the prompt file"):
        check(prompt_path=s.errors_path)


# --- one rule per setting, for flags, records and code alike -----------------------------------

def test_every_field_has_help_a_role_and_a_rule():
    for f in dataclasses.fields(Settings):
        assert f.metadata["help"], f.name
        assert f.metadata["role"] in (DEFINES_OUTPUT, RUNTIME), f.name
    assert RULES == rules(Settings) and set(RULES) == {f.name for f in dataclasses.fields(Settings)}
    assert REQUIRED == ("ckpt_dir", "prompt_path", "out_path")


def test_per_record_settings():
    assert set(PER_RECORD) == {"max_gen_len", "temperature", "top_p", "seed", "num_samples",
                               "top_k", "min_p", "repetition_penalty", "presence_penalty",
                               "frequency_penalty", "stop", "min_tokens", "ignore_eos", "system"}
    assert set(PER_RECORD) <= set(OUTPUT_DEFINING)  # a record's own value changes its lines


def test_output_defining_holds_exactly_the_settings_that_change_a_finished_line(tmp_path):
    assert set(OUTPUT_DEFINING) == {*PER_RECORD, "prompt_key", "id_key", "completion_key",
                                    "logprobs", "top_logprobs", "echo", "keep_special_tokens",
                                    "chat", "chat_format", "quantize", "quantize_head"}
    for runtime in ("max_seq_len", "max_batch_size", "device", "scheduler", "compile",
                    "model_parallel_size", "logging_path"):
        assert runtime not in OUTPUT_DEFINING
    s = settings(tmp_path, temperature=0.0, id_key="key")
    defining = s.output_defining()
    assert list(defining) == list(OUTPUT_DEFINING)
    assert defining["temperature"] == 0.0 and defining["id_key"] == "key"
    json.dumps(defining)  # written to the run settings file as JSON


@pytest.mark.parametrize("name, value", [
    ("top_p", 0), ("top_p", 1.5), ("temperature", -1), ("max_gen_len", 0), ("num_samples", 0),
    ("seed", 1.5),
])
def test_a_record_override_is_checked_by_the_same_rule_as_its_flag(tmp_path, name, value):
    argv = ["--ckpt_dir", "c", "--prompt_path", "p", "--out_path", "o", f"--{name}", str(value)]
    with pytest.raises(UserError) as from_flag:
        parse(Settings, argv, "llama-gen")
    with pytest.raises(UserError) as from_code:
        settings(tmp_path, **{name: value})
    overrides, problem = check_overrides({"prompt": "hi", name: value})
    with pytest.raises(BadValue) as from_rule:
        RULES[name].check(value)
    bad = parse_line(json.dumps({"prompt": "hi", name: value}).encode(), 3, "prompt", "id", False)
    rule = from_rule.value.rule
    assert overrides == {} and problem == f"{name} {from_rule.value}"
    assert bad.reason == problem
    assert str(from_flag.value) == f"--{name} {from_rule.value}"
    assert str(from_code.value) == f"--{name} {from_rule.value}"
    assert f"must be {rule}, got " in str(from_flag.value)


def test_top_p_zero_is_refused_both_ways_with_the_same_words():
    argv = ["--ckpt_dir", "c", "--prompt_path", "p", "--out_path", "o", "--top_p", "0"]
    with pytest.raises(UserError, match=re.escape("--top_p must be a number in (0, 1], got 0")):
        parse(Settings, argv, "llama-gen")
    assert check_overrides({"top_p": 0}) == ({}, "top_p must be a number in (0, 1], got 0")


def test_check_overrides_keeps_only_a_records_own_settings():
    obj = {"prompt": "x", "top_p": 1, "seed": -4, "max_seq_len": 9, "device": "cuda", "meta": 1}
    overrides, problem = check_overrides(obj)
    assert problem is None and overrides == {"top_p": 1.0, "seed": -4}
    assert type(overrides["top_p"]) is float
    assert check_overrides({"prompt": "x"}) == ({}, None)


def test_with_overrides(tmp_path):
    s = settings(tmp_path, temperature=0.7, num_samples=2)
    assert s.with_overrides({}) is s
    own = s.with_overrides({"temperature": 0.0, "num_samples": 5})
    assert (own.temperature, own.num_samples, own.top_p) == (0.0, 5, s.top_p)
    assert (s.temperature, s.num_samples) == (0.7, 2)  # the run's settings are unchanged
    assert own.out_path == s.out_path
    with pytest.raises(UserError, match=re.escape("--top_p must be a number in (0, 1], got 0")):
        s.with_overrides({"top_p": 0})  # still checked, whoever calls it


def test_top_logprobs_without_logprobs_is_refused(tmp_path):
    """The alternatives come beside the chosen token's own logprob, as OpenAI's rule has it."""
    paths = dict(ckpt_dir=tmp_path, prompt_path=tmp_path / "p.jsonl", out_path=tmp_path / "o")
    with pytest.raises(UserError, match="^--top_logprobs 3 lists each token's alternatives "
                       "beside its own logprob: add --logprobs$"):
        Settings(**paths, top_logprobs=3)
    assert Settings(**paths, top_logprobs=3, logprobs=True).top_logprobs == 3


def test_compile_with_the_static_scheduler_is_refused(tmp_path):
    """The static scheduler is the uncompiled baseline: --compile would be silently ignored."""
    with pytest.raises(UserError, match="^--compile compiles the continuous scheduler"):
        Settings(ckpt_dir=tmp_path, prompt_path=tmp_path / "p.jsonl", out_path=tmp_path / "o",
                 compile=True, scheduler="static")


@pytest.mark.parametrize("keys", [dict(completion_key="prompt"), dict(text_key="completion"),
                                  dict(prompt_key="text")])
def test_score_refuses_fields_that_coincide(tmp_path, keys):
    with pytest.raises(UserError, match="the three fields must differ"):
        ScoreSettings(ckpt_dir=tmp_path, prompt_path=tmp_path / "p", out_path=tmp_path / "o",
                      **keys)


# --- the KV cache's size and block size (advanced) ---------------------------------------------

@pytest.mark.parametrize("words, message", [
    (["--kv_cache_tokens", "0"], "--kv_cache_tokens must be an integer >= 1 or auto, got 0"),
    (["--kv_block_size", "0"], "--kv_block_size must be an integer >= 1 or auto, got 0"),
    (["--kv_block_size", "8.5"], "--kv_block_size must be an integer >= 1 or auto, got 8.5"),
    (["--kv_block_size", "65", "--max_seq_len", "64"],
     "--kv_block_size 65 is longer than --max_seq_len 64: a block holds positions of one "
     "sequence; use at most 64"),
    (["--kv_cache_tokens", "63", "--max_seq_len", "64"],
     "--kv_cache_tokens 63 cannot hold one sequence of --max_seq_len 64: give at least 64, or "
     "a shorter --max_seq_len"),
    (["--kv_cache_tokens", "90", "--kv_block_size", "48", "--max_seq_len", "64"],
     "--kv_cache_tokens 90 cannot hold one sequence of --max_seq_len 64 in whole blocks of 48 "
     "positions: give at least 96, or a shorter --max_seq_len"),
    (["--kv_block_size", "8", "--scheduler", "static"],
     "--kv_block_size pages the continuous scheduler's KV cache; the static one keeps a full "
     "--max_seq_len per sequence: drop one of the two"),
])
def test_the_kv_cache_flags_are_checked_in_one_line_naming_the_flag(words, message):
    paths = ["--ckpt_dir", "a", "--prompt_path", "b", "--out_path", "c"]
    with pytest.raises(UserError, match="^" + re.escape(message) + "$"):
        parse(Settings, [*paths, *words], "llama-gen")


def test_the_kv_cache_flags_default_to_auto_and_may_change_on_resume(tmp_path):
    paths = ["--ckpt_dir", "a", "--prompt_path", "b", "--out_path", "c"]
    s = parse(Settings, [*paths, "--kv_cache_tokens", "auto", "--kv_block_size", "auto"],
              "llama-gen")
    assert (s.kv_cache_tokens, s.kv_block_size) == (None, None)
    s = parse(Settings, [*paths, "--kv_cache_tokens", "96", "--kv_block_size", "48",
                         "--max_seq_len", "64", "--scheduler", "continuous"], "llama-gen")
    assert (s.kv_cache_tokens, s.kv_block_size) == (96, 48)
    assert settings(tmp_path, kv_cache_tokens=64, max_seq_len=64).kv_cache_tokens == 64
    assert RULES["kv_cache_tokens"].base is int and RULES["kv_block_size"].base is int
    for name in ("kv_cache_tokens", "kv_block_size"):
        field = {f.name: f for f in dataclasses.fields(Settings)}[name]
        assert field.metadata["role"] == RUNTIME and field.default is None
        assert name not in OUTPUT_DEFINING and name not in PER_RECORD
    # A --max_seq_len resolved later (the model's context, or what fits) is checked as it is
    # set: the run replaces it in its settings.
    s = settings(tmp_path, kv_cache_tokens=100)
    with pytest.raises(UserError, match="^--kv_cache_tokens 100 cannot hold one sequence of "
                                        "--max_seq_len 4096"):
        dataclasses.replace(s, max_seq_len=4096)


def test_scoring_refuses_the_kv_cache_flags_saying_why():
    """Scoring's cache is unpaged, a full-length slot per text: the flags would do nothing."""
    paths = ["--ckpt_dir", "a", "--prompt_path", "b", "--out_path", "c"]
    for name in ("kv_cache_tokens", "kv_block_size"):
        with pytest.raises(UserError, match=f"^--{name} is generation's: scoring keeps an "
                                            "unpaged KV cache of a full --max_seq_len per text"):
            parse(ScoreSettings, [*paths, f"--{name}", "64"], "llama-gen score")
    with pytest.raises(UserError, match="^unknown flag --kv_cache_token: did you mean"):
        parse(Settings, [*paths, "--kv_cache_token", "64"], "llama-gen")


def test_the_block_size_for_the_device_and_the_cache_in_whole_blocks(tmp_path):
    """Default blocks: the CPU's one of --max_seq_len per row (unpaged), a GPU's 128 (at most
    --max_seq_len); a GPU's given block must suit flex attention's kernels."""
    import torch

    from llama_gen.job import sizing
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert sizing.kv_block_size(settings(tmp_path, max_seq_len=300), cpu) == 300
    assert sizing.kv_block_size(settings(tmp_path, max_seq_len=300), gpu) == 128
    assert sizing.kv_block_size(settings(tmp_path, max_seq_len=100), gpu) == 100
    assert sizing.kv_block_size(settings(tmp_path, max_seq_len=300, kv_block_size=8), cpu) == 8
    assert sizing.kv_block_size(settings(tmp_path, max_seq_len=300, kv_block_size=32), gpu) == 32
    with pytest.raises(UserError, match=r"^--kv_block_size 8: on GPUs flex attention reads the "
                                        r"paged KV cache, and its kernels take a multiple of 16"):
        sizing.kv_block_size(settings(tmp_path, max_seq_len=300, kv_block_size=8), gpu)
    # A GPU's default block of 128: 300 positions take 3 blocks.
    with pytest.raises(UserError, match="^--kv_cache_tokens 380 cannot hold one sequence of "
                                        "--max_seq_len 300 in whole blocks of 128 positions: "
                                        "give at least 384"):
        sizing.kv_block_size(settings(tmp_path, max_seq_len=300, kv_cache_tokens=380), gpu)
    assert sizing.kv_block_size(settings(tmp_path, max_seq_len=300, kv_cache_tokens=380),
                               cpu) == 300
    scoring = ScoreSettings(ckpt_dir=tmp_path, prompt_path=tmp_path / "p",
                            out_path=tmp_path / "o", max_seq_len=300)
    assert sizing.kv_block_size(scoring, gpu) == 300  # unpaged: a slot per text


def test_the_run_sizes_its_cache_from_the_flags(tmp_path, single_process, tiny_checkpoints,
                                                monkeypatch):
    """On the CPU: --kv_cache_tokens as given, or a full --max_seq_len per sequence in whole
    blocks; on a GPU: the given cache with as many sequences as their working memory leaves
    room for, or one line naming the flag where it does not fit."""
    import torch

    from llama_gen.engine.memory import (AUTO_TOKENS_PER_SEQUENCE, Sizing, context_table_bytes,
                                         graph_pool_per_slot, slot_working_bytes)
    from llama_gen.job import build, sizing
    from llama_gen.text.tokenizer import load_tokenizer
    ckpt = tiny_checkpoints[("llama3", 1)]
    model = build.load_model(ckpt, load_tokenizer(ckpt / "tokenizer.model"), single_process,
                             torch.float32)
    def size(**kwargs):
        return sizing.size_cache(settings(tmp_path, max_seq_len=100, **kwargs), model, dist)
    dist = single_process
    assert size() == Sizing(8)  # auto: 8 full-length slots
    assert size(kv_block_size=48) == Sizing(8, 8 * 144)  # 100 positions take 3 blocks of 48
    assert size(kv_cache_tokens=150, kv_block_size=48, max_batch_size=3) == Sizing(3, 150)
    engine = build.make_engine(settings(tmp_path, max_seq_len=100, kv_block_size=48,
                                        kv_cache_tokens=150), model, None, dist, (),
                               Sizing(3, 150))
    assert (engine.blocks.n_blocks, engine.blocks.block_size) == (3, 48)
    # On a GPU (only the arithmetic runs here: the budget is what the test says, and the
    # profiling step measures what the estimates say; the graphs' pool stays an estimate).
    dist = dataclasses.replace(single_process, device=torch.device("cuda"))
    shape = dataclasses.replace(sizing.run_shape(model.args, dist, torch.float32, 100, 32),
                                decode_graphs=True)
    per_token, slot = shape.kv_bytes_per_token, slot_working_bytes(shape)
    fixed = sum(sizing.fixed_working_bytes(shape).values())
    monkeypatch.setattr(sizing, "memory_budget", lambda *_: fixed + 2048 * per_token + 3 * slot)
    monkeypatch.setattr(sizing, "measure_working_memory", lambda _, batch, *__: (
        fixed + batch * (slot - graph_pool_per_slot(shape)) - context_table_bytes(shape, batch)))
    assert size(kv_cache_tokens=2048, kv_block_size=32, max_batch_size=3) == Sizing(3, 2048)
    assert size(kv_cache_tokens=2048, kv_block_size=32) == Sizing(3, 2048)  # auto: what fits
    # auto, with room to spare: as many sequences as the cache holds at 100 tokens each (the
    # auto average, AUTO_TOKENS_PER_SEQUENCE, capped by --max_seq_len)
    assert AUTO_TOKENS_PER_SEQUENCE > 100 and 3 + 1024 * per_token // slot > 1024 // 100
    assert size(kv_cache_tokens=1024, kv_block_size=32) == Sizing(1024 // 100, 1024)
    with pytest.raises(UserError, match=r"^--kv_cache_tokens 2048 \(\d+\.\d\d GiB\) and the "
                                        r"working memory of --max_batch_size 4 do not fit in "
                                        r"the .* GiB left of --gpu_memory_utilization 0.9"):
        size(kv_cache_tokens=2048, kv_block_size=32, max_batch_size=4)
