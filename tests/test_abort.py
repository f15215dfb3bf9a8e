"""End to end, issue 24 item 8: a lost node never hangs a survivor. After an error or a lost
peer, a rank closes its files, aborts its process group and exits hard with its status; only a
clean end tears the group down gracefully.

gloo's graceful teardown returns at once even with a peer gone (killed or stopped); NCCL's can
wait forever (pytorch #141510, #180611), which this CPU cannot show. So the workers here load a
`sitecustomize` whose `destroy_process_group` behaves as NCCL's does with a lost peer: it never
returns (or, for the clean run, it marks that it ran and then destroys). On main, whose
survivor destroyed gracefully after a loss, the first test hangs there."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from nodes import start_standalone, stop_all
from replica_runs import done_keys, kill_one_node, part_lines
from runs import write_prompts

RECORDS = [{"prompt": f"Prompt {i}: " + "la " * (i % 5)} for i in range(32)]
ARGS = ["--temperature", "0", "--max_gen_len", "32", "--ignore_eos", "--num_samples", "2",
        "--max_batch_size", "2", "--max_seq_len", "80", "--model_parallel_size", "1"]
GRACEFUL = "test: graceful destroy on rank"
NCCL_LIKE_DESTROY = f"""
import os, sys
if "RANK" in os.environ:
    import threading
    import torch.distributed as dist
    destroy = dist.destroy_process_group
    def destroy_as_nccl_does(*args, **kwargs):
        print("{GRACEFUL}", os.environ["RANK"], file=sys.stderr, flush=True)
        if os.environ.get("DESTROY_WAITS_FOREVER") == os.environ["RANK"]:
            threading.Event().wait()  # a peer that is gone never answers
        destroy(*args, **kwargs)
    dist.destroy_process_group = destroy_as_nccl_does
"""


@pytest.fixture
def nccl_like_destroy(tmp_path, monkeypatch):
    """Workers started from now on destroy their process group as NCCL does (see above)."""
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(NCCL_LIKE_DESTROY)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return monkeypatch


def whole_lines(out: Path) -> list[dict]:
    """Every line of --out_path and its parts, each whole and JSON (a torn one fails here)."""
    lines = []
    for path in [out, *out.parent.glob(out.name + ".parts/*.jsonl")]:
        if path.exists() and not path.name.endswith(".errors.jsonl"):
            data = path.read_bytes()
            assert not data or data.endswith(b"\n"), f"{path} ends in a torn line"
            lines += [json.loads(line) for line in data.splitlines()]
    return lines


def test_a_survivor_of_a_lost_node_aborts_and_exits_with_its_lines_and_one_error_line(
        tiny_checkpoints, tmp_path, nccl_like_destroy):
    """Two nodes, one replica each; node 1 is killed mid-run. Rank 0 declares it lost, merges,
    and exits 3 within the bound: no graceful destroy (it would never return here), its process
    group aborted, every line on disk whole, and the missing count what the disk lacks."""
    nccl_like_destroy.setenv("DESTROY_WAITS_FOREVER", "0")
    prompts = write_prompts(tmp_path / "p.jsonl", RECORDS)
    out = tmp_path / "o.jsonl"
    job = ["--ckpt_dir", str(tiny_checkpoints[("llama3", 1)]), "--prompt_path", str(prompts),
           "--out_path", str(out), *ARGS, "--replica_timeout", "5"]
    survivor = kill_one_node(job, out, rank=1)  # the node of rank 0 survives
    err = survivor.stderr
    assert GRACEFUL not in err, err
    assert "process group aborted, not destroyed" in err, err
    assert re.search(r"exitcode\s*:\s*3\b", err), err  # the worker's status, kept by exit_now
    errors = [line for line in err.splitlines() if line.startswith("llama-gen: error:")]
    assert len(errors) == 1, err
    missing = re.search(r"(\d+) sample\(s\) missing: replica 1 was lost", errors[0])
    assert missing, errors[0]
    lines = whole_lines(out)
    assert len(lines) == len({(r["id"], r["sample"]) for r in lines}) == len(done_keys(out))
    assert int(missing[1]) == 2 * len(RECORDS) - len(lines) > 0
    assert not part_lines(out).get(0), "rank 0 merged its own part, yet it is still there"


def test_a_clean_end_still_destroys_the_process_group_gracefully(
        tiny_checkpoints, tmp_path, nccl_like_destroy):
    """Two replicas that both finish: each rank destroys its group gracefully and none
    aborts."""
    prompts = write_prompts(tmp_path / "p.jsonl", RECORDS[:4])
    out = tmp_path / "o.jsonl"
    node = start_standalone(["--ckpt_dir", str(tiny_checkpoints[("llama3", 1)]),
                             "--prompt_path", str(prompts), "--out_path", str(out), *ARGS], 2)
    try:
        assert node.wait(timeout=180) == 0, node.stderr
    finally:
        stop_all([node])
    assert sorted(re.findall(rf"{GRACEFUL} (\d)", node.stderr)) == ["0", "1"], node.stderr
    assert "aborted" not in node.stderr, node.stderr
    assert len(whole_lines(out)) == 2 * 4


PEER_AWAY = """
import os, sys, threading, time
import torch, torch.distributed as dist
from llama_gen.runtime import distributed
distributed.init_distributed(1)
dist.all_reduce(torch.ones(1))
if dist.get_rank() == 1:
    time.sleep(120)  # takes no part in any teardown (torchrun ends it once rank 0 fails)
if os.environ.get("ABORT_NEVER_RETURNS"):  # as NCCL's abort has (NCCL #1777)
    dist.distributed_c10d._abort_process_group = lambda group: threading.Event().wait()
distributed.abort(seconds=float(os.environ["ABORT_SECONDS"]))
print("initialized after the abort:", dist.is_initialized(), file=sys.stderr, flush=True)
distributed.exit_now(3)
"""


def abort_without_peer(never_returns: bool) -> str:
    """Rank 0 aborts while rank 1 takes no part, then exits hard with 3; its stderr."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env |= {"OMP_NUM_THREADS": "1", "ABORT_SECONDS": "1" if never_returns else "30",
            **({"ABORT_NEVER_RETURNS": "1"} if never_returns else {})}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "--no-python", sys.executable, "-c", PEER_AWAY],
        capture_output=True, text=True, timeout=120, env=env)
    assert re.search(r"exitcode\s*:\s*3\b", done.stderr), done.stderr
    return done.stderr


def test_abort_drops_the_group_without_its_peer_and_exit_now_keeps_the_status():
    """torch 2.7 and later abort gloo's group too; 2.5 and 2.6 leave it to the hard exit."""
    err = abort_without_peer(never_returns=False)
    aborts_gloo = hasattr(dist.ProcessGroup, "abort")
    assert f"initialized after the abort: {not aborts_gloo}" in err, err


@pytest.mark.skipif(not hasattr(dist.ProcessGroup, "abort"), reason="torch < 2.7: no gloo abort")
def test_an_abort_that_never_returns_is_given_up_and_the_exit_keeps_the_status():
    err = abort_without_peer(never_returns=True)
    assert "rank 0: aborting the process group took over 1 s; exiting without it" in err, err
