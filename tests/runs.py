"""Running the installed `llama-gen` as a user does, alone or under torchrun, and reading what
it wrote: the helpers the end-to-end tests share. `kill_when` and its kin stop a run at a
chosen moment that cannot be missed (a job held at N lines written until it is signalled)."""
from __future__ import annotations

import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

LLAMA_GEN = str(Path(sys.executable).parent / "llama-gen")


def written_lines(out: Path) -> int:
    """Whole lines in --out_path and in the part files of several replicas."""
    lines = 0
    for path in [out, *out.parent.glob(out.name + ".parts/*.jsonl")]:
        if not path.name.endswith(".errors.jsonl"):
            try:
                lines += path.read_bytes().count(b"\n")
            except FileNotFoundError:  # not begun, or a part merged meanwhile
                pass
    return lines


# `llama-gen` whose global rank 0 stops itself (SIGSTOP) once --out_path and its part files hold
# HOLD_AT lines, checked after each line it writes, and in any case before it ends its run: a
# job that cannot finish before the test has signalled it (see `kill_when`). The lifeline is
# armed first, as the entry point does, before torch is imported.
HOLDING = """
from llama_gen import __main__ as entry
from llama_gen.runtime import lifeline
lifeline.arm(entry.PARENT)
import os, signal
from pathlib import Path

import pytest
from llama_gen.job import driver as job
from llama_gen.job import output
%s
at, out, held = int(os.environ["HOLD_AT"]), Path(os.environ["HOLD_OUT"]), []
def hold():
    if not held and os.environ.get("RANK", "0") == "0":
        held.append(True)
        os.kill(os.getpid(), signal.SIGSTOP)
write, end = output.Writer.output, job.Results.end
def write_then_hold(self, *args, **kwargs):
    write(self, *args, **kwargs)
    if written_lines(out) >= at:
        hold()
def hold_then_end(self, *args, **kwargs):
    hold()
    return end(self, *args, **kwargs)
output.Writer.output, job.Results.end = write_then_hold, hold_then_end
entry.main()
"""


def launch(args: list[str], nproc: int | None = None, env: dict[str, str] | None = None,
           hold_at: int | None = None, code: str | None = None, **popen) -> subprocess.Popen:
    """`llama-gen args`, alone or under torchrun with `nproc` workers. With `hold_at`, a job
    that holds (stops) at that many lines written, or at its end: for `kill_when`. With
    `code`, `python -c code args` instead of `llama-gen args` (code that ends by calling the
    entry point)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(var, None)
    if hold_at is not None:
        out = Path(args[args.index("--out_path") + 1])
        env |= {"HOLD_AT": str(hold_at), "HOLD_OUT": str(out)}
        code = HOLDING % inspect.getsource(written_lines)
    command = [LLAMA_GEN] if code is None else [sys.executable, "-c", code]
    launcher = command if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        str(nproc), "--no-python", *command]
    proc = subprocess.Popen(launcher + args, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)
    proc.hold_at = hold_at
    return proc


def run(args: list[str], nproc: int | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = launch(args, nproc, env)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def job_args(ckpt: Path, prompts: Path, out: Path) -> list[str]:
    """The three paths every run names."""
    return ["--ckpt_dir", str(ckpt), "--prompt_path", str(prompts), "--out_path", str(out)]


def write_prompts(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


def read_output(path: Path) -> dict[tuple, dict]:
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    by_key = {(r["id"], r["sample"]): r for r in lines}
    assert len(by_key) == len(lines), "a (record, sample) was written twice"
    return by_key


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("llama-gen: error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def descendants(pid: int) -> list[int]:
    """torchrun starts its workers in sessions of their own, so killpg would miss them."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return []
    return [d for c in map(int, children) for d in [c, *descendants(c)]]


def state(pid: int) -> str:
    """A process's state letter (T: stopped), or "" where it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return ""


def pending(pid: int) -> int:
    """The signals pending for a process (a bit per signal, 1 << signum - 1)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0
    return int(re.search(r"^ShdPnd:\s*(\w+)", status, re.M)[1], 16) | \
        int(re.search(r"^SigPnd:\s*(\w+)", status, re.M)[1], 16)


def kill_when(proc: subprocess.Popen, out: Path, min_lines: int, sig: int,
              launcher_only: bool = False) -> tuple[str, str]:
    """Send `sig` to the launcher and all its workers (or to the launcher alone, which passes
    it on) once `out` and its parts hold `min_lines` lines; returns the job's stdout and
    stderr. A job launched with `hold_at=min_lines` cannot finish first (see `when_held`);
    one launched without may have, which its return code says."""
    if (held := when_held(proc, out, min_lines)) is not None:
        signal_held(proc, held, sig, launcher_only)
    return proc.communicate(timeout=120)


def when_held(proc: subprocess.Popen, out: Path, min_lines: int) -> list[int] | None:
    """Wait until the job launched with `hold_at=min_lines` holds (its rank 0 stopped itself
    there, or at its end: an error here if it wrote fewer lines), or, launched without, until
    `out` and its parts hold `min_lines` lines; returns the stopped processes, None if the job
    ended first (only a job launched without can)."""
    assert proc.hold_at in (None, min_lines), "hold where the job is to be signalled"
    deadline = time.monotonic() + 300  # against a hang only: a held job waits for the test
    while not (held := [pid for pid in [*descendants(proc.pid), proc.pid] if state(pid) == "T"]):
        if proc.poll() is not None:
            return None
        if proc.hold_at is None and written_lines(out) >= min_lines:
            return held
        if time.monotonic() > deadline:
            signal_held(proc, [], signal.SIGKILL)
            pytest.fail("the job neither held nor ended")
        time.sleep(0.005)
    if written_lines(out) < min_lines:
        signal_held(proc, [], signal.SIGKILL)  # no stopped process left behind
        pytest.fail(f"the job ended with {written_lines(out)} line(s), fewer than {min_lines}")
    return held


def signal_held(proc: subprocess.Popen, held: list[int], sig: int,
                launcher_only: bool = False) -> None:
    """Send `sig` to the launcher and its workers, or to the launcher alone; then let each
    `held` process go on (SIGCONT) once a signal is pending for it: `sig`, the one the launcher
    passes on, or the kernel's parent-death signal where `sig` killed the launcher."""
    for pid in [proc.pid] if launcher_only else [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 120  # against a hang only
    for pid in held:
        while state(pid) == "T" and not pending(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)  # no stopped process left behind
                pytest.fail(f"no signal reached the held process {pid}")
            time.sleep(0.005)
        if state(pid) == "T":
            os.kill(pid, signal.SIGCONT)
