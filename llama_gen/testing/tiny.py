"""Tiny real checkpoints in Meta's layout, for tests and `llama-gen demo` (no downloads)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..model.args import ModelArgs
from ..model.checkpoint import EMBEDDING_KEY, full_shapes, split_dim

# Llama 2 style (embedding split on dim 1) and Llama 3.1 style (vocabulary split, GQA, scaled RoPE).
TINY_LLAMA2 = {"dim": 64, "multiple_of": 32, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-5,
               "vocab_size": -1}
TINY_LLAMA3 = {"dim": 64, "ffn_dim_multiplier": 1.3, "multiple_of": 32, "n_heads": 4,
               "n_kv_heads": 2, "n_layers": 2, "norm_eps": 1e-5, "rope_theta": 500000.0,
               "use_scaled_rope": True, "vocab_size": -1}


def random_weights(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full (unsplit) float32 weights, scaled so activations stay O(1) and logits are peaked."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape in full_shapes(args).items():
        if len(shape) == 1:  # norms: near one
            weights[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif key == EMBEDDING_KEY:
            weights[key] = torch.randn(shape, generator=gen)
        else:
            weights[key] = torch.randn(shape, generator=gen) / shape[1] ** 0.5
    return weights


def write_checkpoint(ckpt_dir: Path, params: dict[str, Any], weights: dict[str, torch.Tensor],
                     n_shards: int = 1, vocab_parallel_embedding: bool = False,
                     dtype: torch.dtype = torch.bfloat16, rope_freqs: bool = False) -> None:
    """Write params.json and consolidated.NN.pth shards as Meta's release does."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "params.json").write_text(json.dumps(params))
    embedding_dim = 0 if vocab_parallel_embedding else 1
    for i in range(n_shards):
        shard = {}
        for key, tensor in weights.items():
            dim = split_dim(key, embedding_dim)
            part = tensor if dim is None else tensor.chunk(n_shards, dim=dim)[i]
            shard[key] = part.to(dtype).clone()
        if rope_freqs:
            shard["rope.freqs"] = torch.ones(ModelArgs.from_params(params).head_dim // 2)
        torch.save(shard, ckpt_dir / f"consolidated.{i:02d}.pth")


def make_tiny_model(out_dir: Path, family: str = "llama2", n_shards: int = 1,
                    dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A complete tiny checkpoint directory: tokenizer.model, params.json and shards.

    family "llama2": SentencePiece, multi-head attention, embedding split on dim 1, `rope.freqs`
    in every shard, vocab_size -1. "llama3": tiktoken, grouped-query attention, Llama 3.1 scaled
    RoPE, vocabulary-split embedding, explicit vocab_size.
    """
    from ..text.tokenizer import load_tokenizer
    from .tiny_tokenizers import build_sentencepiece_model, build_tiktoken_model

    if family not in ("llama2", "llama3"):
        raise ValueError(f"unknown family {family!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = out_dir / "tokenizer.model"
    if family == "llama2":
        build_sentencepiece_model(tokenizer_path)
    else:
        build_tiktoken_model(tokenizer_path)
    vocab = load_tokenizer(tokenizer_path).n_words
    params = dict(TINY_LLAMA2) if family == "llama2" else {**TINY_LLAMA3, "vocab_size": vocab}
    args = ModelArgs.from_params({**params, "vocab_size": vocab})
    write_checkpoint(out_dir, params, random_weights(args, seed), n_shards,
                     vocab_parallel_embedding=family == "llama3", dtype=dtype,
                     rope_freqs=family == "llama2")
    return out_dir
