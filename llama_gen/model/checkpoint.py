"""Meta's checkpoint layout: find the shards, check them, and cut out this rank's weights.

A checkpoint is `params.json` plus `consolidated.00.pth ... consolidated.{n-1}.pth`, shard i
holding model-parallel rank i's slice of every split weight. This module reshards at load time,
so a checkpoint of n shards runs at any model-parallel size whose slices fall on whole heads.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .args import ModelArgs

SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")
IGNORED_KEYS = frozenset({"rope.freqs"})  # a buffer Llama 1/2 shards carry; we recompute it

# Which dimension each weight is split on across shards (None: replicated in every shard).
# The token embedding is the exception: Llama 1/2 split it on dim 1, Llama 3 on dim 0 (vocab).
SPLIT_DIM_BY_SUFFIX = {
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
    "norm.weight": None,
    "output.weight": 0,
}
EMBEDDING_KEY = "tok_embeddings.weight"


def full_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every weight's unsplit shape, in Meta's key names."""
    hd, hidden = args.head_dim, args.ffn_hidden_dim
    shapes: dict[str, tuple[int, ...]] = {
        EMBEDDING_KEY: (args.vocab_size, args.dim),
        "norm.weight": (args.dim,),
        "output.weight": (args.vocab_size, args.dim),
    }
    for i in range(args.n_layers):
        shapes |= {
            f"layers.{i}.attention.wq.weight": (args.n_heads * hd, args.dim),
            f"layers.{i}.attention.wk.weight": (args.kv_heads * hd, args.dim),
            f"layers.{i}.attention.wv.weight": (args.kv_heads * hd, args.dim),
            f"layers.{i}.attention.wo.weight": (args.dim, args.n_heads * hd),
            f"layers.{i}.feed_forward.w1.weight": (hidden, args.dim),
            f"layers.{i}.feed_forward.w3.weight": (hidden, args.dim),
            f"layers.{i}.feed_forward.w2.weight": (args.dim, hidden),
            f"layers.{i}.attention_norm.weight": (args.dim,),
            f"layers.{i}.ffn_norm.weight": (args.dim,),
        }
    return shapes


def split_dim(key: str, embedding_dim: int) -> int | None:
    if key == EMBEDDING_KEY:
        return embedding_dim
    for suffix, dim in SPLIT_DIM_BY_SUFFIX.items():
        if key == suffix or key.endswith("." + suffix):
            return dim
    raise KeyError(key)


def find_shards(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        raise UserError(f"{ckpt_dir}: checkpoint directory not found")
    found = {int(m.group(1)): p for p in ckpt_dir.iterdir() if (m := SHARD_NAME.fullmatch(p.name))}
    if not found:
        raise UserError(f"{ckpt_dir}: no consolidated.NN.pth shards; is this a Meta-format "
                        "checkpoint directory?")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise UserError(f"{ckpt_dir}: shard(s) {_shard_names(missing)} missing; a checkpoint of "
                        f"{max(found) + 1} shards needs all of them: copy the missing file(s) "
                        "from the download into this directory")
    return [found[i] for i in sorted(found)]


def vocabulary_rows(ckpt_dir: Path) -> int | None:
    """The vocabulary the checkpoint was trained with: the rows of its output layer (split by
    rows across shards), read from shard 0's index without its weights; None where shard 0
    has no 2-D output.weight (its checks say more)."""
    paths = find_shards(ckpt_dir)
    weight = load_shard(paths[0]).get("output.weight")
    return None if weight is None or weight.dim() != 2 else weight.shape[0] * len(paths)


def _shard_names(indices: list[int]) -> str:
    return ", ".join(f"consolidated.{i:02d}.pth" for i in indices)


def check_model_parallel_size(args: ModelArgs, mp_size: int, n_shards: int) -> None:
    """Fail early, naming both numbers, if the weights cannot be cut into mp_size whole slices."""
    parts = {"n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
             "FFN width": args.ffn_hidden_dim, "dim": args.dim, "vocab_size": args.vocab_size}
    bad = [f"{name} {value}" for name, value in parts.items() if value % mp_size]
    if bad:
        raise UserError(f"checkpoint has {n_shards} shard(s); model-parallel size {mp_size} does "
                        f"not divide {', '.join(bad)}: use a model-parallel size that divides them "
                        "(--model_parallel_size)")


@dataclass(frozen=True)
class Checkpoint:
    """Validated shards of one checkpoint, opened lazily with mmap."""

    shards: list[dict[str, torch.Tensor]]
    embedding_split_dim: int

    @classmethod
    def open(cls, ckpt_dir: Path, args: ModelArgs, vocab_parallel_if_unsplit: bool) -> Checkpoint:
        paths = find_shards(ckpt_dir)
        shards = [load_shard(p) for p in paths]
        n = len(paths)
        _check_no_last_shards_missing(ckpt_dir, paths[0], shards[0], args, n)
        if n == 1:
            embedding_dim = 0 if vocab_parallel_if_unsplit else 1
        else:
            embedding_dim = _embedding_split_dim(paths[0], shards[0], args, n)
        expected = full_shapes(args)
        for path, shard in zip(paths, shards):
            _check_shard(path, shard, expected, embedding_dim, n)
        return cls(shards, embedding_dim)

    def slices(self, mp_rank: int, mp_size: int) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, this rank's slice) for every weight, resharded from however many shards there
        are: CPU tensors in the file's dtype, one at a time, so that a caller may convert (or
        quantize) each before the next is read."""
        for key in self.shards[0]:
            if key in IGNORED_KEYS:
                continue
            dim = split_dim(key, self.embedding_split_dim)
            if dim is None:
                yield key, self.shards[0][key]
            else:
                yield key, _slice_across_shards([s[key] for s in self.shards], dim, mp_rank,
                                                mp_size)

    def state_dict_for(self, mp_rank: int, mp_size: int, device: torch.device,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """This rank's slice of every weight, on `device` in `dtype`."""
        return state_dict_from(self.slices(mp_rank, mp_size), device, dtype)


