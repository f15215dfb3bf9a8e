"""Loading benchmark: how long each process takes to load a checkpoint, and its peak memory.

    python scripts/bench_load.py write /tmp/ckpt-1b --dim 2048 --n_layers 16 --n_shards 2
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 scripts/bench_load.py load /tmp/ckpt-1b

`write` makes a random-weight checkpoint in Meta's layout (bf16 shards, a tiny SentencePiece
tokenizer, so the vocabulary is small). `load` loads it as llama-gen does, once per process, and
each process prints its time and its peak resident memory (the process's own, memory-mapped
checkpoint pages included; the Python and torch start-up before loading is printed apart).
"""
from __future__ import annotations

import resource
import time
from pathlib import Path

import fire
import torch

from llama_gen.job.build import DTYPES, load_model
from llama_gen.model.args import ModelArgs
from llama_gen.runtime import distributed
from llama_gen.testing.tiny import random_weights, write_checkpoint
from llama_gen.testing.tiny_tokenizers import build_sentencepiece_model
from llama_gen.text.tokenizer import load_tokenizer


def write(out_dir: str, dim: int = 2048, n_layers: int = 16, n_heads: int = 16,
          n_shards: int = 2) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_sentencepiece_model(out / "tokenizer.model")
    params = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "multiple_of": 256,
              "norm_eps": 1e-5, "vocab_size": -1}
    vocab = load_tokenizer(out / "tokenizer.model").n_words
    args = ModelArgs.from_params({**params, "vocab_size": vocab})
    weights = random_weights(args)
    write_checkpoint(out, params, weights, n_shards)
    n_params = sum(w.numel() for w in weights.values())
    print(f"wrote {out}: {n_params / 1e9:.2f}B parameters in {n_shards} shard(s)")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def load(ckpt_dir: str, dtype: str = "fp32", device: str | None = None) -> None:
    dist = distributed.init_distributed(None, device)
    ckpt = Path(ckpt_dir)
    before = peak_rss_gib()
    start = time.perf_counter()
    model = load_model(ckpt, load_tokenizer(ckpt / "tokenizer.model"), dist, DTYPES[dtype])
    seconds = time.perf_counter() - start
    n_params = sum(p.numel() for p in model.parameters())
    print(f"rank {dist.rank}: loaded its {n_params / 1e9:.2f}B parameters ({dtype}) in {seconds:.1f} s;"
          f" peak resident memory {peak_rss_gib():.2f} GiB ({before:.2f} GiB before loading)")
    distributed.shutdown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    fire.Fire({"write": write, "load": load})
