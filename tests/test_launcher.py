"""Workers never outlive their launcher: torchrun killed with SIGKILL at any moment."""

from __future__ import annotations

import time

import pytest

from test_cli import descendants, launch, read_output, run, write_prompts


@pytest.mark.parametrize("replicas", [1, 2])
def test_workers_stop_cleanly_when_torchrun_is_killed(tiny_checkpoints, tmp_path, replicas):
    """kill -9 of torchrun alone (the OOM killer's way): its workers, in sessions of their own,
    notice within a second or so and stop as on SIGTERM, so the same command can resume. Two
    replicas lose the store their results travel through: a one-line error instead."""
    records = [{"prompt": f"Prompt {i}"} for i in range(80)]
    prompts = write_prompts(tmp_path / "p.jsonl", records)
    out = tmp_path / "o.jsonl"
    args = ["--ckpt_dir", str(tiny_checkpoints[("llama3", 2)]), "--prompt_path", str(prompts),
            "--out_path", str(out), "--max_gen_len", "40", "--max_batch_size", "2",
            "--model_parallel_size", str(2 // replicas)]
    proc = launch(args, nproc=2)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_bytes().count(b"\n") >= 3) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert descendants(proc.pid), "no workers to orphan"
    proc.kill()
    _, err = proc.communicate(timeout=60)  # the workers hold torchrun's pipes until they exit
    assert "Traceback" not in err
    assert "stopped by SIGTERM" in err or (replicas > 1 and "torchrun's store" in err), err
    assert out.read_bytes().endswith(b"\n")
    assert len(read_output(out)) < 80
    assert run(args, nproc=2).returncode == 0
    assert len(read_output(out)) == 80
