"""`llama-gen demo`: it shows every sample, removes its temporary folders, and the command it
prints runs as printed. Each demo launches torchrun with two workers: three launches in all."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from llama_gen.cli.demo import DEMO_PROMPTS

SAMPLES = {(p["id"], s) for p in DEMO_PROMPTS for s in range(p.get("num_samples", 1))}


def demo(tmp: Path, *flags: str) -> subprocess.CompletedProcess:
    """`python -m llama_gen demo` with TMPDIR in `tmp`, so that what it leaves there shows."""
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "llama_gen", "demo", *flags], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def shown(stdout: str) -> set[tuple[str, int]]:
    """The (id, sample)s of the output lines the demo printed."""
    return {(m[1], int(m[2])) for m in re.finditer(r"^  (\w+)#(\d+): ", stdout, re.MULTILINE)}


def printed_command(stdout: str) -> str:
    [line] = [line for line in stdout.splitlines() if line.startswith("$ ")]
    return line[2:]


def outputs(path: Path) -> dict[tuple[str, int], str]:
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return {(r["id"], r["sample"]): r["completion"] for r in lines}


def test_demo_shows_every_sample_and_leaves_no_temporary_folder(tmp_path):
    result = demo(tmp_path)
    assert shown(result.stdout) == SAMPLES and len(SAMPLES) == 6
    assert "--overwrite" not in shlex.split(printed_command(result.stdout))
    assert list(tmp_path.iterdir()) == []  # its own folder and torchrun's logs
    assert "--out_dir DIR" in result.stdout  # how to keep them


def test_the_printed_command_runs_as_printed_and_makes_the_same_output(tmp_path):
    """With --out_dir the files stay; with the output removed, the command, pasted into a
    shell as printed, makes the demo's output again."""
    (tmp_path / "tmp").mkdir()
    result = demo(tmp_path / "tmp", "--out_dir", str(tmp_path / "kept"))
    out = tmp_path / "kept" / "out.jsonl"
    made = outputs(out)
    assert shown(result.stdout) == set(made) == SAMPLES
    assert list((tmp_path / "tmp").iterdir()) == []
    command = printed_command(result.stdout)
    assert shlex.split(command)[0] in ("torchrun", sys.executable)
    for path in out.parent.glob("out.jsonl*"):
        path.unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")}
    rerun = subprocess.run(command, shell=True, env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert outputs(out) == made  # greedy or seeded, the same split: exactly the same
