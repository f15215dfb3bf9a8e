"""Workers never outlive their launcher: torchrun killed with SIGKILL at any moment."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llama_gen import lifeline
from test_cli import descendants, launch, read_output, run, write_prompts

LIMIT = 30  # seconds a worker may take to go away after torchrun died

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the parent-death signal and /proc are Linux's")


def processes_with(marker: str, but: int) -> list[int]:
    """Live processes (not `but`) whose command line holds `marker`: this test's workers."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != but:
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():  # empty for zombies
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def seconds_until_gone(marker: str, launcher: int) -> float:
    """How long the processes with `marker` took to go; they are killed and the test fails
    if they outlive LIMIT."""
    start = time.monotonic()
    while left := processes_with(marker, launcher):
        if time.monotonic() - start > LIMIT:
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"workers {left} outlived torchrun by {LIMIT} s")
        time.sleep(0.05)
    return time.monotonic() - start


def job_args(ckpt: Path, tmp: Path, replicas: int = 1, n: int = 80,
             max_gen_len: int = 40) -> tuple[list[str], Path]:
    prompts = write_prompts(tmp / "p.jsonl", [{"prompt": f"Prompt {i}"} for i in range(n)])
    out = tmp / "o.jsonl"
    return ["--ckpt_dir", str(ckpt), "--prompt_path", str(prompts), "--out_path", str(out),
            "--max_gen_len", str(max_gen_len), "--max_batch_size", "2",
            "--model_parallel_size", str(2 // replicas)], out


@pytest.mark.parametrize("when", [0.5, 2.0, "workers started"])
def test_no_worker_outlives_torchrun_killed_while_starting(tiny_checkpoints, tmp_path, when):
    """Killed before, while or just after it starts its workers (in sessions of their own, so
    the kill reaches none of them): each worker dies with it or soon after."""
    args, out = job_args(tiny_checkpoints[("llama3", 2)], tmp_path, n=4, max_gen_len=4)
    proc = launch(args, nproc=2)
    deadline = time.monotonic() + (60 if when == "workers started" else when)
    while time.monotonic() < deadline and not (when == "workers started" and descendants(proc.pid)):
        time.sleep(0.002)
    workers = descendants(proc.pid)
    proc.kill()
    took = seconds_until_gone(str(out), proc.pid)
    _, err = proc.communicate(timeout=LIMIT)
    print(f"killed at {when} with {len(workers)} worker(s) started: gone {took:.2f} s later")
    assert "Traceback" not in err, err


def written_lines(out) -> int:
    """Whole lines in --out_path and in the part files of several replicas."""
    files = [out, *out.parent.glob(out.name + ".parts/*.jsonl")]
    return sum(f.read_bytes().count(b"\n") for f in files if f.exists())


@pytest.mark.parametrize("replicas", [1, 2])
def test_workers_stop_cleanly_when_torchrun_is_killed(tiny_checkpoints, tmp_path, replicas):
    """kill -9 of torchrun alone (the OOM killer's way) mid-run: its workers get SIGTERM from the
    kernel and stop as on SIGTERM, so the same command can resume. Two replicas write part files
    (merged by the next run) and may lose torchrun's store first: a one-line error instead."""
    args, out = job_args(tiny_checkpoints[("llama3", 2)], tmp_path, replicas, n=40,
                         max_gen_len=24)
    proc = launch(args, nproc=2)
    deadline = time.monotonic() + 120
    while written_lines(out) < 3 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.01)
    workers = descendants(proc.pid)
    assert workers, "no workers to orphan"
    assert set(workers) <= set(processes_with(str(out), proc.pid))  # what the watch below sees
    proc.kill()
    took = seconds_until_gone(str(out), proc.pid)
    _, err = proc.communicate(timeout=LIMIT)  # the workers held torchrun's pipes until they exited
    print(f"killed mid-run, {replicas} replica(s): workers gone {took:.2f} s later")
    assert "Traceback" not in err
    assert "stopped by SIGTERM" in err or (replicas > 1 and "key-value store is gone" in err), err
    assert not out.exists() or out.read_bytes().endswith(b"\n")
    assert not out.exists() or len(read_output(out)) < 40
    assert run(args, nproc=2).returncode == 0
    assert len(read_output(out)) == 40


# The lifeline alone, in small Python processes: a launcher that starts one worker and reports
# its PID, then is killed.

WORKER = """
import os, signal, sys, time
from llama_gen import __main__ as entry, lifeline
{before}
lifeline.arm(entry.PARENT, grace=1)
signal.signal(signal.SIGTERM, lambda *_: print("SIGTERM", flush=True))  # a stop never read
print("armed", flush=True)
time.sleep(30)
"""
LAUNCHER = """
import subprocess, sys
worker = subprocess.Popen([sys.executable, "-c", *sys.argv[1:]], stdout=sys.stdout,
                          stderr=sys.stderr, start_new_session=True)
print(worker.pid, flush=True)
worker.wait()
"""


def start_worker(tmp_path: Path, torchrun: bool = True, before: str = "") -> tuple:
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test"}
    if not torchrun:
        del env["TORCHELASTIC_RUN_ID"]
    log = (tmp_path / "worker.log").open("w+")
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, textwrap.dedent(WORKER.format(before=before)),
         "--out_path", str(tmp_path / "o.jsonl")],  # as torchrun, ends with its worker's args
        env=env, stdout=subprocess.PIPE, stderr=log, text=True, cwd=Path(__file__).parents[1])
    worker = int(launcher.stdout.readline())
    return launcher, worker, log


