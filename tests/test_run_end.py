"""End to end, issue 20: a replica that stopped is not a replica that finished, and the end of
every run adds up. Two "nodes" on this machine (one torchrun each, one process per node: two
replicas of a 1-shard model), and in turn:

- node 1's torchrun killed with SIGKILL (its worker gets SIGTERM from the parent-death signal);
- replica 1's worker sent SIGTERM;
- rank 0 sent SIGINT;
- a part file deleted while its replica writes it;
- every torchrun sent SIGTERM, as Slurm does at the time limit.

In each, every surviving process says the right counts, every surviving torchrun exits non-zero
(none waits in its exit barrier), and the next run completes: every (id, sample) once.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from nodes import Node, start_nodes, stop_all
from replica_runs import (done_keys, last_start_count, node_of_rank, part_lines, run_to_completion,
                          wait_for_lines_of_every_replica)
from runs import write_prompts

RECORDS = [{"prompt": f"Prompt {i}: " + "la " * (i % 5)} for i in range(64)]
ARGS = ["--temperature", "0.8", "--max_gen_len", "32", "--ignore_eos", "--num_samples", "2",
        "--max_batch_size", "2", "--max_seq_len", "80", "--replica_timeout", "30"]
WANT = {(i + 1, s) for i in range(len(RECORDS)) for s in (0, 1)}
BOUND_S = 90  # a surviving node's time to end: the rest of the work, the merge, the count
STOPPED = re.compile(r"replica 1 stopped \((.+)\) after (\d+) of its (\d+) claimed sample\(s\)")
MISSING = re.compile(r"^llama-gen: error: (\d+) sample\(s\) missing: (.+); run the same command "
                     r"again to make them$", re.MULTILINE)
REMAIN = re.compile(r"^llama-gen: stopped by (SIG\w+): (\d+) sample\(s\) remain; what was "
                    r"finished is written", re.MULTILINE)


@pytest.fixture
def job(tiny_checkpoints, tmp_path) -> tuple[list[str], Path]:
    prompts = write_prompts(tmp_path / "p.jsonl", RECORDS)
    out = tmp_path / "o.jsonl"
    return ["--ckpt_dir", str(tiny_checkpoints[("llama3", 1)]), "--prompt_path", str(prompts),
            "--out_path", str(out), *ARGS], out


def started(job: list[str], out: Path) -> tuple[Node, Node]:
    """Two nodes, once each replica has written a line: (rank 0's node, replica 1's node)."""
    nodes = start_nodes(job)
    try:
        wait_for_lines_of_every_replica(nodes, out, replicas=2)
        first = node_of_rank(nodes, 0)
    except BaseException:
        stop_all(nodes)
        print("\n".join(node.stderr for node in nodes))
        raise
    return first, next(node for node in nodes if node is not first)


def ended(nodes: tuple[Node, Node]) -> list[int]:
    """Each launcher's exit status, once it and its workers are gone."""
    try:
        return [node.wait(timeout=BOUND_S) for node in nodes]
    finally:
        stop_all(list(nodes))


def worker_of_rank(node: Node, rank: int) -> int:
    [pid] = [pid for pid, r in node.workers().items() if r == rank]
    return pid


def check_stopped_replica_1(rank0: Node, node1: Node, out: Path, why: str) -> None:
    """Replica 1 says it stopped and what it left; rank 0 counts exactly that as missing; the
    output holds everything else."""
    assert "replica 1 done" not in node1.stderr, node1.stderr
    stopped = STOPPED.findall(node1.stderr)
    assert [s[0] for s in stopped] == [why], node1.stderr
    written, claimed = int(stopped[0][1]), int(stopped[0][2])
    missing = MISSING.findall(rank0.stderr)
    assert missing == [(str(claimed - written), f"replica 1 stopped ({why})")], rank0.stderr
    assert len(WANT) - len(done_keys(out)) == claimed - written > 0
    assert not out.with_name(out.name + ".parts").exists(), "rank 0 merged every part"


def finish_and_check(command: list[str], out: Path, left: int | None = None) -> Node:
    """The same command again, to the end: it sets out to make the `left` samples (those not
    in the output or its parts by default), and writes every (id, sample) once."""
    left = len(WANT) - len(done_keys(out)) if left is None else left
    [node] = run_to_completion(command, nnodes=1, nproc=2)
    assert last_start_count(out) == left, node.stderr
    lines = [json.loads(line) for line in out.read_bytes().splitlines()]
    assert sorted((x["id"], x["sample"]) for x in lines) == sorted(WANT)  # each once
    assert not out.with_name(out.name + ".parts").exists()
    return node


