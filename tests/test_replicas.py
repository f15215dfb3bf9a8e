"""End to end, issue 15: data-parallel replicas under real torchrun launches. Two "nodes" on
this machine, one killed with SIGKILL mid-run: the other exits, non-zero, within a bounded
time, and a rerun writes every sample exactly once, as one uninterrupted process writes it.
Four replicas on prompts of very uneven lengths: exactly once, and claims balance the work."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from nodes import LLAMA_GEN
from replica_runs import (done_keys, kill_one_node, last_start_count,
                          part_lines, run_to_completion)
from runs import read_output, write_prompts

from llama_gen.engine.scheduler import ADMISSION_WINDOW_BATCHES

REPLICA_TIMEOUT_S = 5
TWO_NODE_RECORDS = [{"prompt": f"Prompt {i}: " + "la " * (i % 5)} for i in range(48)]
TWO_NODE_ARGS = ["--temperature", "0", "--max_gen_len", "32", "--ignore_eos", "--num_samples",
                 "2", "--max_batch_size", "2", "--max_seq_len", "80"]
DONE_LINE = re.compile(r"replica (\d+) done: (\d+) chunk\(s\), (\d+) sample\(s\) in ([\d.]+) s")


def one_process(prompts: Path, out: Path, args: list[str]) -> dict[tuple, dict]:
    result = subprocess.run([LLAMA_GEN, "--prompt_path", str(prompts), "--out_path", str(out),
                             *args], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    return read_output(out)


@pytest.fixture(scope="module")
def two_node_job(tiny_checkpoints, tmp_path_factory):
    """The prompts, the flags, and what one uninterrupted process writes for them."""
    folder = tmp_path_factory.mktemp("two-nodes")
    prompts = write_prompts(folder / "p.jsonl", TWO_NODE_RECORDS)
    args = ["--ckpt_dir", str(tiny_checkpoints[("llama3", 1)]), *TWO_NODE_ARGS]
    return prompts, args, one_process(prompts, folder / "uninterrupted.jsonl", args)


def assert_same_lines(out: Path, want: dict[tuple, dict]) -> None:
    got = read_output(out)  # and each (id, sample) once
    assert got.keys() == want.keys()
    for key, line in want.items():
        assert got[key] == line, key


def test_a_killed_node_ends_the_run_in_bounded_time_and_reruns_write_each_sample_once(
        two_node_job, tmp_path):
    """Run 1 loses rank 0's node, which hosts torchrun's store; run 2 loses node 1, and rank 0
    counts what is missing; run 3 finishes. Each run's first step merges the parts the last
    one left, so nothing is made twice."""
    prompts, args, want = two_node_job
    assert set(want) == {(i + 1, s) for i in range(len(TWO_NODE_RECORDS)) for s in (0, 1)}
    out = tmp_path / "o.jsonl"
    job = ["--prompt_path", str(prompts), "--out_path", str(out), *args]
    fast_loss = ["--replica_timeout", str(REPLICA_TIMEOUT_S)]

    survivor = kill_one_node(job + fast_loss, out, rank=0)
    assert survivor.proc.returncode != 0, survivor.stderr
    assert re.search(r"^llama-gen: error: .*run the same command again", survivor.stderr,
                     re.MULTILINE), survivor.stderr
    assert part_lines(out).get(1), "node 1's part is gone before a rerun could merge it"
    done = done_keys(out)

    survivor = kill_one_node(job + fast_loss, out, rank=1)
    assert last_start_count(out) == len(want) - len(done), "run 2 redid samples of run 1"
    assert survivor.proc.returncode != 0, survivor.stderr
    missing = re.search(r"(\d+) sample\(s\) missing", survivor.stderr)
    assert missing and "run the same command again" in survivor.stderr, survivor.stderr
    done = done_keys(out)
    assert int(missing[1]) == len(want) - len(done) > 0

    run_to_completion(job)  # the same command (--replica_timeout only makes a loss quicker)
    assert last_start_count(out) == len(want) - len(done)
    assert_same_lines(out, want)
    assert not out.with_name(out.name + ".parts").exists(), "the parts outlived the merge"


UNEVEN_LONG = 64  # tokens
UNEVEN_ARGS = ["--temperature", "0", "--max_gen_len", "2", "--ignore_eos", "--max_batch_size",
               "1", "--max_seq_len", "96", "--model_parallel_size", "1"]


def uneven_records(n: int = 96) -> list[dict]:
    """A long generation on every 4th record: a round-robin deal over 4 replicas gives replica
    0 all of them; chunks of consecutive records share them out."""
    return [{"prompt": f"Record {i}", **({"max_gen_len": UNEVEN_LONG} if i % 4 == 0 else {})}
            for i in range(n)]


@pytest.fixture(scope="module")
def four_replicas(tiny_checkpoints, tmp_path_factory):
    """One run of 4 replicas (model parallel 1) and one process, on the same uneven prompts."""
    folder = tmp_path_factory.mktemp("four-replicas")
    prompts = write_prompts(folder / "p.jsonl", uneven_records())
    args = ["--ckpt_dir", str(tiny_checkpoints[("llama3", 1)]), *UNEVEN_ARGS]
    want = one_process(prompts, folder / "one.jsonl", args)
    out = folder / "four.jsonl"
    [node] = run_to_completion(["--prompt_path", str(prompts), "--out_path", str(out), *args],
                               nnodes=1, nproc=4)
    return out, want, node


def test_four_replicas_on_uneven_prompts_write_each_sample_once(four_replicas):
    out, want, _ = four_replicas
    assert len(want) == len(uneven_records())
    assert_same_lines(out, want)
    assert not out.with_name(out.name + ".parts").exists(), "the parts outlived the merge"


def test_four_replicas_claim_each_chunk_once_until_none_is_left(four_replicas):
    """Each replica's leader logs `replica R done: C chunk(s), S sample(s) in T s` at its end. A
    chunk is an admission window of consecutive records (8 here: --max_batch_size 1, one sample
    each), so each holds two of the long generations: the work is shared by claims, not dealt
    (a round-robin deal would leave replica 0 every long one). Whatever the timing: a replica's
    samples are those of the chunks it made, every chunk is made once, and a replica stops
    claiming only when a claim comes back past the last chunk (or it took the last one), so
    none stops while chunks are left. How many each makes depends on when it started: no bound
    on that is by design."""
    _, want, node = four_replicas
    done = {int(m[1]): (int(m[2]), int(m[3]))
            for _, line in node.lines if (m := DONE_LINE.search(line))}
    assert sorted(done) == [0, 1, 2, 3], node.stderr
    chunk = ADMISSION_WINDOW_BATCHES  # records, of one sample each, per chunk
    assert all(samples % chunk == 0 for _, samples in done.values()), done
    made = {replica: samples // chunk for replica, (_, samples) in done.items()}
    assert sum(made.values()) == len(uneven_records()) // chunk == len(want) // chunk
    past_the_end = sorted(claims - made[replica] for replica, (claims, _) in done.items())
    assert past_the_end == [0, 1, 1, 1], done
    print("chunks made by replica:", made)
