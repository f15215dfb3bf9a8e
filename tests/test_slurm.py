"""The launch recipes, scripts/slurm/llama-gen.sbatch and scripts/two_nodes.sh, run by bash with
stand-ins on PATH: `srun` runs its command once per node as Slurm's tasks would (each with its
own SLURM_NODEID), `scontrol show hostnames` lists the nodes, and `torchrun` records its argv and
environment. What reaches torchrun on each node is what these tests check."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SBATCH = SCRIPTS / "slurm" / "llama-gen.sbatch"
TWO_NODES = SCRIPTS / "two_nodes.sh"
RECORDED_ENV = ("SLURM_NODEID", "SRUN_CPUS_PER_TASK", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")

SRUN = """#!/usr/bin/env bash
# srun: the command once per node, each task with its node's ids, all at once
set -eu
pids=()
for (( node = 0; node < SLURM_NNODES; node++ )); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
SCONTROL = """#!/usr/bin/env bash
# scontrol show hostnames a,b,c: one host a line
[[ $1 == show && $2 == hostnames ]] || { echo "scontrol stand-in: $*" >&2; exit 1; }
tr , '\\n' <<< "$3"
"""
TORCHRUN = f"""#!{sys.executable}
import json, os, sys
node = os.environ.get("SLURM_NODEID", "local")
record = {{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in {RECORDED_ENV!r}}}}}
with open(os.path.join(os.environ["RECORD"], f"torchrun-{{node}}.json"), "w") as f:
    json.dump(record, f)
"""

# llama-gen flags that a shell would split or glob if a script lost their quotes
SPACED = ["--system", "You are  brief.", "--stop", "*", "--stop", "two words"]


@pytest.fixture
def launch(tmp_path):
    """Runs a script under bash with the stand-ins first on PATH and no Slurm variables but
    those given; returns (the finished process, torchrun's records sorted by node)."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("torchrun", TORCHRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SRUN_", "TORCH_ELASTIC_"))}
    base.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", RECORD=str(record))

    def run(script: Path, env: dict[str, str], *args: str):
        proc = subprocess.run(["bash", str(script), *args], env={**base, **env},
                              capture_output=True, text=True, timeout=30)
        runs = [json.loads(p.read_text()) for p in sorted(record.glob("torchrun-*.json"))]
        return proc, runs
    return run


def slurm_env(tmp_path: Path, **more: str) -> dict[str, str]:
    """A 3-node job as sbatch starts it on its first node, whose SLURM_NODEID is 0; the first
    host does not sort first. Paths with spaces."""
    env = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu-c3,gpu-a1,gpu-b2",
           "SLURM_NNODES": "3", "SLURM_NODEID": "0", "SLURM_CPUS_PER_TASK": "32",
           "SLURM_GPUS_PER_NODE": "8", "CKPT_DIR": str(tmp_path / "my models" / "13b"),
           "PROMPTS": str(tmp_path / "my data" / "p.jsonl"),
           "OUT": str(tmp_path / "my data" / "out.jsonl")}
    env.update(more)
    return {k: v for k, v in env.items() if v is not None}


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def llama_gen_args(argv: list[str]) -> list[str]:
    """What torchrun runs: `--no-python llama-gen ARGS`."""
    at = argv.index("--no-python")
    assert argv[at + 1] == "llama-gen", argv
    return argv[at + 2:]


def sbatch_directives(script: Path) -> list[str]:
    """#SBATCH options as sbatch reads them: from the top, stopping at the first command."""
    found = []
    for line in script.read_text().splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if m := re.match(r"#SBATCH\s+(\S+)", line):
            found.append(m.group(1))
    return found


@pytest.mark.parametrize("job_id", ["7", "123456", "9999999"])
def test_sbatch_runs_one_static_torchrun_per_node(launch, tmp_path, job_id):
    proc, runs = launch(SBATCH, slurm_env(tmp_path, SLURM_JOB_ID=job_id), *SPACED)
    assert proc.returncode == 0, proc.stderr
    assert len(runs) == 3
    ports = set()
    for node, run in enumerate(runs):
        argv, env = run["argv"], run["env"]
        assert env["SLURM_NODEID"] == str(node)
        assert flag(argv, "--node_rank") == str(node)  # per task, not the batch shell's 0
        assert flag(argv, "--nnodes") == "3" and flag(argv, "--nproc_per_node") == "8"
        assert flag(argv, "--master_addr") == "gpu-c3"  # the first host, node 0: the store
        assert flag(argv, "--max_restarts") == "0"
        assert not any(a.startswith("--rdzv") for a in argv), argv  # static, not c10d
        assert env["SRUN_CPUS_PER_TASK"] == "32"
        assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "90"
        assert llama_gen_args(argv) == [
            "--ckpt_dir", str(tmp_path / "my models" / "13b"),
            "--prompt_path", str(tmp_path / "my data" / "p.jsonl"),
            "--out_path", str(tmp_path / "my data" / "out.jsonl"),
            "--model_parallel_size", "2", "--num_samples", "1", "--temperature", "0.8", *SPACED]
        ports.add(int(flag(argv, "--master_port")))
    (port,) = ports
    assert 1024 < port < 32768  # below Linux's ephemeral ports
    assert proc.stdout.strip() == ("llama-gen: 3 node(s) x 8 GPU(s), 12 replica(s) of model "
                                   f"parallel 2, rendezvous at gpu-c3:{port}")