@pytest.mark.parametrize("stop", ["node 1's torchrun killed", "replica 1 sent SIGTERM"])
def test_a_stopped_replica_leaves_its_chunk_counted_and_every_survivor_exits_non_zero(job, stop):
    """Killed, node 1's torchrun leaves its worker the parent-death signal's SIGTERM. Replica 1
    stops and says what it left; rank 0 takes every other chunk, and counts replica 1's
    unfinished samples as missing."""
    command, out = job
    rank0, node1 = started(command, out)
    if stop == "node 1's torchrun killed":
        os.kill(node1.proc.pid, signal.SIGKILL)
    else:
        os.kill(worker_of_rank(node1, 1), signal.SIGTERM)
    status0, status1 = ended((rank0, node1))
    assert status0 != 0, rank0.stderr  # its worker exited 3: no exit barrier
    assert status1 == (-signal.SIGKILL if "killed" in stop else 1), node1.stderr
    check_stopped_replica_1(rank0, node1, out, "SIGTERM")
    done = len(done_keys(out))
    node = finish_and_check(command, out)
    assert f"resuming: {done} of {len(WANT)} sample(s) already in {out}" in node.stderr


def test_rank_0_stopped_stops_the_run_and_counts_what_remains_from_the_store(job):
    """Rank 0 sent SIGINT stops every replica, says what remains from the store's counters and
    leaves the part files for the next start to merge; there, a region of zeros where one of
    replica 1's lines was (a client crash on NFS) is skipped, and its sample made again."""
    command, out = job
    rank0, node1 = started(command, out)
    os.kill(worker_of_rank(rank0, 0), signal.SIGINT)
    status0, status1 = ended((rank0, node1))
    assert status0 != 0 and status1 != 0, rank0.stderr
    assert [s[0] for s in STOPPED.findall(node1.stderr)] == ["rank 0 got SIGINT"], node1.stderr
    remain = REMAIN.findall(rank0.stderr)
    assert remain == [("SIGINT", str(len(WANT) - len(done_keys(out))))], rank0.stderr
    parts = part_lines(out)
    assert parts.get(0) and parts.get(1), "the parts are left for the next start"

    left = len(WANT) - len(done_keys(out)) + 1  # and the line made zeros below
    [part] = out.with_name(out.name + ".parts").glob("*-1.jsonl")
    data = part.read_bytes()
    start = data.index(b"\n") + 1
    end = data.index(b"\n", start)
    part.write_bytes(data[:start] + b"\0" * (end - start) + data[end:])
    node = finish_and_check(command, out, left)
    assert "not JSON" in node.stderr


def test_a_lost_part_file_and_a_stop_at_the_time_limit_are_counted(job):
    """A part file deleted before the merge: the end's count differs from the start's, and the
    run exits 3 with it. Then SIGTERM to every torchrun while replicas write: rank 0 says what
    remains within 10 s, from the store's counters, and no finished line is lost."""
    command, out = job

    rank0, node1 = started(command, out)
    [part] = out.with_name(out.name + ".parts").glob("*-1.jsonl")
    part.unlink()  # replica 1 goes on writing to a file no one will read
    status0, status1 = ended((rank0, node1))
    assert status0 != 0 and status1 != 0, rank0.stderr + node1.stderr
    missing = MISSING.findall(rank0.stderr)
    assert missing and missing[0][1].startswith("the output holds fewer lines than were "
                                                "written"), rank0.stderr
    assert int(missing[0][0]) == len(WANT) - len(done_keys(out)) > 0
    assert re.search(r"replica 1: the run is incomplete: \d+ sample\(s\) missing",
                     node1.stderr), node1.stderr
    finish_and_check(command, out)

    for stale in out.parent.glob(out.name + "*"):
        stale.unlink()
    rank0, node1 = started(command, out)
    before = done_keys(out)
    signalled = time.monotonic()
    for node in (rank0, node1):
        node.proc.send_signal(signal.SIGTERM)
    status0, status1 = ended((rank0, node1))
    assert status0 != 0 and status1 != 0
    said = [at for at, line in rank0.lines if REMAIN.search(line)]
    assert said and said[0] - signalled < 10, rank0.stderr
    after = done_keys(out)
    assert before <= after, "a finished line was lost"
    assert REMAIN.findall(rank0.stderr) == [("SIGTERM", str(len(WANT) - len(after)))]

    finish_and_check(command, out)
