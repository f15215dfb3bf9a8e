"""A checkpoint folder, its format told from what it holds (`is_hf_folder`): Meta's (params.json
and consolidated.NN.pth shards) or Hugging Face's (config.json and safetensors or
pytorch_model.bin files). Loading asks here; the resume fingerprint and the plan, which read
only file sizes, ask `is_hf_folder` themselves."""
from __future__ import annotations

from pathlib import Path

from . import checkpoint, hf_checkpoint
from .args import ModelArgs
from .checkpoint import Checkpoint, find_shards
from .hf_checkpoint import HFCheckpoint, is_hf_folder
from .hf_config import read_config


def config_path(ckpt_dir: Path) -> Path:
    """The model's config file: a Hugging Face folder's config.json, else Meta's params.json
    (whose absence is the error a folder of neither gets)."""
    return ckpt_dir / ("config.json" if is_hf_folder(ckpt_dir) else "params.json")


def read_model_config(ckpt_dir: Path) -> ModelArgs:
    path = config_path(ckpt_dir)
    return read_config(path) if path.name == "config.json" else ModelArgs.from_file(path)


def shard_count(ckpt_dir: Path) -> int:
    """Meta's shards, one per model-parallel rank of the release; a Hugging Face folder's
    files, cut by size and not by rank, count as one."""
    return 1 if is_hf_folder(ckpt_dir) else len(find_shards(ckpt_dir))


def vocabulary_rows(ckpt_dir: Path) -> int | None:
    """The rows of the checkpoint's output head, read without its weights."""
    return (hf_checkpoint if is_hf_folder(ckpt_dir) else checkpoint).vocabulary_rows(ckpt_dir)


def open_checkpoint(ckpt_dir: Path, args: ModelArgs, vocab_parallel_if_unsplit: bool
                 ) -> Checkpoint | HFCheckpoint:
    """The folder's weights, checked against `args`: both kinds give this rank's slices one
    weight at a time (`slices`) and split the embedding as `embedding_split_dim` says."""
    kind = HFCheckpoint if is_hf_folder(ckpt_dir) else Checkpoint
    return kind.open(ckpt_dir, args, vocab_parallel_if_unsplit)
