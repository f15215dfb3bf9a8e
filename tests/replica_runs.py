"""Runs of several replicas under torchrun, and reading their part files and logs."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from nodes import Node, start_nodes, start_standalone, stop_all


def part_lines(out: Path, skip: frozenset[str] = frozenset()) -> dict[int, list[bytes]]:
    """Each replica's whole output lines in `<out>.parts/<run>-<replica>.jsonl`, but for the
    part files named in `skip`."""
    by_replica: dict[int, list[bytes]] = {}
    for part in sorted(out.with_name(out.name + ".parts").glob("*-*.jsonl")):
        if not part.name.endswith(".errors.jsonl") and part.name not in skip:
            replica = int(part.stem.rsplit("-", 1)[1])
            whole = part.read_bytes().splitlines(keepends=True)
            by_replica.setdefault(replica, []).extend(l for l in whole if l.endswith(b"\n"))
    return by_replica


def done_keys(out: Path) -> set[tuple]:
    """(id, sample) of every whole line in --out_path and in its parts."""
    lines = out.read_bytes().splitlines(keepends=True) if out.exists() else []
    lines += [line for part in part_lines(out).values() for line in part]
    return {(r["id"], r["sample"]) for r in map(json.loads, lines)}


def wait_for_lines_of_every_replica(nodes: list[Node], out: Path, replicas: int) -> None:
    """Until each replica has a whole line in a part file of this run (not one an earlier run
    left)."""
    earlier = frozenset(p.name for p in out.with_name(out.name + ".parts").glob("*"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for node in nodes:
            node.workers()
        parts = part_lines(out, skip=earlier)
        if all(parts.get(r) for r in range(replicas)):
            return
        assert all(node.proc.poll() is None for node in nodes), "a node ended before the kill"
        time.sleep(0.005)
    pytest.fail("no output within 120 s")


def node_of_rank(nodes: list[Node], rank: int) -> Node:
    [node] = [node for node in nodes if rank in node.workers().values()]
    return node


def run_to_completion(job_args: list[str], nnodes: int = 2, nproc: int = 1) -> list[Node]:
    nodes = (start_nodes(job_args, nnodes, nproc) if nnodes > 1
             else [start_standalone(job_args, nproc)])
    try:
        for node in nodes:
            assert node.wait(timeout=180) == 0, node.stderr
    finally:
        stop_all(nodes)
    return nodes


def last_start_count(out: Path) -> int:
    """The samples the latest run set out to write, from its progress log."""
    return int(re.findall(r"start: (\d+) sample\(s\)", Path(f"{out}.log").read_text())[-1])


# --replica_timeout, a heartbeat period, the merge, torchrun's shutdown
SURVIVOR_BOUND_S = 60


def kill_one_node(job: list[str], out: Path, rank: int) -> Node:
    """Two nodes; once each replica has written a line, SIGKILL to the node of global `rank`.
    Returns the other node, which must have exited, workers and all, within the bound."""
    nodes = start_nodes(job)
    try:
        wait_for_lines_of_every_replica(nodes, out, replicas=2)
        dead = node_of_rank(nodes, rank)
        [survivor] = [node for node in nodes if node is not dead]
        dead.kill()
        try:
            survivor.wait(timeout=SURVIVOR_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the surviving node still runs {SURVIVOR_BOUND_S} s after the kill:\n"
                        + survivor.stderr[-3000:])
        assert survivor.live_workers() == [], "a surviving worker outlived its launcher"
        return survivor
    finally:
        stop_all(nodes)
