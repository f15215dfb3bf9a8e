"""End to end: the installed `llama-gen` command on prompt files, as one process and under
torchrun, including kill -9 at random moments and resuming.

Two runs that batch or split the work differently (model parallel 2 against 1, two replicas,
a resumed run) may give a sample other tokens where a choice was a near-tie: their logits
differ in the last bits. Their lines are compared by `assert_same_but_near_ties`, which lets a
difference through only at a proven near-tie (tests/near_ties.py); runs of the same batch shape
and split are compared exactly."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import near_ties
import pytest
import torch
from runs import (LLAMA_GEN, assert_one_line_error, job_args, kill_when, launch, read_output, run,
                  write_prompts, written_lines)

import llama_gen
from llama_gen.cli.flags import parse
from llama_gen.engine.engine import Engine
from llama_gen.engine.requests import Request, SamplingParams
from llama_gen.engine.sampling import derive_seed
from llama_gen.job.build import load_model
from llama_gen.job.feed import pending_records
from llama_gen.job.tasks import Generation, Prompting, TokenizedRecord
from llama_gen.settings import Settings
from llama_gen.text.tokenizer import load_tokenizer

PROMPTS = [{"prompt": "Hello world"}, {"id": "de", "prompt": "Guten Morgen, wie geht's?"},
           {"prompt": "नमस्ते दुनिया"}, {"prompt": "こんにちは世界", "num_samples": 2},
           {"prompt": "a", "temperature": 0.9, "max_gen_len": 5}]
GREEDY = ["--temperature", "0", "--max_gen_len", "12", "--logprobs", "--max_batch_size", "3",
          "--max_seq_len", "64"]


def generate(ckpt: Path, tmp: Path, nproc: int | None = None, extra: tuple = (),
             prompts: list[dict] = PROMPTS) -> dict[tuple, dict]:
    prompt_path = write_prompts(tmp / "prompts.jsonl", prompts)
    out = tmp / f"out-{nproc}-{len(list(tmp.iterdir()))}.jsonl"
    result = run([*job_args(ckpt, prompt_path, out), *GREEDY, *extra], nproc)
    assert result.returncode == 0, result.stderr
    return read_output(out)


@pytest.fixture(scope="module")
def reference(tiny_checkpoints, tmp_path_factory):
    """One process, one shard, per family."""
    return {family: generate(tiny_checkpoints[(family, 1)], tmp_path_factory.mktemp(family))
            for family in ("llama2", "llama3")}


@pytest.fixture(scope="module")
def in_process(single_process, tiny_checkpoints):
    """A family's tiny model (one shard, float32) and tokenizer, loaded in this process once:
    what `near_tie` re-derives a choice from."""
    loaded = {}

    def model_and_tokenizer(family: str) -> tuple:
        if family not in loaded:
            ckpt = tiny_checkpoints[(family, 1)]
            tokenizer = load_tokenizer(ckpt / "tokenizer.model")
            loaded[family] = (load_model(ckpt, tokenizer, single_process, torch.float32),
                              tokenizer)
        return loaded[family]
    return model_and_tokenizer


def generated(line: dict) -> list[int]:
    """A line's generated token ids (--logprobs), after the prompt's where --echo."""
    ids = line["token_ids"]
    return ids[len(ids) - line["completion_tokens"]:]


def requests_of(loaded: tuple, prompts: Path, flags: list[str]
                ) -> tuple[dict[tuple, Request], frozenset[int]]:
    """The requests, by (id, sample), that a run of `flags` makes of `prompts`, and where they
    stop."""
    model, tokenizer = loaded
    s = parse(Settings, ["--ckpt_dir", "unused", "--prompt_path", str(prompts), "--out_path",
                         "unused.jsonl", *flags], "llama-gen")
    task = Generation(s, Prompting.for_run(s, tokenizer, model.args))
    return ({(r.tag.record.id, r.tag.sample): r for w in pending_records(task, set())
             if isinstance(w, TokenizedRecord) for r in task.requests(w)},
            task.prompting.stop_ids)


def assert_same_but_near_ties(got: dict, want: dict, loaded: tuple, prompts: Path,
                              flags: list[str], most: int = 3) -> list[str]:
    """`got` and `want`: the lines of two runs of `flags` (with --logprobs) on `prompts` that
    batch or split the work differently. The same samples; each the same tokens, text and
    ending, or tokens that first differ at a proven near-tie (at most `most` such samples);
    logprobs within ALIKE_ATOL up to the first difference. Returns the near-ties."""
    requests, stops = requests_of(loaded, prompts, flags)
    assert got.keys() == want.keys() == requests.keys()
    for key, w in want.items():
        g = got[key]
        same = near_ties.first_difference(g["token_ids"], w["token_ids"])
        if g["token_ids"] == w["token_ids"]:
            assert (g["completion"], g["finish_reason"]) == (w["completion"], w["finish_reason"])
        logprobs = [[lp for lp in line["logprobs"][:same] if lp is not None] for line in (g, w)]
        torch.testing.assert_close(*map(torch.tensor, logprobs), atol=near_ties.ALIKE_ATOL,
                                   rtol=0, msg=lambda m: f"{key}: {m}")
    return near_ties.assert_same_but_near_ties(
        loaded[0], [(requests[k], generated(got[k]), generated(want[k])) for k in want], stops,
        most)


def test_one_process_answers_every_record_and_sample(reference):
    for records in reference.values():
        assert sorted(records, key=str) == sorted(
            [(1, 0), ("de", 0), (3, 0), (4, 0), (4, 1), (5, 0)], key=str)
        for r in records.values():
            assert r["finish_reason"] in ("stop", "length")
            assert len(r["logprobs"]) == r["completion_tokens"]
            assert r["completion_tokens"] <= (5 if r["id"] == 5 else 12)
            assert all(lp <= 0 for lp in r["logprobs"])
        assert records[("de", 0)]["prompt"] == PROMPTS[1]["prompt"]


def test_model_parallel_2_under_torchrun_matches_one_process(tiny_checkpoints, reference,
                                                             in_process, tmp_path):
    got = generate(tiny_checkpoints[("llama3", 2)], tmp_path, nproc=2)
    assert_same_but_near_ties(got, reference["llama3"], in_process("llama3"),
                              tmp_path / "prompts.jsonl", GREEDY)


def test_two_shards_on_one_process_and_one_shard_on_two(tiny_checkpoints, reference,
                                                        in_process, tmp_path):
    """Two shards joined on one process are the one-shard model, batched alike: the same lines,
    bit for bit. One shard split over two processes sums in another order: near-ties aside."""
    assert generate(tiny_checkpoints[("llama2", 2)], tmp_path) == reference["llama2"]
    got = generate(tiny_checkpoints[("llama2", 1)], tmp_path, nproc=2,
                   extra=("--model_parallel_size", "2"))
    assert_same_but_near_ties(got, reference["llama2"], in_process("llama2"),
                              tmp_path / "prompts.jsonl", GREEDY)


def test_compiled_decode_under_torchrun_matches_one_process(tiny_checkpoints, reference,
                                                           in_process, tmp_path):
    """--compile with model parallelism: the collectives are traced into the compiled step."""
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    ckpt = tiny_checkpoints[("llama3", 2)]
    result = run([*job_args(ckpt, prompts, tmp_path / "out.jsonl"), *GREEDY, "--compile"],
                 nproc=2)
    assert result.returncode == 0, result.stderr
    assert re.search(r"decode step compiled .* for batch sizes 1, 2, \d+ in [\d.]+ s",
                     result.stderr), result.stderr
    assert_same_but_near_ties(read_output(tmp_path / "out.jsonl"), reference["llama3"],
                              in_process("llama3"), prompts, GREEDY)


def test_two_replicas_match_one_process(tiny_checkpoints, reference, in_process, tmp_path):
    got = generate(tiny_checkpoints[("llama3", 1)], tmp_path, nproc=2)  # model parallel 1 x 2
    assert_same_but_near_ties(got, reference["llama3"], in_process("llama3"),
                              tmp_path / "prompts.jsonl", GREEDY)


def test_flags_under_torchrun_each_take_effect(checkpoint_copy, in_process, tmp_path):
    """Through torchrun to both workers (model parallel 2 from one shard, which by default
    would be two replicas), each flag given does what it says, as the settings file, the
    output, the errors file, the log and llama-gen's lines show. The samples are those an
    independent batch-1 generation draws at the flags' temperature, top-p and seed (near-ties
    aside). Flags whose effect cannot show here have tests of their own: --dtype and --device
    (the CPU's defaults), --scheduler static (the same lines by design), --strict (it stops the
    run), --lock, --compile, chat, stop strings and penalties."""
    ckpt = checkpoint_copy("llama3", 1)
    tokenizer_path = tmp_path / "elsewhere" / "tokenizer.model"  # not beside the checkpoint
    tokenizer_path.parent.mkdir()
    (ckpt / "tokenizer.model").rename(tokenizer_path)
    prompts = write_prompts(tmp_path / "p.jsonl", [{"uid": "x", "text": "Hello"},
                                                   {"uid": "long", "text": "word " * 40}])
    out, log = tmp_path / "o.jsonl", tmp_path / "progress.log"
    out.write_text('{"uid": "x", "id": "x", "sample": 0, "completion": "old"}\n')
    result = run([*job_args(ckpt, prompts, out), "--logging_path", str(log),
                  "--tokenizer_path", str(tokenizer_path), "--max_seq_len", "32",
                  "--max_batch_size", "2", "--max_gen_len", "6", "--temperature", "1.5",
                  "--top_p", "0.5", "--seed", "3", "--prompt_key", "text", "--id_key", "uid",
                  "--num_samples", "2", "--logprobs", "--echo", "--overwrite",
                  "--model_parallel_size", "2"], nproc=2)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "model parallel 2 x data parallel 1" in err  # --model_parallel_size
    assert "--max_batch_size 2: 2 sequences decoding at once, a KV cache of 64 tokens" in err
    [aside] = tmp_path.glob("o.jsonl.replaced-*")  # --overwrite
    assert "old" in (aside / "o.jsonl").read_text()
    assert "end: 2 sample(s) written, 1 bad line(s)" in log.read_text()  # --logging_path
    assert not out.with_name("o.jsonl.log").exists()
    [error] = [json.loads(line) for line in out.with_name("o.jsonl.errors.jsonl").open()]
    assert error["line"] == 2 and "--max_seq_len 32 allows at most 31" in error["reason"]
    settings = json.loads(out.with_name("o.jsonl.run.json").read_text())
    assert settings["tokenizer"] == hashlib.sha256(tokenizer_path.read_bytes()).hexdigest()
    assert {k: settings[k] for k in ("temperature", "top_p", "seed", "max_gen_len")} == {
        "temperature": 1.5, "top_p": 0.5, "seed": 3, "max_gen_len": 6}
    lines = read_output(out)
    assert set(lines) == {("x", 0), ("x", 1)}  # --id_key, --num_samples
    model, tokenizer = in_process("llama3")
    prompt = tokenizer.encode("Hello", bos=True)  # --prompt_key
    pairs = []
    for (_, sample), line in lines.items():
        assert line["completion"].startswith("Hello")  # --echo
        assert line["token_ids"][:len(prompt)] == prompt and line["prompt_tokens"] == len(prompt)
        assert len(line["logprobs"]) == len(line["token_ids"]) and line["logprobs"][0] is None
        assert line["completion_tokens"] == 6 or line["finish_reason"] == "stop"  # --max_gen_len
        request = Request(prompt, SamplingParams(temperature=1.5, top_p=0.5, max_gen_len=6,
                                                 seed=derive_seed(3, "x", sample)))
        [alone] = Engine(model, tokenizer.stop_ids, max_batch_size=1,
                         max_seq_len=32).generate([request])
        pairs.append((request, generated(line), alone.tokens))
    near_ties.assert_same_but_near_ties(model, pairs, tokenizer.stop_ids, most=1)


def test_a_tokenizer_of_another_vocabulary_is_named_as_the_wrong_file(tiny_checkpoints,
                                                                       tmp_path):
    """Llama 2's params.json takes its vocabulary from the tokenizer: one of another size is
    told as the wrong tokenizer, not as a params.json that does not fit the shards."""
    llama3_tokenizer = tiny_checkpoints[("llama3", 1)] / "tokenizer.model"
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    result = run([*job_args(tiny_checkpoints[("llama2", 2)], prompts, tmp_path / "o.jsonl"),
                  "--tokenizer_path", str(llama3_tokenizer)])
    assert_one_line_error(result, f"{llama3_tokenizer}: this tokenizer has ",
                          "was trained with 512 (its output layer's rows)", "--tokenizer_path")
    assert "params.json" not in result.stderr


def test_the_rope_scaling_factor_is_logged_reaches_the_model_and_binds_a_resume(
        tiny_checkpoints, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "Once upon a time"}])
    out = tmp_path / "o.jsonl"
    args = [*job_args(tiny_checkpoints[("llama3", 1)], prompts, out), "--max_gen_len", "4",
            "--temperature", "0", "--logprobs", "--max_seq_len", "64"]
    first = run(args)
    assert first.returncode == 0, first.stderr
    assert "Llama 3.1: RoPE scaled by 8, Llama 3.1's (params.json names no factor)" \
        in first.stderr
    before = read_output(out)[(1, 0)]["logprobs"]

    refused = run(args + ["--rope_scaling_factor", "32"])
    assert_one_line_error(refused, "rope_scaling_factor: 8.0 -> 32.0 (how RoPE is scaled",
                          "pass --overwrite")
    assert refused.returncode == 2

    rerun = run(args + ["--rope_scaling_factor", "32", "--overwrite"])
    assert rerun.returncode == 0, rerun.stderr
    assert "RoPE scaled by 32 (--rope_scaling_factor; without it: 8, Llama 3.1's" in rerun.stderr
    after = read_output(out)[(1, 0)]["logprobs"]
    assert after != before  # the same run but for the factor: the model saw it

    llama2 = run([*job_args(tiny_checkpoints[("llama2", 1)], prompts, tmp_path / "o2.jsonl"),
                  "--rope_scaling_factor", "32"])
    assert_one_line_error(llama2, "--rope_scaling_factor 32: ",
                          "params.json does not scale RoPE (no use_scaled_rope)")


def test_clear_errors(checkpoint_copy, tmp_path):
    ckpt = checkpoint_copy("llama2", 2)
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    base = job_args(ckpt, prompts, tmp_path / "o.jsonl")

    assert_one_line_error(run(base + ["--dtype", "fp8"]), "--dtype must be one of bf16",
                          'got "fp8"')
    assert_one_line_error(run(base[:3] + ["nope.jsonl"] + base[4:]), "nope.jsonl: no such file")
    assert_one_line_error(run(base[:5] + ["/no/such/dir/o.jsonl"]), "does not exist")
    assert_one_line_error(run(base + ["--device", "gpu"]), "--device 'gpu' is not a device")
    if not torch.cuda.is_available():
        assert_one_line_error(run(base + ["--device", "cuda"]), "torch sees no CUDA GPU here")

    params = json.loads((ckpt / "params.json").read_text())
    (ckpt / "params.json").write_text(json.dumps({**params, "vocab_size": 1000}))
    assert_one_line_error(run(base), "vocab_size 1000 does not match the tokenizer's 512")

    (ckpt / "params.json").unlink()
    assert_one_line_error(run(base), "params.json: not found")

    shard = torch.load(ckpt / "consolidated.01.pth", weights_only=True)
    (ckpt / "params.json").write_text(json.dumps(params))
    shard["norm.weight"] = shard["norm.weight"][:10]
    torch.save(shard, ckpt / "consolidated.01.pth")
    assert_one_line_error(run(base), "consolidated.01.pth: norm.weight has shape (10,)")

    for shard_path in ckpt.glob("consolidated.*.pth"):
        shard_path.unlink()
    assert_one_line_error(run(base), "no consolidated.NN.pth shards")


def test_flag_mistakes_are_refused_before_anything_is_written(tiny_checkpoints, tmp_path):
    """fire alone runs the job with a mistyped flag ignored, and reads `--overwrite false` as
    true (the text "false"), which would throw away the output."""
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    out = tmp_path / "o.jsonl"
    args = [*job_args(tiny_checkpoints[("llama2", 1)], prompts, out), "--max_gen_len", "3"]
    assert_one_line_error(run(args + ["--tempreature", "0"]), "did you mean --temperature?")
    assert not out.exists()
    assert run(args).returncode == 0
    written = out.read_bytes()
    assert_one_line_error(run(args + ["--temperature", "0", "--overwrite", "false"]),
                          "temperature: 0.6 -> 0.0", "--overwrite")
    assert out.read_bytes() == written


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["a", "b", "c", "-h"],
                                  ["--ckpt_dir", "x", "--help"]])
def test_help_lists_the_flags_on_stdout_and_runs_nothing(argv, tmp_path):
    """`llama-gen --help | less` must show it: stdout, plain types, the demo command listed."""
    result = subprocess.run([LLAMA_GEN, *argv], capture_output=True, text=True, cwd=tmp_path,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    if argv[0] == "demo":
        assert "--out_dir PATH" in text and "--nproc INT" in text
    else:
        assert "--temperature FLOAT" in text and "--ckpt_dir PATH" in text
        assert "demo" in text.split("commands:")[1]
    assert "Optional" not in text and "None]" not in text and "|None" not in text
    assert "UNEXPECTED" not in text and result.stderr == ""
    assert list(tmp_path.iterdir()) == []


def test_short_flags_are_refused_with_the_way_to_write_them(tmp_path):
    """--help shows no short flags; one typed anyway is a clear error, not 'unknown flag --n'."""
    help_text = subprocess.run([LLAMA_GEN, "--help"], capture_output=True, text=True).stdout
    assert not re.search(r"^\s+-[a-z]\b", help_text, re.MULTILINE)
    for flag in ("-n", "-p", "-o"):
        result = run([flag, "2"])
        assert_one_line_error(result, f"unknown flag {flag}", "written in full")


def test_a_file_system_error_is_one_line(tiny_checkpoints, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    (tmp_path / "o.jsonl.lock").mkdir()  # the lock file cannot be opened
    result = run(job_args(tiny_checkpoints[("llama2", 1)], prompts, tmp_path / "o.jsonl"))
    assert_one_line_error(result, "Is a directory", "o.jsonl.lock")


def test_compile_without_a_cxx_compiler_is_a_clear_error(tiny_checkpoints, tmp_path):
    """Inductor's CPU kernels need a C++ compiler; its caches are off so that it must look."""
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    ckpt = tiny_checkpoints[("llama2", 1)]
    result = run([*job_args(ckpt, prompts, tmp_path / "o.jsonl"), "--compile",
                  "--device", "cpu"],  # on CUDA, inductor writes Triton kernels instead
                 env={"CXX": "/no/such/g++", "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"})
    assert_one_line_error(result, "--compile: torch.compile failed", "C++ compiler",
                          "run without --compile")


