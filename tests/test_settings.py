"""Settings: each setting defined once (type, default, bounds, role, help), checked on
construction; path checks before a run; what a record may override; what defines the output."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from llama_gen.errors import UserError
from llama_gen.flags import parse
from llama_gen.records import check_overrides, parse_line
from llama_gen.settings import (DEFINES_OUTPUT, ScoreSettings, OUTPUT_DEFINING, PER_RECORD, REQUIRED, RULES,
                                RUNTIME, Settings, rules)
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
                                    "chat", "chat_format"}
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