def wait_for(pid: int, seconds: float) -> bool:
    """Whether `pid` is gone (or a zombie) within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def test_a_worker_that_does_not_stop_exits_hard_after_the_grace_period(tmp_path):
    launcher, worker, log = start_worker(tmp_path)
    assert launcher.stdout.readline() == "armed\n"
    start = time.monotonic()
    launcher.kill()
    launcher.wait()
    assert wait_for(worker, 10), "the worker outlived its grace period"
    took = time.monotonic() - start
    log.seek(0)
    message = log.read()
    assert 1 <= took < 5, took
    assert f"torchrun (pid {launcher.pid}) died and this worker did not stop within 1 s" in message
    assert message.count("\n") == 1 and "Traceback" not in message


def test_a_launcher_gone_before_the_signal_was_set_is_noticed(tmp_path):
    """The launcher died between the entry point's first line and prctl: a new parent."""
    launcher, worker, log = start_worker(tmp_path, before="entry.PARENT = -1")
    assert launcher.wait(timeout=10) == 0
    log.seek(0)
    assert "torchrun (pid -1) died before this worker could watch it" in log.read()


def test_a_worker_left_to_init_before_it_started_is_noticed(tmp_path):
    """The launcher died before the entry point's first line: the parent it recorded is init,
    which is not running our command."""
    launcher, worker, log = start_worker(tmp_path, before=(
        "print('ready', flush=True)\n"
        "while os.getppid() == entry.PARENT: time.sleep(0.01)\n"
        "entry.PARENT = os.getppid()"))
    assert launcher.stdout.readline() == "ready\n"
    launcher.kill()
    launcher.wait()
    if not wait_for(worker, 5):
        adopter = Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1]
        os.kill(worker, signal.SIGKILL)
        if adopter != "1":
            pytest.skip(f"orphans here go to a subreaper (pid {adopter}), not PID 1")
        pytest.fail("a worker left to init was not noticed")
    log.seek(0)
    assert "torchrun died before this worker started (init, pid 1, adopted it)" in log.read()


def test_without_torchrun_a_worker_outlives_its_parent(tmp_path):
    """A plain run belongs to its user, not to the process that started it (nohup, a shell)."""
    launcher, worker, log = start_worker(tmp_path, torchrun=False)
    assert launcher.stdout.readline() == "armed\n"
    launcher.kill()
    launcher.wait()
    assert not wait_for(worker, 2)
    os.kill(worker, signal.SIGKILL)


def test_arming_twice_or_without_torchrun_does_nothing(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(lifeline, "_armed", False)
    lifeline.arm(launcher=-1)  # would exit under torchrun
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setattr(lifeline, "_armed", True)
    lifeline.arm(launcher=-1)


def test_the_launcher_is_recognised_by_its_command_ending_with_ours(monkeypatch):
    """How a worker left to init tells it from torchrun running as a container's PID 1."""
    own = Path(f"/proc/{os.getpid()}/cmdline").read_bytes().decode().split("\0")[:-1]
    monkeypatch.setattr(sys, "argv", ["llama-gen", *own[-2:]])
    assert lifeline._runs_our_command(os.getpid())
    monkeypatch.setattr(sys, "argv", ["llama-gen", "--out_path", "elsewhere.jsonl"])
    assert not lifeline._runs_our_command(os.getpid())
    monkeypatch.setattr(sys, "argv", ["llama-gen"])
    assert lifeline._runs_our_command(os.getpid())  # no arguments: cannot tell