def test_sbatch_ports_differ_between_jobs(launch, tmp_path):
    ports = set()
    for job_id in ("123456", "123457"):
        proc, runs = launch(SBATCH, slurm_env(tmp_path, SLURM_JOB_ID=job_id))
        assert proc.returncode == 0, proc.stderr
        ports.add(flag(runs[0]["argv"], "--master_port"))
    assert len(ports) == 2


@pytest.mark.parametrize("gpu_vars", [
    {"SLURM_GPUS_PER_NODE": "h100:4"},
    {"SLURM_GPUS_ON_NODE": "4"},
    {"SLURM_JOB_GRES": "gpu:a100:4"},
    {"SLURM_GRES": "gpu:4"},
    {"SLURM_JOB_GRES": "tmpfs:1,gpu:a100:4(S:0-1)"},
])
def test_sbatch_finds_the_gpus_per_node(launch, tmp_path, gpu_vars):
    """--gpus-per-node with a type; else the node's count; else --gres, old and new names."""
    proc, runs = launch(SBATCH, slurm_env(tmp_path, **{"SLURM_GPUS_PER_NODE": None, **gpu_vars}))
    assert proc.returncode == 0, proc.stderr
    assert [flag(r["argv"], "--nproc_per_node") for r in runs] == ["4"] * 3
    assert "3 node(s) x 4 GPU(s), 6 replica(s)" in proc.stdout


def test_sbatch_without_a_gpu_count_says_so_in_one_line(launch, tmp_path):
    proc, runs = launch(SBATCH, slurm_env(tmp_path, SLURM_GPUS_PER_NODE=None,
                                          SLURM_JOB_GRES="tmpfs:1"))
    assert proc.returncode == 2 and not runs
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "no GPUs per node" in proc.stderr and "--gpus-per-node" in proc.stderr


def test_sbatch_keeps_model_copies_inside_a_node(launch, tmp_path):
    proc, runs = launch(SBATCH, slurm_env(tmp_path, SLURM_GPUS_PER_NODE="3"))
    assert proc.returncode == 2 and not runs
    assert "not a multiple of MODEL_PARALLEL_SIZE 2" in proc.stderr


def test_sbatch_without_cpus_per_task_sets_no_srun_cpus(launch, tmp_path):
    proc, runs = launch(SBATCH, slurm_env(tmp_path, SLURM_CPUS_PER_TASK=None))
    assert proc.returncode == 0, proc.stderr
    assert all(r["env"]["SRUN_CPUS_PER_TASK"] is None for r in runs)


def test_sbatch_directives_stop_cleanly_and_resubmit_safely(launch, tmp_path):
    directives = sbatch_directives(SBATCH)
    # sbatch reads none after the first command: these must all be above it
    for option in ("--dependency=singleton", "--open-mode=append", "--no-requeue"):
        assert option in directives, directives
    assert "--requeue" not in directives
    (signal,) = [d for d in directives if d.startswith("--signal=")]
    # TERM to the job steps (llama-gen's clean stop); not B: (the batch shell only), not USR1
    # (which kills by default)
    m = re.fullmatch(r"--signal=TERM@(\d+)", signal)
    assert m, signal
    _, runs = launch(SBATCH, slurm_env(tmp_path))
    shutdown = int(runs[0]["env"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    # torchrun's SIGKILL of slow workers comes well before the time limit, and after torch's
    # default 30 s
    assert 30 <= shutdown <= int(m.group(1)) - 30


def test_two_nodes_static_rendezvous(launch, tmp_path):
    env = {"HEAD": "node0", "PORT": "23456", "NODE_RANK": "1", "GPUS": "4",
           "MODEL_PARALLEL_SIZE": "2", "OUT": str(tmp_path / "my data" / "out.jsonl")}
    proc, runs = launch(TWO_NODES, env, *SPACED)
    assert proc.returncode == 0, proc.stderr
    (run,) = runs
    argv = run["argv"]
    assert flag(argv, "--nnodes") == "2" and flag(argv, "--node_rank") == "1"
    assert flag(argv, "--master_addr") == "node0" and flag(argv, "--master_port") == "23456"
    assert flag(argv, "--nproc_per_node") == "4" and flag(argv, "--max_restarts") == "0"
    assert not any(a.startswith("--rdzv") for a in argv), argv
    args = llama_gen_args(argv)
    assert flag(args, "--out_path") == str(tmp_path / "my data" / "out.jsonl")
    assert flag(args, "--model_parallel_size") == "2" and args[-len(SPACED):] == SPACED


@pytest.mark.parametrize("missing", ["HEAD", "PORT", "NODE_RANK"])
def test_two_nodes_has_no_shared_defaults(launch, missing):
    env = {"HEAD": "node0", "PORT": "23456", "NODE_RANK": "0"}
    del env[missing]
    proc, runs = launch(TWO_NODES, env)
    assert proc.returncode != 0 and not runs
    assert len(proc.stderr.splitlines()) == 1 and f"set {missing}" in proc.stderr, proc.stderr


def test_two_nodes_node_rank_is_0_or_1(launch):
    proc, runs = launch(TWO_NODES, {"HEAD": "node0", "PORT": "23456", "NODE_RANK": "2"})
    assert proc.returncode == 2 and not runs
    assert "NODE_RANK=2" in proc.stderr
