"""`llama-gen demo`: the whole pipeline on a tiny model, two processes on the CPU, no downloads.

It prints the torchrun command it runs, as a user would type it, and then every line of the
output. Its files live in a temporary folder that it removes at the end, whatever happens,
unless `--out_dir` names a folder to keep them in; there the printed command runs again.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..settings import check_fields, setting
from ..testing.tiny import make_tiny_model

DEMO_PROMPTS = [
    {"id": "greeting", "prompt": "Hello, my name is"},
    {"id": "german", "prompt": "Guten Morgen! Heute ist"},
    {"id": "hindi", "prompt": "नमस्ते, आज"},
    {"id": "japanese", "prompt": "こんにちは、今日は"},
    {"id": "sampled", "prompt": "Once upon a time", "temperature": 1.0, "num_samples": 2},
]


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    out_dir: Path | None = setting(None, help="where to put the checkpoint, prompts and output, "
                                   "and keep them (default: a temporary folder, removed at the "
                                   "end)")
    nproc: int = setting(2, low=1, help="processes to launch with torchrun")

    def __post_init__(self) -> None:
        check_fields(self)


DEMO_SUMMARY = ("Build a tiny Llama 3-style checkpoint and tokenizer, answer a few prompts with "
                "--nproc processes\n(model parallel) on the CPU, and show the output.")


def demo(settings: DemoSettings) -> None:
    """No --overwrite: in a new folder there is nothing to overwrite, and in a kept --out_dir
    the run resumes the output there (at once if it is finished) rather than moving it aside
    into a new folder each time. The same --out_dir with another --nproc is another checkpoint
    (its folder is named by its shards), which llama-gen refuses to mix into the output."""
    with tempfile.TemporaryDirectory(prefix="llama-gen-demo-") as scratch:
        root = settings.out_dir or Path(scratch)
        ckpt = make_tiny_model(root / f"tiny-llama3-mp{settings.nproc}", "llama3",
                               n_shards=settings.nproc)
        prompts = root / "prompts.jsonl"
        prompts.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n"
                                   for p in DEMO_PROMPTS), encoding="utf-8")
        out = root / "out.jsonl"
        command = [*launcher(settings.nproc), "--ckpt_dir", str(ckpt), "--prompt_path",
                   str(prompts), "--out_path", str(out), "--max_gen_len", "24",
                   "--temperature", "0", "--device", "cpu"]
        print("$ " + shlex.join(command), flush=True)
        # torchrun's own logs go to a folder in TMPDIR: the scratch folder, removed with it
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": scratch}
        code = run_to_the_end(command, env)
        if code:
            raise UserError(f"the demo's run failed (exit status {code}); its messages are above")
        show(out)
        if settings.out_dir is None:
            print("(these files are removed now: `llama-gen demo --out_dir DIR` keeps them in "
                  "DIR, where its command runs again)")


def launcher(nproc: int) -> list[str]:
    """torchrun starting `llama-gen` (--no-python), as the README has it, where this shell finds
    this environment's own by those names; else this Python running both as modules, by its
    full path. Either way the command runs as printed."""
    scripts = Path(sys.executable).parent
    flags = ["--standalone", "--nproc_per_node", str(nproc)]
    if all(_found_as(name, scripts) for name in ("torchrun", "llama-gen")):
        return ["torchrun", *flags, "--no-python", "llama-gen"]
    return [sys.executable, "-m", "torch.distributed.run", *flags, "-m", "llama_gen"]


def _found_as(name: str, scripts: Path) -> bool:
    """Whether PATH finds `scripts`' own `name` by that name (not, say, another environment's)."""
    own, found = scripts / name, shutil.which(name)
    return found is not None and own.exists() and os.path.samefile(found, own)


def run_to_the_end(command: list[str], env: dict[str, str]) -> int:
    """Run `command` and return its exit status. It runs in a session of its own, so that Ctrl-C
    reaches torchrun once, from here: on Ctrl-C torchrun gets SIGINT, stops its workers (they
    write what they finished) and ends before the demo removes the folder they write in."""
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise


def show(out: Path) -> None:
    """Every output line, in the prompts' order."""
    order = {p["id"]: i for i, p in enumerate(DEMO_PROMPTS)}
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    records.sort(key=lambda r: (order.get(r["id"], len(order)), r["sample"]))
    print(f"\noutput: {out} ({len(records)} samples of {len(DEMO_PROMPTS)} prompts)")
    for record in records:
        print(f"  {record['id']}#{record['sample']}: {record['prompt']!r} -> "
              f"{record['completion']!r} ({record['finish_reason']})")
    print("(random weights: the words are noise; the pipeline is real)")
