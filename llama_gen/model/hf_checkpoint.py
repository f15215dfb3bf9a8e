"""A Hugging Face Llama folder's weights, read as Meta's: find the weight files, check them
against config.json, and cut out this rank's slice of each weight under Meta's key names.

The files are `model.safetensors`, or the shards `model.safetensors.index.json` lists; older
folders hold `pytorch_model.bin` (or the shards `pytorch_model.bin.index.json` lists). A rank
reads only its own rows or columns: safetensors through `get_slice`, .bin files memory-mapped.
Hugging Face's converter permuted the query and key rows of each head from Meta's interleaved
RoPE pairs to two halves; heads stay contiguous, so a rank takes its heads and undoes the
permutation on them alone.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .args import ModelArgs, read_json
from .checkpoint import EMBEDDING_KEY, full_shapes, load_shard, split_dim, state_dict_from

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS_INDEX, SAFETENSORS, BIN_INDEX, BIN)  # first found wins
GENERATION_CONFIG = "generation_config.json"
IGNORED_SUFFIX = "rotary_emb.inv_freq"  # a buffer old conversions carry; recomputed
HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"
NAMES = {EMBEDDING: EMBEDDING_KEY, "model.norm.weight": "norm.weight", HEAD: "output.weight"}
LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
PERMUTED = ("attention.wq.weight", "attention.wk.weight")


def is_hf_folder(ckpt_dir: Path) -> bool:
    """Whether the folder is Hugging Face's (config.json) rather than Meta's (params.json)."""
    return not (ckpt_dir / "params.json").is_file() and (ckpt_dir / "config.json").is_file()


def meta_key(name: str) -> str | None:
    """Meta's key for a Hugging Face tensor name, or None for a name a Llama does not have."""
    if name in NAMES:
        return NAMES[name]
    match = LAYER_NAME.fullmatch(name)
    if match and match[2] in LAYER_NAMES:
        return f"layers.{int(match[1])}.{LAYER_NAMES[match[2]]}"
    return None


def weight_paths(ckpt_dir: Path) -> list[Path]:
    """The folder's weight files, in name order (those its index lists, all present), from
    the index alone."""
    found = weights_entry(ckpt_dir)
    if not found.name.endswith(".index.json"):
        return [found]
    return sorted(set(indexed_files(ckpt_dir, found).values()))


def weights_entry(ckpt_dir: Path) -> Path:
    """Where the folder's weights begin: an index, else the one weight file."""
    found = next((ckpt_dir / name for name in WEIGHT_FILES if (ckpt_dir / name).is_file()), None)
    if found is None:
        raise UserError(f"{ckpt_dir}: no {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or "
                        f"{BIN_INDEX}: a Hugging Face Llama folder holds its weights in one of "
                        "them; copy them from the download into this folder")
    return found


def tensor_files(ckpt_dir: Path) -> dict[str, Path]:
    """Each tensor's file: from the index where the folder has one, else the single file's own
    names."""
    found = weights_entry(ckpt_dir)
    if found.name.endswith(".index.json"):
        return indexed_files(ckpt_dir, found)
    with open_weights(found) as weights:
        return {name: found for name in weights.names()}


def indexed_files(ckpt_dir: Path, index_path: Path) -> dict[str, Path]:
    """The index's tensor names and their files, every file present."""
    index = read_json(index_path, "")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index_path}: no \"weight_map\" of tensor names to file names: the "
                        "index is damaged; download it again")
    files = {name: ckpt_dir / file for name, file in weight_map.items()}
    if missing := sorted({p.name for p in files.values() if not p.is_file()}):
        raise UserError(f"{ckpt_dir}: {', '.join(missing)}, listed in {index_path.name}, "
                        f"{'is' if len(missing) == 1 else 'are'} missing: copy "
                        f"{'it' if len(missing) == 1 else 'them'} from the download into this "
                        "folder")
    return files


