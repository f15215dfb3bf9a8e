"""End to end: the installed `llama-gen` command, as one process and under torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

LLAMA_GEN = str(Path(sys.executable).parent / "llama-gen")
PROMPTS = ["Hello world", "Guten Morgen, wie geht's?", "नमस्ते दुनिया", "こんにちは世界", "a"]
GREEDY = ["--temperature", "0", "--max_gen_len", "12", "--logprobs", "--max_batch_size", "3",
          "--max_seq_len", "64"]


def run(args: list[str], nproc: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    launcher = [LLAMA_GEN] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        str(nproc), "--no-python", LLAMA_GEN]
    return subprocess.run(launcher + args, env=env, capture_output=True, text=True, timeout=300)


def generate(ckpt: Path, nproc: int | None = None, extra: tuple[str, ...] = ()) -> list[dict]:
    result = run(["--ckpt_dir", str(ckpt), "--prompt", json.dumps(PROMPTS), *GREEDY, *extra], nproc)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def assert_same_generation(got: list[dict], want: list[dict]) -> None:
    assert [r["completion"] for r in got] == [r["completion"] for r in want]
    for g, w in zip(got, want):
        assert torch.allclose(torch.tensor(g["logprobs"]), torch.tensor(w["logprobs"]), atol=1e-4)


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    """One process, one shard, per family."""
    return {family: generate(tiny_checkpoints[(family, 1)]) for family in ("llama2", "llama3")}


def test_one_process_writes_a_record_per_prompt(reference):
    for records in reference.values():
        assert [r["prompt"] for r in records] == PROMPTS
        for r in records:
            assert r["finish_reason"] in ("stop", "length")
            assert len(r["logprobs"]) == r["completion_tokens"] <= 12
            assert all(lp <= 0 for lp in r["logprobs"])


def test_model_parallel_2_under_torchrun_matches_one_process(tiny_checkpoints, reference):
    assert_same_generation(generate(tiny_checkpoints[("llama3", 2)], nproc=2), reference["llama3"])


def test_two_shards_on_one_process_and_one_shard_on_two(tiny_checkpoints, reference):
    assert_same_generation(generate(tiny_checkpoints[("llama2", 2)]), reference["llama2"])
    assert_same_generation(
        generate(tiny_checkpoints[("llama2", 1)], nproc=2, extra=("--model_parallel_size", "2")),
        reference["llama2"])


def test_two_data_parallel_replicas_match_one_process(tiny_checkpoints, reference):
    got = generate(tiny_checkpoints[("llama3", 1)], nproc=2)  # 1 shard: model parallel 1 x 2
    assert_same_generation(got, reference["llama3"])


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("llama-gen: error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_clear_errors(checkpoint_copy):
    ckpt = checkpoint_copy("llama2", 2)
    base = ["--ckpt_dir", str(ckpt), "--prompt", "hi"]

    assert_one_line_error(run(base + ["--dtype", "fp8"]), "--dtype 'fp8' is not one of")

    long_prompt = " ".join(["word"] * 80)
    result = run(["--ckpt_dir", str(ckpt), "--prompt", json.dumps(["hi", long_prompt]),
                  "--max_seq_len", "32", "--max_gen_len", "4"])
    assert_one_line_error(result, "prompt 1", "--max_seq_len 32 allows at most 31")
    assert json.loads(result.stdout.splitlines()[0])["finish_reason"] == "length"

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