def test_every_bad_line_is_recorded_and_the_rest_answered(tiny_checkpoints, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b"\n".join([
        b'{"prompt": "fine"}', b'{"prompt": ', b'["not", "an", "object"]', b'{"text": "x"}',
        b'{"prompt": ""}', b'{"prompt": 7}', b'{"prompt": "bad \xff utf8"}',
        b'{"id": 1, "prompt": "duplicate of line 1"}', b'{"prompt": "' + b"word " * 80 + b'"}',
        b'{"prompt": "x", "top_p": 2}', b'{"prompt": "also fine"}']) + b"\n")
    out = tmp_path / "o.jsonl"
    args = [*job_args(tiny_checkpoints[("llama2", 1)], prompts, out), "--max_seq_len", "48",
            "--max_gen_len", "4"]
    result = run(args)
    assert result.returncode == 0, result.stderr
    assert set(read_output(out)) == {(1, 0), (11, 0)}
    errors = [json.loads(line)
              for line in (tmp_path / "o.jsonl.errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in sorted(errors, key=lambda e: e["line"])] == list(range(2, 11))
    assert "9 bad line(s)" in result.stderr

    again = run(args)  # resume: nothing to do, no error written twice
    assert again.returncode == 0 and "0 sample(s) written" in again.stderr
    assert "the model is not loaded" in again.stderr and "loaded " not in again.stderr
    assert len((tmp_path / "o.jsonl.errors.jsonl").read_text().splitlines()) == 9

    strict = run(args + ["--strict", "--overwrite"])
    assert_one_line_error(strict, "line 2", "--strict, checked before the model loads")
    assert "loaded " not in strict.stderr and not out.exists()  # line 1 waited for nothing
    strict_errors = (tmp_path / "o.jsonl.errors.jsonl").read_text().splitlines()
    assert [json.loads(e)["line"] for e in strict_errors] == [2]  # the first bad line
    (tmp_path / "o.jsonl.errors.jsonl").unlink()
    too_long_last = run(args + ["--strict", "--prompt_path", str(write_prompts(
        tmp_path / "long.jsonl", [{"prompt": "fine"}, {"prompt": "word " * 80}]))])
    assert_one_line_error(too_long_last, "long.jsonl: line 2: the prompt has ",
                          "--strict, checked before the model loads")
    assert "loaded " not in too_long_last.stderr


@pytest.mark.parametrize("command, record, what", [
    ([], {"prompt": "word " * 4200}, "prompt"), (["score"], {"text": "word " * 4200}, "text")])
def test_a_prompt_longer_than_the_model_s_context_is_not_told_to_raise_max_seq_len(
        tiny_checkpoints, tmp_path, command, record, what):
    """At the model's context (4096 for Llama 2) a longer --max_seq_len is refused: the advice
    is to shorten the prompt. Nothing else is pending, so no model loads to write nothing."""
    prompts = write_prompts(tmp_path / "p.jsonl", [record])
    out = tmp_path / "o.jsonl"
    result = run([*command, *job_args(tiny_checkpoints[("llama2", 1)], prompts, out),
                  "--max_seq_len", "4096"])
    assert_one_line_error(result, "every line of", "is bad")
    [error] = [json.loads(line) for line in out.with_name("o.jsonl.errors.jsonl").open()]
    assert error["reason"].endswith(f": shorten the {what}: the model's context is 4096 tokens")
    assert "raise" not in error["reason"]
    assert "the model is not loaded" in result.stderr and "loaded " not in result.stderr


def test_a_line_not_answered_yet_may_be_fixed_in_place_an_answered_one_not(tiny_checkpoints,
                                                                           tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": 7}\n{"prompt": "also fine"}\n')
    out, errors = tmp_path / "o.jsonl", tmp_path / "o.jsonl.errors.jsonl"
    args = [*job_args(tiny_checkpoints[("llama2", 1)], prompts, out), "--max_gen_len", "3"]
    assert run(args).returncode == 0
    assert set(read_output(out)) == {(1, 0), (3, 0)}
    assert [json.loads(e)["line"] for e in errors.read_text().splitlines()] == [2]

    prompts.write_text('{"prompt": "fine"}\n{"prompt": "seven"}\n{"prompt": "also fine"}\n')
    fixed = run(args)
    assert fixed.returncode == 0, fixed.stderr
    assert "1 line(s) changed since the last run, none of them answered" in fixed.stderr
    assert set(read_output(out)) == {(1, 0), (2, 0), (3, 0)} and errors.read_text() == ""

    answered = prompts.read_text()
    prompts.write_text(answered.replace("also fine", "changed after its answer"))
    for _ in range(2):  # refused, and the refusal took nothing as settled
        assert_one_line_error(run(args), "p.jsonl: line 3 (id 3) changed since its answer was "
                              "written", "lines not answered yet, the bad ones included, may "
                              "change, answered ones may not", "--overwrite")
    prompts.write_text(answered)
    assert run(args).returncode == 0  # undone: the same file as its answers'


def test_an_answered_id_that_is_gone_from_the_prompts_refuses_a_resume(tiny_checkpoints,
                                                                       tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"id": "a", "prompt": "x"},
                                                   {"id": "b", "prompt": "y"}])
    args = [*job_args(tiny_checkpoints[("llama2", 1)], prompts, tmp_path / "o.jsonl"),
            "--max_gen_len", "2"]
    assert run(args).returncode == 0
    write_prompts(prompts, [{"id": "a", "prompt": "x"}, {"id": "c", "prompt": "y"}])
    assert_one_line_error(run(args), "o.jsonl holds answers for 1 id(s) that", 'e.g. "b"',
                          "an answered line was changed or removed")


def test_resume_refuses_changed_settings_and_a_second_job(tiny_checkpoints, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    out = tmp_path / "o.jsonl"
    args = [*job_args(tiny_checkpoints[("llama2", 1)], prompts, out), "--max_gen_len", "3"]
    assert run(args).returncode == 0
    assert_one_line_error(run(args + ["--temperature", "0.1"]), "temperature: 0.6 -> 0.1",
                          "--overwrite")
    written = out.read_bytes()
    write_prompts(prompts, [{"prompt": "hi"}, {"prompt": "more"}])  # lines added: a resume
    assert run(args).returncode == 0
    assert out.read_bytes().startswith(written) and set(read_output(out)) == {(1, 0), (2, 0)}
    write_prompts(prompts, [{"prompt": "hello"}, {"prompt": "more"}])
    assert_one_line_error(run(args), "p.jsonl: line 1 (id 1) changed since its answer")
    with open(tmp_path / "o.jsonl.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert_one_line_error(run(args + ["--overwrite"]), "another llama-gen job")
    assert run(args + ["--overwrite"]).returncode == 0
    assert read_output(out)[(1, 0)]["prompt"] == "hello"


def test_a_failed_start_leaves_nothing_that_blocks_the_next_run(checkpoint_copy, tmp_path):
    """A missing shard fails the start; once it is back, the same command runs."""
    ckpt = checkpoint_copy("llama2", 2)
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    out = tmp_path / "o.jsonl"
    args = [*job_args(ckpt, prompts, out), "--max_gen_len", "3"]
    shard = ckpt / "consolidated.01.pth"
    shard.rename(tmp_path / "kept.pth")
    assert run(args).returncode != 0
    (tmp_path / "kept.pth").rename(shard)
    result = run(args)
    assert result.returncode == 0, result.stderr
    assert set(read_output(out)) == {(1, 0)}


def test_runtime_settings_may_change_on_resume_and_long_prompts_are_retried(tiny_checkpoints,
                                                                            tmp_path):
    """The errors file says "raise --max_seq_len" for a prompt too long: doing so is a resume,
    not a settings change, and the prompt is then answered (and leaves the errors file)."""
    long_prompt = "word " * 40
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": long_prompt}])
    out, errors = tmp_path / "o.jsonl", tmp_path / "o.jsonl.errors.jsonl"
    args = [*job_args(tiny_checkpoints[("llama2", 1)], prompts, out), "--max_gen_len", "3",
            "--temperature", "0"]
    assert run(args + ["--max_seq_len", "24"]).returncode == 0
    assert set(read_output(out)) == {(1, 0)}
    [error] = [json.loads(line) for line in errors.read_text().splitlines()]
    assert error["line"] == 2 and error["reason"].endswith(
        "shorten the prompt or raise --max_seq_len (up to the model's context, 4096)")
    result = run(args + ["--max_seq_len", "128", "--max_batch_size", "2", "--scheduler",
                         "static", "--device", "cpu", "--model_parallel_size", "1"])
    assert result.returncode == 0, result.stderr
    assert set(read_output(out)) == {(1, 0), (2, 0)}
    assert errors.read_text() == ""


def test_overwrite_moves_the_old_output_aside(tiny_checkpoints, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    out = tmp_path / "o.jsonl"
    args = [*job_args(tiny_checkpoints[("llama2", 1)], prompts, out), "--max_gen_len", "3"]
    assert run(args).returncode == 0
    old = out.read_bytes()
    result = run(args + ["--temperature", "0", "--overwrite"])
    assert result.returncode == 0, result.stderr
    [aside] = tmp_path.glob("o.jsonl.replaced-*")
    assert str(aside) in result.stderr
    assert (aside / "o.jsonl").read_bytes() == old and (aside / "o.jsonl.run.json").exists()
    assert set(read_output(out)) == {(1, 0)}  # a new output, of the new settings
    assert json.loads((tmp_path / "o.jsonl.run.json").read_text())["temperature"] == 0


def test_an_input_field_named_like_an_output_field_is_one_error_naming_the_flag(
        tiny_checkpoints, tmp_path):
    records = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "3+3=", "completion": "6"}]
    prompts = write_prompts(tmp_path / "p.jsonl", records)
    out = tmp_path / "o.jsonl"
    args = [*job_args(tiny_checkpoints[("llama2", 1)], prompts, out), "--max_gen_len", "3"]
    assert_one_line_error(run(args), "line 1", "'completion'", "--completion_key")
    assert not out.exists() or out.read_text() == ""
    result = run(args + ["--completion_key", "generated"])
    assert result.returncode == 0, result.stderr
    lines = read_output(out)
    assert [lines[(i, 0)]["completion"] for i in (1, 2)] == ["4", "6"]  # the input's, kept
    assert all(isinstance(line["generated"], str) for line in lines.values())


def test_a_run_in_which_every_line_is_bad_fails(tiny_checkpoints, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "no prompt field"}\n{"prompt": ""}\n')
    out = tmp_path / "o.jsonl"
    result = run(job_args(tiny_checkpoints[("llama2", 1)], prompts, out))
    assert_one_line_error(result, "every line of", "o.jsonl.errors.jsonl")
    assert len((tmp_path / "o.jsonl.errors.jsonl").read_text().splitlines()) == 2


def test_a_replica_with_nothing_to_do_does_not_hang_the_writer(tiny_checkpoints, tmp_path):
    """Two replicas, one prompt: replica 1 sends nothing and must still be heard to finish; and
    a file of only bad lines (reported by replica 0 alone) ends non-zero, not in a hang."""
    ckpt = tiny_checkpoints[("llama3", 1)]
    out = tmp_path / "o.jsonl"
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    args = [*job_args(ckpt, prompts, out), "--max_gen_len", "3", "--model_parallel_size", "1"]
    result = run(args, nproc=2)
    assert result.returncode == 0, result.stderr
    assert set(read_output(out)) == {(1, 0)}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt"}\n')
    result = run(args[:2] + ["--prompt_path", str(bad), "--out_path", str(tmp_path / "b.jsonl"),
                             *args[6:]], nproc=2)
    assert result.returncode != 0 and "every line of" in result.stderr, result.stderr


def test_kill_9_at_random_moments_then_resume_writes_each_sample_once(tiny_checkpoints,
                                                                      in_process, tmp_path):
    """Killed three times, then resumed: each sample once, earlier lines untouched, and each
    the uninterrupted run's tokens but at a near-tie (a resumed run batches it with other
    neighbours)."""
    records = [{"prompt": f"Prompt number {i}: " + "lorem ipsum " * (i % 7)} for i in range(40)]
    prompts = write_prompts(tmp_path / "p.jsonl", records)
    ckpt = str(tiny_checkpoints[("llama3", 2)])
    flags = ["--max_gen_len", "40", "--num_samples", "2", "--max_batch_size", "4",
             "--temperature", "1", "--logprobs"]
    args = ["--ckpt_dir", ckpt, "--prompt_path", str(prompts), *flags]
    want = generate_all(args, tmp_path / "uninterrupted.jsonl")

    out = tmp_path / "o.jsonl"
    rng = random.Random(0)
    before = b""
    for kill in range(3):
        at = len(before.splitlines()) + rng.randint(1, 20)
        proc = launch(args + ["--out_path", str(out)], nproc=2, hold_at=at)
        _, err = kill_when(proc, out, min_lines=at, sig=signal.SIGKILL)
        assert proc.returncode == -signal.SIGKILL, err
        now = out.read_bytes()
        complete = now[: now.rfind(b"\n") + 1]
        assert complete.startswith(before), "a resumed run changed earlier records"
        before = complete
    with out.open("ab") as f:
        f.write(b'{"id": 3, "sample": 0, "compl')  # a torn line, as a crash mid-write leaves
    result = run(args + ["--out_path", str(out)], nproc=2)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(before)
    assert_same_but_near_ties(read_output(out), want, in_process("llama3"), prompts, flags)


def generate_all(args: list[str], out: Path) -> dict:
    result = run(args + ["--out_path", str(out)], nproc=2)
    assert result.returncode == 0, result.stderr
    return read_output(out)


@pytest.mark.parametrize("nproc", [None, 2])
def test_sigterm_stops_cleanly_and_the_same_command_resumes(tiny_checkpoints, tmp_path, nproc):
    """SIGTERM to the launcher: llama-gen itself, or torchrun, which passes it to its workers
    (model parallel 2, so both ranks must stop at the same step)."""
    records = [{"prompt": f"Prompt {i}"} for i in range(80)]
    prompts = write_prompts(tmp_path / "p.jsonl", records)
    out = tmp_path / "o.jsonl"
    family = "llama2" if nproc is None else "llama3"
    args = [*job_args(tiny_checkpoints[(family, nproc or 1)], prompts, out), "--max_gen_len",
            "40", "--max_batch_size", "2"]
    proc = launch(args, nproc, hold_at=3)
    _, err = kill_when(proc, out, min_lines=3, sig=signal.SIGTERM, launcher_only=True)
    assert proc.returncode != 0 and (nproc or proc.returncode == 128 + signal.SIGTERM), err
    remain = re.search(r"stopped by SIGTERM: (\d+) sample\(s\) remain; what was finished is "
                       r"written: run the same command to resume", err)
    assert remain, err
    assert out.read_bytes().endswith(b"\n")
    assert int(remain[1]) == 80 - len(read_output(out)) > 0  # counted in memory, exactly
    assert run(args, nproc).returncode == 0
    assert len(read_output(out)) == 80


def test_demo_runs_the_whole_pipeline(tmp_path):
    result = subprocess.run([LLAMA_GEN, "demo", "--out_dir", str(tmp_path)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    records = read_output(tmp_path / "out.jsonl")
    assert set(records) == {("greeting", 0), ("german", 0), ("hindi", 0), ("japanese", 0),
                            ("sampled", 0), ("sampled", 1)}
    assert f"output: {tmp_path / 'out.jsonl'}" in result.stdout


def test_resume_with_another_number_of_processes(tiny_checkpoints, in_process, tmp_path):
    """Killed as 2 data-parallel replicas (their lines in part files), finished as 1 process:
    each sample once, the greedy tokens of an uninterrupted run but at a near-tie."""
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": f"Line {i}"} for i in range(40)])
    flags = ["--max_gen_len", "40", "--temperature", "0", "--max_batch_size", "2", "--logprobs"]
    args = ["--ckpt_dir", str(tiny_checkpoints[("llama3", 1)]), "--prompt_path", str(prompts),
            *flags]
    want = generate_all(args, tmp_path / "uninterrupted.jsonl")
    out = tmp_path / "o.jsonl"
    proc = launch(args + ["--out_path", str(out)], nproc=2, hold_at=10)
    _, err = kill_when(proc, out, min_lines=10, sig=signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, err
    assert written_lines(out) < 40
    result = run(args + ["--out_path", str(out)])
    assert result.returncode == 0, result.stderr
    assert_same_but_near_ties(read_output(out), want, in_process("llama3"), prompts, flags)


# --- chat, stop strings, sampling controls and scoring -------------------------------------------

NEW_FLAGS = ["--chat", "--system", "Be brief.", "--stop", '["\\n\\n", "###"]', "--top_k", "5",
             "--min_p", "0.05", "--repetition_penalty", "1.1", "--presence_penalty", "0.2",
             "--frequency_penalty", "0.1", "--min_tokens", "2", "--top_logprobs", "2",
             "--temperature", "0.8", "--num_samples", "2"]


def test_chat_stop_and_sampling_flags_match_between_torchrun_and_one_process(
        tiny_checkpoints, in_process, tmp_path):
    """Every new control on model parallel 2 under torchrun gives one process's lines (each rank
    keeps its own penalty counts and stop strings, and they must agree), near-ties aside: those
    re-derived with the penalties."""
    prompts = [{"prompt": "Hello world"}, {"prompt": "Tell me a story", "stop": "e", "top_k": 0},
               {"messages": [{"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello!"},
                             {"role": "user", "content": "Grüße, 東京 🙂"}], "system": "Terse."}]
    extra = (*NEW_FLAGS, "--ignore_eos", "--max_seq_len", "128")
    one = generate(tiny_checkpoints[("llama3", 1)], tmp_path, prompts=prompts, extra=extra)
    two = generate(tiny_checkpoints[("llama3", 2)], tmp_path, nproc=2, prompts=prompts,
                   extra=extra)
    flags, loaded = [*GREEDY, *extra], in_process("llama3")
    requests, stops = requests_of(loaded, tmp_path / "prompts.jsonl", flags)
    for key, line in one.items():  # the control: each draw re-derived, penalties and all
        tokens = generated(line)
        for j in range(len(tokens)):
            cdf, u = near_ties.redraw(loaded[0], requests[key], tokens[:j])
            drawn = (cdf <= u).sum().item()
            assert drawn == tokens[j] or near_ties.near_tie(
                loaded[0], requests[key], tokens[:j] + [drawn], tokens[:j + 1], stops), (key, j)
    assert_same_but_near_ties(two, one, loaded, tmp_path / "prompts.jsonl", flags)
    assert len(one) == 6
    for line in one.values():
        assert line["token_ids"] and len(line["top_logprobs"]) == line["completion_tokens"]
        assert line["completion_tokens"] >= 2  # --min_tokens
        assert all(len(alternatives) == 2 for alternatives in line["top_logprobs"])
    stopped = [line for line in one.values() if line["finish_reason"] == "stop"]
    assert all(line["stop_reason"] in ("\n\n", "###", "e") for line in stopped)


def test_chat_prompts_are_in_the_checkpoints_format_and_bad_dialogs_are_recorded(
        tiny_checkpoints, tmp_path):
    from llama_gen.text import chat
    from llama_gen.text.tokenizer import load_tokenizer
    dialog = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "Grüße, 東京 🙂"}]
    for family in ("llama2", "llama3"):
        ckpt = tiny_checkpoints[(family, 1)]
        tokenizer = load_tokenizer(ckpt / "tokenizer.model")
        prompts = write_prompts(tmp_path / f"{family}.jsonl", [
            {"messages": dialog}, {"prompt": "Why?", "system": "Be brief."},
            {"messages": dialog[:2]}, {"messages": []}])
        out = tmp_path / f"{family}.out.jsonl"
        result = run([*job_args(ckpt, prompts, out), *GREEDY, "--chat"])
        assert result.returncode == 0, result.stderr
        lines = read_output(out)
        fmt = "llama2" if family == "llama2" else "llama3"
        assert lines[(1, 0)]["prompt_tokens"] == len(chat.dialog_tokens(dialog, fmt, tokenizer))
        with_system = chat.with_system([{"role": "user", "content": "Why?"}], "Be brief.")
        assert lines[(2, 0)]["prompt_tokens"] == len(chat.dialog_tokens(with_system, fmt,
                                                                         tokenizer))
        errors = [json.loads(x) for x in out.with_name(out.name + ".errors.jsonl").read_text()
                  .splitlines()]
        assert [e["line"] for e in errors] == [3, 4]
        assert "assistant" in errors[0]["reason"] and "empty" in errors[1]["reason"]


def test_chat_on_a_llama_1_checkpoint_is_one_clear_error(checkpoint_copy, tmp_path):
    ckpt = checkpoint_copy("llama2")
    params = json.loads((ckpt / "params.json").read_text())
    (ckpt / "params.json").write_text(json.dumps({**params, "norm_eps": 1e-6}))
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    result = run([*job_args(ckpt, prompts, tmp_path / "o.jsonl"), "--chat"])
    assert_one_line_error(result, "Llama 1", "--chat_format llama2")
    assert not (tmp_path / "o.jsonl").exists()


def test_stop_strings_cut_the_completion_before_the_first_match(tiny_checkpoints, tmp_path):
    """Each record alone in the batch (--max_batch_size 1), as the free run's: the same greedy
    tokens, bit for bit, up to the stop."""
    ckpt, alone = tiny_checkpoints[("llama2", 1)], ("--max_batch_size", "1")
    free = generate(ckpt, tmp_path, prompts=[{"prompt": "Hello world"}],
                    extra=alone)[(1, 0)]["completion"]
    words = free.split()
    assert len(words) >= 3, free
    first, later = words[1], words[-1]
    want = free[:free.index(first)]
    records = [{"prompt": "Hello world", "stop": [later, first]},  # the later-listed comes first
               {"prompt": "Hello world", "stop": "never there"}]
    lines = generate(ckpt, tmp_path, prompts=records, extra=alone)
    assert (lines[(1, 0)]["completion"], lines[(1, 0)]["finish_reason"],
            lines[(1, 0)]["stop_reason"]) == (want, "stop", first)
    assert lines[(1, 0)]["completion_tokens"] < lines[(2, 0)]["completion_tokens"]
    assert lines[(2, 0)]["completion"] == free and lines[(2, 0)]["stop_reason"] is None


def test_score_equals_the_engines_teacher_forced_logprobs_and_resumes(tiny_checkpoints,
                                                                        tmp_path):
    """Scoring a text gives the logprobs that generating with --echo --logprobs gives its
    prompt; on model parallel 2 too; a second run adds nothing."""
    ckpt = tiny_checkpoints[("llama3", 1)]
    texts = ["The quick brown fox jumps over the lazy dog.", "नमस्ते दुनिया", "a b c d e f g"]
    echoed = generate(ckpt, tmp_path, prompts=[{"prompt": t} for t in texts],
                      extra=("--echo", "--max_gen_len", "1"))
    records = [{"text": t} for t in texts] + [{"prompt": "Q: 2+2? A:", "completion": " 4"},
                                              {"text": ""}]
    prompts = write_prompts(tmp_path / "texts.jsonl", records)
    scores = {}
    for nproc, ckpt_dir in ((None, ckpt), (2, tiny_checkpoints[("llama3", 2)])):
        out = tmp_path / f"scores-{nproc}.jsonl"
        args = ["score", *job_args(ckpt_dir, prompts, out), "--logprobs", "--max_batch_size", "2"]
        result = run(args, nproc)
        assert result.returncode == 0, result.stderr
        scores[nproc] = read_output(out)
        again = run(args, nproc)
        assert again.returncode == 0 and "0 record(s) scored" in again.stderr
        assert read_output(out) == scores[nproc]
    for i in range(len(texts)):
        line = scores[None][(i + 1, 0)]
        want = echoed[(i + 1, 0)]["logprobs"][1:line["n_tokens"] + 1]
        assert torch.allclose(torch.tensor(line["token_logprobs"]), torch.tensor(want),
                              atol=1e-5)
        assert line["logprob"] == pytest.approx(sum(line["token_logprobs"]), abs=1e-9)
        assert line["mean_logprob"] == pytest.approx(line["logprob"] / line["n_tokens"])
        assert torch.allclose(torch.tensor(scores[2][(i + 1, 0)]["token_logprobs"]),
                              torch.tensor(line["token_logprobs"]), atol=1e-4)
    assert scores[None][(4, 0)]["n_tokens"] >= 1
    errors = (tmp_path / "scores-None.jsonl.errors.jsonl").read_text()
    assert '"line": 5' in errors


def test_out_of_memory_is_one_line_of_advice_and_the_rerun_resumes(tiny_checkpoints, tmp_path):
    """A CUDA out-of-memory error, injected into the engine after its first completions on the
    CPU, ends the run with advice; the finished lines stay, and the same command completes."""
    ckpt = tiny_checkpoints[("llama2", 1)]
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": f"Count to {i}"} for i in range(12)])
    out = tmp_path / "o.jsonl"
    args = [*job_args(ckpt, prompts, out), *GREEDY, "--max_batch_size", "2"]
    inject = ("import sys, torch\n"
              "from llama_gen.cli.main import main\n"
              "from llama_gen.engine import scheduler\n"
              "retire, seen = scheduler.Scheduler.postprocess, []\n"
              "def failing(self, draws):\n"
              "    for c in retire(self, draws):\n"
              "        seen.append(c); yield c\n"
              "        if len(seen) == 3: raise torch.OutOfMemoryError('CUDA out of memory. "
              "Tried to allocate 2.00 GiB')\n"
              "scheduler.Scheduler.postprocess = failing\n"
              "main(sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-c", inject, *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert_one_line_error(proc, "out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)",
                          "--max_batch_size", "llama-gen plan", "resume")
    assert proc.returncode == 1
    assert 1 <= len(read_output(out)) <= 3
    result = run(args)
    assert result.returncode == 0, result.stderr
    assert len(read_output(out)) == 12


def test_a_completion_cut_by_the_context_says_so_and_the_summary_counts_it(tiny_checkpoints,
                                                                          tmp_path):
    """--max_seq_len 16 cuts completions that asked for 40 tokens: their lines say
    context_limit, the summary counts them; one that reached its own max_gen_len has no key."""
    prompts = write_prompts(tmp_path / "p.jsonl", [
        {"prompt": "Once upon a time"}, {"prompt": "Hello"},
        {"prompt": "Hi", "max_gen_len": 3}])
    out = tmp_path / "o.jsonl"
    result = run([*job_args(tiny_checkpoints[("llama2", 1)], prompts, out), "--ignore_eos",
                  "--max_gen_len", "40", "--max_seq_len", "16", "--temperature", "0"])
    assert result.returncode == 0, result.stderr
    lines = read_output(out)
    for key in ((1, 0), (2, 0)):
        line = lines[key]
        assert (line["finish_reason"], line["context_limit"]) == ("length", True)
        assert line["prompt_tokens"] + line["completion_tokens"] == 16
    assert lines[(3, 0)]["finish_reason"] == "length" and "context_limit" not in lines[(3, 0)]
    assert ("3 sample(s) written, 2 cut short by --max_seq_len 16 (raise it, up to the model's "
            "context of 4096)") in result.stderr


def test_a_batch_answer_cut_by_the_context_keeps_openais_schema(tiny_checkpoints, tmp_path):
    request = {"custom_id": "r1", "method": "POST", "url": "/v1/completions",
               "body": {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 40,
                        "temperature": 0, "ignore_eos": True}}
    prompts = write_prompts(tmp_path / "p.jsonl", [request])
    out = tmp_path / "o.jsonl"
    result = run([*job_args(tiny_checkpoints[("llama2", 1)], prompts, out), "--max_seq_len",
                  "16"])
    assert result.returncode == 0, result.stderr
    [line] = [json.loads(x) for x in out.read_text().splitlines()]
    [choice] = line["response"]["body"]["choices"]
    assert choice["finish_reason"] == "length" and "context_limit" not in json.dumps(line)


def test_max_seq_len_defaults_to_the_models_context_and_an_old_default_output_resumes(
        tiny_checkpoints, tmp_path):
    """An output begun with --max_seq_len 1024 (the old default) resumes without the flag: the
    default is now the model's context (4096 for this Llama 2 shape), so the prompt too long
    for 1024 is answered; and --max_batch_size auto picks 8 on the CPU."""
    long_prompt = "word " * 1100  # 3302 tokens
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": long_prompt}])
    out, errors = tmp_path / "o.jsonl", tmp_path / "o.jsonl.errors.jsonl"
    args = [*job_args(tiny_checkpoints[("llama2", 1)], prompts, out), "--max_gen_len", "3",
            "--temperature", "0"]
    assert run(args + ["--max_seq_len", "1024"]).returncode == 0
    assert set(read_output(out)) == {(1, 0)} and "--max_seq_len 1024" in errors.read_text()
    result = run(args + ["--max_batch_size", "auto", "--gpu_memory_utilization", "0.5"])
    assert result.returncode == 0, result.stderr
    assert "llama-gen: --max_seq_len 4096, Llama 2's context" in result.stderr
    assert ("--max_batch_size auto: 8 sequences decoding at once, a KV cache of 32768 tokens"
            in result.stderr)
    assert set(read_output(out)) == {(1, 0), (2, 0)} and errors.read_text() == ""
    assert read_output(out)[(2, 0)]["prompt_tokens"] == 3302


def test_a_max_seq_len_past_the_models_context_is_one_error(tiny_checkpoints, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    result = run([*job_args(tiny_checkpoints[("llama2", 1)], prompts, tmp_path / "o.jsonl"),
                  "--max_seq_len", "4097"])
    assert result.returncode == 2
    assert_one_line_error(result, "--max_seq_len 4097 is longer than the context Llama 2 was "
                          "trained for (4096 tokens): use at most 4096")
    assert not (tmp_path / "o.jsonl").exists()


def test_a_mistyped_command_is_named_and_the_version_is_printed():
    typo = subprocess.run([LLAMA_GEN, "scor", "--ckpt_dir", "x"], capture_output=True, text=True,
                          timeout=120)
    assert typo.returncode == 2
    assert typo.stderr.strip().splitlines()[-1] == (
        "llama-gen: error: unknown command 'scor': did you mean `llama-gen score`?")
    version = subprocess.run([LLAMA_GEN, "--version"], capture_output=True, text=True,
                             timeout=120)
    assert version.returncode == 0
    assert version.stdout.startswith(f"llama-gen {llama_gen.__version__} (torch ")