def state_dict_from(slices: Iterable[tuple[str, torch.Tensor]], device: torch.device,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {key: tensor.to(device=device, dtype=dtype) for key, tensor in slices}


def _slice_across_shards(pieces: list[torch.Tensor], dim: int, rank: int, size: int) -> torch.Tensor:
    """Rows [rank*L/size, (rank+1)*L/size) along `dim` of the concatenation of equal `pieces`,
    reading only the pieces that overlap it."""
    piece_len = pieces[0].shape[dim]
    total = piece_len * len(pieces)
    start, end = rank * total // size, (rank + 1) * total // size
    parts = []
    for i in range(start // piece_len, (end - 1) // piece_len + 1):
        lo, hi = max(start, i * piece_len), min(end, (i + 1) * piece_len)
        parts.append(pieces[i].narrow(dim, lo - i * piece_len, hi - lo))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def load_shard(path: Path, what: str = "a Meta consolidated shard") -> dict[str, torch.Tensor]:
    try:
        shard = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # unpickling refused, truncated file, not a zip archive...
        raise UserError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(shard, dict) or not all(isinstance(v, torch.Tensor) for v in shard.values()):
        raise UserError(f"{path}: expected a dict of tensors ({what})")
    return shard


def _check_no_last_shards_missing(ckpt_dir: Path, path: Path, shard: dict[str, torch.Tensor],
                                  args: ModelArgs, n: int) -> None:
    """Shards missing at the end leave no gap in the numbering, but every weight is a smaller
    slice than `n` shards give: name the count those slices belong to."""
    full = (args.vocab_size, args.dim)
    got = tuple(shard[EMBEDDING_KEY].shape) if EMBEDDING_KEY in shard else ()
    for dim in (0, 1):
        if len(got) != 2 or got[1 - dim] != full[1 - dim] or not 0 < got[dim] < full[dim]:
            continue
        k = full[dim] // got[dim]
        if k <= n or full[dim] % got[dim]:
            continue
        try:  # every weight a 1/k slice: the checkpoint has k shards
            _check_shard(path, shard, full_shapes(args), dim, k)
        except UserError:
            continue
        missing = list(range(n, k))
        raise UserError(f"{ckpt_dir}: {n} shard(s) found, but each weight in {path.name} is 1/{k} "
                        f"of its size in params.json ({EMBEDDING_KEY} {got} of {full}): the "
                        f"checkpoint seems to have {k} shards, and {_shard_names(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} missing; copy "
                        f"{'it' if len(missing) == 1 else 'them'} from the download into this "
                        "directory")


def _embedding_split_dim(path: Path, shard: dict[str, torch.Tensor], args: ModelArgs, n: int) -> int:
    shape = tuple(shard[EMBEDDING_KEY].shape) if EMBEDDING_KEY in shard else None
    if shape == (args.vocab_size // n, args.dim) and args.vocab_size % n == 0:
        return 0
    if shape == (args.vocab_size, args.dim // n) and args.dim % n == 0:
        return 1
    raise UserError(f"{path}: {EMBEDDING_KEY} has shape {shape}, which is neither a vocabulary nor an "
                    f"embedding split of ({args.vocab_size}, {args.dim}) over {n} shards; does "
                    "params.json belong to this checkpoint?")


def _check_shard(path: Path, shard: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                 embedding_dim: int, n: int) -> None:
    keys = set(shard) - IGNORED_KEYS
    missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
    if missing or unexpected:
        detail = "; ".join(part for part in (
            f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}" if missing else "",
            f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}"
            if unexpected else "") if part)
        raise UserError(f"{path}: keys do not match params.json ({detail}); does params.json "
                        "belong to this checkpoint?")
    for key, full in expected.items():
        dim = split_dim(key, embedding_dim)
        want = full if dim is None else full[:dim] + (full[dim] // n,) + full[dim + 1:]
        got = tuple(shard[key].shape)
        if got != want:
            raise UserError(f"{path}: {key} has shape {got}, expected {want} for a {n}-shard "
                            "checkpoint of this params.json; the shards disagree with each other "
                            "or with params.json")