class _Weights:
    """One weight file's tensors: names, shapes, and parts read without the rest."""

    def __init__(self, path: Path, handle: Any):
        self.path, self.handle = path, handle

    def names(self) -> list[str]:
        return list(self.handle.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        if isinstance(self.handle, dict):
            return tuple(self.handle[name].shape)
        return tuple(self.handle.get_slice(name).get_shape())

    def read(self, name: str, dim: int | None, start: int = 0, end: int = 0) -> torch.Tensor:
        """The tensor, or its [start, end) along `dim`, on the CPU in the file's dtype."""
        if isinstance(self.handle, dict):
            whole = self.handle[name]
            return whole if dim is None else whole.narrow(dim, start, end - start)
        part = self.handle.get_slice(name)
        if dim is None:
            return part[:]
        return part[start:end] if dim == 0 else part[:, start:end]


@contextmanager
def open_weights(path: Path) -> Iterator[_Weights]:
    """A .safetensors file through `safe_open` (memory-mapped; only the parts read are
    copied), a .bin file through `torch.load(mmap=True, weights_only=True)`."""
    if path.suffix != ".safetensors":
        yield _Weights(path, load_shard(path, "a Hugging Face pytorch_model.bin"))
        return
    try:
        from safetensors import safe_open  # a Hugging Face folder's need only
    except ImportError:
        raise UserError(f"{path}: reading .safetensors files needs the safetensors package: "
                        "pip install safetensors") from None
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as e:  # truncated, not safetensors at all...
        raise UserError(f"{path}: cannot be read as a safetensors file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); download it again") from None
    with handle:
        yield _Weights(path, handle)


def unpermute(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Query or key rows of whole heads from Hugging Face's halves (x[i], x[i + hd/2]) back to
    Meta's interleaved pairs (x[2i], x[2i+1])."""
    n, dim = w.shape[0] // head_dim, w.shape[1]
    return w.reshape(n, 2, head_dim // 2, dim).transpose(1, 2).reshape(n * head_dim, dim)


def rank_range(full: int, mp_rank: int, mp_size: int) -> tuple[int, int]:
    return mp_rank * full // mp_size, (mp_rank + 1) * full // mp_size


def hf_names(args: ModelArgs) -> dict[str, str]:
    """Every tensor name a folder of this model holds (the head: where untied), with its Meta
    key."""
    names = {EMBEDDING: EMBEDDING_KEY, "model.norm.weight": "norm.weight"}
    if not args.tie_word_embeddings:
        names[HEAD] = "output.weight"
    for i in range(args.n_layers):
        names |= {f"model.layers.{i}.{hf}": f"layers.{i}.{meta}"
                  for hf, meta in LAYER_NAMES.items()}
    return names


def _listing(names: list[str], most: int = 4) -> str:
    return ", ".join(names[:most]) + (" ..." if len(names) > most else "")


def read_plan(ckpt_dir: Path, names: set[str], args: ModelArgs) -> dict[str, list[str]]:
    """The Meta keys each tensor name gives (the embedding gives the tied head too), checked:
    every weight of config.json's model present, no other."""
    wanted = hf_names(args)
    if not args.tie_word_embeddings and HEAD not in names and EMBEDDING in names:
        raise UserError(f"{ckpt_dir}: no {HEAD} in the weight files, and config.json's "
                        "tie_word_embeddings is false: the output head is missing; if this model's "
                        "head is its embedding, config.json should say \"tie_word_embeddings\": "
                        "true")
    ignored = {n for n in names if n.endswith(IGNORED_SUFFIX)}
    ignored |= {HEAD} if args.tie_word_embeddings else set()
    missing = sorted(set(wanted) - names)
    unexpected = sorted(names - set(wanted) - ignored)
    if missing or unexpected:
        detail = "; ".join(part for part in (
            f"missing {_listing(missing)}" if missing else "",
            f"unexpected {_listing(unexpected)}" if unexpected else "") if part)
        raise UserError(f"{ckpt_dir}: the weight files do not match config.json ({detail}); "
                        "does config.json belong to these weights?")
    plan = {name: [key] for name, key in wanted.items()}
    if args.tie_word_embeddings:
        plan[EMBEDDING].append("output.weight")
    return plan


@dataclass(frozen=True)
class HFCheckpoint:
    """A Hugging Face folder's weights, checked against config.json; each rank reads its slices
    file by file."""

    files: dict[Path, list[tuple[str, str]]]  # weight file -> its (tensor name, Meta key)s
    head_dim: int
    embedding_split_dim: int

    @classmethod
    def open(cls, ckpt_dir: Path, args: ModelArgs, vocab_parallel_if_unsplit: bool
             ) -> HFCheckpoint:
        """The folder's weights, checked; the embedding split as Meta's single shard is (on the
        vocabulary for tiktoken tokenizers, else on dim)."""
        located = tensor_files(ckpt_dir)
        plan = read_plan(ckpt_dir, set(located), args)
        files: dict[Path, list[tuple[str, str]]] = {}
        for name, keys in plan.items():
            files.setdefault(located[name], []).extend((name, key) for key in keys)
        files = dict(sorted(files.items()))
        shapes = full_shapes(args)
        for path, entries in files.items():
            with open_weights(path) as weights:
                _check_shapes(weights, entries, shapes)
        return cls(files, args.head_dim, 0 if vocab_parallel_if_unsplit else 1)

    def slices(self, mp_rank: int, mp_size: int) -> Iterator[tuple[str, torch.Tensor]]:
        """(Meta key, this rank's slice) for every weight, file by file: CPU tensors in the
        file's dtype, one at a time, so that a caller may convert (or quantize) each before the
        next is read."""
        for path, entries in self.files.items():
            with open_weights(path) as weights:
                for name, key in entries:
                    yield key, self._slice(weights, name, key, mp_rank, mp_size)

    def _slice(self, weights: _Weights, name: str, key: str, mp_rank: int, mp_size: int
               ) -> torch.Tensor:
        dim = split_dim(key, self.embedding_split_dim)
        if dim is None:
            return weights.read(name, None)
        start, end = rank_range(weights.shape(name)[dim], mp_rank, mp_size)
        part = weights.read(name, dim, start, end)
        return unpermute(part, self.head_dim) if key.endswith(PERMUTED) else part

    def state_dict_for(self, mp_rank: int, mp_size: int, device: torch.device,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """This rank's slice of every weight, on `device` in `dtype`."""
        return state_dict_from(self.slices(mp_rank, mp_size), device, dtype)


def _check_shapes(weights: _Weights, entries: list[tuple[str, str]],
                  shapes: dict[str, tuple[int, ...]]) -> None:
    held = set(weights.names())
    for name, key in entries:
        if name not in held:
            raise UserError(f"{weights.path}: holds no {name}, which the folder's index places "
                            "in it: the file does not belong to this index; download it again")
        if (got := weights.shape(name)) != shapes[key]:
            raise UserError(f"{weights.path}: {name} has shape {got}, expected {shapes[key]} for "
                            "the model config.json describes; does config.json belong to these "
                            "weights?")


def vocabulary_rows(ckpt_dir: Path) -> int | None:
    """The rows of the folder's output head (its embedding's where it has no head), read from
    the file's header; None where it has neither."""
    located = tensor_files(ckpt_dir)
    name = HEAD if HEAD in located else EMBEDDING if EMBEDDING in located else None
    if name is None:
        return None
    with open_weights(located[name]) as weights:
        shape = weights.shape(name)
    return shape[0] if len(shape) == 2 else None


def generation_eos_ids(ckpt_dir: Path, vocab_size: int) -> frozenset[int]:
    """generation_config.json's eos_token_id (one id or a list: Llama 3 instruct models end a
    turn with several), where the folder has one; ids outside the vocabulary are refused."""
    path = ckpt_dir / GENERATION_CONFIG
    if not path.is_file():
        return frozenset()
    config = read_json(path, "")
    eos = config.get("eos_token_id") if isinstance(config, dict) else None
    ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise UserError(f"{path}: eos_token_id {json.dumps(eos)} is neither a token id nor a "
                        "list of them")
    if outside := [i for i in ids if not 0 <= i < vocab_size]:
        raise UserError(f"{path}: eos_token_id {', '.join(map(str, outside))} is not among "
                        f"the tokenizer's {vocab_size} tokens; does generation_config.json "
                        "belong to this model, and the tokenizer (--tokenizer_path) to it?")
    return frozenset(ids)
