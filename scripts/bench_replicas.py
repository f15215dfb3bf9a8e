"""Replica benchmark: rank 0's time on the other replicas' results, old design against new.

    python scripts/bench_replicas.py [--replicas 1,2,4] [--prompts 256] [--repeats 1]
                                     [--old_commit 06a8c9a]

Runs the tiny model under `torchrun --standalone --nproc_per_node N` on the CPU for each N, once
with this checkout (claims and part files: rank 0 logs its time on the others) and once with the
old design (a git worktree of `--old_commit`, where rank 0 polls every replica's mailbox after
each of its own completions and writes every line). The old tree is not edited: a
sitecustomize.py on PYTHONPATH wraps rank 0's `Mailbox.receive` and `Results.deliver` (the
deliveries of messages `receive` returned) with timers and prints their totals at exit.

Prints the exact commands and a markdown table. OMP_NUM_THREADS=1: one core per replica, so
more replicas than cores oversubscribe the machine and their wall times are not a scaling curve.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import fire

from llama_gen.testing.tiny import make_tiny_model

REPO = Path(__file__).resolve().parent.parent
HOOK_TAG = "bench_replicas hook:"
# Rank 0 of the old design only: wraps the mailbox and the writer's deliveries, prints at exit.
HOOK = '''
import atexit, json, os, sys, time
if os.environ.get("RANK") == "0" and os.environ.get("BENCH_REPLICAS_HOOK"):
    import llama_gen
    from llama_gen.job import driver as job
    from llama_gen.job import replicas
    totals = {"receive_s": 0.0, "receive_calls": 0, "received": 0, "receive_s_final_wait": 0.0,
              "deliver_s": 0.0, "delivered": 0, "package": llama_gen.__file__}
    theirs = set()  # ids of received messages not yet delivered
    finishing = [False]
    receive, deliver, finish = replicas.Mailbox.receive, job.Results.deliver, job.Results.finish

    def timed_receive(self):
        start = time.perf_counter()
        messages = receive(self)
        seconds = time.perf_counter() - start
        totals["receive_s"] += seconds
        totals["receive_s_final_wait"] += seconds if finishing[0] else 0.0
        totals["receive_calls"] += 1
        totals["received"] += len(messages)
        theirs.update(map(id, messages))
        return messages

    def timed_deliver(self, message):
        if id(message) not in theirs:
            return deliver(self, message)
        theirs.discard(id(message))
        start = time.perf_counter()
        try:
            return deliver(self, message)
        finally:
            totals["deliver_s"] += time.perf_counter() - start
            totals["delivered"] += 1

    def flagged_finish(self, *args, **kwargs):
        finishing[0] = True
        return finish(self, *args, **kwargs)

    replicas.Mailbox.receive = timed_receive
    job.Results.deliver = timed_deliver
    job.Results.finish = flagged_finish
    atexit.register(lambda: print("''' + HOOK_TAG + ''' " + json.dumps(totals), file=sys.stderr,
                                  flush=True))
'''
NEW_LINE = re.compile(r"rank 0's time on the other replicas: ([\d.]+) s reading their progress "
                      r".*?, ([\d.]+) s merging (\d+) line")
SUMMARY = re.compile(r"(\d+) sample\(s\) written, .*?(\d+) tokens generated in ([\d.]+)s "
                     r"\(([\d.]+) tok/s\)")


@dataclass(frozen=True)
class Run:
    design: str
    replicas: int
    command: str
    wall_s: float
    samples: int
    tokens: int
    job_s: float
    tok_s: float
    others_s: float  # rank 0's time on the other replicas' results
    on_others: str  # the same, in parts


def write_inputs(folder: Path, prompts: int) -> tuple[Path, Path]:
    """A tiny float32 llama2 checkpoint and `prompts` prompts of a few lengths."""
    ckpt = make_tiny_model(folder / "ckpt", "llama2")
    prompt_path = folder / "prompts.jsonl"
    prompt_path.write_text("".join(json.dumps({"prompt": f"Prompt {i}: " + "la " * (i % 7)}) + "\n"
                                   for i in range(prompts)), encoding="utf-8")
    return ckpt, prompt_path


def command(n: int, ckpt: Path, prompts: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(n), "--no-python", "llama-gen", "--ckpt_dir", str(ckpt), "--prompt_path",
            str(prompts), "--out_path", str(out), "--num_samples", "2", "--max_gen_len", "32",
            "--max_seq_len", "128", "--ignore_eos", "--seed", "1", "--device", "cpu"]


def old_design_time(stderr: str, n: int, tree: Path) -> tuple[float, str]:
    """Rank 0's receive and delivery totals from the hook; checks that it ran the old tree and
    that the wrappers were called."""
    [found] = [json.loads(line.split(HOOK_TAG, 1)[1]) for line in stderr.splitlines()
               if HOOK_TAG in line]
    assert found["package"].startswith(str(tree)), found["package"]
    if n == 1:
        assert found["receive_calls"] == 0, found
        return 0.0, "one replica: no mailbox"
    assert found["receive_calls"] > 0 and found["delivered"] == found["received"], found
    polls, seconds = found["receive_calls"], found["receive_s"]
    return seconds + found["deliver_s"], (
        f"{seconds:.3f} s in {polls} mailbox polls ({1000 * seconds / polls:.1f} ms each; "
        f"{seconds - found['receive_s_final_wait']:.3f} s of it while its own replica decoded), "
        f"{found['deliver_s']:.3f} s writing {found['delivered']} line(s) of the others")


def new_design_time(stderr: str, n: int, tree: None) -> tuple[float, str]:
    found = NEW_LINE.search(stderr)
    if n == 1:
        assert found is None
        return 0.0, "one replica writes --out_path itself"
    progress, merge, lines = float(found[1]), float(found[2]), int(found[3])
    return progress + merge, (f"{progress:.3f} s reading progress counters, {merge:.3f} s "
                              f"merging {lines} line(s) at the end")


def run_one(design: str, n: int, ckpt: Path, prompts: Path, folder: Path, env: dict,
            tree: Path | None) -> Run:
    folder.mkdir(exist_ok=True)
    args = command(n, ckpt, prompts, folder / f"{design}-{n}.jsonl")
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{design} design, {n} replica(s) failed:\n{done.stderr[-3000:]}")
    summary = SUMMARY.search(done.stderr)
    measure = old_design_time if design == "old" else new_design_time
    others_s, on_others = measure(done.stderr, n, tree)
    shown_env = " ".join(f"{k}={env[k]}" for k in ("OMP_NUM_THREADS", "PYTHONPATH",
                                                      "BENCH_REPLICAS_HOOK") if k in env)
    return Run(design, n, f"{shown_env} {' '.join(args)}", wall, int(summary[1]),
               int(summary[2]), float(summary[3]), float(summary[4]), others_s, on_others)


def old_tree(commit: str) -> Path:
    """A detached worktree of the old design (made once, reused)."""
    tree = Path(f"/tmp/wt_replicas_old_{commit}")
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree),
                        commit], check=True, capture_output=True)
    return tree


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.others_s)[len(runs) // 2]


def table(groups: dict[tuple[str, int], list[Run]]) -> str:
    """One row per design and replica count: the repeat with the median time on the others
    (its wall, job and tok/s columns are that repeat's), and every repeat's total."""
    rows = ["| design | replicas | wall s (whole command) | job s | samples | tok/s | rank 0 on "
            "the others' results, s (each repeat) | of which (median repeat) |",
            "|---|---|---|---|---|---|---|---|"]
    for (design, n), runs in groups.items():
        r = median_run(runs)
        each = ", ".join(f"{run.others_s:.3f}" for run in runs)
        rows.append(f"| {design} | {n} | {r.wall_s:.1f} | {r.job_s:.1f} | {r.samples} "
                    f"| {r.tok_s:.0f} | **{r.others_s:.3f}** ({each}) | {r.on_others} |")
    return "\n".join(rows)


def main(replicas: int | str | tuple = "1,2,4", prompts: int = 256, repeats: int = 1,
         old_commit: str = "06a8c9a") -> None:
    counts = [int(n) for n in str(replicas).strip("()[]").split(",") if n.strip()]
    folder = Path(tempfile.mkdtemp(prefix="bench_replicas_"))
    ckpt, prompt_path = write_inputs(folder, prompts)
    hook_dir = folder / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(HOOK, encoding="utf-8")
    base = {**os.environ, "OMP_NUM_THREADS": "1"}
    tree = old_tree(old_commit)
    old_env = {**base, "PYTHONPATH": f"{tree}:{hook_dir}", "BENCH_REPLICAS_HOOK": "1"}
    load_before, new_commit = os.getloadavg()[0], current_commit()  # main may move meanwhile
    groups: dict[tuple[str, int], list[Run]] = {}
    for i, n in ((i, n) for i in range(repeats) for n in counts):
        for design, env, code in (("old", old_env, tree), ("new", base, None)):
            run = run_one(design, n, ckpt, prompt_path, folder / f"{i}", env, code)
            groups.setdefault((design, n), []).append(run)
            print(f"done: {design} design, {n} replica(s), {run.wall_s:.1f} s", flush=True)
    print(f"\nold design: {old_commit}; new design: {new_commit} (at the start); {prompts} "
          f"prompts x 2 samples x 32 tokens; {os.cpu_count()} CPU core(s), so more replicas "
          f"than that oversubscribe them; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after\n\ncommands (first repeat):")
    print("\n".join(f"    {runs[0].command}" for runs in groups.values()))
    print("\n" + table(groups))


def current_commit() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    fire.Fire(main)
