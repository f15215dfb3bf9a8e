"""`llama-gen demo`: the whole pipeline on a tiny model, two processes on the CPU, no downloads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .settings import check_fields, setting
from .tiny import make_tiny_model

DEMO_PROMPTS = [
    {"id": "greeting", "prompt": "Hello, my name is"},
    {"id": "german", "prompt": "Guten Morgen! Heute ist"},
    {"id": "hindi", "prompt": "नमस्ते, आज"},
    {"id": "japanese", "prompt": "こんにちは、今日は"},
    {"id": "sampled", "prompt": "Once upon a time", "temperature": 1.0, "num_samples": 2},
]


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    out_dir: Path | None = setting(None, help="where to put the checkpoint, prompts and output "
                                   "(default: a new temporary folder)")
    nproc: int = setting(2, low=1, help="processes to launch with torchrun")

    def __post_init__(self) -> None:
        check_fields(self)


DEMO_SUMMARY = ("Build a tiny Llama 3-style checkpoint and tokenizer, answer a few prompts with "
                "--nproc processes\n(model parallel) on the CPU, and show the output.")


def demo(settings: DemoSettings) -> None:
    nproc = settings.nproc
    root = settings.out_dir or Path(tempfile.mkdtemp(prefix="llama-gen-demo-"))
    ckpt = make_tiny_model(root / "tiny-llama3", "llama3", n_shards=nproc)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in DEMO_PROMPTS),
                       encoding="utf-8")
    out = root / "out.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(nproc), "-m", "llama_gen", "--ckpt_dir", str(ckpt),
               "--prompt_path", str(prompts), "--out_path", str(out), "--max_gen_len", "24",
               "--temperature", "0", "--device", "cpu", "--overwrite"]
    print("$ " + " ".join(command[2:]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, env=env, check=True)
    print(f"\noutput: {out}")
    for line in out.read_text(encoding="utf-8").splitlines()[:4]:
        record = json.loads(line)
        print(f"  {record['id']}#{record['sample']}: {record['prompt']!r} -> "
              f"{record['completion']!r} ({record['finish_reason']})")
    print("(random weights: the words are noise; the pipeline is real)")
